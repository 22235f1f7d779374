"""Batched streaming NSNet2 noise suppression with the whole session state in bytes.

Framing follows the upstream package per rate, so that the model sees exactly
the features it was trained on:

* 16 kHz: 320-sample frames, hop 160, window sqrt(np.hanning(320)) (symmetric),
  FFT 320 (161 bins), synthesis with the same window (upstream ``featurelib``).
* 48 kHz: 960-sample frames, hop 480, window sqrt of a *periodic* Hann, FFT 1024
  (513 bins), synthesis window = least-squares dual (upstream ``enhance_48khz``).

Frame k covers input samples ``[k*hop, k*hop + win)`` (upstream 16 kHz drops
its first half-zero frame, which is the same thing), the gain is clipped to
[1e-4, 1] and the frames are overlap-added.

Delay: output sample n is final once frame ``n // hop`` is in, i.e. after
``win - 1`` more samples at most. Every call returns exactly as many samples as
it was given, so the stream is the offline result delayed by a fixed
``win - 1`` samples (319 at 16 kHz, 959 at 48 kHz: just under 20 ms), with
zeros first. The last ``win - 1`` samples of a stream stay in the state.
"""

from __future__ import annotations

import logging
import struct
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from audiostream.errors import ConfigError, ErrorCode, ModelError, ProcessingError
from audiostream.models import files, runtime
from audiostream.models.prepare import RECIPE_VERSION, VARIANTS, nsnet2_name

log = logging.getLogger(__name__)

F32 = npt.NDArray[np.float32]
F64 = npt.NDArray[np.float64]
C128 = npt.NDArray[np.complex128]

MIN_GAIN = 1e-4  # upstream ``mingain`` of -80 dB
LOG_POWER_FLOOR = 1e-12


def _sqrt_hann_symmetric(n: int) -> F64:
    return np.sqrt(np.hanning(n)).astype(np.float64)


def _sqrt_hann_periodic(n: int) -> F64:
    return np.sqrt(0.5 - 0.5 * np.cos(2.0 * np.pi * np.arange(n) / n)).astype(np.float64)


def _dual_window(win: F64, hop: int) -> F64:
    """Least-squares synthesis window (what upstream computes with ``pinv`` per phase)."""
    out = np.zeros_like(win)
    for k in range(hop):
        h = win[k::hop]
        energy = float(np.dot(h, h))
        out[k::hop] = h / energy if energy > 0 else 0.0
    return out


@dataclass(frozen=True, slots=True)
class Framing:
    rate: int
    win: int
    hop: int
    nfft: int
    analysis: F64
    synthesis: F64

    @property
    def bins(self) -> int:
        return self.nfft // 2 + 1

    @property
    def delay(self) -> int:
        """Fixed output delay in samples (see the module docstring)."""
        return self.win - 1


def _framing(rate: int) -> Framing:
    if rate == 16000:
        w = _sqrt_hann_symmetric(320)
        return Framing(16000, 320, 160, 320, w, w)
    w = _sqrt_hann_periodic(960)
    return Framing(48000, 960, 480, 1024, w, _dual_window(w, 480))


FRAMINGS = {rate: _framing(rate) for rate in (16000, 48000)}
RATES = tuple(FRAMINGS)


def framing(rate: int) -> Framing:
    try:
        return FRAMINGS[rate]
    except KeyError:
        raise ConfigError(
            f"NSNet2 runs at {' or '.join(map(str, RATES))} Hz, not {rate}",
            ErrorCode.UNSUPPORTED_FORMAT,
        ) from None


def check_variant(variant: object) -> str:
    if variant not in VARIANTS:
        raise ConfigError(
            f"unknown NSNet2 variant {variant!r}; use one of {', '.join(VARIANTS)}",
            ErrorCode.INVALID_OPTION,
        )
    return str(variant)


# --- the model ----------------------------------------------------------------------


def step_runs(active: Sequence[int], limit: int | None) -> list[tuple[int, int]]:
    """``(start, end)`` runs of consecutive steps with the same active row count, each at
    most ``limit`` steps long (None: unlimited)."""
    runs: list[tuple[int, int]] = []
    start = 0
    for s in range(1, len(active) + 1):
        if s == len(active) or active[s] != active[start] or s - start == limit:
            runs.append((start, s))
            start = s
    return runs


class Model:
    """One loaded NSNet2 graph with explicit GRU state."""

    def __init__(
        self,
        rate: int,
        variant: str = "fp32",
        *,
        model_dir: Path | None = None,
        options: runtime.RuntimeOptions | None = None,
    ) -> None:
        self.framing = framing(rate)
        self.variant = check_variant(variant)
        directory = files.model_dir(model_dir)
        manifest = files.read_manifest(directory)
        path, entry = files.prepared_file(directory, nsnet2_name(rate, variant), manifest)
        recipe = manifest.get("recipe")
        if recipe != RECIPE_VERSION:
            # Still loadable, but e.g. recipe 1's int8 mixed sessions of one batch.
            log.warning(
                "%s was prepared by recipe %s, this version builds recipe %s: re-run "
                "`audiostream models prepare --model-dir %s`",
                path.name,
                recipe,
                RECIPE_VERSION,
                directory,
            )
        try:
            self.hidden = int(entry["hidden"])
            self.bins = int(entry["bins"])
            per_call = entry.get("frames_per_call")
            self.frames_per_call: int | None = None if per_call is None else int(per_call)
            level = str(entry.get("graph_optimization", "ORT_ENABLE_ALL"))
        except (KeyError, TypeError, ValueError):
            raise ModelError(f"manifest entry for {path.name} is malformed") from None
        if self.bins != self.framing.bins:
            raise ModelError(f"{path.name} has {self.bins} bins, expected {self.framing.bins}")
        self.options = options or runtime.RuntimeOptions()
        self.session = runtime.create_session(path, self.options, optimization=level)
        #: Frames per ORT call in ``run_steps``. fp32 takes any run of hops in one call,
        #: bit-identical to one call per hop; fp16 rounds the carried state at call
        #: boundaries only, so it steps one hop per call to stay chunking-invariant.
        self.steps_per_call = self.frames_per_call if variant == "fp32" else 1
        self.providers = runtime.providers_in_use(self.session)
        #: With I/O binding the GRU state stays on the session's device across hops.
        self.binding = (
            runtime.RecurrentBinding(self.session, self.options, state_in="h0", state_out="hn")
            if self.options.bind_io
            else None
        )
        # One inference at a time per model: concurrent runs would only compete for the
        # same cores (a worker scales with processes, not threads).
        self.lock = threading.Lock()

    def run(self, feat: F32, h0: F32) -> tuple[F32, F32]:
        """Gains ``[B, T, bins]`` and the new state for features ``[B, T, bins]``."""
        gain, hn = runtime.run(self.session, {"input": feat, "h0": h0}, ("output", "hn"))
        return gain.astype(np.float32, copy=False), hn.astype(np.float32, copy=False)

    def run_steps(self, feat_t: F32, active: Sequence[int], h: F32) -> tuple[F32, F32]:
        """Gains ``[T, B, bins]`` of one frame per step, the state carried between steps.

        Step ``s`` runs rows ``:active[s]`` of ``feat_t[s]`` (non-increasing: rows are
        sorted longest first), so a row that has no more frames keeps its last state;
        gains of rows not run are undefined. Returns the final state ``[2, B, hidden]``.
        Call with ``lock`` held.
        """
        bins = feat_t.shape[2]
        gain_t = np.empty_like(feat_t)
        if self.binding is None:
            rows = h.shape[1]
            # Consecutive steps over the same rows go through ORT as one sequence (the
            # GRU carries the state inside the call): bit-identical to one call per
            # step, and 7-44 % cheaper per frame (benchmarks/sequence_calls.py).
            for s, e in step_runs(active, self.steps_per_call):
                n = active[s]
                g, hn = self.run(
                    np.ascontiguousarray(feat_t[s:e, :n].transpose(1, 0, 2)),
                    h if n == rows else np.ascontiguousarray(h[:, :n]),
                )
                gain_t[s:e, :n] = g.transpose(1, 0, 2)
                if n == rows:
                    h = hn
                else:
                    h[:, :n] = hn
            return gain_t, h
        # Bound: the state goes to the device once, then only back when rows drop out
        # (a device tensor cannot be sliced from Python) and at the end.
        bound = self.binding
        h = np.array(h, np.float32, copy=True)
        width = 0
        try:
            for s, n in enumerate(active):
                if n != width:
                    if width:
                        h[:, :width] = bound.state()
                    bound.set_state(h[:, :n])
                    width = n
                bound.step(
                    {"input": feat_t[s, :n].reshape(n, 1, bins)},
                    {"output": gain_t[s, :n].reshape(n, 1, bins)},
                )
            if width:
                h[:, :width] = bound.state()
        finally:
            bound.release()
        return gain_t, h

    def zero_state(self, batch: int) -> F32:
        return np.zeros((2, batch, self.hidden), dtype=np.float32)


# --- signal processing --------------------------------------------------------------


def _analyse(fr: Framing, frames: F32) -> tuple[C128, F32]:
    """Complex spectra and log-power features of frames ``[N, win]``."""
    spec: C128 = np.fft.rfft(frames.astype(np.float64) * fr.analysis, fr.nfft, axis=-1)
    power = spec.real**2 + spec.imag**2
    feat = np.log10(np.maximum(power, LOG_POWER_FLOOR)).astype(np.float32)
    return spec, feat


def _synthesise(fr: Framing, spec: C128, gain: F32) -> F32:
    """Windowed time frames ``[N, win]`` from spectra times clipped gains."""
    g = np.clip(gain, np.float32(MIN_GAIN), np.float32(1.0))
    frames = np.fft.irfft(spec * g, fr.nfft, axis=-1)[..., : fr.win] * fr.synthesis
    return frames.astype(np.float32)


def _overlap_add(fr: Framing, frames: F32, tail: F32) -> tuple[F32, F32]:
    """Blocks ``b[k-1] + a[k]`` (50 % overlap) of frames ``[N, win]``, and the new tail."""
    hop = fr.hop
    heads = frames[:, :hop]
    tails = np.concatenate([tail[None, :], frames[:-1, hop:]], axis=0)
    return (tails + heads).reshape(-1), frames[-1, hop:].copy()


# --- state --------------------------------------------------------------------------

_MAGIC = b"NSN2"
#: Version 1 holds every value as float32; version 2 holds the GRU state as float16 and
#: the audio (pending input, ready output, overlap tail) as float32. The fp16 graph's
#: state is already float16 after every hop, so for it version 2 is lossless and
#: 1,600 bytes (31 %) smaller per 16 kHz session and message, both ways through the
#: broker. Readers take both, so workers of either writer can share a queue.
_V_F32, _V_F16 = 1, 2
_H_DTYPE: dict[int, np.dtype[Any]] = {_V_F32: np.dtype("<f4"), _V_F16: np.dtype("<f2")}
#: What ``--denoise-state`` names each version.
STATE_PRECISIONS = {"fp32": _V_F32, "fp16": _V_F16}
_HEADER = struct.Struct("<4sHHIHHQQII")  # magic ver channels rate hidden hop n_in n_frames P R
#: The payload after the header is 4-byte aligned in both versions (the float16 state
#: is 2 x hidden values per channel), so a batch of equal-sized states reads as one
#: matrix (header columns dropped) without a per-state copy.
assert _HEADER.size % 4 == 0


def state_version(variant: str, precision: str | None) -> int:
    """The state version a worker writes: ``precision`` if given, else the variant's
    own (fp16 for the fp16 graph, where it loses nothing; fp32 otherwise)."""
    if precision is None:
        return _V_F16 if variant == "fp16" else _V_F32
    if precision not in STATE_PRECISIONS:
        raise ConfigError(
            f"unknown denoise state precision {precision!r}; use one of "
            f"{', '.join(STATE_PRECISIONS)}",
            ErrorCode.INVALID_OPTION,
        )
    return STATE_PRECISIONS[precision]


def _pack_header(version: int, channels: int, rate: int, hidden: int, hop: int, n_in: int,
                 n_frames: int, p_len: int, r_len: int) -> bytes:
    return _HEADER.pack(_MAGIC, version, channels, rate, hidden, hop, n_in, n_frames, p_len,
                        r_len)


def _bad_state(why: str) -> ProcessingError:
    return ProcessingError(f"denoise state is unusable: {why}", ErrorCode.PROCESSING_FAILED)


def _check_header(
    raw: bytes, fr: Framing, hidden: int, channels: int
) -> tuple[int, int, int, int, int]:
    """``(version, n_in, n_frames, P, R)`` of a state; everything is checked but the
    values' finiteness."""
    if len(raw) < _HEADER.size:
        raise _bad_state(f"{len(raw)} bytes is shorter than the header")
    magic, version, ch, rate, hid, hop, n_in, n_frames, p_len, r_len = _HEADER.unpack_from(raw)
    if magic != _MAGIC:
        raise _bad_state("not an NSNet2 state")
    if version not in _H_DTYPE:
        raise _bad_state(f"version {version}, this worker reads versions "
                         f"{', '.join(map(str, _H_DTYPE))}")
    if rate != fr.rate or hop != fr.hop:
        raise _bad_state(f"made at {rate} Hz, audio is {fr.rate} Hz")
    if hid != hidden:
        raise _bad_state(f"GRU size {hid}, model has {hidden}")
    if ch != channels:
        raise _bad_state(f"made for {ch} channel(s), audio has {channels}")
    expect_frames = max(0, (n_in - fr.win) // fr.hop + 1)
    expect_ready = n_frames * fr.hop - max(0, n_in - fr.delay)
    if n_frames != expect_frames or p_len != n_in - n_frames * fr.hop or r_len != expect_ready:
        raise _bad_state("inconsistent sample counters")
    size = _state_size(version, ch, hid, p_len + r_len + hop)
    if len(raw) != size:
        raise _bad_state(f"{len(raw)} bytes, expected {size}")
    return version, n_in, n_frames, p_len, r_len


def _state_size(version: int, channels: int, hidden: int, audio: int) -> int:
    return _HEADER.size + channels * (2 * hidden * int(_H_DTYPE[version].itemsize) + 4 * audio)


def _read_states(raws: list[bytes], version: int, h_values: int) -> tuple[F32, F32]:
    """``(h, audio)`` rows of equal-sized states: ``[n, h_values]`` and ``[n, rest]``,
    float32, checked finite."""
    buf = np.frombuffer(b"".join(raws), np.uint8).reshape(len(raws), -1)[:, _HEADER.size:]
    cut = h_values * _H_DTYPE[version].itemsize
    h = buf[:, :cut].view(_H_DTYPE[version]).astype(np.float32, copy=False)
    audio = buf[:, cut:].view("<f4").astype(np.float32, copy=False)
    if not (np.isfinite(h).all() and np.isfinite(audio).all()):
        raise _bad_state("non-finite values")
    return h, audio


def _state_bytes(header: bytes, version: int, h: F32, audio: F32) -> bytes:
    return b"".join([header, np.ascontiguousarray(h, dtype=_H_DTYPE[version]).tobytes(),
                     np.ascontiguousarray(audio, dtype="<f4").tobytes()])


@dataclass(slots=True)
class StreamState:
    """Everything one session needs between messages (per channel rows).

    The reference form of the state bytes; ``Denoiser.process`` reads and writes
    the same layout for whole groups of sessions at once (``_Group``).
    """

    n_in: int
    n_frames: int
    h: F32  # [C, 2, hidden]
    pending: F32  # [C, P]: input from n_frames*hop on, not yet framed
    ready: F32  # [C, R]: final output not yet emitted
    tail: F32  # [C, hop]: second half of the last frame, awaiting the next one

    def to_bytes(self, rate: int, version: int = _V_F32) -> bytes:
        channels, _, hidden = self.h.shape
        header = _pack_header(version, channels, rate, hidden, self.tail.shape[1], self.n_in,
                              self.n_frames, self.pending.shape[1], self.ready.shape[1])
        audio = np.concatenate([self.pending.reshape(-1), self.ready.reshape(-1),
                                self.tail.reshape(-1)])
        return _state_bytes(header, version, self.h, audio)

    @classmethod
    def from_bytes(cls, raw: bytes, fr: Framing, hidden: int, channels: int) -> StreamState:
        version, n_in, n_frames, p_len, r_len = _check_header(raw, fr, hidden, channels)
        h, audio = _read_states([raw], version, channels * 2 * hidden)
        ch, hop = channels, fr.hop
        b = ch * p_len
        c = b + ch * r_len
        return cls(
            n_in,
            n_frames,
            h.reshape(ch, 2, hidden),
            audio[0, :b].reshape(ch, p_len),
            audio[0, b:c].reshape(ch, r_len),
            audio[0, c:].reshape(ch, hop),
        )


# --- the engine ---------------------------------------------------------------------

#: Sessions that share (channels, new samples, P, R, leading zeros, is new, state
#: version) stack into arrays: the common case (every session sends 20 ms) is one group
#: per batch.
_Layout = tuple[int, int, int, int, int, bool, int]


@dataclass(slots=True)
class _Group:
    """Sessions of one batch with the same layout, as stacked rows (session x channel)."""

    index: list[int]  # positions in the batch
    channels: int
    zeros: int  # leading zeros of every output (streams younger than the delay)
    n_in: list[int]
    n_frames: list[int]
    x: F32  # [rows, n]: new audio
    h: F32  # [rows, 2, hidden]
    pending: F32  # [rows, P]
    ready: F32  # [rows, R]
    tail: F32  # [rows, hop]
    count: int = 0  # new frames per row

    @classmethod
    def load(
        cls,
        layout: _Layout,
        index: list[int],
        items: Sequence[tuple[npt.NDArray[Any], bytes | None]],
        counters: list[tuple[int, int]],
        hidden: int,
        hop: int,
    ) -> _Group:
        channels, n, p_len, r_len, zeros, fresh, version = layout
        size = len(index)
        rows = size * channels
        arrays = [items[i][0] for i in index]
        audio = arrays[0][None] if size == 1 else np.stack(arrays)  # [G, n, C]
        x = np.ascontiguousarray(audio.transpose(0, 2, 1), dtype=np.float32).reshape(rows, n)
        if not np.isfinite(x).all():
            # A NaN would live on in the GRU state forever; treat it as silence.
            x = np.nan_to_num(x, nan=0.0, posinf=0.0, neginf=0.0)
        if fresh:
            h = np.zeros((rows, 2, hidden), np.float32)
            pending = np.zeros((rows, 0), np.float32)
            ready = np.zeros((rows, 0), np.float32)
            tail = np.zeros((rows, hop), np.float32)
        else:
            raws = [items[i][1] or b"" for i in index]
            flat_h, flat = _read_states(raws, version, channels * 2 * hidden)
            b = channels * p_len
            c = b + channels * r_len
            h = flat_h.reshape(rows, 2, hidden)
            pending = flat[:, :b].reshape(rows, p_len)
            ready = flat[:, b:c].reshape(rows, r_len)
            tail = flat[:, c:].reshape(rows, hop)
        return cls(
            index,
            channels,
            zeros,
            [counters[i][0] for i in index],
            [counters[i][1] for i in index],
            x,
            h,
            pending,
            ready,
            tail,
        )

    def frames(self, fr: Framing) -> F32:
        """The new frames ``[rows * count, win]`` (row-major); consumed input leaves ``pending``."""
        buf = np.concatenate([self.pending, self.x], axis=1) if self.pending.shape[1] else self.x
        length = buf.shape[1]
        self.count = (length - fr.win) // fr.hop + 1 if length >= fr.win else 0
        self.pending = buf[:, self.count * fr.hop :]
        if not self.count:
            return np.empty((0, fr.win), np.float32)
        # Frame k of a row is buf[row, k*hop : k*hop + win]; a loop over frames, not rows.
        frames = np.empty((buf.shape[0], self.count, fr.win), np.float32)
        for k in range(self.count):
            frames[:, k] = buf[:, k * fr.hop : k * fr.hop + fr.win]
        return frames.reshape(-1, fr.win)

    def finish(self, fr: Framing, synth: F32, h: F32, version: int) -> list[tuple[F32, bytes]]:
        """Overlap-add this group's synthesised frames, emit outputs and new state bytes."""
        hop, count = fr.hop, self.count
        rows, n = self.x.shape
        if count:
            frames = synth.reshape(rows, count, fr.win)
            # Block k = second half of frame k-1 + first half of frame k (50 % overlap).
            tails = np.concatenate([self.tail[:, None, :], frames[:, :-1, hop:]], axis=1)
            blocks = (tails + frames[:, :, :hop]).reshape(rows, count * hop)
            self.tail = frames[:, -1, hop:]
            self.ready = (
                np.concatenate([self.ready, blocks], axis=1) if self.ready.shape[1] else blocks
            )
            self.h = h
        size, channels, take = len(self.index), self.channels, n - self.zeros
        out = np.zeros((size, n, channels), np.float32)
        out[:, self.zeros :] = self.ready[:, :take].reshape(size, channels, take).transpose(0, 2, 1)
        self.ready = self.ready[:, take:]
        states = np.ascontiguousarray(self.h.reshape(size, -1), dtype=_H_DTYPE[version])
        audio = np.concatenate(
            [a.reshape(size, -1) for a in (self.pending, self.ready, self.tail)], axis=1
        ).astype("<f4", copy=False)
        hidden = self.h.shape[2]
        p_len, r_len = self.pending.shape[1], self.ready.shape[1]
        results = []
        for g in range(size):
            header = _pack_header(version, channels, fr.rate, hidden, hop, self.n_in[g] + n,
                                  self.n_frames[g] + count, p_len, r_len)
            results.append((out[g], header + states[g].tobytes() + audio[g].tobytes()))
        return results


class Denoiser:
    """Streams any number of sessions through one model: one ORT call per run of 10 ms
    steps over the same sessions (fp32), or per step (int8, fp16).

    ``state_precision`` (``fp32``, ``fp16``; default: the variant's own) is how the GRU
    state is written into the state bytes; any version is read."""

    def __init__(self, model: Model, state_precision: str | None = None) -> None:
        self.model = model
        self.framing = model.framing
        self.state_version = state_version(model.variant, state_precision)

    @property
    def delay(self) -> int:
        return self.framing.delay

    def process(
        self, items: Sequence[tuple[npt.NDArray[Any], bytes | None]]
    ) -> list[tuple[F32, bytes]]:
        """Denoise ``(audio (frames, channels), state)`` pairs; same length out as in.

        All frames of the batch go through one FFT, one ORT call per run of hop
        steps over the same rows (``Model.run_steps``) and
        one inverse FFT. Sessions with the same layout are handled as stacked
        arrays; only header checks and state bytes are per session.
        """
        fr = self.framing
        hidden = self.model.hidden
        layouts: dict[_Layout, list[int]] = {}
        counters: list[tuple[int, int]] = []
        for i, (audio, raw) in enumerate(items):
            if audio.ndim != 2:
                raise ProcessingError(f"audio must be (frames, channels), got shape {audio.shape}")
            n, channels = audio.shape
            if raw is None:
                version = n_in = n_frames = p_len = r_len = 0
            else:
                version, n_in, n_frames, p_len, r_len = _check_header(raw, fr, hidden, channels)
            counters.append((n_in, n_frames))
            zeros = min(max(fr.delay - n_in, 0), n)
            key = (channels, n, p_len, r_len, zeros, raw is None, version)
            layouts.setdefault(key, []).append(i)
        groups = [
            _Group.load(key, index, items, counters, hidden, fr.hop)
            for key, index in layouts.items()
        ]
        frames = [g.frames(fr) for g in groups]
        active = [g for g in groups if g.count]
        synth = np.empty((0, fr.win), np.float32)
        h_new = np.empty((0, 2, hidden), np.float32)
        if active:
            spec, feat = _analyse(fr, _join([f for f in frames if len(f)]))
            row_counts = np.repeat(
                np.array([g.count for g in active], np.int64), [g.x.shape[0] for g in active]
            )
            gains, h_new = self._run_rows(feat, row_counts, _join([g.h for g in active]))
            synth = _synthesise(fr, spec, gains)
        outputs: list[tuple[F32, bytes] | None] = [None] * len(items)
        frame_pos = row = 0
        for g in groups:
            rows = g.x.shape[0]
            n_frames = rows * g.count
            h = h_new[row : row + rows] if g.count else g.h
            results = g.finish(fr, synth[frame_pos : frame_pos + n_frames], h, self.state_version)
            for i, result in zip(g.index, results, strict=True):
                outputs[i] = result
            frame_pos += n_frames
            row += rows if g.count else 0
        return [o for o in outputs if o is not None]

    def _run_rows(self, feat: F32, counts: npt.NDArray[np.int64], h_rows: F32) -> tuple[F32, F32]:
        """Gains for ``feat`` (rows' frames back to back); step s feeds rows with > s frames."""
        bins = self.framing.bins
        rows = len(counts)
        longest = int(counts.max())
        uniform = bool((counts == longest).all())
        if uniform:  # the common case: every session sent the same duration
            order = np.arange(rows)
            feat_t = np.ascontiguousarray(feat.reshape(rows, longest, bins).transpose(1, 0, 2))
        else:
            order = np.argsort(-counts, kind="stable")
            starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
            feat_t = np.zeros((longest, rows, bins), np.float32)
            for pos, r in enumerate(order):
                feat_t[: counts[r], pos] = feat[starts[r] : starts[r] + counts[r]]
        sorted_counts = counts[order]
        h = np.ascontiguousarray(h_rows[order].transpose(1, 0, 2))  # [2, rows, hidden]
        active = (
            [rows] * longest
            if uniform
            else [int(np.count_nonzero(sorted_counts > s)) for s in range(longest)]
        )
        with self.model.lock:
            gain_t, h = self.model.run_steps(feat_t, active, h)
        h_out = np.empty_like(h_rows)
        h_out[order] = h.transpose(1, 0, 2)
        if uniform:
            return np.ascontiguousarray(gain_t.transpose(1, 0, 2)).reshape(-1, bins), h_out
        gains = np.empty_like(feat)
        for pos, r in enumerate(order):
            gains[starts[r] : starts[r] + counts[r]] = gain_t[: counts[r], pos]
        return gains, h_out

    def offline(self, audio: npt.NDArray[Any]) -> F32:
        """The same processing over a whole signal at once, aligned (no delay), same shape.

        The end is padded with zeros so every input sample is final. With the fp32
        graph all frames go through ORT in one call.
        """
        fr = self.framing
        one_d = np.ndim(audio) == 1
        x = _as_channels_first(np.reshape(audio, (-1, 1)) if one_d else audio)
        channels, n = x.shape
        count = -(-n // fr.hop)  # frames until every input sample is final
        padded = np.zeros((channels, (count + 1) * fr.hop), np.float32)
        padded[:, :n] = x
        view = np.lib.stride_tricks.sliding_window_view(padded, fr.win, axis=1)[:, :: fr.hop][
            :, :count
        ]
        spec, feat = _analyse(fr, np.ascontiguousarray(view).reshape(-1, fr.win))
        feat3 = feat.reshape(channels, count, fr.bins)
        h = self.model.zero_state(channels)
        with self.model.lock:
            if self.model.frames_per_call is None and count:
                gain3, _ = self.model.run(feat3, h)
            else:
                feat_t = np.ascontiguousarray(feat3.transpose(1, 0, 2))
                gain_t, _ = self.model.run_steps(feat_t, [channels] * count, h)
                gain3 = gain_t.transpose(1, 0, 2)
        out = np.zeros((channels, n), np.float32)
        if count:
            spec3 = spec.reshape(channels, count, fr.bins)
            for c in range(channels):
                frames = _synthesise(fr, spec3[c], gain3[c])
                blocks, _ = _overlap_add(fr, frames, np.zeros(fr.hop, np.float32))
                out[c] = blocks[:n]
        return out[0] if one_d else np.ascontiguousarray(out.T)


def _join(arrays: list[F32]) -> F32:
    """Concatenate along the first axis; a lone array is used as is (no copy)."""
    return arrays[0] if len(arrays) == 1 else np.concatenate(arrays)


def _as_channels_first(audio: npt.NDArray[Any]) -> F32:
    if audio.ndim != 2:
        raise ProcessingError(f"audio must be (frames, channels), got shape {audio.shape}")
    x = np.ascontiguousarray(audio.T, dtype=np.float32)
    if not np.isfinite(x).all():
        # A NaN would live on in the GRU state forever; treat it as silence.
        x = np.nan_to_num(x, nan=0.0, posinf=0.0, neginf=0.0)
    return x


_models: dict[tuple[Any, ...], Model] = {}
_cache: dict[tuple[Any, ...], Denoiser] = {}
_cache_lock = threading.Lock()


def denoiser(
    rate: int,
    variant: str = "fp32",
    *,
    model_dir: Path | None = None,
    options: runtime.RuntimeOptions | None = None,
    state_precision: str | None = None,
) -> Denoiser:
    """A shared engine per (rate, variant, model dir, runtime options, state precision),
    loaded on first use; engines that differ only in state precision share the model."""
    opts = options or runtime.RuntimeOptions()
    key = (rate, check_variant(variant), str(files.model_dir(model_dir)), opts)
    version = state_version(variant, state_precision)
    with _cache_lock:
        engine = _cache.get((*key, version))
        if engine is None:
            model = _models.get(key)
            if model is None:
                model = _models[key] = Model(rate, variant, model_dir=model_dir, options=opts)
            engine = _cache[(*key, version)] = Denoiser(model, state_precision)
        return engine


def offline(
    audio: npt.NDArray[Any],
    rate: int,
    *,
    variant: str = "fp32",
    model_dir: Path | None = None,
) -> F32:
    """Denoise a whole signal (1-D or ``(frames, channels)``) in one go, without delay."""
    return denoiser(rate, variant, model_dir=model_dir).offline(audio)
