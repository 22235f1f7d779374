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
