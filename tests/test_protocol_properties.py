"""Property-based tests of the sans-I/O protocol core: thousands of frame sequences.

Whatever a client sends, the core never raises, only emits well-formed messages, and
keeps its promise: one outcome per accepted chunk, in seq order, nothing after close.
"""

from __future__ import annotations

import json
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from audiostream.audio import AudioFormat, Encoding
from audiostream.errors import AuthError, ErrorCode
from audiostream.protocol import (
    V1_1,
    AckReceived,
    ChunkReceived,
    Close,
    Limits,
    SendBytes,
    SendText,
    ServerProtocol,
    StartRequested,
    start_json,
)

FMT = AudioFormat(Encoding.PCM_S16LE, 16000, 1)
VALID_CLOSE = {1000, 1001} | {int(c) for c in ErrorCode}

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner,
                                                                 max_size=3),
    max_leaves=8,
)
control = st.one_of(
    st.just(start_json("as_k_s", FMT, ["passthrough"])),
    st.just(start_json("as_k_s", FMT, ["passthrough"], version=V1_1)),
    st.just('{"type":"stop"}'),
    st.just('{"type":"keepalive"}'),
    st.integers(-3, 50).map(lambda n: json.dumps({"type": "ack", "received": n})),
    st.builds(
        lambda t, extra: json.dumps({"type": t, **extra}),
        st.sampled_from(["start", "stop", "ack", "keepalive", "bogus", ""]),
        st.dictionaries(st.sampled_from(["api_key", "format", "pipeline", "options", "version",
                                         "resume", "received"]), json_values, max_size=4),
    ),
    json_values.map(json.dumps),
    st.text(max_size=40),
)
audio = st.one_of(
    st.binary(min_size=0, max_size=700),
    st.integers(1, 40).map(lambda n: b"\x01\x00" * n),
    st.just(b"\x00" * 40_000),  # over the 1000 ms limit at 16 kHz s16
)
frames = st.lists(st.one_of(control.map(lambda t: ("text", t)), audio.map(lambda b: ("bin", b))),
                  max_size=25)
# What the pipeline does with outstanding chunks after each frame: answer some, in any order.
decisions = st.lists(st.tuples(st.integers(0, 5), st.booleans()), max_size=25)


def drive(seq: list[tuple[str, Any]], choices: list[tuple[int, bool]], accept: bool
          ) -> tuple[ServerProtocol, list[Any]]:
    p = ServerProtocol(limits=Limits(chunk_rate=100, chunk_burst=5))
    outstanding: list[int] = []
    out: list[Any] = []
    for i, (kind, data) in enumerate(seq):
        events = p.receive_text(data) if kind == "text" else p.receive_bytes(data)
        for ev in events:
            if isinstance(ev, StartRequested):
                if accept:
                    p.accept("sid", FMT)
                else:
                    p.reject(AuthError("no"))
            elif isinstance(ev, ChunkReceived):
                outstanding.append(ev.seq)
            elif isinstance(ev, AckReceived):
                assert ev.received <= p.next_out
        if i < len(choices) and outstanding:
            k, as_audio = choices[i]
            seq_no = outstanding.pop(k % len(outstanding))
            if as_audio:
                p.deliver_audio(seq_no, b"\x02\x00")
            else:
                p.deliver_notice(seq_no, ErrorCode.EXPIRED, "late")
        assert p.next_out <= p.next_in
        sent = p.data_to_send()
        for o in sent[: len(sent) - i % 3]:  # the socket writes some, not always all
            p.written(o.nbytes)
        out.extend(sent)
    for seq_no in outstanding:  # the pipeline answers everything eventually
        p.deliver_audio(seq_no, b"\x03\x00")
    out.extend(p.data_to_send())
    return p, out


@settings(max_examples=3000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(frames, decisions, st.booleans())
def test_core_never_crashes_and_answers_in_order(
    seq: list[tuple[str, Any]], choices: list[tuple[int, bool]], accept: bool
) -> None:
    p, out = drive(seq, choices, accept)
    closed = False
    answered: list[int] = []
    next_audio = 0
    for o in out:
        assert not closed, "nothing may follow a close"
        if isinstance(o, Close):
            assert o.code in VALID_CLOSE
            closed = True
        elif isinstance(o, SendBytes):
            answered.append(next_audio)
            next_audio += 1
        else:
            assert isinstance(o, SendText)
            msg = json.loads(o.text)
            assert isinstance(msg, dict) and isinstance(msg.get("type"), str)
            if msg["type"] == "notice":
                assert msg["seq"] == next_audio, "a notice takes exactly the next seq"
                assert msg["code"] in {int(c) for c in ErrorCode}
                count = msg.get("count", 1)
                assert count == 1 or p.version == V1_1, "v1 gets one notice per seq"
                answered.extend(range(next_audio, next_audio + count))
                next_audio += count
            elif msg["type"] == "error":
                assert int(msg["code"]) in {int(c) for c in ErrorCode}
    assert answered == list(range(len(answered)))
    if not closed or p.close_code == 1000:
        # Every accepted chunk got exactly one outcome.
        assert len(answered) == p.next_in


@settings(max_examples=1000, deadline=None)
@given(st.binary(max_size=2000))
def test_any_bytes_before_start_close_with_4002(data: bytes) -> None:
    p = ServerProtocol()
    p.receive_bytes(data)
    out = p.data_to_send()
    assert isinstance(out[-1], Close) and out[-1].code == ErrorCode.UNEXPECTED_MESSAGE


@settings(max_examples=1000, deadline=None)
@given(st.text(max_size=200))
def test_any_text_is_answered_or_accepted(text: str) -> None:
    p = ServerProtocol()
    events = p.receive_text(text)
    out = p.data_to_send()
    if events:
        assert isinstance(events[0], StartRequested) or out
    for o in out:
        if isinstance(o, SendText):
            assert json.loads(o.text)["type"] in {"error", "keepalive"}
