"""Batched streaming Silero VAD with the whole session state in bytes.

The model scores fixed windows (512 samples at 16 kHz, 256 at 8 kHz) and
needs the previous 64 (32) samples as context, so the context is stream state
just like the RNN state; a message's leftover samples wait in the state for
the next message. ``sr`` must be int64 (int32 is rejected) and any value other
than 16000 silently selects the 8 kHz branch, so rates are checked here.

Speech start/end follow upstream ``VADIterator`` (hysteresis: start at
``p >= threshold``; end once ``p < neg_threshold`` has lasted
``min_silence_ms``, cancelled by any ``p >= threshold``), without its padding.
"""

from __future__ import annotations

import struct
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

from audiostream.errors import ConfigError, ErrorCode, ProcessingError
from audiostream.models import files, runtime
from audiostream.models.prepare import SILERO_NAME

F32 = npt.NDArray[np.float32]

WINDOW = {16000: 512, 8000: 256}
CONTEXT = {16000: 64, 8000: 32}
RATES = tuple(WINDOW)
STATE_SHAPE = (2, 128)


def check_rate(rate: int) -> None:
    if rate not in WINDOW:
        raise ConfigError(
            f"Silero VAD runs at 8000 or 16000 Hz, not {rate}", ErrorCode.UNSUPPORTED_FORMAT
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class Hysteresis:
    threshold: float = 0.5
    neg_threshold: float = 0.35
    min_silence_ms: float = 100.0

    def __post_init__(self) -> None:
        if not 0.0 <= self.neg_threshold <= self.threshold <= 1.0:
            raise ConfigError(
                "VAD thresholds need 0 <= neg_threshold <= threshold <= 1",
                ErrorCode.INVALID_OPTION,
            )
        if not 0.0 <= self.min_silence_ms <= 10_000.0:
            raise ConfigError("min_silence_ms must be in [0, 10000]", ErrorCode.INVALID_OPTION)

    @classmethod
    def from_params(cls, params: Mapping[str, Any]) -> Hysteresis:
        values: dict[str, float] = {}
        for key in ("threshold", "neg_threshold", "min_silence_ms"):
            if key in params:
                v = params[key]
                if not isinstance(v, int | float) or isinstance(v, bool):
                    raise ConfigError(
                        f"parameter {key!r} must be a number", ErrorCode.INVALID_OPTION
                    )
                values[key] = float(v)
        if "threshold" in values and "neg_threshold" not in values:
            values["neg_threshold"] = max(0.0, values["threshold"] - 0.15)
        return cls(**values)


@dataclass(frozen=True, slots=True)
class Window:
    """One scored window; ``end`` is where it ends, in frames into the message."""

    probability: float
    end: int


@dataclass(frozen=True, slots=True)
class Event:
    name: str  # "speech_start" | "speech_end"
    end: int  # frames into the message where the deciding window ends


@dataclass(slots=True)
class Result:
    windows: list[Window] = field(default_factory=list)
    events: list[Event] = field(default_factory=list)
    state: bytes = b""


_MAGIC = b"SVD1"
_VERSION = 1
_HEADER = struct.Struct("<4sHHIBxxxqqI")  # magic version - rate triggered temp_end windows rem


@dataclass(slots=True)
class StreamState:
    rnn: F32  # [2, 128]
    context: F32  # [ctx]
    remainder: F32  # [< window]
    triggered: bool = False
    temp_end: int = 0  # sample index where the current silence began, 0 = none
    windows: int = 0  # windows scored so far

    @classmethod
    def new(cls, rate: int) -> StreamState:
        return cls(
            np.zeros(STATE_SHAPE, np.float32),
            np.zeros(CONTEXT[rate], np.float32),
            np.zeros(0, np.float32),
        )

    def to_bytes(self, rate: int) -> bytes:
        header = _HEADER.pack(
            _MAGIC,
            _VERSION,
            0,
            rate,
            int(self.triggered),
            self.temp_end,
            self.windows,
            self.remainder.size,
        )
        return header + b"".join(
            np.ascontiguousarray(a, dtype="<f4").tobytes()
            for a in (self.rnn, self.context, self.remainder)
        )

    @classmethod
    def from_bytes(cls, raw: bytes, rate: int) -> StreamState:
        def bad(why: str) -> ProcessingError:
            return ProcessingError(f"vad state is unusable: {why}", ErrorCode.PROCESSING_FAILED)

        if len(raw) < _HEADER.size:
            raise bad(f"{len(raw)} bytes is shorter than the header")
        magic, version, _, srate, trig, temp_end, windows, rem = _HEADER.unpack_from(raw)
        if magic != _MAGIC:
            raise bad("not a Silero VAD state")
        if version != _VERSION:
            raise bad(f"version {version}, this worker reads version {_VERSION}")
        if srate != rate:
            raise bad(f"made at {srate} Hz, audio is {rate} Hz")
        if rem >= WINDOW[rate] or windows < 0 or temp_end < 0 or trig > 1:
            raise bad("counters out of range")
        sizes = (STATE_SHAPE[0] * STATE_SHAPE[1], CONTEXT[rate], rem)
        if len(raw) != _HEADER.size + 4 * sum(sizes):
            raise bad(f"{len(raw)} bytes, expected {_HEADER.size + 4 * sum(sizes)}")
        flat = np.frombuffer(raw, dtype="<f4", offset=_HEADER.size).astype(np.float32)
        if not np.isfinite(flat).all():
            raise bad("non-finite values")
        a, b, c = np.split(flat, np.cumsum(sizes)[:-1])
        return cls(a.reshape(STATE_SHAPE), b, c, bool(trig), temp_end, windows)


class Model:
    def __init__(
        self, *, model_dir: Path | None = None, options: runtime.RuntimeOptions | None = None
    ) -> None:
        path, _ = files.prepared_file(files.model_dir(model_dir), SILERO_NAME)
        files.verify(path, files.SOURCES["silero-vad"].sha256)
        self.session = runtime.create_session(path, options or runtime.RuntimeOptions())
        self.providers = runtime.providers_in_use(self.session)
        self.lock = threading.Lock()

    def run(self, x: F32, state: F32, rate: int) -> tuple[F32, F32]:
        """Probabilities ``[B]`` and new state for context+window rows ``x [B, ctx+win]``."""
        check_rate(rate)
        out, new_state = runtime.run(
            self.session,
            {"input": x, "state": state, "sr": np.array(rate, dtype=np.int64)},
            ("output", "stateN"),
        )
        return out.reshape(-1).astype(np.float32), new_state.astype(np.float32, copy=False)


class ScoringModel(Protocol):
    """What the detector needs from a model (tests script probabilities with it)."""

    lock: threading.Lock
    providers: list[str]

    def run(self, x: F32, state: F32, rate: int) -> tuple[F32, F32]: ...


class Detector:
    """Streams many sessions of one rate through the model, one ORT call per window step."""

    def __init__(self, model: ScoringModel) -> None:
        self.model = model

    def process(
        self,
        items: Sequence[tuple[npt.NDArray[Any], bytes | None, Hysteresis]],
        rate: int,
    ) -> list[Result]:
        """Score ``(audio (frames, channels), state, hysteresis)`` items of one rate."""
        check_rate(rate)
        win, ctx = WINDOW[rate], CONTEXT[rate]
        states: list[StreamState] = []
        chunks: list[F32] = []  # [count, ctx + win] per item
        pending_before: list[int] = []
        for audio, raw, _ in items:
            mono = _mono(audio)
            st = StreamState.new(rate) if raw is None else StreamState.from_bytes(raw, rate)
            pending_before.append(st.remainder.size)
            buf = np.concatenate([st.context, st.remainder, mono])
            count = (buf.size - ctx) // win
            if count:
                view = np.lib.stride_tricks.sliding_window_view(buf, ctx + win)[::win][:count]
                chunks.append(np.ascontiguousarray(view))
            else:
                chunks.append(np.zeros((0, ctx + win), np.float32))
            used = count * win
            st.context = buf[used : used + ctx].copy()
            st.remainder = buf[used + ctx :].copy()
            states.append(st)

        counts = np.array([c.shape[0] for c in chunks])
        probs: list[F32] = [np.zeros(0, np.float32)] * len(items)
        if counts.size and counts.max() > 0:
            order = np.argsort(-counts, kind="stable")
            rnn = np.stack([states[i].rnn for i in order], axis=1)  # [2, B, 128]
            steps = np.zeros((int(counts.max()), len(items)), np.float32)
            with self.model.lock:
                for s in range(int(counts.max())):
                    active = int(np.count_nonzero(counts[order] > s))
                    x = np.stack([chunks[i][s] for i in order[:active]])
                    p, new = self.model.run(x, np.ascontiguousarray(rnn[:, :active]), rate)
                    steps[s, :active] = p
                    rnn[:, :active] = new
            for pos, i in enumerate(order):
                probs[i] = steps[: counts[i], pos].copy()
                states[i].rnn = np.ascontiguousarray(rnn[:, pos])

        results = []
        for (_, _, hyst), st, p, before in zip(items, states, probs, pending_before, strict=True):
            res = Result()
            min_silence = hyst.min_silence_ms * rate / 1000.0
            for k, prob in enumerate(p.tolist()):
                end = (k + 1) * win - before  # frames into this message
                st.windows += 1
                current = st.windows * win
                res.windows.append(Window(prob, end))
                if prob >= hyst.threshold:
                    st.temp_end = 0
                    if not st.triggered:
                        st.triggered = True
                        res.events.append(Event("speech_start", end))
                elif prob < hyst.neg_threshold and st.triggered:
                    if not st.temp_end:
                        st.temp_end = current
                    if current - st.temp_end >= min_silence:
                        st.temp_end = 0
                        st.triggered = False
                        res.events.append(Event("speech_end", end))
            res.state = st.to_bytes(rate)
            results.append(res)
        return results


def _mono(audio: npt.NDArray[Any]) -> F32:
    if audio.ndim != 2:
        raise ProcessingError(f"audio must be (frames, channels), got shape {audio.shape}")
    mono = audio[:, 0] if audio.shape[1] == 1 else audio.mean(axis=1)
    x = np.asarray(mono, dtype=np.float32)
    if not np.isfinite(x).all():
        x = np.nan_to_num(x, nan=0.0, posinf=0.0, neginf=0.0)
    return x


_cache: dict[tuple[Any, ...], Detector] = {}
_cache_lock = threading.Lock()


def detector(
    *, model_dir: Path | None = None, options: runtime.RuntimeOptions | None = None
) -> Detector:
    """A shared detector per (model dir, runtime options), loaded on first use."""
    opts = options or runtime.RuntimeOptions()
    key = (str(files.model_dir(model_dir)), opts)
    with _cache_lock:
        det = _cache.get(key)
        if det is None:
            det = _cache[key] = Detector(Model(model_dir=model_dir, options=opts))
        return det
