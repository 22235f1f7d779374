"""CPU per reply publish: aio-pika's ``Exchange.publish`` against ``RabbitTransport.publish_reply``.

A worker publishes one reply per session message, so this is its hottest AMQP call.
Both paths publish the same 1.5 KB body to one classic queue with publisher confirms
and ``mandatory``, 250 at a time (confirms overlap, as in the worker), alternating
rounds so load changes hit both alike. Prints one JSON line: process CPU µs per
message and messages per second for each path.

    .venv/bin/python benchmarks/reply_publish.py [--messages 6000] [--rounds 4]
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as c


async def main(args: argparse.Namespace) -> int:
    import aio_pika

    from audiostream.testing import default_topology
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

    paths = {"aio_pika_exchange_publish": via_aio_pika,
             "rabbit_transport_publish_reply": via_transport}
    totals = {name: [0.0, 0.0] for name in paths}  # cpu s, wall s
    try:
        for _ in range(args.rounds):
            for name, publish in paths.items():
                await queue.purge()
                cpu0, wall0 = time.process_time(), time.perf_counter()
                for _ in range(0, args.messages, 250):
                    await asyncio.gather(*(publish() for _ in range(250)))
                totals[name][0] += time.process_time() - cpu0
                totals[name][1] += time.perf_counter() - wall0
        n = args.rounds * (args.messages // 250 * 250)
        result = {name: {"cpu_us_per_message": round(cpu / n * 1e6, 1),
                         "messages_per_s": round(n / wall)}
                  for name, (cpu, wall) in totals.items()}
        a, b = (result[k]["cpu_us_per_message"] for k in paths)
        c.emit({"bench": "reply_publish", "machine": c.machine(), "messages": n,
                **result, "cpu_saved": round(1 - b / a, 3)}, None)
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
