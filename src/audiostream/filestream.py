"""File mode: stream an audio file through a gateway into a file with the same timeline.

What makes a streamed file usable as a file:

* any input ``audiofile`` reads (WAV variants, FLAC, Opus/Ogg, MP3, ... or ``-``) at
  any rate: the client converts to a wire rate (``choose_wire_rate``) and the output
  back to the input's rate, at the input's exact length, as WAV, FLAC or Opus;
* every input chunk ends up in the output, as processed audio, or (when the server
  answered it with a notice) as silence or, with ``fill="input"``, as the original
  input, so the output always has the input's length and timeline;
* with ``compensate_delay`` a pipeline's fixed delay (NSNet2: 319 samples at 16 kHz;
  the gateway's ``ready.delay_frames`` when it says so) is removed and the tail is
  flushed with that many frames of zeros, so the result lines up with the input;
* chunk sizes are checked before anything is sent;
* memory is bounded: the input is decoded and the output encoded incrementally, and
  only chunks still unanswered (within the session's credit) are held.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from audiostream.audio import SUPPORTED_RATES, AudioFormat
from audiostream.audiofile import (
    AudioReader,
    Int16Audio,
    Resampled,
    StreamResampler,
    open_reader,
    open_writer,
    wire_rate,
)
from audiostream.client import (
    Audio,
    AudioStreamClient,
    Item,
    Notice,
    Reconnected,
    Summary,
)
from audiostream.client_errors import ClientError
from audiostream.errors import AudioStreamError, ConfigError, ErrorCode
from audiostream.processors import ProcessorRegistry, registry
from audiostream.processors.pipeline import delay_frames as planned_delay
from audiostream.processors.pipeline import native_rate, plan_raw
from audiostream.protocol import MAX_CHUNK_MS, latency_summary

log = logging.getLogger("audiostream.client")

Fill = Literal["silence", "input"]
#: Deadline at ``--rate max``: a 22.05 kHz file sent at 24 kHz through the 48 kHz
#: denoise model expired 64 of 600 chunks of 200 ms at the gateway's default 1 s.
FILE_DEADLINE_MS = 10_000
#: Audio decoded per read (in a thread): a pipe may block, the event loop must not.
READ_AHEAD_S = 0.25


@dataclass(frozen=True, kw_only=True)
class FileStreamOptions:
    chunk_ms: float = 20.0
    rate: float | None = None
    """1.0 = real time; None = as fast as the server's credit (v1.1) or rate (v1) allows."""
    compensate_delay: bool = True
    fill: Fill = "silence"
    """What a chunk answered without audio becomes in the output."""
    server_rate: int | None = None
    """The rate sent on the wire; None chooses one (``choose_wire_rate``)."""
    raw_format: AudioFormat | None = None
    """Raw PCM input (``-`` or a headerless file) in this format; ``-`` output is then raw."""
    deadline_ms: int | None = None
    """Per-chunk deadline asked of the gateway; None: the gateway's default in real time,
    ``FILE_DEADLINE_MS`` at ``rate=None`` (nobody waits on a file's chunk; a full
    credit window behind a slow step must queue, not expire)."""


@dataclass
class FileStreamReport:
    session_id: str = ""
    chunks: int = 0
    dropped: int = 0
    dropped_by_reason: dict[str, int] = field(default_factory=dict)
    frames_in: int = 0
    frames_out: int = 0
    """Both at the input's rate: the output has the input's exact length."""
    padded_frames: int = 0
    """Frames of silence added at the very end to restore the exact length (a rate
    conversion there and back can come short by a frame)."""
    input_rate: int = 0
    wire_rate: int = 0
    codec: str = ""
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
    (including inserted resamplers), rounded to the nearest frame."""
    return planned_delay(plan_raw(pipeline, fmt, processors), fmt, processors)


def choose_wire_rate(
    file_rate: int, pipeline: Sequence[Any], requested: int | None = None,
    processors: ProcessorRegistry = registry,
) -> int:
    """The rate a ``file_rate`` Hz file is sent at.

    ``requested`` (``--server-rate``) wins. A file at a wire rate goes as it is
    (bit-exact). Otherwise the pipeline's native rate when a step is bound to one
    (``processors.pipeline.native_rate``: 16 kHz for ``denoise`` on a 22.05 kHz
    file; the server then converts nothing, and the band above it would not survive
    that step anyway), else the lowest wire rate above the file's (no band lost:
    22.05 -> 24 kHz).
    """
    if requested is not None:
        if requested not in SUPPORTED_RATES:
            raise ConfigError(
                f"--server-rate {requested} is not a rate the server takes; use one of "
                f"{', '.join(map(str, SUPPORTED_RATES))}", ErrorCode.INVALID_OPTION)
        return requested
    if file_rate in SUPPORTED_RATES:
        return file_rate
    fallback = wire_rate(file_rate)
    try:
        native = native_rate(pipeline, file_rate, processors)
    except AudioStreamError:
        return fallback  # a step only the server knows: it plans the conversions
    return native or fallback


async def stream_file(
    client: AudioStreamClient,
    source: str | Path,
    output: str | Path,
    pipeline: Sequence[Any],
    options: FileStreamOptions | None = None,
    *,
    progress: Callable[[int, int | None], Any] | None = None,
    delay_frames: int | None = None,
) -> FileStreamReport:
    """Stream ``source`` (a file or ``-``) to ``output`` (``.wav``, ``.flac``,
    ``.opus`` or ``-``) at the input's rate and length.

    ``delay_frames`` (at the wire rate) overrides the delay the gateway advertises
    and the one taken from the processor registry.
    """
    opts = options or FileStreamOptions()
    reader = await asyncio.to_thread(open_reader, source, raw_format=opts.raw_format)
    try:
        return await _stream(client, reader, output, pipeline, opts, progress, delay_frames)
    finally:
        reader.close()


async def _stream(
    client: AudioStreamClient,
    reader: AudioReader,
    output: str | Path,
    pipeline: Sequence[Any],
    opts: FileStreamOptions,
    progress: Callable[[int, int | None], Any] | None,
    delay_override: int | None,
) -> FileStreamReport:
    channels, in_rate = reader.channels, reader.rate
    wire = choose_wire_rate(in_rate, pipeline, opts.server_rate)
    fmt = AudioFormat.pcm16(wire, channels)
    per_chunk = chunk_frames(fmt, opts.chunk_ms)
    src: AudioReader = reader if wire == in_rate else Resampled(reader, wire)
    back = None if wire == in_rate else StreamResampler(wire, in_rate, channels)
    report = FileStreamReport(input_rate=in_rate, wire_rate=wire, codec=reader.codec)
    pending: deque[bytes | int] = deque()  # per unanswered chunk: its input, or its frames
    latencies: deque[float] = deque(maxlen=100_000)
    writer = open_writer(output, in_rate, channels,
                         raw_format=opts.raw_format if str(output) == "-" else None)
    to_skip = 0
    total_chunks: int | None = None

    def write(frames: Int16Audio) -> None:
        nonlocal to_skip
        if to_skip:
            cut = min(to_skip, len(frames))
            frames = frames[cut:]
            to_skip -= cut
        if back is not None:
            frames = back.push(frames)
        room = reader.position - writer.frames
        if len(frames) and room > 0:
            writer.write(frames[:room])

    def on_item(item: Item) -> None:
        if isinstance(item, Audio):
            pending.popleft()
            report.chunks += 1
            write(np.frombuffer(item.data, dtype="<i2").reshape(-1, channels))
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
                    write(np.frombuffer(original, dtype="<i2").reshape(-1, channels))
                else:
                    write(np.zeros((original, channels), np.int16))
        elif isinstance(item, Reconnected):
            report.resumes += 1
        elif isinstance(item, Summary):
            report.summary = dict(item.data)
        if progress is not None:
            progress(report.chunks, total_chunks)

    try:
        session = client.session(pipeline, format=fmt, iterate=False,
                                 deadline_ms=opts.deadline_ms if opts.deadline_ms is not None
                                 else FILE_DEADLINE_MS if opts.rate is None else None)
        session.on_item(on_item)
        started = time.monotonic()
        async with session:
            report.session_id = session.session_id or ""
            delay = _delay(opts, delay_override, session.delay_frames, pipeline, fmt)
            report.delay_frames = to_skip = delay
            if src.frames is not None:
                total_chunks = -(-src.frames // per_chunk) + -(-delay // per_chunk)
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

            ahead = per_chunk * max(1, math.ceil(READ_AHEAD_S * 1000 / opts.chunk_ms))
            while len(block := await asyncio.to_thread(src.read, ahead)):
                data = block.astype("<i2", copy=False).tobytes()
                step = per_chunk * fmt.frame_bytes
                for i in range(0, len(data), step):
                    await send(data[i:i + step])
            left = delay
            while left > 0:  # flush the tail out of the pipeline's delay line
                n = min(left, per_chunk)
                await send(bytes(n * fmt.frame_bytes))
                left -= n
            await session.finish()
        report.wall_s = time.monotonic() - started
        if back is not None:
            tail = back.flush()
            writer.write(tail[:max(0, reader.position - writer.frames)])
        report.padded_frames = max(0, reader.position - writer.frames)
        if report.padded_frames:
            writer.write(np.zeros((report.padded_frames, channels), np.int16))
    finally:
        writer.close()
    report.frames_in, report.frames_out = reader.position, writer.frames
    report.latency_ms = latency_summary(list(latencies))
    return report


def _delay(opts: FileStreamOptions, override: int | None, advertised: int | None,
           pipeline: Sequence[Any], fmt: AudioFormat) -> int:
    """Frames to drop at the start: the caller's figure, else the gateway's
    ``ready.delay_frames``, else the local registry's (a step it does not know counts 0)."""
    if not opts.compensate_delay:
        return 0
    if override is not None:
        return override
    if advertised is not None:
        return advertised
    try:
        return pipeline_delay(pipeline, fmt)
    except ConfigError as err:
        if err.code is not ErrorCode.UNKNOWN_STEP:
            raise
        # A step only the server knows: it declares no delay here.
        log.warning("no delay compensation: %s", err.message)
        return 0
