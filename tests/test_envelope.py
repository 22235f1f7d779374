"""The broker envelopes: round trips, versioning, and refusal of malformed bytes."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import msgpack
import pytest
from hypothesis import given
from hypothesis import strategies as st

from audiostream.audio import AudioFormat, Encoding
from audiostream.envelope import (
    ENVELOPE_VERSION,
    Control,
    Reply,
    ReplyStatus,
    Step,
    WorkEnvelope,
    decode_reply,
    decode_reply_queue_message,
    decode_work,
    decode_work_message,
    encode_control,
    encode_reply,
    encode_work,
    encode_work_bundle,
    redistribute,
    state_key,
)
from audiostream.errors import ErrorCode, ProtocolError

S16 = AudioFormat(Encoding.PCM_S16LE, 16000, 1)
F32 = AudioFormat(Encoding.PCM_F32LE, 48000, 2)


def work(**changes: Any) -> WorkEnvelope:
    env = WorkEnvelope(
        session_id="s-1",
        msg_id=7,
        seq=41,
        chunk_frames=(320, 320),
        received_at=1_700_000_000.25,
        deadline=1_700_000_000.75,
        format=S16,
        output_format=F32,
        audio=bytes(range(256)) * 5,
        pipeline=(Step("gain", {"db": -6.0}), Step("passthrough")),
        step_index=1,
        reply_to="audiostream.reply.s-1",
        state={"0:gain": b"\x00\x01state"},
        events=({"type": "vad", "speech": True},),
        timings=(("gateway_rx", 1_700_000_000.25), ("gain:worker_rx", 1_700_000_000.5)),
    )
    return replace(env, **changes)


def reply(**changes: Any) -> Reply:
    r = Reply(
        session_id="s-1",
        msg_id=7,
        seq=41,
        status=ReplyStatus.OK,
        chunk_frames=(480, 480),
        format=F32,
        audio=b"\x00" * 64,
        state={"1:passthrough": b""},
        events=({"type": "level", "db": -20.5},),
        timings=(("worker:replied", 2.0),),
    )
    return replace(r, **changes)


# -- round trips -----------------------------------------------------------------------


def test_work_envelope_round_trip() -> None:
    env = work()
    decoded = decode_work(encode_work(env))
    assert decoded == env
    assert decoded.step == Step("passthrough")
    assert decoded.is_last_step
    assert decoded.chunk_count == 2


def test_reply_round_trip() -> None:
    assert decode_reply(encode_reply(reply())) == reply()
    failed = reply(
        status=ReplyStatus.FAILED,
        audio=b"",
        chunk_frames=(0,),
        error_code=int(ErrorCode.PROCESSING_FAILED),
        error_message="boom",
        error_step="gain",
    )
    assert decode_reply(encode_reply(failed)) == failed


def test_control_travels_on_the_reply_queue() -> None:
    ctl = Control("s-1", "displace", "n0nce")
    assert decode_reply_queue_message(encode_control(ctl)) == ctl
    newer = Control("s-1", "displace", "n0nce", generation=3)
    assert decode_reply_queue_message(encode_control(newer)) == newer
    asking = Control("s-1", "displace", "n0nce", generation=3, reply_to="q.taker.n0nce")
    assert decode_reply_queue_message(encode_control(asking)) == asking
    assert decode_reply_queue_message(encode_reply(reply())) == reply()


@given(
    audio=st.binary(max_size=2048),
    frames=st.lists(st.integers(0, 10_000), min_size=1, max_size=8),
    seq=st.integers(0, 2**62),
    state=st.dictionaries(st.text(max_size=8), st.binary(max_size=32), max_size=4),
)
def test_work_envelope_round_trip_any_payload(
    audio: bytes, frames: list[int], seq: int, state: dict[str, bytes]
) -> None:
    env = work(audio=audio, chunk_frames=tuple(frames), seq=seq, state=state)
    assert decode_work(encode_work(env)) == env


def test_expiry_uses_the_deadline() -> None:
    env = work(timings=())
    assert not env.expired(now=env.deadline - 0.001)
    assert env.expired(now=env.deadline)


def test_state_key_separates_repeated_steps() -> None:
    assert state_key(0, Step("gain")) != state_key(2, Step("gain"))


# -- versions and malformed input ------------------------------------------------------


def _repack(data: bytes, **fields: Any) -> bytes:
    body = msgpack.unpackb(data, raw=False)
    body.update(fields)
    return msgpack.packb(body, use_bin_type=True)


@pytest.mark.parametrize("version", [0, ENVELOPE_VERSION + 1, "1", None])
def test_unknown_version_is_refused(version: Any) -> None:
    for data, decode in ((encode_work(work()), decode_work), (encode_reply(reply()), decode_reply)):
        with pytest.raises(ProtocolError) as caught:
            decode(_repack(data, v=version))
        assert caught.value.code is ErrorCode.UNSUPPORTED_VERSION


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\xc1",  # a byte msgpack never uses
        b"\x92\x01",  # truncated array
        encode_work(work())[:-3],  # truncated envelope
        encode_work(work()) + b"\x00",  # trailing garbage
        msgpack.packb([1, 2, 3]),  # not a map
        msgpack.packb({"k": "w"}),  # no version
        msgpack.packb({1: 2}),  # non-string keys
    ],
)
def test_malformed_bytes_raise_protocol_error(data: bytes) -> None:
    with pytest.raises(ProtocolError):
        decode_work(data)
    with pytest.raises(ProtocolError):
        decode_reply(data)
    with pytest.raises(ProtocolError):
        decode_reply_queue_message(data)


def test_a_reply_is_not_a_work_envelope_and_vice_versa() -> None:
    with pytest.raises(ProtocolError):
        decode_work(encode_reply(reply()))
    with pytest.raises(ProtocolError):
        decode_reply(encode_work(work()))


@pytest.mark.parametrize(
    "fields",
    [
        {"sid": 5},
        {"mid": "7"},
        {"mid": True},
        {"cf": [320, -1]},
        {"cf": "320"},
        {"pcm": "not bytes"},
        {"si": 2},  # outside the two-step pipeline
        {"si": -1},
        {"pl": [["gain"]]},
        {"pl": [["gain", []]]},
        {"fmt": ["pcm_s16le", 16000]},
        {"fmt": ["pcm_s24le", 16000, 1]},
        {"fmt": ["pcm_s16le", 12345, 1]},
        # Parsed formats are remembered: a look-alike of a known one must still fail.
        {"fmt": ["pcm_s16le", 16000, True]},
        {"fmt": ["pcm_s16le", [16000], 1]},
        {"st": {"0:gain": "text"}},
        {"tm": [["x"]]},
        {"rx": "now"},
    ],
)
def test_fields_of_the_wrong_shape_raise_protocol_error(fields: dict[str, Any]) -> None:
    with pytest.raises(ProtocolError):
        decode_work(_repack(encode_work(work()), **fields))


def test_reply_with_an_unknown_status_is_refused() -> None:
    with pytest.raises(ProtocolError):
        decode_reply(_repack(encode_reply(reply()), s="maybe"))


# -- redistribute ----------------------------------------------------------------------


def test_redistribute_is_exact_when_the_total_is_unchanged() -> None:
    assert redistribute([160, 320, 7], 487) == (160, 320, 7)


def test_redistribute_scales_proportionally() -> None:
    assert redistribute([320, 320], 960) == (480, 480)  # 16 kHz -> 48 kHz
    assert redistribute([480, 480, 480], 480) == (160, 160, 160)
    assert redistribute([160, 160, 1], 600) == (299, 299, 2)


def test_redistribute_splits_evenly_when_there_was_nothing() -> None:
    assert redistribute([0, 0], 10) == (5, 5)
    assert redistribute([], 0) == ()
    with pytest.raises(ValueError):
        redistribute([], 3)


@given(
    lengths=st.lists(st.integers(0, 5_000), min_size=1, max_size=10),
    new_total=st.integers(0, 50_000),
)
def test_redistribute_parts_add_up_and_never_go_negative(
    lengths: list[int], new_total: int
) -> None:
    out = redistribute(lengths, new_total)
    assert len(out) == len(lengths)
    assert sum(out) == new_total
    assert all(n >= 0 for n in out)
    if sum(lengths):
        # Each chunk's share is within one frame of its exact proportion.
        for n, old in zip(out, lengths, strict=True):
            assert abs(n - old * new_total / sum(lengths)) < 2


# -- bundles of many sessions ------------------------------------------------------------


def test_a_bundle_carries_the_envelopes_of_many_sessions_in_order() -> None:
    envs = [work(session_id=f"s-{i}", msg_id=i, audio=bytes([i]) * 640) for i in range(5)]
    decoded, bad = decode_work_message(encode_work_bundle(envs))
    assert decoded == envs
    assert bad == []


def test_a_single_work_message_is_a_bundle_of_one() -> None:
    assert decode_work_message(encode_work(work())) == ([work()], [])


def test_a_malformed_bundle_item_costs_only_itself() -> None:
    body = msgpack.unpackb(encode_work_bundle([work(session_id="a"), work(session_id="b"),
                                               work(session_id="c")]), raw=False)
    body["items"][1]["cf"] = "not frames"
    body["items"][2]["v"] = ENVELOPE_VERSION + 1
    good, bad = decode_work_message(msgpack.packb(body, use_bin_type=True))
    assert [e.session_id for e in good] == ["a"]
    assert len(bad) == 2
    assert all(isinstance(e, ProtocolError) for e in bad)
    assert bad[1].code is ErrorCode.UNSUPPORTED_VERSION


@pytest.mark.parametrize(
    "body",
    [
        {"k": "b", "v": ENVELOPE_VERSION, "items": []},
        {"k": "b", "v": ENVELOPE_VERSION, "items": "nope"},
        {"k": "b", "v": ENVELOPE_VERSION},
        {"k": "b", "v": ENVELOPE_VERSION + 1, "items": [1]},
        {"k": "r", "v": ENVELOPE_VERSION},
    ],
)
def test_a_bundle_that_is_not_one_raises(body: dict[str, Any]) -> None:
    with pytest.raises(ProtocolError):
        decode_work_message(msgpack.packb(body, use_bin_type=True))


def test_an_empty_bundle_cannot_be_made() -> None:
    with pytest.raises(ValueError):
        encode_work_bundle([])
