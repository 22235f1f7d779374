"""The sans-I/O telephony core with plain values: parsing, order, pacing, marks, clear."""

from __future__ import annotations

import base64
import json

import pytest

from audiostream.audio import Encoding
from audiostream.errors import ErrorCode, ProtocolError
from audiostream.telephony import (
    ASTERISK_MAX_MESSAGE,
    DIALECTS,
    CallSession,
    CallStarted,
    ClearIn,
    Dialect,
    DtmfIn,
    FlowOff,
    FlowOn,
    MarkIn,
    MediaIn,
    Pacer,
    Reorder,
    parse_asterisk_text,
    parse_json_message,
    split_message,
)

TW = DIALECTS[Dialect.TWILIO]


def media(chunk: int, payload: bytes = b"\xff" * 160) -> MediaIn:
    return MediaIn(chunk, payload)


def live(dialect: Dialect = Dialect.TWILIO) -> CallSession:
    s = CallSession(DIALECTS[dialect])
    s.started(CallStarted("MZ1", "CA1", {}, DIALECTS[dialect].wire_format))
    return s


def test_parse_twilio_start_and_media() -> None:
    start = parse_json_message(TW, json.dumps({
        "event": "start", "sequenceNumber": "1", "streamSid": "MZ1",
        "start": {"streamSid": "MZ1", "callSid": "CA9", "customParameters": {"api_key": "k"},
                  "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000,
                                  "channels": 1}}}))
    assert isinstance(start, CallStarted)
    assert (start.stream_id, start.call_id, dict(start.params)) == ("MZ1", "CA9", {"api_key": "k"})
    assert start.format.encoding is Encoding.MULAW
    m = parse_json_message(TW, json.dumps({
        "event": "media", "sequenceNumber": "3", "streamSid": "MZ1",
        "media": {"track": "inbound", "chunk": "2", "timestamp": "20",
                  "payload": base64.b64encode(b"\x01\x02").decode()}}))
    assert m == MediaIn(2, b"\x01\x02", 20)
    assert parse_json_message(TW, '{"event":"mark","mark":{"name":"x"}}') == MarkIn("x")
    assert parse_json_message(TW, '{"event":"dtmf","dtmf":{"digit":"5"}}') == DtmfIn("5")
    assert parse_json_message(TW, '{"event":"clear"}') == ClearIn()


@pytest.mark.parametrize("text, code", [
    ("nope", ErrorCode.INVALID_JSON),
    ('{"no":"event"}', ErrorCode.PROTOCOL_ERROR),
    ('{"event":"media","media":{"payload":"***"}}', ErrorCode.INVALID_AUDIO),
    ('{"event":"start","start":{}}', ErrorCode.PROTOCOL_ERROR),
    ('{"event":"start","streamSid":"s","start":{"mediaFormat":{"encoding":"audio/opus"}}}',
     ErrorCode.UNSUPPORTED_FORMAT),
])
def test_bad_messages_get_clear_codes(text: str, code: ErrorCode) -> None:
    with pytest.raises(ProtocolError) as exc:
        parse_json_message(TW, text)
    assert exc.value.code is code


def test_asterisk_plain_and_json_control() -> None:
    ev = parse_asterisk_text("MEDIA_START connection_id:c1 channel:WebSocket/c1/0x1 "
                             "format:slin16 optimal_frame_size:640 ptime:20")
    assert isinstance(ev, CallStarted) and ev.format.sample_rate == 16000
    assert ev.optimal_frame_bytes == 640
    ev = parse_asterisk_text(json.dumps({"event": "MEDIA_START", "connection_id": "c",
                                         "channel_id": "1.1", "format": "ulaw"}))
    assert isinstance(ev, CallStarted) and ev.call_id == "1.1"
    assert parse_asterisk_text("MEDIA_XOFF") == FlowOff()
    assert parse_asterisk_text('{"event":"MEDIA_XON","channel_id":"1"}') == FlowOn()
    with pytest.raises(ProtocolError):
        parse_asterisk_text("MEDIA_START format:g729")


def test_reorder_window_and_gaps() -> None:
    r = Reorder(window=3)
    assert r.push(media(2)) == []
    assert [m.chunk for m in r.push(media(1))] == [1, 2]
    assert r.push(media(4)) == [] and r.push(media(5)) == [] and r.push(media(6)) == []
    # A fourth frame past the gap: chunk 3 is given up.
    assert [m.chunk for m in r.push(media(7))] == [4, 5, 6, 7]
    assert r.skipped == 1
    assert r.push(media(3)) == [] and r.late == 1


def test_pacer_never_runs_ahead_of_real_time() -> None:
    p = Pacer(lead_s=0.1)
    now = 0.0
    sent = 0
    while p.may_send(now):
        p.sent(0.02, now)
        sent += 1
    assert sent == 5  # 100 ms of lead
    assert p.due_at() == pytest.approx(0.0)
    assert not p.may_send(0.0) and p.may_send(0.021)
    # After an underrun the budget restarts from now, not from the past.
    p.sent(0.02, 10.0)
    assert p.buffered(10.0) == pytest.approx(0.02)


def test_one_frame_out_per_frame_in_and_drops_are_marks() -> None:
    s = live()
    subs = [s.media(media(i + 1, bytes([i]) * 160))[0] for i in range(4)]
    assert [x.seq for x in subs] == [0, 1, 2, 3]
    s.outcome(1, None, "expired", "late")  # out of order: held until 0 arrives
    assert s.take(0.0) == []
    s.outcome(0, b"a" * 160)
    s.outcome(2, b"c" * 160)
    s.outcome(3, b"d" * 160)
    out = [json.loads(o) for o in s.take(0.0)]
    assert [o["event"] for o in out] == ["media", "mark", "media", "media"]
    assert out[1]["mark"]["name"] == "audiostream:drop:1:expired"
    assert all(o["streamSid"] == "MZ1" for o in out)
    assert s.stats.dropped == {"expired": 1} and s.pending == 0


def test_marks_follow_their_audio_and_echoes_are_consumed() -> None:
    s = live()
    s.media(media(1))
    s.mark(MarkIn("m0"))
    s.media(media(2))
    s.outcome(0, b"x" * 160)
    s.outcome(1, b"y" * 160)
    out = [json.loads(o) for o in s.take(0.0)]
    assert [o.get("mark", {}).get("name", "audio") for o in out] == ["audio", "m0", "audio"]
    s.mark(MarkIn("m0"))  # Twilio's echo once played: not passed on again
    assert s.take(1.0) == [] and s.stats.marks_played == 1


def test_clear_drops_queued_and_in_flight_frames() -> None:
    drops = []
    s = CallSession(TW, on_drop=drops.append)
    s.started(CallStarted("MZ1", "", {}, TW.wire_format))
    for i in range(10):
        s.media(media(i + 1))
    for i in range(6):
        s.outcome(i, b"z" * 160)
    first = s.take(0.0)  # 5 frames fit in the 100 ms lead
    assert len(first) == 5
    out = [json.loads(o) for o in s.clear(0.0)]
    assert out[0] == {"event": "clear", "streamSid": "MZ1"}
    assert out[1]["mark"]["name"] == "audiostream:cleared:5-9"
    assert [d.seq for d in drops] == [5, 6, 7, 8, 9]
    s.outcome(7, b"late" * 40)  # answered after the clear: already dropped
    assert s.take(5.0) == [] and s.pending == 0


def test_exotel_batches_3200_bytes_in_320_byte_multiples() -> None:
    s = live(Dialect.EXOTEL)
    for i in range(12):
        s.media(media(i + 1, b"\x00\x01" * 160))
        s.outcome(i, b"\x00\x01" * 160)
    sizes = [len(base64.b64decode(json.loads(o)["media"]["payload"])) for o in s.take(0.0)]
    assert sizes == [3200]  # the rest waits for 3.2 KB or the end of the call
    s.stop()
    sizes = [len(base64.b64decode(json.loads(o)["media"]["payload"])) for o in s.take(1.0)]
    assert sizes == [640]


def test_asterisk_flow_control_and_message_limit() -> None:
    s = live(Dialect.ASTERISK)
    s.audio(b"\xff" * 160)
    s.outcome(0, b"\xff" * 160)
    s.flow(False)
    assert s.take(0.0) == [] and s.due_at(0.0) is None
    s.flow(True)
    assert s.take(0.0) == [b"\xff" * 160]
    assert [len(p) for p in split_message(b"\x00" * 100_000, ASTERISK_MAX_MESSAGE, 2)] == \
        [65_500, 34_500]


def test_media_before_start_is_refused() -> None:
    s = CallSession(TW)
    with pytest.raises(ProtocolError) as exc:
        s.media(media(1))
    assert exc.value.code is ErrorCode.UNEXPECTED_MESSAGE
    s.started(CallStarted("MZ1", "", {}, TW.wire_format))
    with pytest.raises(ProtocolError) as exc:
        s.media(media(1, b""))
    assert exc.value.code is ErrorCode.INVALID_AUDIO


def test_backlog_over_max_behind_drops_oldest_with_one_mark() -> None:
    drops = []
    s = CallSession(TW, on_drop=drops.append)
    s.started(CallStarted("MZ1", "", {}, TW.wire_format))
    for i in range(30):  # 600 ms of processed audio at once
        s.media(media(i + 1))
        s.outcome(i, bytes([i]) * 160)
    out = [json.loads(o) for o in s.take(0.0)]
    # 100 ms goes out at once; of the rest at most 300 ms (15 frames) may wait here,
    # so the 10 oldest of those are dropped.
    assert [base64.b64decode(o["media"]["payload"])[0] for o in out[:5]] == [0, 1, 2, 3, 4]
    assert out[5]["mark"]["name"] == "audiostream:drop:5-14:behind"
    assert [d.seq for d in drops] == list(range(5, 15))
    nxt = [json.loads(o) for o in s.take(0.02)]
    assert [base64.b64decode(o["media"]["payload"])[0] for o in nxt] == [15]


def test_exotel_tail_waits_for_every_outcome_after_stop() -> None:
    s = live(Dialect.EXOTEL)
    for i in range(3):
        s.media(media(i + 1, b"\x00\x01" * 160))
    s.outcome(0, b"\x00\x01" * 160)
    s.outcome(1, b"\x00\x01" * 160)
    s.stop()
    assert s.take(0.0) == [] and s.due_at(0.0) is None  # frame 2 is still coming
    s.outcome(2, b"\x00\x01" * 160)
    sizes = [len(base64.b64decode(json.loads(o)["media"]["payload"])) for o in s.take(0.0)]
    assert sizes == [960] and s.finished
