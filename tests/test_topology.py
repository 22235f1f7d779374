"""Broker names and arguments as pure data."""

from __future__ import annotations

import os
import subprocess
import sys
from collections import Counter

import pytest

from audiostream.topology import Topology

TOPO = Topology(processing_types=("denoise", "vad"), prefix="as", shards=3)


def test_names() -> None:
    assert TOPO.exchange("vad") == "as.vad"
    assert TOPO.work_queue("vad", 2) == "as.vad.2"
    assert TOPO.work_queues("denoise") == ["as.denoise.0", "as.denoise.1", "as.denoise.2"]
    assert Topology.routing_key("vad", 1) == "vad.1"
    assert TOPO.reply_queue("abc") == "as.reply.abc"
    assert TOPO.dead_letter_exchange == "as.dlx"
    assert TOPO.dead_letter_queue == "as.dead"


def test_names_of_different_types_and_shards_never_collide() -> None:
    names = [TOPO.work_queue(t, s) for t in TOPO.processing_types for s in range(TOPO.shards)]
    keys = [TOPO.routing_key(t, s) for t in TOPO.processing_types for s in range(TOPO.shards)]
    assert len(set(names)) == len(names)
    assert len(set(keys)) == len(keys)
    assert TOPO.dead_letter_queue not in names


def test_work_queue_arguments() -> None:
    args = Topology(processing_types=("x",), prefix="p", delivery_limit=5).work_queue_arguments()
    assert args == {
        "x-queue-type": "quorum",
        "x-delivery-limit": 5,
        "x-dead-letter-exchange": "p.dlx",
    }


def test_queue_arguments_are_integers_where_rabbitmq_wants_milliseconds_or_counts() -> None:
    """aio-pika/RabbitMQ refuse a float or string where an integer is expected."""
    t = Topology(processing_types=("x",), reply_expires_ms=1500, dead_letter_max_length=7)
    assert t.reply_queue_arguments() == {"x-queue-type": "classic", "x-expires": 1500}
    assert t.dead_letter_queue_arguments() == {
        "x-queue-type": "classic",
        "x-max-length": 7,
        "x-overflow": "drop-head",
    }
    for args in (t.work_queue_arguments(), t.reply_queue_arguments()):
        for key, value in args.items():
            if key in ("x-delivery-limit", "x-expires", "x-max-length"):
                assert type(value) is int


@pytest.mark.parametrize(
    "bad",
    [
        {"shards": 0},
        {"delivery_limit": 0},
        {"reply_expires_ms": 0},
        {"reply_expires_ms": 1500.0},
        {"reply_expires_ms": True},
        {"dead_letter_max_length": -1},
    ],
)
def test_invalid_settings_are_refused(bad: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        Topology(processing_types=("x",), **bad)  # type: ignore[arg-type]


def test_shard_is_stable_for_a_session() -> None:
    assert {TOPO.shard_for("session-42") for _ in range(100)} == {TOPO.shard_for("session-42")}
    assert all(0 <= TOPO.shard_for(f"s{i}") < TOPO.shards for i in range(1000))


def test_shard_is_the_same_in_every_process() -> None:
    """Gateways in different processes must agree (unlike ``hash()``, which is salted)."""
    ids = [f"session-{i}" for i in range(20)]
    here = [TOPO.shard_for(i) for i in ids]
    code = (
        "from audiostream.topology import Topology;"
        "t = Topology(processing_types=('denoise',), shards=3);"
        f"print([t.shard_for(i) for i in {ids!r}])"
    )
    for seed in ("1", "2"):
        out = subprocess.run(
            [sys.executable, "-c", code],
            capture_output=True,
            text=True,
            check=True,
            env={**os.environ, "PYTHONHASHSEED": seed},
        ).stdout
        assert out.strip() == str(here)
    # Pinned values: changing the hash would move live sessions between queues.
    four = Topology(processing_types=("x",), shards=4)
    assert [four.shard_for(s) for s in ("a", "b", "c", "d")] == [3, 1, 3, 0]


def test_shards_spread_sessions_evenly() -> None:
    counts = Counter(TOPO.shard_for(f"{i:08x}-session") for i in range(3000))
    assert set(counts) == {0, 1, 2}
    assert all(800 < n < 1200 for n in counts.values())
