"""Run one processing step on a batch of envelopes; pure (no I/O), runs on the executor.

Each envelope becomes either the envelope for its next step or the reply to its
session. A failure of the batch call is retried item by item, so one bad input
fails only its own session's chunks.
"""

from __future__ import annotations

import bisect
import itertools
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from audiostream import audio
from audiostream.audio import AudioFormat, Encoding
from audiostream.envelope import (
    Reply,
    ReplyStatus,
    WorkEnvelope,
    redistribute,
    state_key,
)
from audiostream.errors import AudioStreamError, ErrorCode, ProcessingError
from audiostream.processors.base import BatchFn, StepInput, StepOutput

log = logging.getLogger(__name__)

Result = WorkEnvelope | Reply


@dataclass(frozen=True, slots=True)
class BatchReport:
    results: list[Result]
    ok: int
    failed: int
    expired: int
    processed_size: int
    """Inputs given to the processing call (expired ones are not processed)."""


def _no_audio_reply(
    env: WorkEnvelope, status: ReplyStatus, code: ErrorCode, message: str
) -> Reply:
    """A reply without audio; it keeps the state the message came with."""
    return Reply(
        session_id=env.session_id,
        msg_id=env.msg_id,
        seq=env.seq,
        status=status,
        chunk_frames=env.chunk_frames,
        format=env.output_format,
        state=env.state,
        timings=env.timings,
        error_code=int(code),
        error_message=message,
        error_step=env.step.name,
    )


def failure_reply(env: WorkEnvelope, err: AudioStreamError) -> Reply:
    return _no_audio_reply(env, ReplyStatus.FAILED, err.code, err.message)


def expired_reply(env: WorkEnvelope) -> Reply:
    return _no_audio_reply(env, ReplyStatus.EXPIRED, ErrorCode.EXPIRED,
                           f"deadline passed before step {env.step.name!r} could run")


def _call(fn: BatchFn, inputs: Sequence[StepInput]) -> list[StepOutput | AudioStreamError]:
    """Call the batch; on failure, isolate the failing items one by one."""
    try:
        outputs = list(fn(inputs))
        if len(outputs) != len(inputs):
            raise ProcessingError(
                f"processor returned {len(outputs)} outputs for {len(inputs)} inputs"
            )
        return list(outputs)
    except Exception as exc:
        if len(inputs) == 1:
            if isinstance(exc, AudioStreamError):
                return [exc]
            log.exception("session=%s stage=processing: the processor raised",
                          inputs[0].session_id)
            return [ProcessingError(f"{type(exc).__name__}: {exc}")]
    results: list[StepOutput | AudioStreamError] = []
    for item in inputs:
        results.extend(_call(fn, [item]))
    return results


def _events_with_seq(
    env: WorkEnvelope, events: Sequence[Mapping[str, Any]], step_name: str
) -> list[Mapping[str, Any]]:
    """Place each event in its chunk: ``seq`` of that chunk, ``offset`` in frames from the
    chunk's start at the client's rate (a window ending on a boundary stays in its chunk)."""
    if not events:
        return []
    edges = list(itertools.accumulate(env.chunk_frames))
    scale = env.output_format.sample_rate / env.format.sample_rate
    out: list[Mapping[str, Any]] = []
    for ev in events:
        offset = int(ev.get("offset", 0))
        idx = min(bisect.bisect_left(edges, offset), len(edges) - 1)
        start = edges[idx - 1] if idx else 0
        out.append({**ev, "offset": round((offset - start) * scale), "step": step_name,
                    "seq": env.seq + idx})
    return out


def _advance(env: WorkEnvelope, out: StepOutput, now: float,
             marks: tuple[tuple[str, float], ...] = ()) -> Result:
    """Build the next envelope (or the reply) from one step output; ``marks`` are the
    batch's timing marks (``_marks``), added here rather than by a copy of ``env``."""
    rate = out.sample_rate or env.format.sample_rate
    produced = np.asarray(out.audio, dtype=np.float32)
    if produced.ndim != 2 or produced.shape[1] != env.format.channels:
        raise ProcessingError(
            f"step {env.step.name!r} returned audio of shape {produced.shape}, "
            f"expected (frames, {env.format.channels})"
        )
    frames = redistribute(env.chunk_frames, produced.shape[0])
    state = dict(env.state)
    if out.state is not None:
        state[state_key(env.step_index, env.step)] = out.state
    events = (*env.events, *_events_with_seq(env, out.events, env.step.name))
    timings = (*env.timings, *marks, (f"{env.step.name}:processed", now))
    if env.is_last_step:
        if rate != env.output_format.sample_rate:
            raise ProcessingError(
                f"pipeline ends at {rate} Hz but the session expects "
                f"{env.output_format.sample_rate} Hz"
            )
        return Reply(
            session_id=env.session_id,
            msg_id=env.msg_id,
            seq=env.seq,
            status=ReplyStatus.OK,
            chunk_frames=frames,
            format=env.output_format,
            audio=audio.encode(env.output_format, produced),
            state=state,
            events=events,
            timings=timings,
        )
    fmt = AudioFormat(Encoding.PCM_F32LE, rate, env.format.channels)
    return replace(
        env,
        format=fmt,
        audio=audio.encode(fmt, produced),
        chunk_frames=frames,
        step_index=env.step_index + 1,
        state=state,
        events=events,
        timings=timings,
    )


def _marks(env: WorkEnvelope, start: float, received: float | None
           ) -> tuple[tuple[str, float], ...]:
    name = env.step.name
    return ((f"{name}:batch_start", start),) if received is None else (
        (f"{name}:worker_rx", received), (f"{name}:batch_start", start))


def _stamp(env: WorkEnvelope, start: float, received: float | None) -> WorkEnvelope:
    """``env`` with its batch's marks: for replies built from the envelope itself (a
    ``dataclasses.replace`` costs as much as the rest of a passthrough step)."""
    return replace(env, timings=(*env.timings, *_marks(env, start, received)))


def run_step(
    fn: BatchFn,
    envelopes: Sequence[WorkEnvelope],
    *,
    now: float | None = None,
    received: Sequence[float] | None = None,
) -> BatchReport:
    """Process one batch of envelopes that all wait for the same processing type.

    ``received``: when the worker got each envelope, stamped as ``<step>:worker_rx``
    together with ``<step>:batch_start``.
    """
    start = time.time() if now is None else now
    if received is not None and len(received) != len(envelopes):
        raise ValueError("one receive time per envelope")
    results: list[Result | None] = [None] * len(envelopes)
    live: list[int] = []
    inputs: list[StepInput] = []
    expired = failed = 0
    for i, env in enumerate(envelopes):
        if env.expired(start):
            results[i] = expired_reply(
                _stamp(env, start, None if received is None else received[i]))
            expired += 1
            continue
        try:
            samples = audio.decode(env.format, env.audio)
        except AudioStreamError as err:
            results[i] = failure_reply(env, err)
            failed += 1
            continue
        live.append(i)
        inputs.append(
            StepInput(
                audio=samples,
                sample_rate=env.format.sample_rate,
                state=env.state.get(state_key(env.step_index, env.step)),
                params=env.step.params,
                session_id=env.session_id,
            )
        )
    if inputs:
        marks = [_marks(envelopes[i], start, None if received is None else received[i])
                 for i in live]
        outputs = _call(fn, inputs)
        done = time.time()
        for i, mark, out in zip(live, marks, outputs, strict=True):
            env = envelopes[i]
            if isinstance(out, AudioStreamError):
                results[i] = failure_reply(replace(env, timings=(*env.timings, *mark)), out)
                failed += 1
                continue
            try:
                results[i] = _advance(env, out, done, mark)
            except AudioStreamError as err:
                results[i] = failure_reply(replace(env, timings=(*env.timings, *mark)), err)
                failed += 1
    final = [r for r in results if r is not None]
    assert len(final) == len(envelopes)
    return BatchReport(
        results=final,
        ok=len(envelopes) - failed - expired,
        failed=failed,
        expired=expired,
        processed_size=len(inputs),
    )
