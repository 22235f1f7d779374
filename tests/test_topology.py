"""Broker names and arguments as pure data."""

from __future__ import annotations

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


