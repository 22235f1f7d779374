from __future__ import annotations

import pytest

from audiostream.worker.batcher import Batcher


def test_flushes_when_full_before_the_wait() -> None:
    b: Batcher[int] = Batcher(max_size=3, max_wait=1.0)
    for i in range(3):
        b.add(i, now=10.0)
    assert b.ready(10.0)
    assert b.take(10.0) == [0, 1, 2]
    assert len(b) == 0 and b.due_at() is None


def test_flushes_when_the_oldest_waited_long_enough() -> None:
    b: Batcher[str] = Batcher(max_size=10, max_wait=0.005)
    b.add("a", now=1.000)
    b.add("b", now=1.004)
    assert not b.ready(1.004)
    assert b.due_at() == pytest.approx(1.005)
    assert b.ready(1.005)
    assert b.take(1.005) == ["a", "b"]


def test_take_leaves_the_rest_with_a_new_clock() -> None:
    b: Batcher[int] = Batcher(max_size=2, max_wait=0.01)
    for i in range(5):
        b.add(i, now=0.0)
    assert b.take(1.0) == [0, 1]
    assert b.due_at() == pytest.approx(1.01)
    assert b.take(1.0) == [2, 3]
    assert b.take(1.0) == [4]
    assert not b.ready(5.0)


def test_max_size_one_never_batches() -> None:
    b: Batcher[int] = Batcher(max_size=1, max_wait=10)
    b.add(1, now=0)
    assert b.ready(0)


def test_bad_settings() -> None:
    with pytest.raises(ValueError):
        Batcher(0, 1)
    with pytest.raises(ValueError):
        Batcher(1, -1)


def test_adaptive_takes_a_lone_stream_at_once() -> None:
    """One real-time session: a message every 20 ms, longer than the 10 ms wait, so
    waiting could not add anything to the batch."""
    b: Batcher[int] = Batcher(max_size=64, max_wait=0.010, adaptive=True)
    b.add(0, now=0.0)
    assert b.ready(0.0)  # no arrival history yet: nothing to wait for
    b.take(0.0)
    for i in range(1, 6):
        b.add(i, now=0.020 * i)
        assert b.ready(0.020 * i)
        assert b.take(0.020 * i) == [i]
    assert b.mean_gap == pytest.approx(0.020)


def test_adaptive_waits_while_more_arrivals_are_due() -> None:
    b: Batcher[int] = Batcher(max_size=64, max_wait=0.010, adaptive=True)
    for i in range(10):  # a busy lane: one message per millisecond
        b.add(i, now=0.001 * i)
    b.take(0.009)
    b.add(10, now=0.010)
    assert not b.ready(0.010)
    assert b.due_at() == pytest.approx(0.020)
    b.add(11, now=0.011)
    assert b.ready(0.020) and b.take(0.020) == [10, 11]


def test_adaptive_stops_waiting_when_the_lane_goes_quiet() -> None:
    b: Batcher[int] = Batcher(max_size=64, max_wait=0.010, adaptive=True)
    for i in range(10):
        b.add(i, now=0.001 * i)
    b.take(0.009)
    t = 0.009
    while b.mean_gap is not None and b.mean_gap <= 0.010:  # arrivals slow to 1 per 50 ms
        t += 0.050
        b.add(0, now=t)
        b.take(t)
    b.add(1, now=t + 0.050)
    assert b.ready(t + 0.050)


def test_bursts_count_as_a_high_rate() -> None:
    """A bundle delivers many items at one instant; that is load, not silence."""
    b: Batcher[int] = Batcher(max_size=64, max_wait=0.010, adaptive=True)
    for burst in range(3):
        for i in range(8):
            b.add(i, now=0.015 * burst)
        b.take(0.015 * burst)
    b.add(0, now=0.045)
    assert b.mean_gap is not None and b.mean_gap < 0.010
    assert not b.ready(0.045)
