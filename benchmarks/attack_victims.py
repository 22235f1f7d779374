"""Victim latency under attack: does one hostile client slow everyone else?

For each attack, one gateway (embedded server with a passthrough worker, in-memory
broker or real RabbitMQ, in its own process) serves ``--victims`` well-behaved sessions
streaming real-time audio. Each attack runs two phases in the same run, same gateway:

1. *baseline*: the victims stream alone for ``--seconds``;
2. *attack*: an attacker process hammers the gateway while the victims stream again.

The victims run in this process, the attacker in a third one, so neither's CPU is
charged to the gateway's event loop. One JSON line per attack on stdout:
victims' p50/p99 round-trip latency (client-measured, ms) and dropped chunks in each
phase, the p99 ratio attack/baseline, what the attacker achieved (connections, codes
it got), what the gateway's edge refused (``edge_refused``, by reason, from its
metrics), and the machine's load average.

``--tls`` serves ``wss://`` (a throwaway trustme CA): the attacker and the victims then
pay the TLS handshake too, and with ``max_pending_per_ip`` in ``--edge`` the edge runs
that handshake itself (its gate), so sockets over the cap are refused before it.

    PYTHONPATH=src python benchmarks/attack_victims.py                 # all attacks
    PYTHONPATH=src python benchmarks/attack_victims.py --attack chunk_flood --broker
    PYTHONPATH=src python benchmarks/attack_victims.py --attack oversized_params \
        --attack oversized_params_wide --attack reconnect_elsewhere
    PYTHONPATH=src python benchmarks/attack_victims.py --tls --attack slowloris \
        --edge '{"conn_rate_per_ip": 50, "conn_burst_per_ip": 200, "max_pending_per_ip": 32}'

A ratio near 1 means the attack does not reach the victims; the figures live in
docs/benchmarks.md ("Victim latency under attack").
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import json
import multiprocessing as mp
import os
import queue
import ssl
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import BROKER, emit, log, machine, raise_nofile, use_uvloop

from audiostream.audio import AudioFormat, Encoding
from audiostream.protocol import start_json

FMT = AudioFormat(Encoding.PCM_S16LE, 16000, 1)
CHUNK = b"\x01\x00" * 320  # 20 ms
OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING = 0x1, 0x2, 0x8, 0x9


# --- the gateway, in its own process ----------------------------------------------------------


@dataclass(frozen=True)
class ServerSpec:
    keys_file: str
    broker: str | None
    settings: dict[str, Any] = field(default_factory=dict)
    edge: dict[str, Any] = field(default_factory=dict)
    tls: tuple[str, str] | None = None
    """Certificate chain and key files: serve wss://."""


def _tls_files(tmp: Path) -> tuple[str, str, str]:
    """A throwaway CA and a certificate for 127.0.0.1: (ca, chain, key) files."""
    import trustme

    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1", "localhost")
    ca_file, chain, key = tmp / "ca.pem", tmp / "server.pem", tmp / "server.key"
    ca.cert_pem.write_to_path(str(ca_file))
    cert.private_key_pem.write_to_path(str(key))
    chain.write_bytes(b"".join(b.bytes() for b in cert.cert_chain_pems))
    return str(ca_file), str(chain), str(key)


def _client_tls(ca_file: str | None) -> ssl.SSLContext | None:
    return None if ca_file is None else ssl.create_default_context(cafile=ca_file)


def _serve(spec: ServerSpec, ready: Any, stop: Any, report: Any) -> None:
    use_uvloop()
    raise_nofile()

    async def main() -> None:
        from audiostream.gateway import GatewaySettings
        from audiostream.gateway.edge import EdgeSettings
        from audiostream.gateway.server import server_ssl_context
        from audiostream.testing import embedded_server
        from audiostream.topology import Topology

        topo = Topology(processing_types=("passthrough",),
                        prefix=f"bench-attack-{os.getpid()}", reply_expires_ms=1500)
        settings = GatewaySettings(edge=EdgeSettings(ops_port=None, **spec.edge),
                                   **spec.settings)
        tls = None if spec.tls is None else server_ssl_context(*map(Path, spec.tls))
        async with embedded_server(broker_url=spec.broker, topology=topo,
                                   processing=("passthrough",),
                                   keys_file=Path(spec.keys_file),
                                   gateway_settings=settings, ssl_context=tls) as srv:
            ready.put(srv.url)
            loop = asyncio.get_running_loop()
            await loop.run_in_executor(None, stop.wait)
            refused: dict[str, int] = {}
            for metric in srv.gateway.metrics_registry.collect():
                for sample in metric.samples:
                    if sample.name == "audiostream_gateway_edge_refused_total":
                        refused[sample.labels["reason"]] = int(sample.value)
            report.put(refused)

    asyncio.run(main())


def _sink(ready: Any, stop: Any) -> None:
    """The control for reconnect loops: a separate process that refuses every socket the
    way the gateway's edge does over the per-address rate (canned 429, close, at once).
    Attacking it instead of the gateway costs the machine (kernel, attacker) the same and
    the gateway nothing: what the victims lose then is not the gateway's doing."""
    use_uvloop()
    raise_nofile()

    async def main() -> None:
        from audiostream.gateway.edge import TOO_MANY_CONNECTIONS

        class Refuse(asyncio.Protocol):
            def connection_made(self, transport: asyncio.BaseTransport) -> None:
                assert isinstance(transport, asyncio.WriteTransport)
                transport.write(TOO_MANY_CONNECTIONS)
                transport.close()

        loop = asyncio.get_running_loop()
        server = await loop.create_server(Refuse, "127.0.0.1", 0, backlog=128)
        ready.put(f"ws://127.0.0.1:{server.sockets[0].getsockname()[1]}/v1/stream")
        await loop.run_in_executor(None, stop.wait)
        server.close()

    asyncio.run(main())


# --- raw WebSocket, as an attacker speaks it ----------------------------------------------


def frame(opcode: int, payload: bytes) -> bytes:
    n = len(payload)
    if n < 126:
        head = bytes([0x80 | opcode, 0x80 | n])
    elif n < 65536:
        head = bytes([0x80 | opcode, 0x80 | 126]) + n.to_bytes(2, "big")
    else:
        head = bytes([0x80 | opcode, 0x80 | 127]) + n.to_bytes(8, "big")
    return head + b"\x00\x00\x00\x00" + payload  # a zero mask: payload unchanged


class Raw:
    """One attacker socket."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def upgrade(cls, c: Ctx) -> Raw | None:
        host, stats = c.host, c.stats
        reader, writer = await c.connect()
        stats["connections"] += 1
        key = base64.b64encode(os.urandom(16)).decode()
        writer.write((f"GET /v1/stream HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\n"
                      f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
                      "Sec-WebSocket-Version: 13\r\n\r\n").encode())
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except (asyncio.IncompleteReadError, ConnectionError):
            stats["reset_before_upgrade"] += 1
            writer.close()
            return None
        status = head.split(b" ", 2)[1].decode()
        if status != "101":
            stats[f"http_{status}"] += 1
            writer.close()
            return None
        return cls(reader, writer)

    async def read_frame(self) -> tuple[int, bytes]:
        b0, b1 = await self.reader.readexactly(2)
        n = b1 & 0x7F
        if n == 126:
            n = int.from_bytes(await self.reader.readexactly(2), "big")
        elif n == 127:
            n = int.from_bytes(await self.reader.readexactly(8), "big")
        return b0 & 0x0F, await self.reader.readexactly(n)

    async def until_close(self, stats: Counter[str]) -> None:
        """Read until the server's close frame (its code is counted) or EOF."""
        try:
            while True:
                op, payload = await self.read_frame()
                if op == OP_CLOSE:
                    code = int.from_bytes(payload[:2], "big") if len(payload) >= 2 else 1005
                    stats[f"close_{code}"] += 1
                    return
        except (asyncio.IncompleteReadError, ConnectionError):
            stats["eof"] += 1
        finally:
            self.close()

    async def start(self, key: str, stats: Counter[str]) -> bool:
        self.writer.write(frame(OP_TEXT, start_json(key, FMT, ["passthrough"]).encode()))
        while True:
            op, payload = await self.read_frame()
            if op == OP_TEXT:
                msg = json.loads(payload)
                if msg.get("type") == "ready":
                    stats["ready"] += 1
                    return True
                if msg.get("type") == "error":
                    stats[f"error_{msg.get('code')}"] += 1
            elif op == OP_CLOSE:
                code = int.from_bytes(payload[:2], "big") if len(payload) >= 2 else 1005
                stats[f"close_{code}"] += 1
                self.close()
                return False

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.writer.close()


# --- attacks ---------------------------------------------------------------------------------


@dataclass
class Ctx:
    host: str
    port: int
    key: str
    keys_file: str
    stats: Counter[str]
    source: str
    tls: ssl.SSLContext | None = None

    async def connect(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """A socket from the attacker's address (through a TLS handshake with ``--tls``)."""
        return await asyncio.open_connection(self.host, self.port, ssl=self.tls,
                                             local_addr=(self.source, 0))


async def ping_flood(c: Ctx) -> None:
    ws = await Raw.upgrade(c)
    if ws is None:
        return
    ws.writer.write(frame(OP_PING, b"x") * 200)
    await ws.until_close(c.stats)


async def keepalive_before_start(c: Ctx) -> None:
    ws = await Raw.upgrade(c)
    if ws is None:
        return
    reading = asyncio.ensure_future(ws.until_close(c.stats))
    ka = frame(OP_TEXT, b'{"type":"keepalive"}')
    while not reading.done():
        ws.writer.write(ka)
        c.stats["keepalives"] += 1
        await asyncio.wait({reading}, timeout=0.05)


async def slowloris(c: Ctx) -> None:
    reader, writer = await c.connect()
    c.stats["connections"] += 1
    head = b"GET /v1/stream HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 100_000
    for b in head:
        writer.write(bytes([b]))
        try:
            await asyncio.wait_for(reader.read(1024), 1.0)
        except TimeoutError:
            continue
        c.stats["closed_by_server"] += 1
        break
    writer.close()


async def revocation(c: Ctx) -> None:
    """Sessions of a key that gets revoked one second in; afterwards each keeps trying
    to start again once a second (a client retrying)."""
    ws = await Raw.upgrade(c)
    if ws is None:
        return
    if not await ws.start(c.key, c.stats):
        await asyncio.sleep(1.0)
        return
    reading = asyncio.ensure_future(ws.until_close(c.stats))
    while not reading.done():
        ws.writer.write(frame(OP_BINARY, CHUNK))
        await asyncio.wait({reading}, timeout=0.02)
    await asyncio.sleep(1.0)


async def oversized_params(c: Ctx) -> None:
    ws = await Raw.upgrade(c)
    if ws is None:
        return
    start = json.loads(start_json(c.key, FMT, ["passthrough"]))
    start["pipeline"] = [{"name": "passthrough", "params": {"x": "a" * 200_000}}]
    ws.writer.write(frame(OP_TEXT, json.dumps(start).encode()))
    await ws.until_close(c.stats)


async def detached_spam(c: Ctx) -> None:
    """Start a session and drop the socket without stop: resumable, detached."""
    ws = await Raw.upgrade(c)
    if ws is None:
        return
    with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError):
        await ws.start(c.key, c.stats)
    ws.writer.transport.abort()


async def chunk_flood(c: Ctx) -> None:
    ws = await Raw.upgrade(c)
    if ws is None:
        return
    try:
        if not await ws.start(c.key, c.stats):
            return
    except (asyncio.IncompleteReadError, ConnectionError):
        return
    reading = asyncio.ensure_future(ws.until_close(c.stats))
    burst = frame(OP_BINARY, CHUNK) * 50
    while not reading.done():
        ws.writer.write(burst)
        c.stats["chunks"] += 50
        try:
            await ws.writer.drain()
        except ConnectionError:
            break
        await asyncio.sleep(0)
    await reading


async def preauth_large_text(c: Ctx) -> None:
    ws = await Raw.upgrade(c)
    if ws is None:
        return
    ws.writer.write(frame(OP_TEXT, b'{"type":"keepalive","pad":"' + b"a" * 500_000 + b'"}'))
    await ws.until_close(c.stats)


async def non_reader(c: Ctx) -> None:
    """Streams at 5x real time and never reads a reply."""
    ws = await Raw.upgrade(c)
    if ws is None:
        return
    try:
        if not await ws.start(c.key, c.stats):
            return
    except (asyncio.IncompleteReadError, ConnectionError):
        return
    c.stats["sessions"] += 1
    try:
        for _ in range(3000):  # 60 s of audio
            ws.writer.write(frame(OP_BINARY, CHUNK))
            await asyncio.wait_for(ws.writer.drain(), 15)
            await asyncio.sleep(0.004)
    except (ConnectionError, TimeoutError):
        c.stats["cut_off"] += 1
    ws.close()


@dataclass(frozen=True)
class Attack:
    run: Callable[[Ctx], Awaitable[None]]
    concurrency: int
    key: str = "attacker"
    revoke_after_s: float | None = None
    elsewhere: bool = False
    """Attack the sink (``_sink``) instead of the gateway: a control."""
    default: bool = True
    """In the default set (all attacks)."""


ATTACKS: dict[str, Attack] = {
    "ping_flood": Attack(ping_flood, 8),
    "keepalive_before_start": Attack(keepalive_before_start, 50),
    "slowloris": Attack(slowloris, 200),
    "revocation": Attack(revocation, 10, key="revokee", revoke_after_s=1.0),
    "oversized_params": Attack(oversized_params, 8),
    # Not in the default set: the same reconnect loop from 1,000 sockets at once, and
    # from 8 against the sink instead of the gateway (a control).
    "oversized_params_wide": Attack(oversized_params, 1000, default=False),
    "reconnect_elsewhere": Attack(oversized_params, 8, elsewhere=True, default=False),
    "detached_spam": Attack(detached_spam, 8),
    "chunk_flood": Attack(chunk_flood, 4),
    "preauth_large_text": Attack(preauth_large_text, 8),
    "non_reader": Attack(non_reader, 4),
}


def _attack(name: str, url: str, keys: dict[str, str], keys_file: str, source: str,
            ca_file: str | None, go: Any, stop: Any, out: Any) -> None:
    use_uvloop()
    raise_nofile()
    spec = ATTACKS[name]
    hostport = url.split("://", 1)[1].split("/", 1)[0]
    host, port = hostport.rsplit(":", 1)
    stats: Counter[str] = Counter()
    tls = _client_tls(ca_file) if url.startswith("wss:") else None
    ctx = Ctx(host, int(port), keys[spec.key], keys_file, stats, source, tls)

    async def loop() -> None:
        while True:
            try:
                await spec.run(ctx)
            except (ConnectionError, OSError, asyncio.IncompleteReadError) as exc:
                stats[type(exc).__name__] += 1
                await asyncio.sleep(0.01)

    def loop_error(_loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        # The attacker's own sockets cut by the gateway: uvloop's client-side SSL protocol
        # reports them ("Fatal error on SSL protocol", a write to a closed handle; "Future
        # exception was never retrieved", ConnectionResetError). They were once printed
        # as a traceback each and mistaken for the gateway's; counted here instead.
        stats[f"attacker_loop_error: {context.get('message', '?')}"] += 1

    async def main() -> None:
        loop_ = asyncio.get_running_loop()
        loop_.set_exception_handler(loop_error)
        tasks = [asyncio.ensure_future(loop()) for _ in range(spec.concurrency)]
        go.set()
        started = time.monotonic()
        if spec.revoke_after_s is not None:
            await asyncio.sleep(spec.revoke_after_s)
            from audiostream.gateway.keys import revoke_key

            revoke_key(Path(keys_file), "revokee")
            stats["revoked"] = 1
        await loop_.run_in_executor(None, stop.wait)
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        stats["seconds"] = round(time.monotonic() - started)
        out.put(dict(stats))

    asyncio.run(main())


# --- victims ----------------------------------------------------------------------------------


async def victims(url: str, key: str, n: int, seconds: float,
                  ca_file: str | None = None) -> dict[str, Any]:
    from audiostream.client import AudioStreamClient

    rng = np.random.default_rng(7)
    x = (rng.standard_normal(int(16000 * seconds)) * 3000).astype(np.int16)

    async def one() -> Any:
        client = AudioStreamClient(url, api_key=key, pipeline=["passthrough"], format=FMT,
                                   deadline_ms=1000, ssl_context=_client_tls(ca_file))
        return await client.stream(x, rate=1.0)

    results = await asyncio.gather(*(one() for _ in range(n)), return_exceptions=True)
    lat: list[float] = []
    dropped = failed = complete = 0
    expected = len(x) * 2
    for r in results:
        if isinstance(r, BaseException):
            failed += 1
            continue
        lat += r.latencies_ms
        dropped += len(r.dropped)
        complete += r.audio == x.tobytes() and len(r.audio) == expected
    arr = np.asarray(lat) if lat else np.asarray([float("nan")])
    return {"p50_ms": round(float(np.percentile(arr, 50)), 2),
            "p99_ms": round(float(np.percentile(arr, 99)), 2),
            "max_ms": round(float(arr.max()), 2), "chunks": len(lat), "dropped": dropped,
            "failed_sessions": failed, "complete_sessions": complete}


def run_one(name: str, args: argparse.Namespace) -> dict[str, Any]:
    from audiostream.gateway.keys import create_key

    ctx = mp.get_context("spawn")
    with tempfile.TemporaryDirectory() as tmp:
        keys_file = Path(tmp) / "keys.json"
        keys = {who: create_key(keys_file, who, max_sessions=cap)[0]
                for who, cap in (("victim", None), ("attacker", 50), ("revokee", 50))}
        ca_file = None
        tls = None
        if args.tls:
            ca_file, chain, key = _tls_files(Path(tmp))
            tls = (chain, key)
        spec = ServerSpec(str(keys_file), BROKER if args.broker else None,
                          settings=json.loads(args.settings), edge=json.loads(args.edge),
                          tls=tls)
        ready, stop, report = ctx.Queue(), ctx.Event(), ctx.Queue()
        server = ctx.Process(target=_serve, args=(spec, ready, stop, report), daemon=True)
        sinks: list[Any] = []
        server.start()
        try:
            url = ready.get(timeout=60)
            target = url
            if ATTACKS[name].elsewhere:
                sinks.append(sink := ctx.Process(target=_sink, args=(ready, stop), daemon=True))
                sink.start()
                target = ready.get(timeout=60)
            base = asyncio.run(victims(url, keys["victim"], args.victims, args.seconds,
                                       ca_file))
            go, astop, out = ctx.Event(), ctx.Event(), ctx.Queue()
            attacker = ctx.Process(target=_attack, daemon=True,
                                   args=(name, target, keys, str(keys_file), args.source,
                                         ca_file, go, astop, out))
            attacker.start()
            go.wait(30)
            time.sleep(args.warmup)  # the attack reaches its steady state
            under = asyncio.run(victims(url, keys["victim"], args.victims, args.seconds,
                                        ca_file))
            astop.set()
            try:
                stats = out.get(timeout=30)
            except queue.Empty:
                stats = {"unreported": 1}
            attacker.join(5)
            if attacker.is_alive():
                attacker.kill()
        finally:
            stop.set()
            try:
                refused = report.get(timeout=30)
            except queue.Empty:
                refused = {"unreported": 1}
            for p in sinks:
                p.join(10)
            server.join(30)
            if server.is_alive():
                server.kill()
    ratio = under["p99_ms"] / base["p99_ms"] if base["p99_ms"] else float("nan")
    return {"attack": name, "broker": "rabbitmq" if args.broker else "memory",
            "victims": args.victims, "seconds": args.seconds,
            "tls": bool(args.tls), "edge": json.loads(args.edge),
            "baseline": base, "under_attack": under, "p99_ratio": round(ratio, 2),
            "attacker": stats, "edge_refused": refused,
            "loadavg_1m": round(os.getloadavg()[0], 2)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--attack", choices=sorted(ATTACKS), action="append",
                   help="run only this attack (repeatable; default: all but "
                   "oversized_params_wide and the reconnect_elsewhere control)")
    p.add_argument("--victims", type=int, default=5, help="victim sessions (default 5)")
    p.add_argument("--seconds", type=float, default=5.0,
                   help="audio per victim session and phase (default 5)")
    p.add_argument("--warmup", type=float, default=1.5,
                   help="seconds of attack before the victims start (default 1.5)")
    p.add_argument("--source", default="127.0.0.2",
                   help="the attacker's source address (default 127.0.0.2; the victims "
                   "use 127.0.0.1, as tenants behind other addresses would)")
    p.add_argument("--broker", action="store_true", help="real RabbitMQ (default in-memory)")
    p.add_argument("--tls", action="store_true",
                   help="serve wss:// with a throwaway CA; attacker and victims use TLS")
    p.add_argument("--settings", default="{}",
                   help='GatewaySettings overrides as JSON, e.g. \'{"flood_burst": 1000}\'')
    p.add_argument("--edge", default='{"conn_rate_per_ip": 50, "conn_burst_per_ip": 200}',
                   help="EdgeSettings overrides as JSON (default: the CLI's per-address "
                   "connection rate, 50/s burst 200; '{}' for none)")
    p.add_argument("--out", help="also append the JSON lines to this file")
    args = p.parse_args()
    emit({"machine": machine(), "loadavg_1m": round(os.getloadavg()[0], 2)}, args.out)
    for name in args.attack or [n for n, a in ATTACKS.items() if a.default]:
        log(f"attack {name} ...")
        emit(run_one(name, args), args.out)


if __name__ == "__main__":
    main()
