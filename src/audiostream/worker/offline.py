"""Offline reference: the same processors on a whole file in one process, no server."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

from audiostream.audio import AudioFormat
from audiostream.envelope import Reply, ReplyStatus, WorkEnvelope
from audiostream.errors import ProcessingError
from audiostream.processors import ProcessorContext, ProcessorRegistry, registry
from audiostream.processors.pipeline import plan_raw
from audiostream.worker.step import run_step


def run_offline(
    audio_bytes: bytes,
    fmt: AudioFormat,
    pipeline: Sequence[Any],
    *,
    processors: ProcessorRegistry = registry,
    context: ProcessorContext | None = None,
) -> bytes:
    """Process a whole recording through ``pipeline``; returns bytes in ``fmt``.

    Goes through exactly the code a worker runs (``run_step``), with the whole
    file as one message and fresh state, so it is the reference that streamed
    results are compared against.
    """
    steps = plan_raw(pipeline, fmt, processors)
    ctx = context or ProcessorContext()
    fns = {name: processors.get(name).factory(ctx) for name in {s.name for s in steps}}
    frames = len(audio_bytes) // fmt.frame_bytes
    msg: WorkEnvelope | Reply = WorkEnvelope(
        session_id="offline",
        msg_id=0,
        seq=0,
        chunk_frames=(frames,),
        received_at=time.time(),
        deadline=float("inf"),
        format=fmt,
        output_format=fmt,
        audio=audio_bytes,
        pipeline=steps,
        step_index=0,
        reply_to="",
    )
    while isinstance(msg, WorkEnvelope):
        msg = run_step(fns[msg.step.name], [msg]).results[0]
    if msg.status is not ReplyStatus.OK:
        raise ProcessingError(f"{msg.error_step}: {msg.error_message}")
    return msg.audio
