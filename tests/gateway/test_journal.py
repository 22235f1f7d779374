"""The reply journal with plain values: trimming by ack, by the cap for a client that
never acks, and agreement between the cap and the transports' reply prefetch."""

from __future__ import annotations

import pytest

from audiostream.audio import AudioFormat, Encoding
from audiostream.envelope import Reply, ReplyStatus
from audiostream.gateway.journal import MAX_JOURNAL, MAX_JOURNAL_BYTES, Journal, JournalEntry
from audiostream.transport.memory import REPLY_PREFETCH
from audiostream.transport.rabbitmq import DEFAULT_REPLY_PREFETCH

FMT = AudioFormat(Encoding.PCM_S16LE, 16000, 1)


class Tag:
    """A stand-in delivery: the journal only carries it."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.body = b""
        self.redelivered = False

    async def ack(self) -> None: ...

    async def reject(self) -> None: ...

    async def release(self) -> None: ...


def entry(seq: int, chunks: int = 1, audio: bytes = b"") -> JournalEntry:
    reply = Reply("s", seq, seq, ReplyStatus.OK, (320,) * chunks, FMT, audio)
    return JournalEntry(reply, Tag(seq))


BIG = b"\0" * 384_000  # one reply of the largest legal chunk


def seqs(entries: list[JournalEntry]) -> list[int]:
    return [e.reply.seq for e in entries]


def test_ack_trims_what_the_client_holds_but_keeps_the_newest() -> None:
    j = Journal(cap=100)
    for s in range(0, 10, 2):  # replies of 2 chunks: 0-1, 2-3, ..., 8-9
        assert j.append(entry(s, 2)) == []
    assert seqs(j.confirm(4)) == [0, 2]
    assert seqs(j.confirm(5)) == []  # 4-5 is only half confirmed
    assert seqs(j.confirm(3)) == []  # an older ack changes nothing
    assert seqs(j.confirm(10)) == [4, 6]  # the newest (8-9) stays for its state
    assert len(j) == 1 and j.newest is not None and j.newest.seq == 8


def test_below_the_cap_written_outcomes_stay_for_a_resume() -> None:
    j = Journal(cap=5)
    for s in range(5):
        j.append(entry(s))
    assert j.delivered(5) == []
    assert len(j) == 5


def test_over_the_cap_written_outcomes_count_as_delivered() -> None:
    j = Journal(cap=3)
    trimmed: list[JournalEntry] = []
    for s in range(10):
        trimmed += j.append(entry(s))
        trimmed += j.delivered(s + 1)  # the writer put the outcome on the socket
    assert seqs(trimmed) == list(range(7))
    assert seqs(list(j)) == [7, 8, 9]


def test_unwritten_outcomes_are_kept_past_the_cap() -> None:
    """A client that stopped reading: nothing it has not been sent is dropped."""
    j = Journal(cap=3)
    for s in range(10):
        j.append(entry(s))
    assert len(j) == 10
    assert seqs(j.delivered(4)) == [0, 1, 2, 3]
    assert seqs(j.delivered(10)) == [4, 5, 6]
    assert len(j) == 3


def test_over_the_byte_cap_written_outcomes_count_as_delivered() -> None:
    """Replies of the largest chunks: the journal's audio stays within 8 MiB (plus the
    newest reply) for a client that reads and never acks, long before 256 replies."""
    j = Journal()
    assert j.max_bytes == MAX_JOURNAL_BYTES == 8 * 1024 * 1024
    trimmed: list[JournalEntry] = []
    for s in range(100):
        trimmed += j.append(entry(s, audio=BIG))
        trimmed += j.delivered(s + 1)
        assert j.nbytes <= MAX_JOURNAL_BYTES
    assert len(j) == MAX_JOURNAL_BYTES // len(BIG) < MAX_JOURNAL
    assert seqs(trimmed) == list(range(100 - len(j)))
    assert j.nbytes == len(j) * len(BIG)
    assert j.drain() and j.nbytes == 0


def test_unwritten_outcomes_are_kept_past_the_byte_cap() -> None:
    """Nothing the client was not sent is dropped for bytes either: the slow-consumer
    rule closes such a connection (4023) and a resume replays it."""
    j = Journal(max_bytes=3 * len(BIG))
    for s in range(10):
        j.append(entry(s, audio=BIG))
    assert len(j) == 10 and j.nbytes == 10 * len(BIG)
    assert seqs(j.delivered(4)) == [0, 1, 2, 3]
    assert seqs(j.delivered(10)) == [4, 5, 6]
    assert j.nbytes == 3 * len(BIG)


def test_acks_keep_the_byte_count() -> None:
    j = Journal(entries=[entry(0, audio=BIG), entry(1, audio=BIG)])
    assert j.nbytes == 2 * len(BIG)
    assert seqs(j.confirm(1)) == [0] and j.nbytes == len(BIG)


def test_trimming_is_amortised_constant() -> None:
    """Each entry is looked at once when it leaves, plus once per call: a long-lived
    non-acking session costs the same per reply at minute 0 and minute 60."""
    j = Journal(cap=MAX_JOURNAL)
    left = 0
    for s in range(50_000):
        left += len(j.append(entry(s)))
        left += len(j.delivered(s + 1))
    assert left == 50_000 - MAX_JOURNAL
    assert len(j) == MAX_JOURNAL


def test_a_resumed_journal_is_in_seq_order() -> None:
    j = Journal(cap=10, entries=[entry(4), entry(0), entry(2, 2)])
    assert seqs(list(j)) == [0, 2, 4]
    assert seqs(j.confirm(4)) == [0, 2]
    assert seqs(j.drain()) == [4] and len(j) == 0


def test_cap_must_be_positive() -> None:
    with pytest.raises(ValueError):
        Journal(cap=0)


def test_journal_cap_agrees_with_the_reply_prefetch() -> None:
    """The broker stops delivering to a consumer that holds ``prefetch`` unacked
    replies: the journal (plus the one reply being handled and a few control
    messages) must fit below it on both transports, or a non-acking client stalls."""
    headroom = 16
    assert MAX_JOURNAL + headroom <= DEFAULT_REPLY_PREFETCH
    assert MAX_JOURNAL + headroom <= REPLY_PREFETCH
