"""Idle authenticated sessions one gateway process holds, and its memory per connection.

Several client processes open ``--sessions`` WebSocket sessions in total (start
message with an API key, ``ready`` received), then hold them idle with heartbeats
(client pings every ``--heartbeat`` s; the gateway pings every 30 s) for ``--hold``
seconds. Reported: sessions established and still alive after the hold, the
gateway's RSS delta per connection, RabbitMQ's RSS delta per session (one reply
queue and consumer each), and the CPU the idle sessions cost. 127.0.0.1 only.

    .venv/bin/python benchmarks/connections.py [--sessions 10000] [--clients 4]
        [--transport rabbitmq|memory] [--hold 45]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import re
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as c

SELF = str(Path(__file__).resolve())


# --- client process ---------------------------------------------------------------------------


async def client_role(args: argparse.Namespace) -> int:
    """Open ``--count`` sessions, report, then obey 'check' / 'close' on stdin."""
    import aiohttp

    from audiostream.audio import AudioFormat, Encoding
    from audiostream.protocol import start_json

    fmt = AudioFormat(Encoding.PCM_S16LE, 16000, 1)
    start = start_json(args.key, fmt, ["passthrough"])
    sockets: list[aiohttp.ClientWebSocketResponse] = []
    failures: dict[str, int] = {}
    gate = asyncio.Semaphore(args.concurrency)
    http = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0),
                                 timeout=aiohttp.ClientTimeout(total=None, sock_connect=30))

    async def open_one() -> None:
        async with gate:
            try:
                ws = await http.ws_connect(args.url, heartbeat=args.heartbeat, compress=0)
                await ws.send_str(start)
                msg = await ws.receive(timeout=30)
                if msg.type is aiohttp.WSMsgType.TEXT and json.loads(msg.data)["type"] == "ready":
                    sockets.append(ws)
                    return
                await ws.close()
                key = f"refused:{str(msg.data)[:80]}"
            except (aiohttp.ClientError, OSError, TimeoutError) as exc:
                key = type(exc).__name__
            failures[key] = failures.get(key, 0) + 1

    t0 = time.monotonic()
    await asyncio.gather(*(open_one() for _ in range(args.count)))
    print(json.dumps({"ready": len(sockets), "failures": failures,
                      "seconds": round(time.monotonic() - t0, 2)}), flush=True)
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    while line := (await reader.readline()).decode().strip():
        if line == "check":
            print(json.dumps({"alive": sum(not ws.closed for ws in sockets)}), flush=True)
        elif line == "close":
            break
    await asyncio.gather(*(ws.close() for ws in sockets), return_exceptions=True)
    await http.close()
    print(json.dumps({"closed": len(sockets)}), flush=True)
    return 0


class Clients:
    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc

    async def line(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        raw = await self.proc.stdout.readline()
        if not raw:
            raise RuntimeError(f"client process exited ({await self.proc.wait()})")
        data: dict[str, Any] = json.loads(raw)
        return data

    async def send(self, cmd: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(cmd.encode() + b"\n")
        await self.proc.stdin.drain()


async def spawn_clients(url: str, key: str, count: int, heartbeat: float,
                        concurrency: int) -> Clients:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, SELF, "--role", "clients", "--url", url, "--key", key,
        "--count", str(count), "--heartbeat", str(heartbeat),
        "--concurrency", str(concurrency),
        cwd=c.ROOT, env=c.env(), stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL,
    )
    return Clients(proc)


async def scrape_active(metrics_url: str) -> float:
    from audiostream.bench import scrape_all

    s = await scrape_all([metrics_url], None)
    return s.get(("audiostream_gateway_connections_active", ()), -1.0)


# --- main -------------------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def memory_gateway(max_connections: int) -> Any:
    """``audiostream serve``: gateway + worker in one process, in-process broker."""
    with tempfile.TemporaryDirectory() as tmp:
        keys = Path(tmp) / "keys.json"
        key = c.create_key(keys)
        oport = c.free_port()
        proc = await c.start("serve", c.cli(
            "serve", "--keys-file", str(keys), "--host", "127.0.0.1", "--port", "0",
            "--ops-port", str(oport), "--max-pending-per-ip", "0",  # clients share 127.0.0.1
            "--max-connections", str(max_connections), "--drain-grace-s", "1"),
            "audiostream serving")
        try:
            m = re.search(r"(ws://\S+)", proc.info["line"])
            assert m
            url = m.group(1)
            yield proc, url, key, f"http://127.0.0.1:{oport}/metrics"
        finally:
            await proc.stop()


async def run(args: argparse.Namespace) -> dict[str, Any]:
    maxconn = str(args.sessions * 2)
    if args.transport == "rabbitmq":
        ctx: Any = c.stack(["passthrough"], broker=args.broker, workers=False,
                           gateway_args=["--max-connections", maxconn])
    else:
        ctx = memory_gateway(args.sessions * 2)
    rabbit = c.find_pid("beam.smp") if args.transport == "rabbitmq" else None
    async with ctx as handle:
        if args.transport == "rabbitmq":
            gw_pid, url, key, murl = (handle.gateway.pid, handle.ws_url, handle.key,
                                      handle.gateway_metrics)
        else:
            proc, url, key, murl = handle
            gw_pid = proc.pid
        # Warm up code paths (imports, first-session allocations) before the baseline.
        warm = await spawn_clients(url, key, 20, args.heartbeat, 20)
        assert (await warm.line())["ready"] == 20
        await warm.send("close")
        await warm.line()
        await warm.proc.wait()
        for _ in range(300):  # until the gateway has let the warm-up sessions go
            if await scrape_active(murl) == 0:
                break
            await asyncio.sleep(0.1)
        gw_base = c.rss_bytes(gw_pid)
        rabbit_base = c.rss_bytes(rabbit) if rabbit else 0

        per = [args.sessions // args.clients + (i < args.sessions % args.clients)
               for i in range(args.clients)]
        t0 = time.monotonic()
        clients = [await spawn_clients(url, key, n, args.heartbeat, args.concurrency)
                   for n in per]
        reports = [await cl.line() for cl in clients]
        connect_s = time.monotonic() - t0
        established = sum(r["ready"] for r in reports)
        failures: dict[str, int] = {}
        for r in reports:
            for k, v in r["failures"].items():
                failures[k] = failures.get(k, 0) + v
        active_after_connect = await scrape_active(murl)
        gw_rss_connected = c.rss_bytes(gw_pid)
        c.log(f"[connections] {established} established in {connect_s:.1f} s; "
              f"holding {args.hold:g} s")
        with c.CpuMeter({"gateway": gw_pid, **({"rabbitmq": rabbit} if rabbit else {})}) as cpu:
            await asyncio.sleep(args.hold)  # the hold period being measured
            idle_cpu = cpu.read()
        for cl in clients:
            await cl.send("check")
        alive = 0
        for cl in clients:
            alive += (await cl.line())["alive"]
        active_after_hold = await scrape_active(murl)
        gw_rss = c.rss_bytes(gw_pid)
        rabbit_rss = c.rss_bytes(rabbit) if rabbit else 0
        for cl in clients:
            await cl.send("close")
        for cl in clients:
            await cl.line()
            await cl.proc.wait()
    per_conn = (gw_rss - gw_base) / established if established else 0.0
    return {
        "bench": "connections", "transport": args.transport, "target": args.sessions,
        "client_processes": args.clients, "established": established, "failures": failures,
        "connect_seconds": round(connect_s, 1),
        "alive_after_hold": alive, "hold_seconds": args.hold,
        "heartbeat_s": {"client": args.heartbeat, "gateway": 30.0},
        "gateway_connections_active": {"after_connect": active_after_connect,
                                       "after_hold": active_after_hold},
        "gateway_rss_mib": {"baseline": round(gw_base / 2**20, 1),
                            "connected": round(gw_rss_connected / 2**20, 1),
                            "after_hold": round(gw_rss / 2**20, 1)},
        "gateway_kib_per_connection": round(per_conn / 1024, 1),
        "rabbitmq_kib_per_session": round((rabbit_rss - rabbit_base) / established / 1024, 1)
        if rabbit and established else None,
        "idle_cpu_cores": idle_cpu,
    }


async def main(args: argparse.Namespace) -> int:
    c.emit({"bench": "connections", "machine": c.machine(),
            "nofile": c.raise_nofile()}, args.out)
    c.emit(await run(args), args.out)
    return 0


def cli() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--role", default="main", choices=("main", "clients"))
    ap.add_argument("--broker", default=c.BROKER)
    ap.add_argument("--transport", default="rabbitmq", choices=("rabbitmq", "memory"))
    ap.add_argument("--sessions", type=int, default=10_000)
    ap.add_argument("--clients", type=int, default=4, help="client processes")
    ap.add_argument("--concurrency", type=int, default=50, help="opens in flight per client")
    ap.add_argument("--heartbeat", type=float, default=15.0, help="client ping interval (s)")
    ap.add_argument("--hold", type=float, default=45.0, help="seconds to hold them idle")
    ap.add_argument("--url", default="")
    ap.add_argument("--key", default="")
    ap.add_argument("--count", type=int, default=0)
    ap.add_argument("--out", type=Path, default=None, help="also append JSON lines here")
    args = ap.parse_args()
    c.use_uvloop()
    c.raise_nofile()
    if args.role == "clients":
        return asyncio.run(client_role(args))
    return asyncio.run(main(args))


if __name__ == "__main__":
    sys.exit(cli())
