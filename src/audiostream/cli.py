"""Command line: ``audiostream serve|gateway|worker|stream|offline|keys|topology|models``."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import importlib
import json
import logging
import os
import signal
import ssl
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from audiostream.errors import AudioStreamError

log = logging.getLogger("audiostream")

DEFAULT_PORT = 8080


# --- logging ------------------------------------------------------------------------------


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        data: dict[str, Any] = {
            "ts": round(record.created, 6),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            data["exc"] = self.formatException(record.exc_info)
        return json.dumps(data)


def setup_logging(level: str, json_lines: bool) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if json_lines:
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    logging.getLogger("aio_pika").setLevel(logging.WARNING)
    logging.getLogger("aiormq").setLevel(logging.WARNING)


# --- shared options -----------------------------------------------------------------------


def _env(name: str, default: str | None = None) -> str | None:
    return os.environ.get(f"AUDIOSTREAM_{name}", default)


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--log-level", default=_env("LOG_LEVEL", "info"),
                   help="debug, info, warning or error (env AUDIOSTREAM_LOG_LEVEL)")
    p.add_argument("--json-logs", action="store_true",
                   default=_env("JSON_LOGS", "") in ("1", "true"),
                   help="log JSON lines (env AUDIOSTREAM_JSON_LOGS=1)")


def _add_broker(p: argparse.ArgumentParser, *, required: bool) -> None:
    default = _env("BROKER")
    p.add_argument(
        "--broker",
        default=default,
        required=required and default is None,
        help="AMQP URL, e.g. amqp://user:pass@host:5672/ (env AUDIOSTREAM_BROKER)"
        + ("" if required else "; omit for the in-process broker"),
    )
    p.add_argument("--shards", type=int, default=int(_env("SHARDS", "2") or 2),
                   help="work queues per processing type (default 2)")
    p.add_argument("--prefix", default=_env("PREFIX", "audiostream"),
                   help="name prefix of exchanges and queues (default audiostream)")


def _add_gateway(p: argparse.ArgumentParser) -> None:
    p.add_argument("--host", default=_env("HOST", "127.0.0.1"), help="listen address")
    p.add_argument("--port", type=int, default=int(_env("PORT", str(DEFAULT_PORT)) or 0),
                   help=f"listen port (default {DEFAULT_PORT}; 0 picks a free one)")
    p.add_argument("--keys-file", type=Path, default=_env("KEYS_FILE"),
                   help="API keys file from 'audiostream keys create' "
                   "(env AUDIOSTREAM_KEYS_FILE)")
    p.add_argument("--tls-cert", type=Path, default=_env("TLS_CERT"),
                   help="PEM certificate chain: serve wss:// (TLS 1.3 only)")
    p.add_argument("--tls-key", type=Path, default=_env("TLS_KEY"), help="PEM private key")
    p.add_argument("--deadline-ms", type=int, default=1000,
                   help="default per-chunk deadline; later audio is dropped with a notice")
    p.add_argument("--max-connections", type=int, default=10_000,
                   help="connections this gateway accepts (default 10000)")
    p.add_argument("--drain-grace-s", type=float, default=20.0,
                   help="on SIGTERM, wait this long for in-flight outcomes (default 20)")
    p.add_argument("--token-secret", default=_env("TOKEN_SECRET"),
                   help="HMAC secret for resume and browser tokens, shared by all gateways "
                   "(env AUDIOSTREAM_TOKEN_SECRET; default: random, so sessions resume "
                   "only on this process)")
    p.add_argument("--resume-window-s", type=float, default=60.0,
                   help="how long a dropped session can be resumed (default 60)")
    p.add_argument("--allowed-origin", dest="allowed_origins", action="append", default=[],
                   metavar="ORIGIN", help="browser Origin allowed to connect (repeatable; "
                   "'*' for any). Requests without an Origin header are always allowed.")
    p.add_argument("--behind-proxy", action="store_true",
                   help="serve plain ws:// on a non-loopback address because a TLS-terminating "
                   "proxy is in front (warned about at start-up)")
    p.add_argument("--chunk-rate", type=float, default=120.0,
                   help="chunks per second per connection before rate_limited notices "
                   "(default 120; 0 disables)")
    p.add_argument("--chunk-burst", type=float, default=60.0,
                   help="chunks a connection may send at once above the rate (default 60)")
    p.add_argument("--heartbeat-s", type=float, default=30.0,
                   help="WebSocket ping interval; a missing pong closes the connection "
                   "(default 30)")
    p.add_argument("--auth-timeout-s", type=float, default=10.0,
                   help="close connections that send no start within this time (default 10)")
    p.add_argument("--idle-timeout-s", type=float, default=60.0,
                   help="close sessions that send nothing for this long (default 60)")
    p.add_argument("--linger-ms", type=float, default=0.0,
                   help="hold a session's next message until its oldest chunk is this old, "
                   "so it carries more chunks: up to this much latency for fewer messages "
                   "per session (default 0)")
    p.add_argument("--bundle-max", type=int, default=64,
                   help="most sessions' work messages packed into one broker message "
                   "(default 64; 1 = one broker message per session message)")
    p.add_argument("--bundle-wait-ms", type=float, default=5.0,
                   help="longest a work message waits for its bundle while the previous "
                   "bundle awaits its confirm; with none in flight it goes at once (default 5)")


def _add_worker(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", choices=("cpu", "gpu"), default=_env("DEVICE", "cpu"),
                   help="execution device for model steps (default cpu)")
    p.add_argument("--max-batch", type=int, default=64,
                   help="most messages per processing call (default 64)")
    p.add_argument("--max-wait-ms", type=float, default=None,
                   help="longest a message waits for its batch to fill, for every "
                        "processing type (default: 10 for denoise and vad, 2 for DSP); a "
                        "lane whose messages arrive further apart than that does not wait")
    p.add_argument("--prefetch", type=int, default=None,
                   help="unacked messages per work queue (default max(2*max-batch, 32))")
    p.add_argument("--model-dir", type=Path, default=_env("MODEL_DIR"),
                   help="prepared models (default: inside the environment)")
    p.add_argument("--intra-op-threads", type=int, default=1,
                   help="ONNX Runtime threads per model call (default 1: scale with processes)")
    p.add_argument("--denoise-variant", choices=("fp32", "int8", "fp16"), default=None,
                   help="NSNet2 variant (default fp32 on cpu, fp16 on gpu)")
    p.add_argument("--tensorrt", action="store_true",
                   help="with --device gpu, try the TensorRT execution provider first")
    p.add_argument("--io-binding", action=argparse.BooleanOptionalAction, default=None,
                   help="ONNX Runtime I/O binding: the GRU state stays on the device between "
                   "10 ms hops (default: on with --device gpu, off on cpu, where it is not "
                   "faster)")
    p.add_argument("--device-id", type=int, default=0, help="CUDA device (default 0)")
    p.add_argument("--import", dest="imports", action="append", default=[], metavar="MODULE",
                   help="import a module that registers more processors (repeatable)")


def _ssl_from(args: argparse.Namespace) -> ssl.SSLContext | None:
    if args.tls_cert is None and args.tls_key is None:
        return None
    if args.tls_cert is None or args.tls_key is None:
        raise AudioStreamError("--tls-cert and --tls-key go together")
    from audiostream.gateway import server_ssl_context

    return server_ssl_context(args.tls_cert, args.tls_key)


def _topology(args: argparse.Namespace) -> Any:
    from audiostream.testing import default_topology

    return default_topology(shards=args.shards, prefix=args.prefix)


def _worker_settings(args: argparse.Namespace, processing: Sequence[str]) -> Any:
    from audiostream.worker import WorkerSettings

    return WorkerSettings(
        processing=tuple(processing),
        device=args.device,
        max_batch=args.max_batch,
        max_wait_ms=args.max_wait_ms,
        prefetch=args.prefetch,
        model_dir=args.model_dir,
        options={
            "intra_op_threads": args.intra_op_threads,
            "tensorrt": args.tensorrt,
            "io_binding": args.io_binding,
            "device_id": args.device_id,
            **({"denoise_variant": args.denoise_variant} if args.denoise_variant else {}),
        },
    )


def _gateway_settings(args: argparse.Namespace) -> Any:
    from audiostream.gateway import GatewaySettings

    return GatewaySettings(
        default_deadline_ms=args.deadline_ms,
        max_connections=args.max_connections,
        drain_grace_s=args.drain_grace_s,
        resume_window_s=args.resume_window_s,
        allowed_origins=tuple(args.allowed_origins),
        chunk_rate=args.chunk_rate or None,
        chunk_burst=args.chunk_burst,
        auth_timeout_s=args.auth_timeout_s,
        idle_timeout_s=args.idle_timeout_s,
        heartbeat_s=args.heartbeat_s,
        linger_ms=args.linger_ms,
        bundle_max=args.bundle_max,
        bundle_wait_ms=args.bundle_wait_ms,
    )


def _check_exposure(args: argparse.Namespace) -> None:
    """Refuse plain ws:// on a public address unless a proxy is declared; warn then."""
    if args.tls_cert is not None:
        return
    loopback = args.host in ("127.0.0.1", "::1", "localhost")
    if not loopback and not args.behind_proxy:
        raise AudioStreamError(
            f"refusing to serve plain ws:// on {args.host}: give --tls-cert/--tls-key, or "
            "--behind-proxy if a TLS-terminating proxy is in front"
        )
    if args.behind_proxy:
        log.warning("serving plain ws:// on %s:%s; TLS must be terminated by the proxy in front",
                    args.host, args.port)


def _secret(args: argparse.Namespace) -> bytes | None:
    if args.token_secret:
        return str(args.token_secret).encode()
    log.warning("no --token-secret: resume tokens are valid on this process only")
    return None


async def _wait_for_signal() -> str:
    loop = asyncio.get_running_loop()
    stop: asyncio.Future[str] = loop.create_future()

    def handler(sig: signal.Signals) -> None:
        if not stop.done():
            stop.set_result(sig.name)

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, handler, sig)
    return await stop


# --- serve / gateway / worker -------------------------------------------------------------


async def _serve(args: argparse.Namespace) -> int:
    from audiostream.testing import embedded_server, sample_wav

    _check_exposure(args)
    async with embedded_server(
        token_secret=args.token_secret.encode() if args.token_secret else None,
        broker_url=args.broker,
        topology=_topology(args),
        host=args.host,
        port=args.port,
        ssl_context=_ssl_from(args),
        keys_file=args.keys_file,
        workers=args.workers,
        gateway_settings=_gateway_settings(args),
        worker_settings=_worker_settings(args, _topology(args).processing_types),
    ) as server:
        where = "in-process broker" if args.broker is None else "RabbitMQ"
        print(f"audiostream serving {server.url} ({where}, {args.workers} worker(s))")
        print(f"development API key (valid while this process runs):\n{server.api_key}",
              flush=True)
        if args.demo is not None:
            await _demo(server.url, server.api_key, sample_wav(), args.demo, _ssl_from(args))
            print(f"still serving {server.url}; Ctrl-C to stop", flush=True)
        sig = await _wait_for_signal()
        log.info("%s received; shutting down", sig)
        await server.gateway.drain(args.drain_grace_s)
    return 0


async def _demo(url: str, key: str, wav: Path, out_dir: Path, ctx: ssl.SSLContext | None) -> None:
    from audiostream.client import AudioStreamClient
    from audiostream.processors import registry

    await asyncio.to_thread(out_dir.mkdir, parents=True, exist_ok=True)
    pipeline = ["denoise"] if "denoise" in registry else ["highpass"]
    out = out_dir / "demo-processed.wav"
    print(f"demo: streaming {wav.name} in real time through {'+'.join(pipeline)} ...",
          flush=True)
    client = AudioStreamClient(url, api_key=key, pipeline=pipeline, ssl_context=ctx)
    try:
        result = await client.stream(wav, chunk_ms=20, rate=1.0)
    except AudioStreamError as err:
        if pipeline == ["highpass"]:
            raise
        print(f"demo: {pipeline[0]} unavailable ({err}); using highpass", flush=True)
        pipeline = ["highpass"]
        client = AudioStreamClient(url, api_key=key, pipeline=pipeline, ssl_context=ctx)
        result = await client.stream(wav, chunk_ms=20, rate=1.0)
    _write_result(out, result, wav)
    lat = result.latency()
    print(
        f"demo: wrote {out} ({len(result.outcomes)} chunks, {len(result.dropped)} dropped); "
        f"round trip p50 {lat['p50']:.1f} ms, p90 {lat['p90']:.1f} ms, "
        f"p99 {lat['p99']:.1f} ms, max {lat['max']:.1f} ms",
        flush=True,
    )


def _write_result(out: Path, result: Any, like: Path) -> None:
    """Write the outcomes as a WAV; dropped chunks become silence of the same length."""
    import numpy as np
    import soundfile

    info = soundfile.info(str(like))
    pieces = []
    for o in result.outcomes:
        if isinstance(o, bytes):
            pieces.append(np.frombuffer(o, dtype="<i2").reshape(-1, info.channels))
    data = np.concatenate(pieces) if pieces else np.zeros((0, info.channels), dtype=np.int16)
    soundfile.write(str(out), data, info.samplerate, subtype="PCM_16")


async def _gateway(args: argparse.Namespace) -> int:
    from audiostream.gateway import Gateway, KeyStore, start_site
    from audiostream.transport import open_transport

    if args.keys_file is None:
        raise AudioStreamError("--keys-file (or AUDIOSTREAM_KEYS_FILE) is required")
    _check_exposure(args)
    transport = open_transport(args.broker, _topology(args))
    gateway = Gateway(transport, KeyStore(args.keys_file), settings=_gateway_settings(args),
                      token_secret=_secret(args))
    runner, port = await start_site(gateway.app(), args.host, args.port, _ssl_from(args))
    scheme = "wss" if args.tls_cert else "ws"
    print(f"audiostream gateway on {scheme}://{args.host}:{port}/v1/stream", flush=True)
    try:
        sig = await _wait_for_signal()
        log.info("%s received; draining for up to %.0f s", sig, args.drain_grace_s)
        await gateway.drain(args.drain_grace_s)
    finally:
        await runner.cleanup()
    return 0


async def _worker(args: argparse.Namespace) -> int:
    from aiohttp import web
    from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

    from audiostream.metrics import WorkerMetrics
    from audiostream.transport import open_transport
    from audiostream.worker import Worker

    processing = [p.strip() for p in args.processing.split(",") if p.strip()]
    topo = _topology(args)
    transport = open_transport(args.broker, topo)
    await transport.connect()
    metrics_registry = CollectorRegistry()
    worker = Worker(transport, _worker_settings(args, processing),
                    metrics=WorkerMetrics(metrics_registry))
    runner = None
    if args.metrics_port is not None:
        app = web.Application()

        async def metrics(_r: web.Request) -> web.Response:
            return web.Response(body=generate_latest(metrics_registry),
                                headers={"Content-Type": CONTENT_TYPE_LATEST})

        async def health(_r: web.Request) -> web.Response:
            ok = transport.is_connected
            return web.json_response({"status": "ok" if ok else "broker down"},
                                     status=200 if ok else 503)

        app.router.add_get("/metrics", metrics)
        app.router.add_get("/healthz", health)
        runner = web.AppRunner(app, handle_signals=False)
        await runner.setup()
        await web.TCPSite(runner, args.metrics_host, args.metrics_port).start()
    try:
        await worker.start()
        # Models, sessions and modules are loaded: keep them out of every later garbage
        # collection, and collect the young generation less often (per-message objects
        # die young; py-spy showed 4 % of the event loop in gc at 35 sessions).
        gc.freeze()
        gc.set_threshold(10_000, 20, 20)
        print(f"audiostream worker consuming {','.join(processing)}", flush=True)
        sig = await _wait_for_signal()
        log.info("%s received; finishing the current batch", sig)
    finally:
        await worker.stop()
        await transport.close()
        if runner is not None:
            await runner.cleanup()
    return 0


# --- client-side commands -------------------------------------------------------------------


def _client_ssl(args: argparse.Namespace) -> ssl.SSLContext | None:
    if not args.url.startswith("wss://"):
        return None
    ctx = ssl.create_default_context(cafile=str(args.ca) if args.ca else None)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    return ctx


def _parse_pipeline(text: str) -> list[Any]:
    return [p.strip() for p in text.split(",") if p.strip()]


async def _stream(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from audiostream.client import AudioStreamClient, read_wav

    samples, _rate = read_wav(args.input)
    chunk_bytes_frames = max(1, int(_rate * args.chunk_ms / 1000))
    total = -(-samples.shape[0] // chunk_bytes_frames)
    rate = None if args.rate == "max" else float(args.rate)
    client = AudioStreamClient(args.url, api_key=args.api_key,
                               pipeline=_parse_pipeline(args.pipeline),
                               ssl_context=_client_ssl(args))
    with tqdm(total=total, unit="chunk", disable=args.quiet, file=sys.stderr) as bar:

        def progress(received: int, _total: int) -> None:
            bar.update(received - bar.n)

        result = await client.stream(args.input, chunk_ms=args.chunk_ms, rate=rate,
                                     progress=progress)
    _write_result(args.output, result, args.input)
    lat = result.latency()
    report = {
        "session_id": result.session_id,
        "chunks": len(result.outcomes),
        "dropped": len(result.dropped),
        "latency_ms": lat,
        "server_summary": result.summary,
    }
    print(json.dumps(report) if args.json else
          f"{len(result.outcomes)} chunks, {len(result.dropped)} dropped; round trip "
          f"p50 {lat['p50']:.1f} ms p90 {lat['p90']:.1f} ms p99 {lat['p99']:.1f} ms "
          f"max {lat['max']:.1f} ms -> {args.output}")
    return 0


def _offline(args: argparse.Namespace) -> int:
    import numpy as np

    from audiostream.audio import AudioFormat, Encoding
    from audiostream.audiofile import read_audio, write_audio
    from audiostream.processors import ProcessorContext
    from audiostream.worker.offline import run_offline

    data, rate = read_audio(args.input)  # any container/codec/rate (audiofile.py)
    fmt = AudioFormat(Encoding.PCM_S16LE, int(rate), data.shape[1])
    started = time.perf_counter()
    out = run_offline(data.tobytes(), fmt, _parse_pipeline(args.pipeline),
                      context=ProcessorContext(device=args.device, model_dir=args.model_dir))
    took = time.perf_counter() - started
    result = np.frombuffer(out, dtype="<i2").reshape(-1, fmt.channels)
    write_audio(args.output, result, rate)  # .wav, .flac or .opus
    print(f"processed {data.shape[0] / rate:.2f} s in {took:.2f} s -> {args.output}")
    return 0


async def _healthcheck(args: argparse.Namespace) -> int:
    """WebSocket-level readiness: an upgrade and a keepalive round trip must work."""
    import aiohttp

    ctx: ssl.SSLContext | bool = True
    if args.url.startswith("wss://") and args.insecure:
        ctx = False
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=args.timeout)) as s:
            async with s.ws_connect(args.url, ssl=ctx) as ws:
                await ws.send_str('{"type":"keepalive"}')
                msg = await ws.receive()
                if msg.type is aiohttp.WSMsgType.TEXT and '"keepalive"' in msg.data:
                    print("ok")
                    return 0
                print(f"unexpected answer: {msg.type} {str(msg.data)[:200]}")
                return 1
    except (aiohttp.ClientError, OSError, TimeoutError) as exc:
        print(f"unhealthy: {exc!r}")
        return 1


# --- keys / topology / models -----------------------------------------------------------------


def _keys(args: argparse.Namespace) -> int:
    from audiostream.gateway.keys import create_key, load_records, revoke_key

    if args.keys_cmd == "create":
        key, rec = create_key(
            args.keys_file,
            args.name,
            max_sessions=args.max_sessions,
            pipelines=_parse_pipeline(args.pipelines) if args.pipelines else None,
        )
        print(f"created key {rec.id} ({rec.name}) in {args.keys_file}; it is shown only once:")
        print(key)
    elif args.keys_cmd == "list":
        for rec in load_records(args.keys_file).values():
            state = "revoked" if rec.revoked else "active"
            print(f"{rec.id}\t{rec.name}\t{state}\tmax_sessions={rec.max_sessions}\t"
                  f"pipelines={','.join(rec.pipelines) if rec.pipelines else '*'}")
    elif args.keys_cmd == "token":
        return _keys_token(args)
    else:
        rec = revoke_key(args.keys_file, args.key)
        print(f"revoked {rec.id} ({rec.name})")
    return 0


def _keys_token(args: argparse.Namespace) -> int:
    """Mint a browser token offline: same secret as the gateways, no gateway needed."""
    from audiostream.gateway.browser import BrowserTokens
    from audiostream.gateway.keys import KeyStore, load_records

    if not args.token_secret:
        raise AudioStreamError("--token-secret (or AUDIOSTREAM_TOKEN_SECRET) is required: "
                               "the gateways' secret, which they check tokens with")
    rec = next((r for r in load_records(args.keys_file).values()
                if args.key in (r.id, r.name)), None)
    if rec is None:
        raise AudioStreamError(f"no key with id or name {args.key!r} in {args.keys_file}")
    tokens = BrowserTokens(str(args.token_secret).encode(), KeyStore(args.keys_file))
    token, grant = tokens.mint(rec, _parse_pipeline(args.pipelines), args.ttl)
    print(f"browser token for key {rec.id} ({rec.name}), pipelines "
          f"{','.join(grant.pipelines)}, one session, expires in {args.ttl:g} s:")
    print(token)
    return 0


async def _topology_cmd(args: argparse.Namespace) -> int:
    topo = _topology(args)
    if args.topology_cmd == "declare":
        from audiostream.transport.rabbitmq import declare_topology

        await declare_topology(args.broker, topo)
        print(f"declared {len(topo.processing_types)} exchanges and "
              f"{len(topo.processing_types) * topo.shards} work queues on {args.broker}")
        return 0
    from audiostream.definitions import write_definitions

    write_definitions(args.out, topo)
    print(f"wrote {args.out}")
    return 0


# --- parser --------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="audiostream",
        description="Real-time audio processing over WebSockets, RabbitMQ and ONNX Runtime.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("serve", help="gateway and workers in one process (embedded default)")
    _add_common(p)
    _add_broker(p, required=False)
    _add_gateway(p)
    _add_worker(p)
    p.add_argument("--workers", type=int, default=1, help="in-process workers (default 1)")
    p.add_argument("--demo", type=Path, default=None, metavar="OUT_DIR",
                   help="after start, stream the bundled sample and write the result here")

    p = sub.add_parser("gateway", help="WebSocket gateway in front of RabbitMQ")
    _add_common(p)
    _add_broker(p, required=True)
    _add_gateway(p)

    p = sub.add_parser("worker", help="consume work queues and process batches")
    _add_common(p)
    _add_broker(p, required=True)
    _add_worker(p)
    p.add_argument("--processing", required=True, help="processing types, e.g. denoise,vad")
    p.add_argument("--metrics-port", type=int, default=None,
                   help="serve /metrics and /healthz on this port")
    p.add_argument("--metrics-host", default="0.0.0.0", help="address for --metrics-port")

    p = sub.add_parser("stream", help="stream a WAV file through a gateway")
    _add_common(p)
    p.add_argument("input", type=Path)
    p.add_argument("output", type=Path)
    p.add_argument("--url", required=True, help="ws:// or wss:// URL of /v1/stream")
    p.add_argument("--api-key", default=_env("API_KEY"), required=_env("API_KEY") is None,
                   help="API key (env AUDIOSTREAM_API_KEY)")
    p.add_argument("--pipeline", required=True, help="steps, e.g. highpass,denoise")
    p.add_argument("--chunk-ms", type=float, default=20.0, help="chunk duration (default 20)")
    p.add_argument("--rate", default="1.0",
                   help="1.0 = real time, 2.0 = twice as fast, max = as fast as possible")
    p.add_argument("--ca", type=Path, default=None, help="CA bundle to trust for wss://")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--quiet", action="store_true", help="no progress bar")

    p = sub.add_parser("bench", help="N concurrent real-time sessions against a gateway")
    _add_common(p)
    from audiostream import bench as _bench

    _bench.add_arguments(p)

    p = sub.add_parser("offline", help="run a pipeline on an audio file in-process (reference)")
    _add_common(p)
    p.add_argument("input", type=Path, help="WAV, FLAC, Opus/Ogg or MP3, any sample rate")
    p.add_argument("output", type=Path, help="written as .wav, .flac or .opus")
    p.add_argument("--pipeline", required=True)
    p.add_argument("--device", choices=("cpu", "gpu"), default="cpu")
    p.add_argument("--model-dir", type=Path, default=_env("MODEL_DIR"))

    p = sub.add_parser("healthcheck", help="exit 0 if a WebSocket upgrade + keepalive works")
    _add_common(p)
    p.add_argument("--url", default=f"ws://127.0.0.1:{DEFAULT_PORT}/v1/stream")
    p.add_argument("--timeout", type=float, default=5.0)
    p.add_argument("--insecure", action="store_true", help="skip certificate checks (local)")

    p = sub.add_parser("keys", help="manage API keys (stored as hashes)")
    _add_common(p)
    ks = p.add_subparsers(dest="keys_cmd", required=True)
    kc = ks.add_parser("create", help="create a key; prints it as the last line")
    kc.add_argument("name")
    kc.add_argument("--max-sessions", type=int, default=None)
    kc.add_argument("--pipelines", default=None, help="allowed steps, comma separated")
    kl = ks.add_parser("list", help="list keys (never the secrets)")
    kr = ks.add_parser("revoke", help="revoke a key by id or name")
    kr.add_argument("key")
    kt = ks.add_parser("token", help="mint a short-lived browser token (bt1.) for one "
                       "session; prints it as the last line")
    kt.add_argument("key", help="id or name of the API key it acts for")
    kt.add_argument("--pipelines", required=True, help="allowed steps, comma separated")
    kt.add_argument("--ttl", type=float, default=300.0, help="seconds, at most 600")
    kt.add_argument("--token-secret", default=_env("TOKEN_SECRET"),
                    help="the gateways' --token-secret (env AUDIOSTREAM_TOKEN_SECRET)")
    for k in (kc, kl, kr, kt):
        k.add_argument("--keys-file", type=Path, default=_env("KEYS_FILE"),
                       required=_env("KEYS_FILE") is None)

    p = sub.add_parser("topology", help="broker topology")
    _add_common(p)
    ts = p.add_subparsers(dest="topology_cmd", required=True)
    td = ts.add_parser("declare", help="declare exchanges and queues on RabbitMQ (idempotent)")
    _add_broker(td, required=True)
    tdef = ts.add_parser("definitions", help="write RabbitMQ definitions JSON")
    _add_broker(tdef, required=False)
    tdef.add_argument("--out", type=Path, required=True)

    p = sub.add_parser("models", help="model files")
    _add_common(p)
    ms = p.add_subparsers(dest="models_cmd", required=True)
    mp = ms.add_parser("prepare", help="derive streaming/INT8/FP16 models and verify hashes")
    with contextlib.suppress(ImportError):
        from audiostream.models import prepare as _prepare

        _prepare.add_arguments(mp)
    return parser


def _run_async(coro: Any) -> int:
    with contextlib.suppress(ImportError):
        import uvloop

        return int(uvloop.run(coro))
    return int(asyncio.run(coro))


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(getattr(args, "log_level", "info"), getattr(args, "json_logs", False))
    try:
        for module in getattr(args, "imports", []):
            importlib.import_module(module)
        cmd = args.command
        if cmd == "serve":
            return _run_async(_serve(args))
        if cmd == "gateway":
            return _run_async(_gateway(args))
        if cmd == "worker":
            return _run_async(_worker(args))
        if cmd == "stream":
            return _run_async(_stream(args))
        if cmd == "bench":
            from audiostream.bench import run_cli

            return _run_async(run_cli(args))
        if cmd == "healthcheck":
            return _run_async(_healthcheck(args))
        if cmd == "offline":
            return _offline(args)
        if cmd == "keys":
            return _keys(args)
        if cmd == "topology":
            return _run_async(_topology_cmd(args))
        if cmd == "models":
            from audiostream.models import prepare

            return prepare.run(args)
    except AudioStreamError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 2
