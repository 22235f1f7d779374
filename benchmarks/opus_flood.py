"""Victim latency next to an Opus flood: does decoding a flooder's Opus cost the PCM
sessions their latency?

One gateway (embedded server with a passthrough worker, in-memory broker or RabbitMQ,
in its own process) serves ``--victims`` real-time PCM sessions (16 kHz mono, 20 ms
chunks, paced at real time, in this process). Two phases in the same run, same gateway:

1. *baseline*: the victims stream alone for ``--seconds``;
2. *flood*: ``--flooders`` Opus sessions (a third process) send maximal frames (48 kHz
   stereo at 510 kbit/s, 50 packets of 10 ms: the most decoding per byte of credit) as
   fast as their credit allows, while the victims stream again.

One JSON line per run: the victims' p50/p99 round trip (client-measured, ms), dropped
chunks and bit-exact sessions in each phase, the p99 ratio flood/baseline, the
gateway's CPU share in each phase, the flood's chunks per second, and the load average.
``--settings`` overrides GatewaySettings, e.g. '{"opus_cpu_share": 1e9,
"opus_cpu_share_total": 1e9}' for a gateway with no Opus budget (the A/B);
``--flood-codec pcm`` is the control: the same audio flooded as PCM (no decoding).

    PYTHONPATH=src python benchmarks/opus_flood.py
    PYTHONPATH=src python benchmarks/opus_flood.py --broker --flooders 4
    PYTHONPATH=src python benchmarks/opus_flood.py --flood-codec pcm   # the control

Figures live in docs/benchmarks.md ("Opus on the wire").
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import queue
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import BROKER, cpu_seconds, emit, log, machine, raise_nofile, use_uvloop

from audiostream.audio import AudioFormat, Codec, Encoding

FMT = AudioFormat(Encoding.PCM_S16LE, 16000, 1)


@dataclass(frozen=True)
class ServerSpec:
    keys_file: str
    broker: str | None
    settings: dict[str, Any] = field(default_factory=dict)


def _serve(spec: ServerSpec, ready: Any, stop: Any) -> None:
    use_uvloop()
    raise_nofile()

    async def main() -> None:
        from audiostream.gateway import GatewaySettings
        from audiostream.gateway.edge import EdgeSettings
        from audiostream.testing import embedded_server
        from audiostream.topology import Topology

        topo = Topology(processing_types=("passthrough",),
                        prefix=f"bench-opusflood-{os.getpid()}", reply_expires_ms=1500)
        settings = GatewaySettings(edge=EdgeSettings(ops_port=None), **spec.settings)
        async with embedded_server(broker_url=spec.broker, topology=topo,
                                   processing=("passthrough",),
                                   keys_file=Path(spec.keys_file),
                                   gateway_settings=settings) as srv:
            ready.put((srv.url, os.getpid()))
            await asyncio.get_running_loop().run_in_executor(None, stop.wait)

    asyncio.run(main())


def maximal_frames() -> list[bytes]:
    from audiostream.audio import frame_opus_packets
    from audiostream.audiofile import OpusPacketEncoder

    rng = np.random.default_rng(7)
    enc = OpusPacketEncoder(48000, 2, bitrate=510_000, frame_ms=10)
    packets = enc.encode((rng.standard_normal((48000 * 5, 2)) * 6000).astype(np.int16))
    return [frame_opus_packets(packets[i:i + 50]) for i in range(0, 500, 50)]


def pcm_frames() -> list[bytes]:
    """The control: the same audio as ``maximal_frames`` decoded, sent as PCM chunks."""
    from audiostream.audiofile import OpusPacketDecoder

    dec = OpusPacketDecoder(48000, 2)
    return [dec.decode(f) for f in maximal_frames()]


def _flood(url: str, key: str, n: int, codec: str, go: Any, stop: Any, out: Any) -> None:
    use_uvloop()

    async def one(frames: list[bytes], sent: list[int]) -> None:
        from audiostream.client import AudioStreamClient

        client = AudioStreamClient(url, api_key=key)
        async with client.session(["passthrough"], format=AudioFormat.pcm16(48000, 2),
                                  codec=Codec(codec), iterate=False, deadline_ms=30_000) as s:
            k = 0
            while not stop.is_set():
                await s.send(frames[k % len(frames)])
                k += 1
                sent[0] += 1
            await s.finish()

    async def main() -> None:
        frames = maximal_frames() if codec == "opus" else pcm_frames()
        sent = [0]
        tasks = [asyncio.ensure_future(one(frames, sent)) for _ in range(n)]
        go.set()
        t0 = time.monotonic()
        results = await asyncio.gather(*tasks, return_exceptions=True)
        wall = time.monotonic() - t0
        out.put({"chunks": sent[0], "chunks_per_s": round(sent[0] / wall, 1),
                 "failed": [repr(r) for r in results if isinstance(r, BaseException)]})

    asyncio.run(main())


async def victims(url: str, key: str, n: int, seconds: float) -> dict[str, Any]:
    from audiostream.client import AudioStreamClient

    rng = np.random.default_rng(7)
    x = (rng.standard_normal(int(16000 * seconds)) * 3000).astype(np.int16)

    async def one() -> Any:
        client = AudioStreamClient(url, api_key=key, pipeline=["passthrough"], format=FMT,
                                   deadline_ms=1000)
        return await client.stream(x, rate=1.0)

    results = await asyncio.gather(*(one() for _ in range(n)), return_exceptions=True)
    lat: list[float] = []
    dropped = failed = complete = 0
    for r in results:
        if isinstance(r, BaseException):
            failed += 1
            continue
        lat += r.latencies_ms
        dropped += len(r.dropped)
        complete += r.audio == x.tobytes()
    arr = np.asarray(lat) if lat else np.asarray([float("nan")])
    return {"p50_ms": round(float(np.percentile(arr, 50)), 2),
            "p99_ms": round(float(np.percentile(arr, 99)), 2),
            "max_ms": round(float(arr.max()), 2), "chunks": len(lat), "dropped": dropped,
            "failed_sessions": failed, "complete_sessions": complete}


def phase(url: str, key: str, args: argparse.Namespace, pid: int) -> dict[str, Any]:
    c0, t0 = cpu_seconds(pid), time.monotonic()
    res = asyncio.run(victims(url, key, args.victims, args.seconds))
    res["gateway_cpu_share"] = round((cpu_seconds(pid) - c0) / (time.monotonic() - t0), 3)
    return res


def run(args: argparse.Namespace) -> dict[str, Any]:
    from audiostream.gateway.keys import create_key

    ctx = mp.get_context("spawn")
    with tempfile.TemporaryDirectory() as tmp:
        keys_file = Path(tmp) / "keys.json"
        victim_key = create_key(keys_file, "victim")[0]
        flood_key = create_key(keys_file, "flooder", max_sessions=50)[0]
        spec = ServerSpec(str(keys_file), BROKER if args.broker else None,
                          settings=json.loads(args.settings))
        ready, stop = ctx.Queue(), ctx.Event()
        server = ctx.Process(target=_serve, args=(spec, ready, stop), daemon=True)
        server.start()
        try:
            url, pid = ready.get(timeout=60)
            base = phase(url, victim_key, args, pid)
            go, fstop, out = ctx.Event(), ctx.Event(), ctx.Queue()
            flooder = ctx.Process(target=_flood, daemon=True,
                                  args=(url, flood_key, args.flooders, args.flood_codec, go,
                                        fstop, out))
            flooder.start()
            go.wait(30)
            time.sleep(args.warmup)  # the flood reaches its steady state
            under = phase(url, victim_key, args, pid)
            fstop.set()
            try:
                stats = out.get(timeout=60)
            except queue.Empty:
                stats = {"unreported": 1}
            flooder.join(10)
            if flooder.is_alive():
                flooder.kill()
        finally:
            stop.set()
            server.join(30)
            if server.is_alive():
                server.kill()
    from audiostream.gateway import GatewaySettings

    eff = GatewaySettings(**json.loads(args.settings))
    ratio = under["p99_ms"] / base["p99_ms"] if base["p99_ms"] else float("nan")
    return {"broker": "rabbitmq" if args.broker else "memory", "victims": args.victims,
            "flooders": args.flooders, "flood_codec": args.flood_codec,
            "seconds": args.seconds,
            "settings": json.loads(args.settings), "opus_cpu_share": eff.opus_cpu_share,
            "opus_cpu_share_total": eff.opus_cpu_share_total,
            "baseline": base, "flood": under,
            "p99_ratio": round(ratio, 2), "flooder": stats,
            "loadavg_1m": round(os.getloadavg()[0], 2)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--victims", type=int, default=5, help="PCM sessions (default 5)")
    p.add_argument("--flooders", type=int, default=1, help="Opus sessions flooding (default 1)")
    p.add_argument("--flood-codec", choices=("opus", "pcm"), default="opus",
                   help="pcm: the control, the same audio sent as PCM chunks (default opus)")
    p.add_argument("--seconds", type=float, default=10.0,
                   help="audio per victim session and phase (default 10)")
    p.add_argument("--warmup", type=float, default=1.5,
                   help="seconds of flood before the victims start (default 1.5)")
    p.add_argument("--broker", action="store_true", help="real RabbitMQ (default in-memory)")
    p.add_argument("--settings", default="{}",
                   help="GatewaySettings overrides as JSON, e.g. "
                   "'{\"opus_cpu_share\": 1e9, \"opus_cpu_share_total\": 1e9}' (no budget)")
    p.add_argument("--out", help="also append the JSON lines to this file")
    args = p.parse_args()
    emit({"machine": machine(), "loadavg_1m": round(os.getloadavg()[0], 2)}, args.out)
    log("opus flood ...")
    emit(run(args), args.out)


if __name__ == "__main__":
    main()
