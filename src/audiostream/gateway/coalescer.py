"""The per-session send policy: which chunks go out in the next work message, and when.

Pure (no I/O, no asyncio), clock injected, like ``worker/batcher.py``. The pipeline
calls ``add`` for each chunk, ``tick`` + ``take`` whenever something may have
changed (a chunk, a reply, its one timer at ``due_at()``), and ``answered`` /
``failed`` when the message in flight is settled.

* **One message in flight per session.** The workers return the session's state
  with each reply, so messages must be processed in order; chunks that arrive
  meanwhile wait here and go out together in the next message.
* **Deadlines.** A chunk not answered by its deadline gets an ``expired`` outcome,
  whether it is still queued here or in flight (a late reply is then discarded).
* **Message size cap.** A message carries at most ``max_message_bytes`` of audio (one
  chunk alone may be larger): the gateway, the broker and the worker each hold a
  whole message at once, several copies of it. Chunks past the cap wait for the next
  message (nothing is refused for it; a chunk that waits past its deadline gets
  ``expired``, as any queued chunk does). The cap is also what other sessions wait
  behind: the broker moves a message whole, in order, on the queues, channels and
  connections every session shares, so one session's big messages add their transfer
  time to everyone's small ones (2 MiB messages: 10-36 ms per leg, ``MAX_MESSAGE_BYTES``).
* **Backlog cap.** Past ``max_backlog`` waiting chunks, new ones are refused as
  ``overloaded`` rather than queued without bound. The bytes held (``queued_bytes``:
  waiting and in flight) are bounded by the connection, which stops reading its
  socket above its byte budget (``gateway/server.py``).
* **Proactive coalescing (the latency budget).** Every message costs the gateway,
  the broker and the worker the same fixed work whatever it carries, so under load
  the number of messages per session-second is what to cut. When replies take
  longer than the quickest reply seen (``ReplyFloor``: the distance to the broker
  and the steps' own time, which no coalescing shortens) by more than
  ``budget_fraction`` of the chunk interval (the gateway, broker or workers are
  loaded: messages queue), the next message waits until it holds ``target``
  chunks, or its oldest chunk has waited about ``max_hold_s``. An idle system sends
  every chunk at once, however far away its broker is: no added latency. The target
  follows a moving average of reply times with hysteresis, so it does not flap
  between two sizes; a sample enters the average capped at the reply time that
  already asks for the largest message, so one slow burst does not hold the target
  up long after it. A hold in which no second chunk arrived did not pay (the client
  waits for our answer before it sends more): holds pause for ``MISS_BACKOFF_S``.
* **The gateway's floor.** ``set_floor`` passes on the gateway-wide coalescing floor
  (``gateway/budget.py``): while the whole gateway is loaded every session waits for
  at least that many chunks (within ``max_hold_s``), before its own reply times rise.
* ``linger_s`` is the older, opt-in fixed hold: every message waits until its oldest
  chunk is that old (or ``max_chunks`` are waiting).
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass
from enum import Enum
from typing import Any

from audiostream.errors import ErrorCode

#: Weight of the newest sample in the moving averages (chunk gaps, reply times).
EWMA_WEIGHT = 0.2
#: The target shrinks only once reply times fell below this share of what raised it.
HYSTERESIS = 0.7
#: Default cap on a message's audio. Small enough that another session's message waits
#: behind one of them for a few ms on the broker (benchmarks/nonreader.py: with 2 MiB
#: messages, 20 ms real-time sessions waited 10-36 ms more per leg while one session
#: moved 26 MB; with this cap 5-10 ms), large enough that a message still carries 8
#: one-second chunks of 16 kHz mono 16-bit audio, and 50 (``max_chunks`` at the
#: gateway) 20 ms chunks of 16-bit audio up to 48 kHz stereo.
MAX_MESSAGE_BYTES = 256 * 1024
#: After a hold in which no second chunk arrived (a client that waits for each outcome
#: before it sends the next), no proactive hold for this long.
MISS_BACKOFF_S = 1.0


@dataclass(frozen=True, slots=True)
class Outcome:
    """What the gateway hands back to the connection for one chunk."""

    seq: int
    audio: bytes | None = None
    code: ErrorCode | None = None
    message: str = ""
    events: tuple[Mapping[str, Any], ...] = ()


@dataclass(frozen=True, slots=True)
class Chunk:
    seq: int
    data: bytes
    received_at: float
    deadline: float


@dataclass(frozen=True, slots=True)
class Message:
    """Chunks sent together as one work message (consecutive seqs)."""

    msg_id: int
    chunks: tuple[Chunk, ...]
    sent_at: float
    deadline: float
    nbytes: int = 0
    """Audio bytes the chunks hold."""


class ReplyFloor:
    """The quickest reply seen: what a reply takes with nothing queued.

    Without it, a broker 10 ms away (or a slow one: 7 ms for the bare aio-pika round
    trip on one 2-core VM) made an idle session's replies look loaded, and every other
    chunk was held for 30 ms. Shared by a gateway's sessions of one pipeline
    (``LoadBudget.reply_floor``), so a session that starts under load knows what idle
    looked like. It only ever falls: a floor from before the path got slower errs
    towards coalescing, which is what happened without it."""

    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = math.inf

    def observe(self, rtt: float) -> None:
        if rtt < self.value:
            self.value = rtt


@dataclass(frozen=True, slots=True, kw_only=True)
class CoalescePolicy:
    max_chunks: int = 50
    """Most chunks carried by one message."""
    max_message_bytes: int = MAX_MESSAGE_BYTES
    """Most audio bytes carried by one message, unless its first chunk alone is larger."""
    max_backlog: int = 1000
    """Most chunks waiting for a session before new ones are refused as overloaded."""
    linger_s: float = 0.0
    """Fixed hold: a message waits until its oldest chunk is this old (opt-in)."""
    budget_fraction: float = 0.5
    """Coalesce when replies take longer than the quickest reply seen by more than this
    share of the chunk interval (0 turns proactive coalescing off)."""
    max_hold_s: float = 0.045
    """Most latency proactive coalescing adds to a chunk (about): under half of a
    100 ms latency goal, so a held chunk still has room for the round trip."""

    def __post_init__(self) -> None:
        if self.max_chunks < 1 or self.max_backlog < 1 or self.max_message_bytes < 1:
            raise ValueError("max_chunks, max_backlog and max_message_bytes must be >= 1")
        if self.linger_s < 0 or self.budget_fraction < 0 or self.max_hold_s < 0:
            raise ValueError("linger_s, budget_fraction and max_hold_s must be >= 0")


class Phase(Enum):
    IDLE = "idle"
    """Nothing waits, nothing is in flight."""
    COLLECTING = "collecting"
    """Chunks wait and nothing is in flight: the next message is due at ``due_at()``."""
    IN_FLIGHT = "in_flight"
    """A message awaits its reply; new chunks wait for it."""
    CLOSED = "closed"


QUEUED_EXPIRED = "deadline passed while queued at the gateway"
FLIGHT_EXPIRED = "deadline passed before the processed audio came back"
OVERLOADED = "session backlog is full; the pipeline is behind"


class Coalescer:
    def __init__(
        self,
        *,
        deadline_s: float,
        policy: CoalescePolicy | None = None,
        first_msg_id: int = 0,
        reply_floor: ReplyFloor | None = None,
    ) -> None:
        if deadline_s <= 0:
            raise ValueError("deadline_s must be > 0")
        self.policy = policy = policy or CoalescePolicy()
        self.deadline_s = deadline_s
        # No hold may cost a chunk its deadline: at most half of it.
        self._linger = min(policy.linger_s, deadline_s / 2)
        self._max_hold = min(policy.max_hold_s, deadline_s / 2)
        self._backlog: deque[Chunk] = deque()
        self._backlog_bytes = 0
        self._inflight: Message | None = None
        self._next_id = first_msg_id
        self._closed = False
        self._last_at: float | None = None
        self.gap: float | None = None
        """Moving average of the time between chunks; None before the second one."""
        self.rtt: float | None = None
        """Moving average of reply times (sent -> answered or expired)."""
        self.reply_floor = reply_floor or ReplyFloor()
        self.target = 1
        """Chunks the next message waits for by this session's reply times (1: at once)."""
        self.floor = 1
        """The gateway's floor as it applies to this session (see ``set_floor``)."""
        self._quiet_until = -math.inf
        self.misses = 0
        """Holds that ended with a single chunk (see ``MISS_BACKOFF_S``)."""

    # -- state ----------------------------------------------------------------------
    @property
    def phase(self) -> Phase:
        if self._closed:
            return Phase.CLOSED
        if self._inflight is not None:
            return Phase.IN_FLIGHT
        return Phase.COLLECTING if self._backlog else Phase.IDLE

    @property
    def in_flight(self) -> Message | None:
        return self._inflight

    @property
    def waiting(self) -> int:
        return len(self._backlog)

    @property
    def outstanding(self) -> int:
        """Chunks without an outcome yet (waiting or in flight)."""
        return len(self._backlog) + (len(self._inflight.chunks) if self._inflight else 0)

    @property
    def queued_bytes(self) -> int:
        """Audio bytes of the chunks without an outcome (waiting or in flight)."""
        return self._backlog_bytes + (self._inflight.nbytes if self._inflight else 0)

    @property
    def oldest_pending_at(self) -> float | None:
        if self._inflight is not None:
            return self._inflight.chunks[0].received_at
        return self._backlog[0].received_at if self._backlog else None

    # -- inputs ---------------------------------------------------------------------
    def add(self, seq: int, data: bytes, now: float) -> list[Outcome]:
        """Queue a chunk received at ``now``; an ``overloaded`` outcome if it cannot be."""
        if self._closed:
            return []
        if len(self._backlog) >= self.policy.max_backlog:
            return [Outcome(seq, code=ErrorCode.OVERLOADED, message=OVERLOADED)]
        if self._last_at is not None:
            gap = max(0.0, now - self._last_at)
            self.gap = gap if self.gap is None else self.gap + EWMA_WEIGHT * (gap - self.gap)
        self._last_at = now
        self._backlog.append(Chunk(seq, data, now, now + self.deadline_s))
        self._backlog_bytes += len(data)
        return []

    def tick(self, now: float) -> list[Outcome]:
        """Outcomes of the chunks whose deadline has passed (in flight or waiting)."""
        out: list[Outcome] = []
        flight = self._inflight
        if flight is not None and flight.deadline <= now:
            self._inflight = None
            self.observe(now - flight.sent_at, now)
            out += [Outcome(c.seq, code=ErrorCode.EXPIRED, message=FLIGHT_EXPIRED)
                    for c in flight.chunks]
        backlog = self._backlog
        while backlog and backlog[0].deadline <= now:
            c = backlog.popleft()
            self._backlog_bytes -= len(c.data)
            out.append(Outcome(c.seq, code=ErrorCode.EXPIRED, message=QUEUED_EXPIRED))
        return out

    def take(self, now: float) -> Message | None:
        """The next message, if one is due now (call ``tick`` first)."""
        if self._closed or self._inflight is not None or not self._backlog:
            return None
        release = self._release_at()
        if release is not None and now < release:
            return None
        backlog = self._backlog
        if release is not None and len(backlog) == 1 and self._size() > 1:
            self.misses += 1
            self.target = self.floor = 1
            self._quiet_until = now + MISS_BACKOFF_S
        n = min(self.policy.max_chunks, len(backlog))
        cap = self.policy.max_message_bytes
        first = backlog.popleft()
        taken, nbytes = [first], len(first.data)
        while len(taken) < n and nbytes + len(backlog[0].data) <= cap:
            c = backlog.popleft()
            taken.append(c)
            nbytes += len(c.data)
        chunks = tuple(taken)
        self._backlog_bytes -= nbytes
        msg = Message(self._next_id, chunks, now, min(c.deadline for c in chunks), nbytes)
        self._next_id += 1
        self._inflight = msg
        return msg

    def answered(self, msg_id: int, now: float) -> Message | None:
        """The reply to ``msg_id`` arrived: the message in flight, or None if it is not
        awaited (a duplicate, or a reply past its deadline)."""
        flight = self._inflight
        if flight is None or flight.msg_id != msg_id:
            return None
        self._inflight = None
        self.observe(now - flight.sent_at, now)
        return flight

    def failed(self, msg_id: int, code: ErrorCode, message: str) -> list[Outcome]:
        """The message could not be sent: its chunks get ``code``."""
        flight = self._inflight
        if flight is None or flight.msg_id != msg_id:
            return []
        self._inflight = None
        return [Outcome(c.seq, code=code, message=message) for c in flight.chunks]

    def close(self) -> None:
        self._closed = True
        self._backlog.clear()
        self._backlog_bytes = 0
        self._inflight = None

    # -- timing ---------------------------------------------------------------------
    def due_at(self) -> float | None:
        """When ``tick``/``take`` next have something to do (None: only on new input)."""
        times: list[float] = []
        if self._inflight is not None:
            times.append(self._inflight.deadline)
        if self._backlog:
            times.append(self._backlog[0].deadline)
            if self._inflight is None:
                release = self._release_at()
                times.append(self._backlog[0].received_at if release is None else release)
        return min(times) if times else None

    def set_floor(self, floor: int, now: float) -> None:
        """The gateway-wide coalescing floor (``gateway/budget.py``), capped by what this
        session's chunk interval fits in ``max_hold_s``; ignored during a miss backoff
        and with a fixed ``linger_s``."""
        gap = self.gap
        if (floor <= 1 or gap is None or gap <= 0 or now < self._quiet_until
                or self._linger > 0 or self.policy.budget_fraction <= 0):
            self.floor = 1
        else:
            self.floor = min(floor, self._most(gap))

    def _size(self) -> int:
        return self.target if self.target >= self.floor else self.floor

    def _fill(self) -> int:
        return self.policy.max_chunks if self._linger > 0 else self._size()

    def _hold(self) -> float:
        hold = self._linger
        size = self._size()
        if size > 1 and self.gap is not None:
            hold = max(hold, min(self._max_hold, (size - 0.5) * self.gap))
        return hold

    def _most(self, gap: float) -> int:
        """Most chunks one message can wait for within the hold limit."""
        return max(1, min(self.policy.max_chunks, 1 + math.floor(self._max_hold / gap)))

    def _release_at(self) -> float | None:
        """When the waiting chunks must go even if the message is not full (None: now)."""
        if (len(self._backlog) >= self._fill()
                or self._backlog_bytes >= self.policy.max_message_bytes):
            return None  # the next message is full
        hold = self._hold()
        return self._backlog[0].received_at + hold if hold > 0 else None

    def observe(self, rtt: float, now: float) -> None:
        """A reply time (``answered`` and expiries report theirs): update the moving
        average and the target size."""
        rtt = max(0.0, rtt)
        self.reply_floor.observe(rtt)
        if (gap := self.gap) is not None and gap > 0 and self.policy.budget_fraction > 0:
            # A reply slower than what already asks for the largest message says nothing
            # more about the size to choose; averaged in whole, one burst (a 300 ms reply
            # behind another session's big messages) kept the target up for 0.7-1.0 s
            # after replies were fast again (21 replies). Capped: 10.
            rtt = min(rtt, self.policy.budget_fraction * gap * self._most(gap))
        self.rtt = rtt if self.rtt is None else self.rtt + EWMA_WEIGHT * (rtt - self.rtt)
        if now < self._quiet_until:
            self.target = 1
            return
        want = self._want(self.rtt)
        if want < self.target:
            want = min(self.target, self._want(self.rtt / HYSTERESIS))
        self.target = want

    def _want(self, rtt: float) -> int:
        p = self.policy
        gap = self.gap
        if p.budget_fraction <= 0 or gap is None or gap <= 0:
            return 1
        unit = p.budget_fraction * gap
        if rtt - self.reply_floor.value < unit:
            return 1  # nothing queues (much): a bigger message would only wait longer
        # Sized by the whole reply time, as before the floor existed: under load the
        # floor is a small part of it, and the message rate is what must fall.
        return min(self._most(gap), 1 + math.floor(rtt / unit))
