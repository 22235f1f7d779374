"""The session's reply journal: replies the client may still need after a reconnect.

A reply stays unacked at the broker while it is in the journal, so a gateway that
dies hands the journal back to the reply queue for whoever resumes the session.
Entries leave from the front only, each once: trimming is O(1) amortised, whatever
the session's age.

How it is bounded:

* the client's ``ack`` (``confirm``) trims every reply it covers;
* a client that never acks: once the journal holds more than ``cap`` replies, the
  oldest whose outcomes were already written to the socket (``delivered``) count as
  delivered and are trimmed too. A resume then replays what the journal still holds
  and answers the rest with ``expired``. ``cap`` must stay below the reply queue's
  prefetch (the broker stops delivering to a consumer holding ``prefetch`` unacked
  replies, which would stall the session), so it is checked against both transports'
  prefetch in the tests;
* the same once the journal's audio passes ``max_bytes`` (a client of the largest
  chunks reaches it long before ``cap`` replies);
* the newest reply always stays: it carries the session's state for a resume.

Replies whose outcomes were not written yet (a client that stopped reading) are
kept beyond ``cap``: the broker's prefetch then holds the session back, and the
gateway's slow-consumer rule closes such a connection.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from audiostream.envelope import Reply
from audiostream.transport.base import Delivery

#: Most replies kept for a client that does not ack (and reads what it is sent).
#: Each reply holds at least one chunk, so this is at least four times the largest
#: credit window (64 chunks) a client can have in flight when a connection breaks.
MAX_JOURNAL = 256
#: Most reply audio bytes kept for such a client, whatever the chunk size.
MAX_JOURNAL_BYTES = 8 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class JournalEntry:
    """A reply and the broker delivery that must be settled once it leaves."""

    reply: Reply
    delivery: Delivery

    @property
    def end(self) -> int:
        """First seq after the chunks this reply covers."""
        return self.reply.seq + self.reply.chunk_count


class Journal:
    """Replies in seq order; ``append``/``confirm``/``delivered`` return the entries that
    left (the caller acks their deliveries)."""

    __slots__ = ("_entries", "cap", "confirmed", "max_bytes", "nbytes", "written")

    def __init__(self, cap: int = MAX_JOURNAL, entries: Iterable[JournalEntry] = (), *,
                 max_bytes: int = MAX_JOURNAL_BYTES) -> None:
        if cap < 1 or max_bytes < 1:
            raise ValueError("the journal caps must be >= 1")
        self.cap = cap
        self.max_bytes = max_bytes
        self._entries: deque[JournalEntry] = deque(sorted(entries, key=lambda e: e.reply.seq))
        self.nbytes = sum(len(e.reply.audio) for e in self._entries)
        """Reply audio bytes held."""
        self.confirmed = 0
        """Outcomes the client said it holds (seqs below)."""
        self.written = 0
        """Outcomes written to the client's socket (seqs below)."""

    def __len__(self) -> int:
        return len(self._entries)

    def __iter__(self) -> Iterator[JournalEntry]:
        return iter(self._entries)

    @property
    def newest(self) -> Reply | None:
        return self._entries[-1].reply if self._entries else None

    def append(self, entry: JournalEntry) -> list[JournalEntry]:
        """Add the newest reply (replies arrive in seq order: one message in flight)."""
        self._entries.append(entry)
        self.nbytes += len(entry.reply.audio)
        return self._trim()

    def confirm(self, received: int) -> list[JournalEntry]:
        """The client holds every outcome before ``received``."""
        if received <= self.confirmed:
            return []
        self.confirmed = received
        self.written = max(self.written, received)
        return self._trim()

    def delivered(self, written: int) -> list[JournalEntry]:
        """Every outcome before ``written`` is on the client's socket."""
        if written <= self.written:
            return []
        self.written = written
        return self._trim() if self._over() else []

    def drain(self) -> list[JournalEntry]:
        """Take every entry (the session closes)."""
        out = list(self._entries)
        self._entries.clear()
        self.nbytes = 0
        return out

    def _over(self) -> bool:
        return len(self._entries) > self.cap or self.nbytes > self.max_bytes

    def _trim(self) -> list[JournalEntry]:
        entries = self._entries
        out: list[JournalEntry] = []
        while len(entries) > 1:
            head = entries[0]
            end = head.end
            if end <= self.confirmed or (end <= self.written and self._over()):
                out.append(entries.popleft())
                self.nbytes -= len(head.reply.audio)
            else:
                break
        return out
