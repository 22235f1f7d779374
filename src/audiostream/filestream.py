"""File mode: stream a WAV file through a gateway into a WAV file with the same timeline.

What makes a streamed file usable as a file:

* every input chunk ends up in the output, as processed audio, or (when the server
  answered it with a notice) as silence or, with ``fill="input"``, as the original
  input, so the output always has the input's length and timeline;
* with ``compensate_delay`` a pipeline's fixed delay (NSNet2: 319 samples at 16 kHz)
  is removed and the tail is flushed with that many frames of zeros, so the result
  lines up with the input sample for sample;
* chunk sizes are checked before anything is sent;
* memory is bounded: the input is read and the output written chunk by chunk, and
  only chunks still unanswered (within the session's credit) are held.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from audiostream.audio import AudioFormat
from audiostream.client import (
    Audio,
    AudioStreamClient,
    Item,
    Notice,
    Reconnected,
    Summary,
)
from audiostream.client_errors import ClientError
from audiostream.errors import ConfigError, ErrorCode
from audiostream.processors import ProcessorRegistry, registry
from audiostream.processors.pipeline import plan_raw
from audiostream.protocol import MAX_CHUNK_MS, latency_summary

log = logging.getLogger("audiostream.client")

Fill = Literal["silence", "input"]


@dataclass(frozen=True, kw_only=True)
class FileStreamOptions:
    chunk_ms: float = 20.0
    rate: float | None = None
    """1.0 = real time; None = as fast as the server's credit (v1.1) or rate (v1) allows."""
    compensate_delay: bool = True
    fill: Fill = "silence"
    """What a chunk answered without audio becomes in the output."""


@dataclass
class FileStreamReport:
    session_id: str = ""
    chunks: int = 0
    dropped: int = 0
    dropped_by_reason: dict[str, int] = field(default_factory=dict)
    frames_in: int = 0
    frames_out: int = 0
    delay_frames: int = 0
    wall_s: float = 0.0
    resumes: int = 0
    latency_ms: dict[str, float] = field(default_factory=dict)
    summary: dict[str, Any] = field(default_factory=dict)

    @property
    def complete(self) -> bool:
        return self.dropped == 0 and self.frames_out == self.frames_in


def chunk_frames(fmt: AudioFormat, chunk_ms: float) -> int:
    """Frames per chunk; a clear error for sizes the gateway would refuse."""
    frames = round(fmt.sample_rate * chunk_ms / 1000)
    if not 0 < chunk_ms <= MAX_CHUNK_MS or frames < 1:
        raise ClientError(
            f"--chunk-ms {chunk_ms:g} is out of range: chunks must be between "
            f"{1000 / fmt.sample_rate:.3g} and {MAX_CHUNK_MS} ms "
            f"(max_frame_bytes {fmt.bytes_for_ms(MAX_CHUNK_MS)} at {fmt.sample_rate} Hz, "
            f"{fmt.channels} ch)",
            ErrorCode.FRAME_TOO_LARGE,
        )
    return frames


def pipeline_delay(
    pipeline: Sequence[Any], fmt: AudioFormat, processors: ProcessorRegistry = registry
) -> int:
    """The pipeline's fixed delay in frames of ``fmt``, from the steps' declared delays
    (including inserted resamplers)."""
    delay_s = 0.0
    rate = fmt.sample_rate
    for step in plan_raw(pipeline, fmt, processors):
        spec = processors.get(step.name)
        out_rate = int(step.params.get("to", rate)) if spec.internal else rate
        if spec.delay_frames is not None:
            delay_s += spec.delay_frames(rate, step.params) / out_rate
        rate = out_rate
    frames = delay_s * fmt.sample_rate
    if abs(frames - round(frames)) > 1e-6:
        raise ConfigError(
            f"the pipeline's delay ({delay_s * 1000:.3f} ms) is not a whole number of "
            f"samples at {fmt.sample_rate} Hz; use --no-compensate-delay",
            ErrorCode.INVALID_OPTION)
    return round(frames)


async def stream_file(
    client: AudioStreamClient,
    source: str | Path,
    output: str | Path,
    pipeline: Sequence[Any],
    options: FileStreamOptions | None = None,
    *,
    progress: Callable[[int, int], Any] | None = None,
    delay_frames: int | None = None,
) -> FileStreamReport:
    """Stream ``source`` (any file soundfile reads) to a 16-bit WAV at ``output``.

    ``delay_frames`` overrides the delay taken from the processor registry.
    """
    import soundfile

    opts = options or FileStreamOptions()
    info = await asyncio.to_thread(soundfile.info, str(source))
    fmt = AudioFormat.pcm16(int(info.samplerate), int(info.channels))
    per_chunk = chunk_frames(fmt, opts.chunk_ms)
    delay = 0
    if opts.compensate_delay and delay_frames is not None:
        delay = delay_frames
    elif opts.compensate_delay:
        try:
            delay = pipeline_delay(pipeline, fmt)
        except ConfigError as err:
            if err.code is not ErrorCode.UNKNOWN_STEP:
                raise
            # A step only the server knows: it declares no delay here; the server decides
            # whether the pipeline is valid.
            log.warning("no delay compensation: %s", err.message)
    report = FileStreamReport(frames_in=int(info.frames), delay_frames=delay)
    total_chunks = -(-report.frames_in // per_chunk) + (-(-delay // per_chunk) if delay else 0)
    pending: deque[bytes | int] = deque()  # per unanswered chunk: its input, or its frames
    latencies: deque[float] = deque(maxlen=100_000)
    to_skip = delay
    channels = fmt.channels

    with soundfile.SoundFile(str(source)) as fin, soundfile.SoundFile(
            str(output), "w", samplerate=fmt.sample_rate, channels=channels,
            subtype="PCM_16", format="WAV") as fout:

        def write(data: bytes) -> None:
            nonlocal to_skip
            frames = np.frombuffer(data, dtype="<i2").reshape(-1, channels)
            if to_skip:
                cut = min(to_skip, len(frames))
                frames = frames[cut:]
                to_skip -= cut
            room = report.frames_in - report.frames_out
            frames = frames[:room]
            if len(frames):
                fout.write(frames)
                report.frames_out += len(frames)

        def on_item(item: Item) -> None:
            if isinstance(item, Audio):
                pending.popleft()
                report.chunks += 1
                write(item.data)
                if item.latency_ms is not None:
                    latencies.append(item.latency_ms)
            elif isinstance(item, Notice):
                report.dropped += item.count
                report.chunks += item.count
                report.dropped_by_reason[item.reason] = (
                    report.dropped_by_reason.get(item.reason, 0) + item.count)
                for _ in range(item.count):
                    original = pending.popleft()
                    if isinstance(original, bytes):
                        write(original)
                    else:
                        write(bytes(original * fmt.frame_bytes))
            elif isinstance(item, Reconnected):
                report.resumes += 1
            elif isinstance(item, Summary):
                report.summary = dict(item.data)
            if progress is not None:
                progress(report.chunks, total_chunks)

        session = client.session(pipeline, format=fmt, iterate=False)
        session.on_item(on_item)
        started = time.monotonic()
        async with session:
            report.session_id = session.session_id or ""
            sent = 0

            async def send(data: bytes) -> None:
                nonlocal sent
                if opts.rate is not None:
                    due = started + sent * opts.chunk_ms / 1000 / opts.rate
                    wait = due - time.monotonic()
                    if wait > 0:
                        await asyncio.sleep(wait)  # pacing real-time audio
                pending.append(data if opts.fill == "input" else len(data) // fmt.frame_bytes)
                await session.send(data)
                sent += 1

            while True:
                block = fin.read(per_chunk, dtype="int16", always_2d=True)
                if not len(block):
                    break
                await send(block.astype("<i2", copy=False).tobytes())
            left = delay
            while left > 0:  # flush the tail out of the pipeline's delay line
                n = min(left, per_chunk)
                await send(bytes(n * fmt.frame_bytes))
                left -= n
            await session.finish()
        report.wall_s = time.monotonic() - started
    report.latency_ms = latency_summary(list(latencies))
    return report
