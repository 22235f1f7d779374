"""The sans-I/O protocol core, driven with plain values only."""

from __future__ import annotations

import contextlib
import itertools
import json
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from audiostream.audio import (
    OPUS_MAX_FRAME_BYTES,
    AudioFormat,
    Codec,
    Encoding,
    frame_opus_packets,
)
from audiostream.errors import AudioStreamError, AuthError, ErrorCode, ProtocolError
from audiostream.protocol import (
    INTERNAL,
    TABLE,
    TRANSITIONS,
    V1_1,
    AckMessage,
    AudioFrame,
    AudioOutcome,
    ChunkReceived,
    ClientProtocol,
    Close,
    Credit,
    DropNotice,
    ErrorMsg,
    Event,
    GoingAway,
    Keepalive,
    KeepaliveMessage,
    Limits,
    Notice,
    Rate,
    Ready,
    SendBytes,
    SendText,
    ServerProtocol,
    StartMessage,
    StartRequested,
    State,
    StopMessage,
    StopRequested,
    Summary,
    TokenRefresh,
    decode_server,
    encode_server,
    parse_client_message,
    plan_resume,
    start_json,
    state_table_markdown,
)

FMT = AudioFormat(Encoding.PCM_S16LE, 16000, 1)


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def texts(out: list[object]) -> list[dict[str, object]]:
    return [json.loads(o.text) for o in out if isinstance(o, SendText)]


def closes(out: list[object]) -> list[Close]:
    return [o for o in out if isinstance(o, Close)]


def started(clock: Clock | None = None) -> ServerProtocol:
    p = ServerProtocol(clock=clock or Clock())
    events = p.receive_text(start_json("as_x_y", FMT, ["passthrough"]))
    assert isinstance(events[0], StartRequested)
    p.accept("s1", FMT)
    p.data_to_send()
    return p


def test_start_then_ready() -> None:
    p = ServerProtocol()
    [ev] = p.receive_text(start_json("as_a_b", FMT, ["gain"], deadline_ms=300))
    assert isinstance(ev, StartRequested)
    assert ev.start.deadline_ms == 300 and ev.start.format == FMT
    assert p.state is State.STARTING
    p.accept("sid", FMT, pipeline=["gain"])
    [ready] = texts(p.data_to_send())
    assert ready["type"] == "ready" and ready["session_id"] == "sid"
    assert ready["max_frame_bytes"] == 32000


def test_binary_before_start_closes_4002() -> None:
    p = ServerProtocol()
    assert p.receive_bytes(b"\x00\x00") == []
    out = p.data_to_send()
    assert texts(out)[0]["code"] == ErrorCode.UNEXPECTED_MESSAGE
    assert closes(out)[0].code == 4002
    assert p.state is State.CLOSED


def test_invalid_json_before_start_closes_but_later_only_reports() -> None:
    p = ServerProtocol()
    p.receive_text("{nope")
    out = p.data_to_send()
    assert closes(out)[0].code == ErrorCode.INVALID_JSON
    q = started()
    q.receive_text("{nope")
    out = q.data_to_send()
    assert texts(out)[0]["code"] == ErrorCode.INVALID_JSON and not closes(out)
    assert q.state is State.STREAMING


def test_second_start_is_an_error_not_a_close() -> None:
    p = started()
    assert p.receive_text(start_json("as_x_y", FMT, ["passthrough"])) == []
    out = p.data_to_send()
    assert texts(out)[0]["code"] == ErrorCode.UNEXPECTED_MESSAGE and not closes(out)


def test_seq_is_implicit_and_outcomes_leave_in_order() -> None:
    p = started()
    seqs = [ev.seq for i in range(3) for ev in p.receive_bytes(bytes([i, 0]) * 160)
            if isinstance(ev, ChunkReceived)]
    assert seqs == [0, 1, 2]
    p.deliver_audio(2, b"c")
    p.deliver_audio(1, b"b")
    assert p.data_to_send() == []  # 0 is still missing
    p.deliver_notice(0, ErrorCode.EXPIRED, "late")
    out = p.data_to_send()
    assert json.loads(out[0].text)["seq"] == 0  # type: ignore[union-attr]
    assert [o.data for o in out if isinstance(o, SendBytes)] == [b"b", b"c"]


def test_audio_only_out_says_whether_the_outbox_holds_nothing_but_audio() -> None:
    """An adapter writes plain audio at once and leaves the rest (text, closes) to its
    writer, so the outbox must tell them apart without being drained."""
    p = started()
    p.receive_bytes(b"\x00\x00" * 160)
    p.receive_bytes(b"\x00\x00" * 160)
    p.deliver_audio(0, b"a")
    assert p.audio_only_out and p.has_output
    p.deliver_notice(1, ErrorCode.EXPIRED, "late")
    assert not p.audio_only_out
    assert [type(o) for o in p.data_to_send()] == [SendBytes, SendText]
    assert p.audio_only_out and not p.has_output  # empty: nothing but audio


def test_duplicate_outcomes_are_ignored() -> None:
    p = started()
    p.receive_bytes(b"\x00\x00" * 10)
    p.deliver_audio(0, b"x")
    p.deliver_audio(0, b"y")
    p.deliver_notice(0, ErrorCode.EXPIRED, "dup")
    out = p.data_to_send()
    assert out == [SendBytes(b"x", 0, 100.0)]


def test_odd_byte_count_gets_a_notice_and_session_continues() -> None:
    p = started()
    assert p.receive_bytes(b"\x00\x00\x00") == []
    [notice] = texts(p.data_to_send())
    assert notice == {**notice, "type": "notice", "seq": 0, "code": ErrorCode.INVALID_AUDIO}
    [ev] = p.receive_bytes(b"\x00\x00")
    assert isinstance(ev, ChunkReceived) and ev.seq == 1


def test_oversized_frame_gets_frame_too_large() -> None:
    p = started()
    p.receive_bytes(b"\x00" * (10 * 1024 * 1024))
    [notice] = texts(p.data_to_send())
    assert notice["code"] == ErrorCode.FRAME_TOO_LARGE and notice["seq"] == 0
    assert p.state is State.STREAMING


def test_stop_flushes_then_summary_and_1000() -> None:
    clock = Clock()
    p = started(clock)
    p.receive_bytes(b"\x01\x00" * 4)
    p.receive_bytes(b"\x01\x00" * 4)
    [ev] = p.receive_text('{"type":"stop"}')
    assert isinstance(ev, StopRequested)
    assert not closes(p.data_to_send())
    clock.now += 0.010
    p.deliver_audio(0, b"a")
    clock.now += 0.010
    p.deliver_notice(1, ErrorCode.OVERLOADED, "busy")
    out = p.data_to_send()
    summary = texts(out)[-1]
    assert summary["type"] == "summary"
    assert summary["chunks_in"] == 2 and summary["chunks_out"] == 1 and summary["dropped"] == 1
    assert summary["dropped_by_reason"] == {"overloaded": 1}
    assert summary["latency_ms"]["max"] == pytest.approx(10.0)  # type: ignore[index]
    assert closes(out) == [Close(1000, "done")]
    assert p.receive_bytes(b"\x00\x00") == []


def test_reject_closes_with_the_error_code() -> None:
    p = ServerProtocol()
    p.receive_text(start_json("as_x_y", FMT, ["gain"]))
    p.reject(AuthError("invalid API key"))
    out = p.data_to_send()
    assert texts(out)[0]["code"] == ErrorCode.AUTH_FAILED
    assert closes(out)[0].code == 4010


@pytest.mark.parametrize(
    ("message", "code"),
    [
        ({"type": "start", "api_key": "k", "format": {"sample_rate": 11025}, "pipeline": ["a"]},
         ErrorCode.UNSUPPORTED_FORMAT),
        ({"type": "start", "api_key": "k", "format": {"sample_rate": 16000, "encoding": "flac"},
          "pipeline": ["a"]}, ErrorCode.UNSUPPORTED_FORMAT),
        ({"type": "start", "format": {"sample_rate": 16000}, "pipeline": ["a"]},
         ErrorCode.AUTH_FAILED),
        ({"type": "start", "api_key": "k", "format": {"sample_rate": 16000}, "pipeline": []},
         ErrorCode.UNKNOWN_STEP),
        ({"type": "start", "version": 2, "api_key": "k", "format": {"sample_rate": 16000},
          "pipeline": ["a"]}, ErrorCode.UNSUPPORTED_VERSION),
        ({"type": "start", "api_key": "k", "format": {"sample_rate": 16000}, "pipeline": ["a"],
          "options": {"deadline_ms": 5}}, ErrorCode.INVALID_OPTION),
        ({"type": "dance"}, ErrorCode.UNEXPECTED_MESSAGE),
        ([1, 2], ErrorCode.PROTOCOL_ERROR),
    ],
)
def test_bad_start_messages_have_codes(message: object, code: ErrorCode) -> None:
    p = ServerProtocol()
    p.receive_text(json.dumps(message))
    out = p.data_to_send()
    assert texts(out)[0]["code"] == code
    assert closes(out)[0].code == code
    with pytest.raises(Exception) as info:
        parse_client_message(json.dumps(message))
    assert info.value.code == code  # type: ignore[attr-defined]


def test_transition_table_has_no_way_out_of_closed() -> None:
    assert not [k for k in TRANSITIONS if k[0] is State.CLOSED]


def test_client_core_numbers_outcomes_and_checks_order() -> None:
    c = ClientProtocol()
    c.next_seq()
    c.next_seq()
    assert c.receive_text('{"type":"ready","session_id":"s"}') is not None
    ev = c.receive_text('{"type":"notice","seq":0,"code":4030,"reason":"expired","message":"m"}')
    assert isinstance(ev, DropNotice) and ev.code == ErrorCode.EXPIRED
    out = c.receive_bytes(b"zz")
    assert out == AudioOutcome(1, b"zz")
    with pytest.raises(Exception, match="never sent"):
        c.receive_bytes(b"extra")


def test_client_core_rejects_out_of_order_notice() -> None:
    c = ClientProtocol()
    c.next_seq()
    c.next_seq()
    with pytest.raises(Exception, match="expected 0"):
        c.receive_text('{"type":"notice","seq":1,"code":4030,"reason":"expired","message":""}')


def test_latency_memory_is_bounded_for_long_sessions() -> None:
    from audiostream.protocol import LATENCY_WINDOW

    clock = Clock()
    p = started(clock)
    total = 2 * LATENCY_WINDOW + 500
    for seq in range(total):
        p.receive_bytes(b"\x00\x00")
        clock.now += 0.001 if seq < total - LATENCY_WINDOW else 0.002
        p.deliver_audio(seq, b"a")
        p.data_to_send()
    assert p.measured == total
    assert LATENCY_WINDOW <= len(p.latencies_ms) <= 2 * LATENCY_WINDOW
    # The summary reflects the recent chunks (2 ms), not the early ones (1 ms).
    assert p.summary()["latency_ms"]["p99"] == pytest.approx(2.0)


# --- typed server messages ------------------------------------------------------------

ALL_MESSAGES = [
    Ready("s", 640, pipeline=("gain",), deadline_ms=500, token="t", resume_window_s=60.0),
    Ready("s", 640, version=V1_1, resume_from=7, credit=71, rate=None),
    Ready("s", 640, rate=Rate(120.0, 60.0)),
    Ready("s", 640, pipeline=("denoise",), delay_frames=319),
    Notice(3, 1, ErrorCode.EXPIRED, "late"),
    Notice(3, 9, ErrorCode.CREDIT_EXCEEDED, "beyond"),
    Event(4, {"step": "vad", "name": "speech_start", "offset": 12}),
    ErrorMsg(ErrorCode.AUTH_FAILED, "no", False),
    ErrorMsg(ErrorCode.OVERLOADED, "busy", True, seq=5),
    Summary("s", 3, 2, 1, {"expired": 1}, {"p50": 1.0, "p90": 1.0, "p99": 1.0, "max": 1.0}),
    GoingAway("draining", "tok"),
    Credit(128),
    TokenRefresh("tok2"),
    Keepalive(),
]


@pytest.mark.parametrize("msg", ALL_MESSAGES, ids=lambda m: type(m).__name__)
def test_every_server_message_survives_encode_decode(msg: object) -> None:
    assert decode_server(encode_server(msg)) == msg  # type: ignore[arg-type]


def test_ready_delay_frames_is_optional_both_ways() -> None:
    """Older gateways leave it out (None), older clients ignore it."""
    assert decode_server('{"type":"ready","session_id":"s","max_frame_bytes":640}'
                         ).delay_frames is None  # type: ignore[union-attr]
    text = encode_server(Ready("s", 640, delay_frames=0))
    assert '"delay_frames":0' in text and decode_server(text) == Ready("s", 640, delay_frames=0)


def test_v1_wire_json_is_unchanged() -> None:
    """What v1 clients parse stays byte-for-byte what the v1 gateway sent."""
    assert encode_server(Notice(17, 1, ErrorCode.EXPIRED, "m")) == (
        '{"type":"notice","seq":17,"code":4030,"reason":"expired","message":"m"}')
    assert encode_server(Ready("9a", 32000, pipeline=("highpass",), deadline_ms=500)) == (
        '{"type":"ready","version":1,"session_id":"9a","max_frame_bytes":32000,'
        '"pipeline":["highpass"],"deadline_ms":500}')
    assert encode_server(ErrorMsg(ErrorCode.AUTH_FAILED, "invalid API key", False)) == (
        '{"type":"error","code":4010,"name":"auth_failed","message":"invalid API key",'
        '"retryable":false}')


@settings(max_examples=2000, deadline=None)
@given(st.text(max_size=80) | st.builds(
    lambda t, d: json.dumps({"type": t, **d}),
    st.sampled_from(["ready", "notice", "event", "error", "summary", "credit", "token",
                     "going_away", "keepalive", "x"]),
    st.dictionaries(st.sampled_from(["seq", "count", "code", "session_id", "credit",
                                     "token", "chunks_in", "rate", "resumed"]),
                    st.none() | st.integers() | st.text(max_size=3) | st.booleans(),
                    max_size=4)))
def test_decode_server_raises_protocol_error_only(text: str) -> None:
    with contextlib.suppress(ProtocolError):
        decode_server(text)


# --- the table ----------------------------------------------------------------------


def test_table_covers_every_state_and_message() -> None:
    kinds = {StartMessage, AudioFrame, StopMessage, AckMessage, KeepaliveMessage}
    assert set(TABLE) == {(s, k) for s in State for k in kinds}
    assert not [k for k in INTERNAL if k[0] is State.CLOSED]


def test_docs_state_table_is_the_generated_one() -> None:
    doc = (Path(__file__).parents[1] / "docs" / "protocol.md").read_text()
    assert state_table_markdown() in doc


# --- v1.1 credit, aggregation, flooding ------------------------------------------------


def started11(clock: Clock, **limits: object) -> ServerProtocol:
    p = ServerProtocol(clock=clock, limits=Limits(**limits))  # type: ignore[arg-type]
    p.receive_text(start_json("as_x_y", FMT, ["passthrough"], version=V1_1))
    p.accept("s1", FMT)
    return p


def write_all(p: ServerProtocol) -> list[object]:
    out = p.data_to_send()
    for o in out:
        p.written(o.nbytes)
    return out


def test_v11_ready_grants_credit_and_v1_ready_advertises_the_rate() -> None:
    p = started11(Clock(), chunk_rate=120.0)
    [ready] = texts(write_all(p))
    assert ready["version"] == 1.1 and ready["credit"] == 64 and "rate" not in ready
    q = ServerProtocol(clock=Clock(), limits=Limits(chunk_rate=120.0, chunk_burst=60))
    q.receive_text(start_json("as_x_y", FMT, ["passthrough"]))
    q.accept("s2", FMT)
    [ready] = texts(q.data_to_send())
    assert ready["version"] == 1 and ready["rate"] == {"chunks_per_s": 120.0, "burst": 60.0}
    assert "credit" not in ready


def test_credit_rises_as_outcomes_are_written_not_when_queued() -> None:
    p = started11(Clock(), credit_window=8)
    write_all(p)
    for seq in range(8):
        [ev] = p.receive_bytes(b"\x00\x00")
        p.deliver_audio(ev.seq, b"a")  # type: ignore[union-attr]
        assert seq == ev.seq  # type: ignore[union-attr]
    out = p.data_to_send()
    assert not [t for t in texts(out) if t["type"] == "credit"]  # queued, not written
    for o in out:
        p.written(o.nbytes)
    credit = [t for t in texts(p.data_to_send()) if t["type"] == "credit"]
    assert credit[-1]["credit"] == 16 and p.credit == 16


def test_chunks_answered_one_by_one_get_credit_only_every_quarter_window() -> None:
    """At idle each chunk is answered before the next is sent; a grant per answer
    would double the messages to the client. Credit rises in quarter-window steps
    only, and the client never runs out of it."""
    p = started11(Clock(), credit_window=64)
    write_all(p)
    grants: list[tuple[int, int]] = []  # (chunks answered so far, new credit)
    for seq in range(256):
        assert seq < p.credit  # the client always has credit for its next chunk
        [ev] = p.receive_bytes(b"\x00\x00")
        p.deliver_audio(ev.seq, b"a")  # type: ignore[union-attr]
        grants += [(seq + 1, t["credit"]) for t in texts(write_all(p))
                   if t["type"] == "credit"]
    # The write of the 16th answer queues the grant; it leaves with the next output.
    assert grants[:3] == [(17, 80), (33, 96), (49, 112)]
    assert len(grants) == 256 // 16 - 1
    credits = [c for _, c in grants]
    assert all(b - a == 16 for a, b in itertools.pairwise(credits))


def test_a_grant_queued_by_the_last_write_is_announced_by_has_output() -> None:
    """The adapter's only cue to write the grant that ``written`` queued itself: without
    it a client that spent its credit would wait for an unrelated event."""
    p = started11(Clock(), credit_window=8)
    write_all(p)
    assert not p.has_output
    for _ in range(8):
        [ev] = p.receive_bytes(b"\x00\x00")
        p.deliver_audio(ev.seq, b"a")  # type: ignore[union-attr]
    assert p.has_output
    write_all(p)  # the last write grants 16
    assert p.has_output
    assert [t["credit"] for t in texts(p.data_to_send()) if t["type"] == "credit"][-1] == 16
    assert not p.has_output


def test_a_replay_larger_than_the_hard_cap_does_not_close_the_connection() -> None:
    """A resume's replay is bounded by the journal; counted against the outbound caps
    it would close the resumed connection 4023 at once."""
    clock = Clock()
    p = ServerProtocol(clock=clock, limits=Limits(max_outbound_bytes=1000))
    p.receive_text(start_json("as_x_y", FMT, ["passthrough"]))
    p.accept("s1", FMT, resume_from=10, delivered=0)
    with p.replaying():
        for seq in range(10):
            p.deliver_audio(seq, b"r" * 1000)  # 10,000 bytes: over the hard cap of 4,000
    assert p.close_code is None and p.next_deadline() == clock() + 60  # only idle
    [ev] = p.receive_bytes(b"\x00\x00" * 750)
    p.deliver_audio(ev.seq, b"n" * 1500)  # type: ignore[union-attr]
    assert p.close_code is None and p.next_deadline() == clock() + 10  # soft cap: grace
    [ev] = p.receive_bytes(b"\x00\x00" * 1500)
    p.deliver_audio(ev.seq, b"n" * 3000)  # type: ignore[union-attr]  # over 4 x 1000
    assert p.close_code == ErrorCode.SLOW_CONSUMER


def test_chunks_beyond_credit_get_one_aggregated_notice() -> None:
    p = started11(Clock(), credit_window=4)
    write_all(p)
    events = [ev for _ in range(10) for ev in p.receive_bytes(b"\x00\x00")]
    assert [e.seq for e in events] == [0, 1, 2, 3]  # type: ignore[union-attr]
    for e in events:
        p.deliver_audio(e.seq, b"a")  # type: ignore[union-attr]
    notices = [t for t in texts(p.data_to_send()) if t["type"] == "notice"]
    assert notices == [{"type": "notice", "seq": 4, "count": 6, "code": 4024,
                        "reason": "credit_exceeded",
                        "message": "sent beyond the granted credit (4)"}]


def test_a_v11_client_is_not_rate_limited_but_a_flooder_is_closed_4025() -> None:
    clock = Clock()
    p = started11(clock, chunk_rate=10.0, chunk_burst=2, credit_window=1000,
                  credit_bytes=1 << 40, flood_burst=5, flood_rate=1)
    for _ in range(100):  # within credit: no bucket for v1.1
        assert p.receive_bytes(b"\x00\x00")
    q = started11(clock, credit_window=2, flood_burst=5, flood_rate=1)
    for _ in range(2 + 6):
        q.receive_bytes(b"\x00\x00")
    assert closes(q.data_to_send()) == [Close(4025, "flooding")]


def test_v1_over_the_rate_limit_gets_one_notice_per_chunk() -> None:
    clock = Clock()
    p = ServerProtocol(clock=clock, limits=Limits(chunk_rate=10.0, chunk_burst=1))
    p.receive_text(start_json("as_x_y", FMT, ["passthrough"]))
    p.accept("s", FMT)
    p.data_to_send()
    p.receive_bytes(b"\x00\x00")
    p.deliver_audio(0, b"a")
    p.receive_bytes(b"\x00\x00")
    p.receive_bytes(b"\x00\x00")
    notices = [t for t in texts(p.data_to_send()) if t["type"] == "notice"]
    assert [(n["seq"], n["code"], "count" in n) for n in notices] == [
        (1, 4020, False), (2, 4020, False)]


# --- outbound accounting and deadlines --------------------------------------------------


def test_unwritten_bytes_over_the_cap_for_the_grace_close_4023() -> None:
    clock = Clock()
    p = ServerProtocol(clock=clock, limits=Limits(max_outbound_bytes=1000,
                                                  slow_consumer_grace_s=2.0))
    p.receive_text(start_json("as_x_y", FMT, ["passthrough"]))
    p.accept("s", FMT)
    for seq in range(4):
        p.receive_bytes(b"\x00\x00" * 200)
        p.deliver_audio(seq, b"\x00" * 400)
    out = p.data_to_send()  # handed to the adapter, never written
    assert p.unwritten_bytes > 1000
    due = p.next_deadline()
    assert due == pytest.approx(clock.now + 2.0)
    p.poll(clock.now + 1.9)
    assert p.state is State.STREAMING
    p.poll(clock.now + 2.0)
    assert closes(p.data_to_send()) == [Close(4023, "slow_consumer")]
    # Writing in time stops the clock.
    q = ServerProtocol(clock=clock, limits=Limits(max_outbound_bytes=1000,
                                                  slow_consumer_grace_s=2.0))
    q.receive_text(start_json("as_x_y", FMT, ["passthrough"]))
    q.accept("s", FMT)
    for seq in range(4):
        q.receive_bytes(b"\x00\x00" * 200)
        q.deliver_audio(seq, b"\x00" * 400)
    write_all(q)
    assert q.unwritten_bytes == 0 and q.delivered == 4
    q.poll(clock.now + 5)
    assert q.state is State.STREAMING
    assert len(out) == 5


def test_keepalives_do_not_extend_the_auth_deadline() -> None:
    clock = Clock()
    p = ServerProtocol(clock=clock, limits=Limits(auth_timeout_s=10))
    assert p.next_deadline() == 110.0
    for _ in range(50):
        clock.now += 0.19
        p.receive_text('{"type":"keepalive"}')
    assert p.next_deadline() == 110.0
    p.poll(110.0)
    assert closes(p.data_to_send()) == [Close(4011, "auth_timeout")]


def test_idle_timeout_counts_frames_only() -> None:
    clock = Clock()
    p = ServerProtocol(clock=clock, limits=Limits(idle_timeout_s=5))
    p.receive_text(start_json("as_x_y", FMT, ["passthrough"]))
    p.accept("s", FMT)
    clock.now += 3
    p.receive_text('{"type":"keepalive"}')
    assert p.next_deadline() == clock.now + 5
    p.poll(clock.now + 5)
    assert closes(p.data_to_send())[-1].code == ErrorCode.IDLE_TIMEOUT


def test_the_idle_clock_stops_while_the_gateway_does_not_read() -> None:
    """Back-pressure is the gateway's silence, not the client's: no idle timeout for it."""
    clock = Clock()
    p = ServerProtocol(clock=clock, limits=Limits(idle_timeout_s=5))
    p.receive_text(start_json("as_x_y", FMT, ["passthrough"]))
    p.accept("s", FMT)
    p.pause_reading()
    assert p.next_deadline() is None
    clock.now += 60
    p.poll(clock.now)
    assert p.state is State.STREAMING
    p.resume_reading()
    assert p.next_deadline() == clock.now + 5
    p.poll(clock.now + 4.9)
    assert p.state is State.STREAMING
    p.poll(clock.now + 5)
    assert closes(p.data_to_send())[-1].code == ErrorCode.IDLE_TIMEOUT


def test_text_frames_are_capped_before_and_after_start() -> None:
    p = ServerProtocol()
    p.receive_text('{"type":"keepalive","x":"' + "a" * 9000 + '"}')
    out = p.data_to_send()
    assert closes(out)[0].code == ErrorCode.FRAME_TOO_LARGE
    q = started()
    q.receive_text('{"type":"keepalive","x":"' + "a" * 9000 + '"}')  # fine after start
    assert not closes(q.data_to_send())
    q.receive_text('{"type":"ack","x":"' + "a" * 70_000 + '"}')
    assert closes(q.data_to_send())[0].code == ErrorCode.FRAME_TOO_LARGE


def test_parse_errors_do_not_leak_python_internals() -> None:
    p = ServerProtocol()
    p.receive_text("{nope")
    [err] = texts(p.data_to_send())
    assert err["message"] == "a text frame is not valid JSON"


def test_every_audio_outcome_carries_its_seq_and_receive_time() -> None:
    clock = Clock()
    p = started(clock)
    p.receive_bytes(b"\x00\x00")
    clock.now += 1
    p.receive_bytes(b"\x00\x00")
    p.deliver_audio(1, b"b")
    p.deliver_audio(0, b"a")
    assert p.data_to_send() == [SendBytes(b"a", 0, 100.0), SendBytes(b"b", 1, 101.0)]


def test_finished_only_once_the_summary_is_written() -> None:
    p = ServerProtocol(clock=Clock())
    p.receive_text(start_json("as_x_y", FMT, ["passthrough"]))
    p.accept("s1", FMT)
    write_all(p)
    p.receive_bytes(b"\x00\x00")
    p.receive_text('{"type":"stop"}')
    p.deliver_audio(0, b"a")
    out = p.data_to_send()
    assert p.state is State.CLOSED and not p.finished
    p.written(out[0].nbytes)
    assert not p.finished
    for o in out[1:]:
        p.written(o.nbytes)
    assert p.finished


# --- resume ----------------------------------------------------------------------------


def test_plan_resume_replays_the_journal_and_expires_the_gaps() -> None:
    plan = plan_resume([range(0, 4), range(6, 10)], received=2)
    assert plan.resume_from == 10 and plan.delivered == 2
    assert plan.replay == (2, 3, 6, 7, 8, 9) and plan.expired == (4, 5)


def test_plan_resume_refuses_more_than_was_answered() -> None:
    with pytest.raises(ProtocolError) as info:
        plan_resume([range(0, 5)], received=10**9)
    assert info.value.code is ErrorCode.RESUME_FAILED
    with pytest.raises(ProtocolError):
        plan_resume([range(0, 5)], received=8, answered=5)
    # Outcomes the gateway answered itself (no reply in the journal) are allowed.
    assert plan_resume([range(0, 5)], received=8, answered=9).resume_from == 8


def test_unwritten_bytes_far_over_the_cap_close_without_waiting_for_the_grace() -> None:
    clock = Clock()
    p = ServerProtocol(clock=clock, limits=Limits(max_outbound_bytes=1000,
                                                  slow_consumer_grace_s=60.0))
    p.receive_text(start_json("as_x_y", FMT, ["passthrough"]))
    p.accept("s", FMT)
    for seq in range(12):
        p.receive_bytes(b"\x00\x00" * 200)
        p.deliver_audio(seq, b"\x00" * 400)
    out = p.data_to_send()
    assert closes(out) == [Close(4023, "slow_consumer")]
    assert sum(o.nbytes for o in out if isinstance(o, SendBytes)) <= 4000


# --- format.encoding "opus": frames of length-prefixed Opus packets ---------------------

#: TOC bytes: CELT fullband 20 ms (config 31, code 0) and SILK wideband 60 ms (config 11).
CELT_20MS = bytes([31 << 3, 0xAA, 0xBB])
SILK_60MS = bytes([11 << 3, 0x01])


def started_opus(rate: int = 16000) -> ServerProtocol:
    p = ServerProtocol(clock=Clock())
    fmt = AudioFormat.pcm16(rate)
    [ev] = p.receive_text(start_json("as_x_y", fmt, ["passthrough"], codec=Codec.OPUS))
    assert isinstance(ev, StartRequested) and ev.start.codec is Codec.OPUS
    assert ev.start.format == fmt  # what the pipeline sees: PCM at the session's rate
    p.accept("s1", fmt)
    assert texts(p.data_to_send())[0]["max_frame_bytes"] == OPUS_MAX_FRAME_BYTES
    return p


def test_opus_start_on_the_wire_and_rates() -> None:
    msg = json.loads(start_json("k", FMT, ["passthrough"], codec=Codec.OPUS))
    assert msg["format"] == {"encoding": "opus", "sample_rate": 16000, "channels": 1}
    with pytest.raises(AudioStreamError) as err:  # libopus has no 44.1 kHz
        parse_client_message(start_json("k", AudioFormat.pcm16(44100), ["passthrough"],
                                        codec=Codec.OPUS))
    assert err.value.code is ErrorCode.UNSUPPORTED_FORMAT


def test_opus_frames_are_numbered_and_bad_framing_is_a_notice() -> None:
    p = started_opus()
    good = frame_opus_packets([CELT_20MS, SILK_60MS])
    [ev] = p.receive_bytes(good)
    assert isinstance(ev, ChunkReceived) and ev.seq == 0 and ev.data == good
    p.deliver_audio(0, bytes(2 * 1280))  # 80 ms decoded
    assert isinstance(p.data_to_send()[0], SendBytes)
    # a prefix longer than what follows: a notice for seq 1, and the session goes on
    assert p.receive_bytes(b"\x00\x09" + CELT_20MS) == []
    [notice] = texts(p.data_to_send())
    assert notice["seq"] == 1 and notice["code"] == ErrorCode.INVALID_AUDIO
    [ev] = p.receive_bytes(good)
    assert isinstance(ev, ChunkReceived) and ev.seq == 2 and p.state is State.STREAMING


def test_an_opus_frame_over_a_second_is_frame_too_large() -> None:
    p = started_opus()
    assert p.receive_bytes(frame_opus_packets([SILK_60MS] * 17)) == []  # 1020 ms
    [notice] = texts(p.data_to_send())
    assert notice["code"] == ErrorCode.FRAME_TOO_LARGE and "1020 ms" in notice["message"]
    [ev] = p.receive_bytes(frame_opus_packets([SILK_60MS] * 16))  # 960 ms
    assert isinstance(ev, ChunkReceived)
    # 51 packets of 2.5 ms: short, but more packets than a frame may hold
    p.deliver_audio(1, bytes(2 * 15360))
    p.data_to_send()
    tiny = bytes([16 << 3, 0])
    assert p.receive_bytes(frame_opus_packets([tiny] * 51)) == []
    [notice] = texts(p.data_to_send())
    assert notice["code"] == ErrorCode.FRAME_TOO_LARGE and "50 Opus packets" in notice["message"]
    [ev] = p.receive_bytes(frame_opus_packets([tiny] * 50))
    assert isinstance(ev, ChunkReceived)
