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
* with ``encoding=Codec.OPUS`` the upload is Opus packets (a tenth of PCM's bytes at
  32 kbit/s for 16 kHz speech): the client encodes at the wire rate, the gateway
  decodes, the answers are PCM, and the encoder's look-ahead (``pre_skip``) is cut
  from the output like a pipeline delay, so the length stays the input's;
* memory is bounded: the input is decoded and the output encoded incrementally, and
  only chunks still unanswered (within the session's credit) are held.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from audiostream.audio import (
    OPUS_MAX_PACKETS,
    OPUS_RATES,
    SUPPORTED_RATES,
    AudioFormat,
    Codec,
    check_opus_chunk,
    frame_opus_packets,
)
from audiostream.audiofile import (
    AudioReader,
    Int16Audio,
    OpusPacketEncoder,
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
    encoding: Codec = Codec.PCM
    """How audio travels to the gateway: PCM, or Opus packets (answers are PCM either
    way)."""
    bitrate: int = 32000
    """Opus bit rate for ``encoding=Codec.OPUS`` and for an ``.opus`` output."""


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
    codec_delay_frames: int = 0
    """Opus uploads: the encoder's look-ahead cut from the output (at the wire rate)."""
    encoding: str = "pcm"
    wire_bytes: int = 0
    """Audio bytes sent to the gateway (binary frames' payloads)."""
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
    processors: ProcessorRegistry = registry, accepted: Sequence[int] = SUPPORTED_RATES,
) -> int:
    """The rate a ``file_rate`` Hz file is sent at.

    ``requested`` (``--server-rate``) wins. A file at a wire rate goes as it is
    (bit-exact). Otherwise the pipeline's native rate when a step is bound to one
    (``processors.pipeline.native_rate``: 16 kHz for ``denoise`` on a 22.05 kHz
    file; the server then converts nothing, and the band above it would not survive
    that step anyway), else the lowest wire rate above the file's (no band lost:
    22.05 -> 24 kHz). ``accepted`` narrows the rates (``OPUS_RATES`` for Opus).
    """
    if requested is not None:
        if requested not in accepted:
            raise ConfigError(
                f"--server-rate {requested} is not a rate the server takes here; use one of "
                f"{', '.join(map(str, accepted))}", ErrorCode.INVALID_OPTION)
        return requested
    if file_rate in accepted:
        return file_rate
    fallback = wire_rate(file_rate, accepted)
    try:
        native = native_rate(pipeline, file_rate, processors)
    except AudioStreamError:
        return fallback  # a step only the server knows: it plans the conversions
    return native if native is not None and native in accepted else fallback


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
    opus = opts.encoding is Codec.OPUS
    if opus and opts.fill == "input":
        raise ConfigError("--fill input needs PCM on the wire (the client does not keep "
                          "a decoded copy of its Opus upload)", ErrorCode.INVALID_OPTION)
    wire = choose_wire_rate(in_rate, pipeline, opts.server_rate,
                            accepted=OPUS_RATES if opus else SUPPORTED_RATES)
    fmt = AudioFormat.pcm16(wire, channels)
    per_chunk = chunk_frames(fmt, opts.chunk_ms)
    # Opus: 20 ms packets (10 ms for shorter chunks), as many as make up a chunk.
    encoder = (OpusPacketEncoder(wire, channels, bitrate=opts.bitrate,
                                 frame_ms=20 if opts.chunk_ms >= 20 else 10)
               if opus else None)
    packets_per_chunk = (min(OPUS_MAX_PACKETS, max(1, round(per_chunk / encoder.frame_size)))
                         if encoder is not None else 0)
    src: AudioReader = reader if wire == in_rate else Resampled(reader, wire)
    back = None if wire == in_rate else StreamResampler(wire, in_rate, channels)
    report = FileStreamReport(input_rate=in_rate, wire_rate=wire, codec=reader.codec,
                              encoding=str(opts.encoding))
    pending: deque[bytes | int] = deque()  # per unanswered chunk: its input, or its frames
    latencies: deque[float] = deque(maxlen=100_000)
    writer = open_writer(output, in_rate, channels, bitrate=opts.bitrate,
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
                                 else FILE_DEADLINE_MS if opts.rate is None else None,
                                 codec=opts.encoding)
        session.on_item(on_item)
        started = time.monotonic()
        async with session:
            report.session_id = session.session_id or ""
            delay = _delay(opts, delay_override, session.delay_frames, pipeline, fmt)
            report.delay_frames = to_skip = delay
            if encoder is not None:
                report.codec_delay_frames = encoder.pre_skip
                to_skip += encoder.pre_skip
            if src.frames is not None:
                total_chunks = -(-src.frames // per_chunk) + -(-delay // per_chunk)
            sent = 0
            packets: list[bytes] = []

            async def send(data: bytes, frames: int) -> None:
                nonlocal sent
                if opts.rate is not None:
                    due = started + sent * opts.chunk_ms / 1000 / opts.rate
                    wait = due - time.monotonic()
                    if wait > 0:
                        await asyncio.sleep(wait)  # pacing real-time audio
                pending.append(data if opts.fill == "input" else frames)
                report.wire_bytes += len(data)
                await session.send(data)
                sent += 1

            async def send_packets(new: list[bytes], *, last: bool = False) -> None:
                assert encoder is not None
                packets.extend(new)
                while len(packets) >= packets_per_chunk or (last and packets):
                    group = packets[:packets_per_chunk]
                    del packets[:packets_per_chunk]
                    data = frame_opus_packets(group)
                    await send(data, check_opus_chunk(fmt, data))

            async def send_pcm(block: Int16Audio) -> None:
                if encoder is not None:
                    await send_packets(encoder.encode(block))
                    return
                data = block.astype("<i2", copy=False).tobytes()
                step = per_chunk * fmt.frame_bytes
                for i in range(0, len(data), step):
                    await send(data[i:i + step], len(data[i:i + step]) // fmt.frame_bytes)

            ahead = per_chunk * max(1, math.ceil(READ_AHEAD_S * 1000 / opts.chunk_ms))

            def take() -> tuple[Int16Audio, list[bytes]]:
                """The next block, and its Opus packets: decoding and encoding cost CPU
                (libopus: about 1 % of a core per real-time stream), so both run on a
                thread, one block ahead of the sending."""
                block = src.read(ahead)
                return block, (encoder.encode(block)
                               if encoder is not None and len(block) else [])

            nxt = asyncio.ensure_future(asyncio.to_thread(take))
            try:
                while True:
                    block, new = await nxt
                    if not len(block):
                        break
                    nxt = asyncio.ensure_future(asyncio.to_thread(take))
                    if encoder is not None:
                        await send_packets(new)
                    else:
                        await send_pcm(block)
            finally:
                if not nxt.done():  # the session failed mid-send: let the read finish
                    with contextlib.suppress(Exception):
                        await nxt
            left = delay
            while left > 0:  # flush the tail out of the pipeline's delay line
                n = min(left, per_chunk)
                await send_pcm(np.zeros((n, channels), np.int16))
                left -= n
            if encoder is not None:  # the padded last frame and the encoder's look-ahead
                await send_packets(encoder.flush(), last=True)
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
