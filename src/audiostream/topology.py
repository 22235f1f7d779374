"""Names and arguments of every exchange and queue, as pure data.

The RabbitMQ adapter, ``audiostream topology declare`` and the definitions in
``broker/`` are all generated from this module, so there is one source of truth.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

DEFAULT_PREFIX = "audiostream"


@dataclass(frozen=True, slots=True, kw_only=True)
class Topology:
    """Broker layout for a set of processing types."""

    processing_types: tuple[str, ...]
    prefix: str = DEFAULT_PREFIX
    shards: int = 2
    """Work queues per processing type; one queue is served by about one broker core."""
    delivery_limit: int = 3
    """Returns (redeliveries) of one message before it is dead-lettered: RabbitMQ's
    ``x-delivery-limit``, so a message is delivered at most ``delivery_limit + 1``
    times (poison-message guard)."""
    reply_expires_ms: int = 60_000
    """A reply queue outlives its last consumer by this long (the resume window)."""
    dead_letter_max_length: int = 10_000

    def __post_init__(self) -> None:
        if self.shards < 1:
            raise ValueError("shards must be >= 1")
        if self.delivery_limit < 1:
            raise ValueError("delivery_limit must be >= 1")
        # RabbitMQ refuses queue arguments that are not integers (a float is refused).
        for name in ("reply_expires_ms", "dead_letter_max_length"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")

    # -- names ---------------------------------------------------------------------
    def exchange(self, processing: str) -> str:
        return f"{self.prefix}.{processing}"

    def work_queue(self, processing: str, shard: int) -> str:
        return f"{self.prefix}.{processing}.{shard}"

    def work_queues(self, processing: str) -> list[str]:
        return [self.work_queue(processing, s) for s in range(self.shards)]

    @staticmethod
    def routing_key(processing: str, shard: int) -> str:
        return f"{processing}.{shard}"

    def reply_queue(self, session_id: str) -> str:
        return f"{self.prefix}.reply.{session_id}"

    @property
    def dead_letter_exchange(self) -> str:
        return f"{self.prefix}.dlx"

    @property
    def dead_letter_queue(self) -> str:
        return f"{self.prefix}.dead"

    # -- arguments -----------------------------------------------------------------
    def work_queue_arguments(self) -> dict[str, Any]:
        return {
            "x-queue-type": "quorum",
            "x-delivery-limit": self.delivery_limit,
            "x-dead-letter-exchange": self.dead_letter_exchange,
        }

    def reply_queue_arguments(self) -> dict[str, Any]:
        return {"x-queue-type": "classic", "x-expires": self.reply_expires_ms}

    def dead_letter_queue_arguments(self) -> dict[str, Any]:
        return {
            "x-queue-type": "classic",
            "x-max-length": self.dead_letter_max_length,
            "x-overflow": "drop-head",
        }
