"""CPU per reply publish: aio-pika's ``Exchange.publish``, ``RabbitTransport.publish_reply``
and ``RabbitTransport.publish_replies``.

A worker publishes one reply per session message, so this is its hottest AMQP call.
Every path publishes the same 1.5 KB body to one classic queue with publisher confirms
and ``mandatory``, 250 at a time: the first two as 250 concurrent calls (confirms
overlap), the last as one batch of 250, as the worker does since it batches replies.
Rounds alternate so load changes hit all paths alike. Prints one JSON line: process
CPU µs per message and messages per second for each path.

    .venv/bin/python benchmarks/reply_publish.py [--messages 6000] [--rounds 4]
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as c


async def main(args: argparse.Namespace) -> int:
    import aio_pika

    from audiostream.embedded import default_topology
    from audiostream.transport.rabbitmq import RabbitTransport

    topo = default_topology(prefix=f"bench{uuid.uuid4().hex[:8]}")
    transport = RabbitTransport(args.broker, topo)
    await transport.connect()
    queue_name = topo.reply_queue("publish-bench")
    await transport.declare_reply_queue(queue_name)
    conn = await aio_pika.connect(args.broker)
    channel = await conn.channel(publisher_confirms=True)
    queue = await channel.get_queue(queue_name, ensure=False)
    body = b"x" * 1500

    async def via_aio_pika() -> None:
        message = aio_pika.Message(body, delivery_mode=aio_pika.DeliveryMode.NOT_PERSISTENT)
        await channel.default_exchange.publish(message, queue_name, mandatory=True)

    async def via_transport() -> None:
        assert await transport.publish_reply(queue_name, body)

    async def concurrently(publish: Callable[[], Awaitable[None]]) -> None:
        await asyncio.gather(*(publish() for _ in range(250)))

    async def batched() -> None:
        assert all(o is True for o in await transport.publish_replies(batch))

    batch = [(queue_name, body)] * 250
    paths: dict[str, Callable[[], Awaitable[None]]] = {
        "aio_pika_exchange_publish": lambda: concurrently(via_aio_pika),
        "rabbit_transport_publish_reply": lambda: concurrently(via_transport),
        "rabbit_transport_publish_replies": batched,
    }
    totals = {name: [0.0, 0.0] for name in paths}  # cpu s, wall s
    try:
        for _ in range(args.rounds):
            for name, publish in paths.items():
                await queue.purge()
                cpu0, wall0 = time.process_time(), time.perf_counter()
                for _ in range(0, args.messages, 250):
                    await publish()
                totals[name][0] += time.process_time() - cpu0
                totals[name][1] += time.perf_counter() - wall0
        n = args.rounds * (args.messages // 250 * 250)
        result = {name: {"cpu_us_per_message": round(cpu / n * 1e6, 1),
                         "messages_per_s": round(n / wall)}
                  for name, (cpu, wall) in totals.items()}
        a, b, batch_cpu = (result[k]["cpu_us_per_message"] for k in paths)
        c.emit({"bench": "reply_publish", "machine": c.machine(), "messages": n,
                **result, "cpu_saved": round(1 - b / a, 3),
                "batched_cpu_saved": round(1 - batch_cpu / a, 3)}, None)
    finally:
        await queue.purge()
        await conn.close()
        await transport.delete_reply_queue(queue_name)
        await transport.close()
    return 0


def cli() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--broker", default=c.BROKER)
    ap.add_argument("--messages", type=int, default=6000, help="per path and round")
    ap.add_argument("--rounds", type=int, default=4)
    args = ap.parse_args()
    c.use_uvloop()
    return asyncio.run(main(args))


if __name__ == "__main__":
    sys.exit(cli())
