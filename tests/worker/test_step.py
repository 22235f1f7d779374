"""run_step: the worker's pure core, with real processors and a test registry."""

from __future__ import annotations

import time
from collections.abc import Sequence

import numpy as np

from audiostream import audio
from audiostream.audio import AudioFormat, Encoding
from audiostream.envelope import Reply, ReplyStatus, Step, WorkEnvelope, state_key
from audiostream.errors import ErrorCode, ProcessingError
from audiostream.processors import ProcessorContext, ProcessorRegistry, StepInput, StepOutput
from audiostream.processors import registry as builtin
from audiostream.worker.step import run_step

FMT = AudioFormat(Encoding.PCM_S16LE, 16000, 1)


def envelope(
    pcm: bytes, steps: Sequence[Step], *, session: str = "s", deadline_in: float = 10.0,
    frames: tuple[int, ...] | None = None,
) -> WorkEnvelope:
    n = len(pcm) // 2
    return WorkEnvelope(
        session_id=session, msg_id=0, seq=5, chunk_frames=frames or (n,),
        received_at=time.time(), deadline=time.time() + deadline_in, format=FMT,
        output_format=FMT, audio=pcm, pipeline=tuple(steps), step_index=0, reply_to="r",
    )


def pcm(values: list[int]) -> bytes:
    return np.array(values, dtype="<i2").tobytes()


def fn(name: str):
    return builtin.get(name).factory(ProcessorContext())


def test_passthrough_is_bit_identical() -> None:
    data = pcm([0, 1, -1, 32767, -32768, 1234])
    [reply] = run_step(fn("passthrough"), [envelope(data, [Step("passthrough")])]).results
    assert isinstance(reply, Reply) and reply.status is ReplyStatus.OK
    assert reply.audio == data and reply.chunk_frames == (6,)


def test_first_of_two_steps_forwards_float_audio_and_state() -> None:
    data = pcm([1000] * 320)
    env = envelope(data, [Step("highpass"), Step("gain", {"db": 0})])
    [nxt] = run_step(fn("highpass"), [env]).results
    assert isinstance(nxt, WorkEnvelope)
    assert nxt.step_index == 1 and nxt.format.encoding is Encoding.PCM_F32LE
    assert state_key(0, Step("highpass")) in nxt.state
    assert any(stage == "highpass:processed" for stage, _ in nxt.timings)


def test_every_result_carries_the_batch_marks_in_order() -> None:
    """Receive, batch start and processed marks feed the per-stage latency metrics; a
    reply, a forward and a failure each keep them (a failure has no processed mark)."""
    data = pcm([1000] * 320)
    ok = envelope(data, [Step("passthrough")])
    fwd = envelope(data, [Step("highpass"), Step("gain", {"db": 0})])
    for f, env, last in ((fn("passthrough"), ok, "passthrough:processed"),
                         (fn("highpass"), fwd, "highpass:processed")):
        [out] = run_step(f, [env], now=2.0, received=[1.0]).results
        step = env.step.name
        assert out.timings[-3:] == ((f"{step}:worker_rx", 1.0), (f"{step}:batch_start", 2.0),
                                    (last, out.timings[-1][1]))

    def boom(items: Sequence[StepInput]) -> list[StepOutput]:
        raise ProcessingError("no")

    [failed] = run_step(boom, [ok], now=2.0, received=[1.0]).results
    assert isinstance(failed, Reply) and failed.status is ReplyStatus.FAILED
    assert failed.timings[-2:] == (("passthrough:worker_rx", 1.0),
                                   ("passthrough:batch_start", 2.0))


def test_expired_envelope_is_not_processed() -> None:
    calls = []

    def spy(batch: Sequence[StepInput]) -> list[StepOutput]:
        calls.append(len(batch))
        return [StepOutput(b.audio) for b in batch]

    env = envelope(pcm([1, 2]), [Step("passthrough")], deadline_in=-0.001)
    report = run_step(spy, [env])
    [reply] = report.results
    assert isinstance(reply, Reply) and reply.status is ReplyStatus.EXPIRED
    assert reply.error_code == ErrorCode.EXPIRED and calls == [] and report.expired == 1


def test_one_bad_item_fails_only_its_own_session() -> None:
    reg = ProcessorRegistry()

    @reg.per_item("picky")
    def picky(item: StepInput) -> StepOutput:
        if item.session_id == "bad":
            raise ValueError("boom")
        return StepOutput(item.audio * 0.5)

    envs = [envelope(pcm([100, 200]), [Step("picky")], session=s) for s in ("a", "bad", "c")]
    report = run_step(reg.get("picky").factory(ProcessorContext()), envs)
    statuses = [r.status for r in report.results if isinstance(r, Reply)]
    assert statuses == [ReplyStatus.OK, ReplyStatus.FAILED, ReplyStatus.OK]
    failed = report.results[1]
    assert isinstance(failed, Reply) and "boom" in (failed.error_message or "")
    assert failed.error_code == ErrorCode.PROCESSING_FAILED
    assert report.ok == 2 and report.failed == 1


def test_wrong_output_count_fails_the_batch() -> None:
    def broken(batch: Sequence[StepInput]) -> list[StepOutput]:
        return []

    [reply] = run_step(broken, [envelope(pcm([1]), [Step("x")])]).results
    assert isinstance(reply, Reply) and reply.status is ReplyStatus.FAILED


def test_processing_error_code_is_kept() -> None:
    def refuses(batch: Sequence[StepInput]) -> list[StepOutput]:
        raise ProcessingError("state of the wrong shape")

    [reply] = run_step(refuses, [envelope(pcm([1]), [Step("x")])]).results
    assert isinstance(reply, Reply) and reply.error_message == "state of the wrong shape"


def test_events_get_the_seq_of_their_chunk() -> None:
    def marks(batch: Sequence[StepInput]) -> list[StepOutput]:
        return [StepOutput(b.audio, events=({"name": "e", "offset": 300},)) for b in batch]

    env = envelope(pcm([0] * 640), [Step("m")], frames=(160, 160, 320))
    [reply] = run_step(marks, [env]).results
    assert isinstance(reply, Reply)
    assert reply.events[0]["seq"] == 5 + 1 and reply.events[0]["step"] == "m"


def test_highpass_streams_exactly_like_one_call() -> None:
    rng = np.random.default_rng(0)
    x = (rng.standard_normal(3200) * 3000).astype(np.int16)
    whole = run_step(fn("highpass"), [envelope(x.tobytes(), [Step("highpass")])]).results[0]
    assert isinstance(whole, Reply)
    state = None
    parts = []
    for i in range(0, 3200, 160):
        env = envelope(x[i:i + 160].tobytes(), [Step("highpass")])
        if state is not None:
            env = WorkEnvelope(**{**{f: getattr(env, f) for f in env.__dataclass_fields__},
                                  "state": state})
        [r] = run_step(fn("highpass"), [env]).results
        assert isinstance(r, Reply)
        state = r.state
        parts.append(r.audio)
    assert b"".join(parts) == whole.audio
    y = audio.decode(FMT, whole.audio)
    assert abs(float(y.mean())) < 0.01  # DC removed
