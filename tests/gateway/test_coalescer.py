"""The per-session send policy with plain values and an explicit clock."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from audiostream.errors import ErrorCode
from audiostream.gateway.coalescer import (
    FLIGHT_EXPIRED,
    QUEUED_EXPIRED,
    CoalescePolicy,
    Coalescer,
    Phase,
    ReplyFloor,
)

PCM = b"\0\0" * 320
OFF = CoalescePolicy(budget_fraction=0)


def seen(quickest: float = 0.001) -> ReplyFloor:
    """A reply floor that has seen an idle reply this fast (shared by a gateway's
    sessions, so a session's first replies may already be loaded ones)."""
    floor = ReplyFloor()
    floor.observe(quickest)
    return floor


def test_sends_each_chunk_at_once_one_in_flight() -> None:
    c = Coalescer(deadline_s=1.0, policy=OFF)
    assert c.phase is Phase.IDLE and c.due_at() is None
    assert c.add(0, PCM, 10.0) == []
    assert c.phase is Phase.COLLECTING
    m = c.take(10.0)
    assert m is not None and [ch.seq for ch in m.chunks] == [0] and m.deadline == 11.0
    assert c.phase is Phase.IN_FLIGHT
    c.add(1, PCM, 10.01)
    c.add(2, PCM, 10.02)
    assert c.take(10.02) is None  # one message in flight
    assert c.due_at() == 11.0  # its deadline
    assert c.answered(m.msg_id + 7, 10.03) is None  # not awaited
    assert c.answered(m.msg_id, 10.03) is m
    nxt = c.take(10.03)
    assert nxt is not None and [ch.seq for ch in nxt.chunks] == [1, 2]
    assert nxt.msg_id == m.msg_id + 1
    assert c.answered(nxt.msg_id, 10.04) is nxt
    assert c.phase is Phase.IDLE and c.outstanding == 0


def test_messages_carry_at_most_max_chunks() -> None:
    c = Coalescer(deadline_s=1.0, policy=CoalescePolicy(max_chunks=3, budget_fraction=0))
    for s in range(7):
        c.add(s, PCM, 0.0)
    sizes = []
    while (m := c.take(0.0)) is not None:
        sizes.append(len(m.chunks))
        c.answered(m.msg_id, 0.0)
    assert sizes == [3, 3, 1]


BIG = b"\0" * 384_000  # 1 s of 48 kHz stereo float32: the largest legal chunk


def test_messages_carry_at_most_max_message_bytes_and_nothing_is_lost() -> None:
    """Ten 200 ms chunks of 48 kHz stereo float32 (76,800 B) at once: by default messages
    of at most 256 KiB (three chunks; other sessions' messages wait behind each one on
    the broker), the rest waits for the next message, every chunk goes out once, in
    order."""
    chunk = b"\0" * 76_800
    c = Coalescer(deadline_s=30.0, policy=OFF)
    for s in range(10):
        assert c.add(s, chunk, 0.0) == []
    seqs: list[int] = []
    sizes: list[int] = []
    while (m := c.take(0.0)) is not None:
        assert m.nbytes <= 256 * 1024, m.nbytes
        sizes.append(len(m.chunks))
        seqs += [ch.seq for ch in m.chunks]
        c.answered(m.msg_id, 0.0)
    assert sizes == [3, 3, 3, 1]
    assert seqs == list(range(10)) and c.outstanding == 0 and c.queued_bytes == 0


def test_the_largest_chunks_go_one_per_message_by_default() -> None:
    """A backlog of 1 s chunks of 48 kHz stereo float32 (384,000 B, the largest legal
    chunk, over the default cap): one chunk per message, not five 2 MiB bundles that
    every other session's messages would queue behind."""
    c = Coalescer(deadline_s=30.0, policy=OFF)
    for s in range(5):
        c.add(s, BIG, 0.0)
    sizes: list[int] = []
    while (m := c.take(0.0)) is not None:
        sizes.append(m.nbytes)
        c.answered(m.msg_id, 0.0)
    assert sizes == [len(BIG)] * 5


def test_twenty_ms_chunks_still_fill_a_message_by_count() -> None:
    """The byte cap does not cut small chunks' coalescing: 50 chunks of 20 ms at 48 kHz
    stereo 16-bit (3,840 B) fit one message."""
    c = Coalescer(deadline_s=30.0, policy=CoalescePolicy(max_chunks=50, budget_fraction=0))
    for s in range(50):
        c.add(s, b"\0" * 3_840, 0.0)
    m = c.take(0.0)
    assert m is not None and len(m.chunks) == 50


def test_a_chunk_over_the_message_cap_goes_alone() -> None:
    c = Coalescer(deadline_s=1.0, policy=CoalescePolicy(max_message_bytes=1000,
                                                        budget_fraction=0))
    c.add(0, b"\0" * 1500, 0.0)
    c.add(1, PCM, 0.0)
    m = c.take(0.0)
    assert m is not None and [ch.seq for ch in m.chunks] == [0] and m.nbytes == 1500
    c.answered(m.msg_id, 0.0)
    m = c.take(0.0)
    assert m is not None and [ch.seq for ch in m.chunks] == [1]


def test_a_full_message_by_bytes_is_not_held() -> None:
    """A hold waits for more chunks; once the waiting ones fill a message by bytes,
    waiting longer cannot make it bigger."""
    c = Coalescer(deadline_s=1.0, policy=CoalescePolicy(linger_s=0.2, max_message_bytes=1280,
                                                        budget_fraction=0))
    c.add(0, PCM, 0.0)
    assert c.take(0.0) is None and c.due_at() == pytest.approx(0.2)  # held
    c.add(1, PCM, 0.01)
    assert c.due_at() == 0.0  # full: due now
    m = c.take(0.01)
    assert m is not None and [ch.seq for ch in m.chunks] == [0, 1]


def test_backlog_cap_refuses_as_overloaded() -> None:
    c = Coalescer(deadline_s=1.0, policy=CoalescePolicy(max_backlog=2, budget_fraction=0))
    assert c.add(0, PCM, 0.0) == []
    assert c.add(1, PCM, 0.0) == []
    [refused] = c.add(2, PCM, 0.0)
    assert refused.seq == 2 and refused.code is ErrorCode.OVERLOADED
    assert c.outstanding == 2


def test_queued_bytes_count_waiting_and_in_flight_chunks_until_settled() -> None:
    """What the connection's byte budget reads: every way a chunk leaves takes its bytes."""
    c = Coalescer(deadline_s=0.5, policy=CoalescePolicy(max_chunks=2, budget_fraction=0))
    for s, n in enumerate((100, 200, 300, 400)):
        c.add(s, b"\0" * n, 0.0)
    assert c.queued_bytes == 1000
    m = c.take(0.0)
    assert m is not None and m.nbytes == 300 and c.queued_bytes == 1000  # in flight counts
    assert c.answered(m.msg_id, 0.1) is m and c.queued_bytes == 700
    m = c.take(0.1)
    assert m is not None and m.nbytes == 700
    assert c.failed(m.msg_id, ErrorCode.BROKER_UNAVAILABLE, "down") and c.queued_bytes == 0
    c.add(4, b"\0" * 50, 0.2)
    c.add(5, b"\0" * 60, 0.3)
    m = c.take(0.3)
    assert m is not None and c.queued_bytes == 110
    c.add(6, b"\0" * 70, 0.4)
    assert len(c.tick(0.7)) == 2 and c.queued_bytes == 70  # the message expired in flight
    assert len(c.tick(0.9)) == 1 and c.queued_bytes == 0  # and the waiting chunk
    c.add(7, b"\0" * 80, 1.0)
    c.close()
    assert c.queued_bytes == 0


def test_deadlines_expire_in_flight_and_queued_chunks() -> None:
    c = Coalescer(deadline_s=0.5, policy=OFF)
    c.add(0, PCM, 0.0)
    m = c.take(0.0)
    assert m is not None
    c.add(1, PCM, 0.1)
    assert c.tick(0.49) == []
    out = c.tick(0.5)
    assert [(o.seq, o.code, o.message) for o in out] == [
        (0, ErrorCode.EXPIRED, FLIGHT_EXPIRED)]
    assert c.answered(m.msg_id, 0.6) is None  # its late reply is discarded
    c.add(2, PCM, 0.2)
    assert c.due_at() == 0.1  # chunk 1 may go at once (received at 0.1, nothing held)
    out = c.tick(0.65)  # chunk 1 (deadline 0.6) expired while queued
    assert [(o.seq, o.message) for o in out] == [(1, QUEUED_EXPIRED)]
    m2 = c.take(0.65)
    assert m2 is not None and [ch.seq for ch in m2.chunks] == [2]


def test_publish_failure_answers_the_message() -> None:
    c = Coalescer(deadline_s=1.0, policy=OFF)
    c.add(0, PCM, 0.0)
    c.add(1, PCM, 0.0)
    m = c.take(0.0)
    assert m is not None
    assert c.failed(m.msg_id + 1, ErrorCode.BROKER_UNAVAILABLE, "x") == []
    out = c.failed(m.msg_id, ErrorCode.BROKER_UNAVAILABLE, "down")
    assert [(o.seq, o.code) for o in out] == [(0, ErrorCode.BROKER_UNAVAILABLE),
                                              (1, ErrorCode.BROKER_UNAVAILABLE)]
    assert c.phase is Phase.IDLE


def test_linger_holds_until_the_oldest_chunk_is_old_enough() -> None:
    c = Coalescer(deadline_s=1.0, policy=CoalescePolicy(linger_s=0.05, budget_fraction=0))
    c.add(0, PCM, 0.0)
    assert c.take(0.0) is None
    assert c.due_at() == pytest.approx(0.05)
    c.add(1, PCM, 0.02)
    m = c.take(0.05)
    assert m is not None and len(m.chunks) == 2


def stream(c: Coalescer, *, rtt: float | Callable[[float], float], seconds: float,
           interval: float = 0.02) -> list[int]:
    """Real-time chunks every ``interval``; each message answered ``rtt`` (or ``rtt(sent
    at)``) after it left. Returns the chunk count of every message sent."""
    sizes: list[int] = []
    now = next_chunk = 0.0
    seq = 0
    answer_at: float | None = None
    while now < seconds:
        due = [next_chunk]
        if answer_at is not None:
            due.append(answer_at)
        if (d := c.due_at()) is not None:
            due.append(d)
        now = min(due)
        if answer_at is not None and now >= answer_at:
            flight = c.in_flight
            assert flight is not None
            c.answered(flight.msg_id, now)
            answer_at = None
        if now >= next_chunk:
            c.add(seq, PCM, now)
            seq += 1
            next_chunk += interval
        assert c.tick(now) == []
        m = c.take(now)
        if m is not None:
            sizes.append(len(m.chunks))
            answer_at = now + (rtt(now) if callable(rtt) else rtt)
    return sizes


def test_fast_replies_get_no_coalescing_and_no_hold() -> None:
    c = Coalescer(deadline_s=1.0)
    sizes = stream(c, rtt=0.004, seconds=2.0)
    assert set(sizes) == {1}
    assert c.target == 1


def test_slow_replies_coalesce_before_the_round_trip_reaches_the_interval() -> None:
    """Replies at 60 % of the 20 ms interval: without the budget every chunk is its own
    message; with it, messages carry several chunks (fewer messages per second)."""
    plain = stream(Coalescer(deadline_s=1.0, policy=OFF), rtt=0.012, seconds=4.0)
    budget = stream(Coalescer(deadline_s=1.0, reply_floor=seen()), rtt=0.012, seconds=4.0)
    assert set(plain) == {1}
    assert len(budget) < 0.6 * len(plain)
    assert max(budget) <= 3  # 1 + max_hold (40 ms) / 20 ms


@pytest.mark.parametrize("rtt", [0.012, 0.018])
def test_a_distant_broker_alone_is_not_load(rtt: float) -> None:
    """Replies that take 60 or 90 % of the interval from the first one on (a broker far
    away, or a slow one) queue nothing: no chunk is held for company. Before the reply
    floor, every other chunk of such a lone session waited 30 ms."""
    c = Coalescer(deadline_s=1.0)
    assert set(stream(c, rtt=rtt, seconds=4.0)) == {1}
    assert c.target == 1 and c.reply_floor.value == pytest.approx(rtt)


def test_replies_slower_than_their_floor_coalesce() -> None:
    """Idle replies of 4 ms, then 16 ms (messages queue): the same session coalesces."""
    c = Coalescer(deadline_s=1.0)
    sizes = stream(c, rtt=lambda sent: 0.004 if sent < 1.0 else 0.016, seconds=4.0)
    assert set(sizes[:50]) == {1}  # the first second: 50 chunks, 50 messages
    assert max(sizes[50:]) > 1 and len(sizes[50:]) < 0.6 * 150
    assert c.reply_floor.value == pytest.approx(0.004)


def test_a_session_that_starts_under_load_uses_the_shared_floor() -> None:
    shared = ReplyFloor()
    stream(Coalescer(deadline_s=1.0, reply_floor=shared), rtt=0.004, seconds=1.0)
    assert shared.value == pytest.approx(0.004)
    own = stream(Coalescer(deadline_s=1.0), rtt=0.016, seconds=3.0)
    late = stream(Coalescer(deadline_s=1.0, reply_floor=shared), rtt=0.016, seconds=3.0)
    assert set(own) == {1}  # alone it cannot tell 16 ms of distance from 16 of queue
    assert max(late) > 1 and len(late) < 0.6 * len(own)


def test_target_has_hysteresis() -> None:
    c = Coalescer(deadline_s=1.0, reply_floor=seen())
    for s in range(5):
        c.add(s, PCM, s * 0.02)  # gap 20 ms: one budget unit is 10 ms
    c.observe(0.025, 1.0)
    assert c.target == 3
    for _ in range(60):
        c.observe(0.0095, 1.0)  # below one unit, but within the hysteresis band of 2
    assert c.target == 2
    for _ in range(60):
        c.observe(0.002, 1.0)
    assert c.target == 1


def _fast_replies_until_unheld(c: Coalescer) -> int:
    for n in range(1, 100):
        c.observe(0.004, 2.0)
        if c.target == 1:
            return n
    raise AssertionError("the target never came down")


def test_the_target_comes_down_soon_after_a_burst_of_slow_replies() -> None:
    """Replies of 300 ms for a while (another session's big messages ahead on the
    broker), then fast again: the hold ends within half the replies it took when every
    sample entered the average whole (21, each held 40-45 ms: about a second)."""
    c = Coalescer(deadline_s=1.0, reply_floor=seen())
    for s in range(5):
        c.add(s, PCM, s * 0.02)
    for _ in range(20):
        c.observe(0.3, 1.0)
    assert c.target == 3
    assert _fast_replies_until_unheld(c) <= 10


def test_steadily_slow_replies_keep_the_largest_message() -> None:
    """The cap only trims what is past the largest size: slow replies still hold it."""
    c = Coalescer(deadline_s=1.0, reply_floor=seen())
    for s in range(5):
        c.add(s, PCM, s * 0.02)
    for rtt in (0.5, 0.03, 0.2, 0.025, 0.9) * 20:
        c.observe(rtt, 1.0)
        assert c.target == 3


def test_holds_never_exceed_half_the_deadline() -> None:
    c = Coalescer(deadline_s=0.04, policy=CoalescePolicy(linger_s=1.0))
    c.add(0, PCM, 0.0)
    assert c.due_at() == pytest.approx(0.02)


def test_closed_takes_nothing() -> None:
    c = Coalescer(deadline_s=1.0)
    c.add(0, PCM, 0.0)
    c.close()
    assert c.phase is Phase.CLOSED
    assert c.take(1.0) is None and c.add(1, PCM, 1.0) == [] and c.outstanding == 0


def test_a_hold_that_does_not_pay_pauses_holding() -> None:
    """A client that waits for each outcome before sending the next (lock-step): the
    chunk it waits on is not held again and again."""
    c = Coalescer(deadline_s=1.0, reply_floor=seen())
    for s in range(5):
        c.add(s, PCM, s * 0.02)
    c.observe(0.025, 0.1)
    assert c.target == 3
    while (m := c.take(0.1)) is not None:
        c.answered(m.msg_id, 0.1)
    c.add(5, PCM, 0.2)
    assert c.take(0.2) is None  # held for more
    release = c.due_at()
    assert release is not None and release > 0.2
    m = c.take(release)
    assert m is not None and len(m.chunks) == 1
    assert c.misses == 1 and c.target == 1
    c.answered(m.msg_id, release + 0.025)
    assert c.target == 1  # quiet for MISS_BACKOFF_S
    c.add(6, PCM, release + 0.03)
    assert c.take(release + 0.03) is not None


def test_the_byte_budget_must_exceed_the_slow_consumer_threshold() -> None:
    """Otherwise a client that stops reading would sit paused until the idle timeout
    instead of being closed 4023 (resumable)."""
    from audiostream.errors import ConfigError
    from audiostream.gateway import GatewaySettings

    with pytest.raises(ConfigError, match="max_queued_bytes"):
        GatewaySettings(max_outbound_bytes=16 * 1024 * 1024)
    assert GatewaySettings().max_queued_bytes > GatewaySettings().max_outbound_bytes
