"""The sans-I/O protocol core, driven with plain values only."""

from __future__ import annotations

import json

import pytest

from audiostream.audio import AudioFormat, Encoding
from audiostream.errors import AuthError, ErrorCode
from audiostream.protocol import (
    TRANSITIONS,
    AudioOutcome,
    ChunkReceived,
    ClientProtocol,
    Close,
    DropNotice,
    SendBytes,
    SendText,
    ServerProtocol,
    StartRequested,
    State,
    StopRequested,
    parse_client_message,
    start_json,
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
