"""Command line: ``audiostream serve|gateway|worker|stream|bench|offline|healthcheck|keys|...``.

Exit codes, the same for every command: 0 success; 2 a usage or user error (bad option,
bad environment value, missing file, unknown step); 1 a runtime failure (broker or
gateway unreachable, unhealthy); 70 a bug (``EX_SOFTWARE``), with a hint to run again
with ``--debug``, which prints the traceback. Errors are one line on stderr, with
secrets (URL passwords, API keys) redacted.
"""

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
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

from audiostream import __version__
from audiostream.errors import (
    AudioStreamError,
    AuthError,
    ConfigError,
    ProtocolError,
    TransportError,
)
from audiostream.redact import redact_text, redact_url

log = logging.getLogger("audiostream")

DEFAULT_PORT = 8080
#: Sockets one client address may hold before their request head (``serve``/``gateway``
#: without ``--behind-proxy``): far above what clients open at once, far below the
#: pending cap (512), so a slowloris needs many addresses. docs/security.md explains it.
DEFAULT_MAX_PENDING_PER_IP = 32

#: Exit codes (see the module docstring); 70 is ``EX_SOFTWARE`` from BSD's sysexits.h.
EXIT_OK, EXIT_FAILURE, EXIT_USAGE, EXIT_BUG, EXIT_INTERRUPTED = 0, 1, 2, 70, 130


class UsageError(ConfigError):
    """A user error found by the command line itself (exit code 2)."""


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


#: One-shot commands report broker trouble themselves, in one line; aiormq's own
#: "error when creating transport" log would repeat it.
_ONE_SHOT = frozenset({"keys", "topology", "healthcheck", "offline", "models"})


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


# --- environment defaults -------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class FromEnv:
    """A default read from ``AUDIOSTREAM_*``, converted only once its command is chosen.

    Converting while the parser is built made one bad variable (``AUDIOSTREAM_SHARDS=two``)
    crash every command, even ``keys list``; converted after parsing, it fails only the
    commands that use it, with a message naming the variable.
    """

    var: str
    raw: str
    convert: Callable[[str], Any]


def _env(name: str, default: str | None = None) -> str | None:
    return os.environ.get(f"AUDIOSTREAM_{name}", default)


def _env_default(name: str, convert: Callable[[str], Any], default: Any) -> Any:
    raw = os.environ.get(f"AUDIOSTREAM_{name}")
    return default if raw is None else FromEnv(f"AUDIOSTREAM_{name}", raw, convert)


def _resolve_env(args: argparse.Namespace) -> None:
    for dest, value in vars(args).items():
        if isinstance(value, FromEnv):
            try:
                setattr(args, dest, value.convert(value.raw))
            except (ValueError, argparse.ArgumentTypeError) as exc:
                raise UsageError(f"environment variable {value.var}={value.raw!r}: {exc}"
                                 ) from None


def _int_at_least(low: int) -> Callable[[str], int]:
    def convert(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}, got {value}")
        return value

    convert.__name__ = "integer"
    return convert


def _non_negative(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not value >= 0:  # also NaN
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


_non_negative.__name__ = "number"


def _port(text: str) -> int:
    value = _int_at_least(0)(text)
    if value > 65535:
        raise argparse.ArgumentTypeError(f"port must be 0..65535, got {value}")
    return value


def _choice(*options: str) -> Callable[[str], str]:
    def convert(text: str) -> str:
        if text.lower() not in options:
            raise argparse.ArgumentTypeError(f"{text!r} is not one of {', '.join(options)}")
        return text.lower()

    convert.__name__ = "choice"
    return convert


def _flag(text: str) -> bool:
    low = text.strip().lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("", "0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"{text!r} is not a boolean (use 1/0, true/false)")


def _broker_url(text: str) -> str:
    """An AMQP URL with a host: aio-pika retries a malformed one forever instead of failing."""
    from urllib.parse import urlsplit

    try:
        parts = urlsplit(text)
        parts.port  # noqa: B018 - raises ValueError on a bad port
    except ValueError:
        raise argparse.ArgumentTypeError(f"{redact_url(text)!r} is not a URL") from None
    if parts.scheme not in ("amqp", "amqps") or not parts.hostname:
        raise argparse.ArgumentTypeError(
            f"{redact_url(text)!r} is not an AMQP URL (amqp://user:pass@host:5672/)")
    return text


_LOG_LEVELS = ("debug", "info", "warning", "error")


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors: the message and where to find the usage."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {redact_text(message)} "
                  f"(see '{self.prog} --help')\n")


# --- shared options -----------------------------------------------------------------------


def _add_common(p: argparse.ArgumentParser, *, nested: bool = False) -> None:
    """Logging and --debug options; ``nested`` (an action under a command, e.g. ``keys list``)
    leaves defaults to the command, since argparse lets a subparser's defaults overwrite
    what was given before it (``keys --log-level debug list``)."""
    p.add_argument("--log-level", type=_choice(*_LOG_LEVELS),
                   default=argparse.SUPPRESS if nested else
                   _env_default("LOG_LEVEL", _choice(*_LOG_LEVELS), "info"),
                   help="debug, info, warning or error (env AUDIOSTREAM_LOG_LEVEL)")
    p.add_argument("--json-logs", action="store_true",
                   default=argparse.SUPPRESS if nested else
                   _env_default("JSON_LOGS", _flag, False),
                   help="log JSON lines (env AUDIOSTREAM_JSON_LOGS=1)")
    p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                   help="on an error, print the traceback (env AUDIOSTREAM_DEBUG=1)")


def _add_broker(p: argparse.ArgumentParser, *, required: bool,
                note: str = "; omit for the in-process broker") -> None:
    default = _env_default("BROKER", _broker_url, None)
    p.add_argument(
        "--broker",
        type=_broker_url,
        default=default,
        required=required and default is None,
        help="AMQP URL, e.g. amqp://user:pass@host:5672/ (env AUDIOSTREAM_BROKER)"
        + ("" if required else note),
    )
    p.add_argument("--shards", type=_int_at_least(1),
                   default=_env_default("SHARDS", _int_at_least(1), 2),
                   help="work queues per processing type (default 2; env AUDIOSTREAM_SHARDS)")
    p.add_argument("--prefix", default=_env("PREFIX", "audiostream"),
                   help="name prefix of exchanges and queues (default audiostream; "
                   "env AUDIOSTREAM_PREFIX)")


def _add_gateway(p: argparse.ArgumentParser) -> None:
    p.add_argument("--host", default=_env("HOST", "127.0.0.1"),
                   help="listen address (default 127.0.0.1; env AUDIOSTREAM_HOST)")
    p.add_argument("--port", type=_port, default=_env_default("PORT", _port, DEFAULT_PORT),
                   help=f"listen port (default {DEFAULT_PORT}; 0 picks a free one; "
                   "env AUDIOSTREAM_PORT)")
    p.add_argument("--keys-file", type=Path, default=_env("KEYS_FILE"),
                   help="API keys file from 'audiostream keys create' "
                   "(env AUDIOSTREAM_KEYS_FILE); serve without one creates and prints an "
                   "in-memory development key")
    p.add_argument("--tls-cert", type=Path, default=_env("TLS_CERT"),
                   help="PEM certificate chain: serve wss:// (TLS 1.3 only; env "
                   "AUDIOSTREAM_TLS_CERT)")
    p.add_argument("--tls-key", type=Path, default=_env("TLS_KEY"),
                   help="PEM private key (env AUDIOSTREAM_TLS_KEY)")
    p.add_argument("--deadline-ms", type=int, default=1000,
                   help="default per-chunk deadline; later audio is dropped with a notice")
    p.add_argument("--max-connections", type=int, default=10_000,
                   help="connections this gateway accepts (default 10000)")
    p.add_argument("--session-starts-per-minute", type=_int_at_least(0), default=600, metavar="N",
                   help="new sessions one API key may start per minute on this gateway; "
                   "over it a start is refused with 4021 (default 600; 0: no cap, e.g. "
                   "for a telephony bridge or load test that starts every call under "
                   "one key)")
    p.add_argument("--shed-above-ms", type=_non_negative, default=250.0, metavar="MS",
                   help="refuse new sessions (4031 overloaded, retryable; resumes are "
                   "taken) while the typical waiting session of their processing type "
                   "has a chunk older than this (default 250; 0: never)")
    p.add_argument("--drain-grace-s", type=float, default=20.0,
                   help="on SIGTERM, wait this long for in-flight outcomes (default 20)")
    p.add_argument("--token-secret", default=_env("TOKEN_SECRET"),
                   help="HMAC secret for resume and browser tokens, shared by all "
                   "gateways; visible in ps, so prefer env AUDIOSTREAM_TOKEN_SECRET or "
                   "--token-secret-file (default: random, so sessions resume only on this process)")
    p.add_argument("--token-secret-file", type=Path, default=_env("TOKEN_SECRET_FILE"),
                   help="file holding the token secret (env AUDIOSTREAM_TOKEN_SECRET_FILE)")
    p.add_argument("--ops-host", default=_env("OPS_HOST", "127.0.0.1"),
                   help="address of /metrics, /healthz, /readyz (default 127.0.0.1; env "
                   "AUDIOSTREAM_OPS_HOST; never expose it publicly)")
    p.add_argument("--ops-port", type=int, default=_env_default("OPS_PORT", int, 9090),
                   help="port of /metrics, /healthz, /readyz (default 9090; env "
                   "AUDIOSTREAM_OPS_PORT)")
    p.add_argument("--handshake-timeout-s", type=float, default=10.0,
                   help="close sockets that have not sent a whole request (TLS handshake "
                   "plus headers) within this time (default 10)")
    p.add_argument("--max-pending-sockets", type=int, default=512,
                   help="sockets without a whole request yet; above it the oldest is "
                   "closed (default 512)")
    p.add_argument("--max-pending-per-ip", type=int, default=None,
                   help="sockets one client address may hold without a whole request, "
                   "counted from accept (TLS handshake included); over it a new one is "
                   f"closed at accept (default {DEFAULT_MAX_PENDING_PER_IP}: a browser or "
                   "SDK client holds a handful for milliseconds, a NAT'd office a few "
                   "more, while one address can fill at most 1/16 of "
                   "--max-pending-sockets; with --behind-proxy the default is off, since "
                   "the proxy's address is every client's; 0: off)")
    p.add_argument("--max-conn-rate-per-ip", type=float, default=50.0,
                   help="new connections per second one client address may open, burst "
                   "4x that; over it a socket is refused at accept: 429 without TLS, "
                   "closed before its TLS handshake with --tls-cert (default 50; 0 "
                   "disables, e.g. behind a proxy that hides client addresses)")
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
    p.add_argument("--coalesce-fraction", type=float, default=0.5, metavar="SHARE",
                   help="a session sends several chunks per work message once its replies "
                   "take longer than the quickest reply seen by more than this share of "
                   "its chunk interval (default 0.5; 0 disables)")
    p.add_argument("--coalesce-above", type=float, default=1500.0, metavar="CHUNKS_PER_S",
                   help="gateway-wide chunks per second above which every session sends "
                   "several chunks per work message (fewer messages for the broker and "
                   "workers, up to ~45 ms added latency); below it, and when idle, each "
                   "chunk goes at once (default 1500; 0 disables)")
    p.add_argument("--opus-cpu-share", type=float, default=0.1, metavar="SHARE",
                   help="CPU seconds per second one Opus session's decoding may cost the "
                   "gateway's event loop; over it its socket is left unread until back "
                   "within (default 0.1)")
    p.add_argument("--opus-cpu-share-total", type=float, default=0.25, metavar="SHARE",
                   help="the same for all Opus sessions together (default 0.25)")
    p.add_argument("--loop-lag-high-ms", type=float, default=25.0,
                   help="event-loop lag that also raises the coalescing (default 25; "
                   "0 ignores lag)")
    p.add_argument("--max-message-kib", type=_int_at_least(1), default=256, metavar="KIB",
                   help="most audio one work message carries; a session's waiting chunks "
                   "past it go in its next message (one chunk alone may be larger). "
                   "Other sessions' messages wait behind it on the broker (default 256)")
    p.add_argument("--bundle-max", type=int, default=64,
                   help="most sessions' work messages packed into one broker message "
                   "(default 64; 1 = one broker message per session message)")
    p.add_argument("--bundle-wait-ms", type=float, default=5.0,
                   help="longest a work message waits for its bundle while the previous "
                   "bundle awaits its confirm; with none in flight it goes at once (default 5)")


def _add_worker(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", choices=("cpu", "gpu"),
                   default=_env_default("DEVICE", _choice("cpu", "gpu"), "cpu"),
                   help="execution device for model steps (default cpu; env AUDIOSTREAM_DEVICE)")
    p.add_argument("--max-batch", type=int, default=64,
                   help="most messages per processing call (default 64)")
    p.add_argument("--max-wait-ms", type=float, default=None,
                   help="longest a message waits for its batch to fill, for every "
                        "processing type (default: 10 for denoise and vad, 2 for DSP); a "
                        "lane whose messages arrive further apart than that does not wait")
    p.add_argument("--prefetch", type=int, default=None,
                   help="unacked messages per work queue (default max(2*max-batch, 32))")
    p.add_argument("--model-dir", type=Path, default=_env("MODEL_DIR"),
                   help="prepared models (default: inside the environment; env "
                   "AUDIOSTREAM_MODEL_DIR)")
    p.add_argument("--intra-op-threads", type=int, default=1,
                   help="ONNX Runtime threads per model call (default 1: scale with processes)")
    p.add_argument("--denoise-variant", choices=("fp32", "int8", "fp16"), default=None,
                   help="NSNet2 variant (default fp32 on cpu, fp16 on gpu)")
    p.add_argument("--denoise-state", choices=("fp32", "fp16"),
                   default=_env_default("DENOISE_STATE", _choice("fp32", "fp16"), None),
                   help="precision of the NSNet2 GRU state carried in every message "
                   "(default: the variant's own, so fp16 only with --denoise-variant fp16, "
                   "where it is lossless; fp16 makes each message 1.6 KB smaller per 16 kHz "
                   "session and rounds the fp32 and int8 variants' state); workers read "
                   "either (env AUDIOSTREAM_DENOISE_STATE)")
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
        raise UsageError("--tls-cert and --tls-key go together")
    from audiostream.gateway import server_ssl_context

    return server_ssl_context(args.tls_cert, args.tls_key)


def _topology(args: argparse.Namespace) -> Any:
    from audiostream.embedded import default_topology

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
            **({"denoise_state": args.denoise_state} if args.denoise_state else {}),
        },
    )


def _gateway_settings(args: argparse.Namespace) -> Any:
    from audiostream.gateway import GatewaySettings
    from audiostream.gateway.edge import EdgeSettings

    return GatewaySettings(
        default_deadline_ms=args.deadline_ms,
        max_connections=args.max_connections,
        session_starts_per_minute=args.session_starts_per_minute or None,
        shed_above_ms=args.shed_above_ms,
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
        max_message_bytes=args.max_message_kib * 1024,
        bundle_wait_ms=args.bundle_wait_ms,
        coalesce_above=args.coalesce_above,
        coalesce_fraction=args.coalesce_fraction,
        loop_lag_high_ms=args.loop_lag_high_ms,
        opus_cpu_share=args.opus_cpu_share,
        opus_cpu_share_total=args.opus_cpu_share_total,
        edge=EdgeSettings(handshake_timeout_s=args.handshake_timeout_s,
                          max_pending=args.max_pending_sockets,
                          max_pending_per_ip=_max_pending_per_ip(args),
                          conn_rate_per_ip=args.max_conn_rate_per_ip or None,
                          conn_burst_per_ip=max(1.0, 4 * args.max_conn_rate_per_ip),
                          ops_host=args.ops_host, ops_port=args.ops_port),
    )


def _max_pending_per_ip(args: argparse.Namespace) -> int | None:
    """The cap per address unless set: on for a gateway that sees client addresses, off
    behind a proxy, where one address is every client's and the cap would refuse them
    all together."""
    value: int | None = args.max_pending_per_ip
    if value is None:
        return None if args.behind_proxy else DEFAULT_MAX_PENDING_PER_IP
    return value or None


def _check_exposure(args: argparse.Namespace) -> None:
    """Refuse plain ws:// on a public address unless a proxy is declared; warn then."""
    if args.tls_cert is not None:
        return
    loopback = args.host in ("127.0.0.1", "::1", "localhost")
    if not loopback and not args.behind_proxy:
        raise UsageError(
            f"refusing to serve plain ws:// on {args.host}: give --tls-cert/--tls-key, or "
            "--behind-proxy if a TLS-terminating proxy is in front"
        )
    if args.behind_proxy:
        log.warning("serving plain ws:// on %s:%s; TLS must be terminated by the proxy in front",
                    args.host, args.port)


def _secret(args: argparse.Namespace) -> bytes | None:
    if args.token_secret_file is not None:
        try:
            return Path(args.token_secret_file).read_bytes().strip()
        except OSError as exc:
            raise UsageError(f"cannot read --token-secret-file: {exc}") from exc
    if args.token_secret:
        if "--token-secret" in sys.argv or any(a.startswith("--token-secret=")
                                               for a in sys.argv):
            log.warning("--token-secret is visible to every local user (ps); use "
                        "AUDIOSTREAM_TOKEN_SECRET or --token-secret-file")
        return str(args.token_secret).encode()
    log.warning("no --token-secret: resume tokens are valid on this process only")
    return None


def _freeze_heap() -> None:
    """Move everything start-up allocated (modules, processors, the app) out of the
    garbage collector's reach: a full collection then walks only what sessions
    allocate, which keeps its pauses (a latency tail under load) short."""
    gc.collect()
    gc.freeze()


def _stop_signal() -> asyncio.Future[str]:
    """SIGINT/SIGTERM handled from now on; the future gets the first one's name.

    Installed before a command prints that it is ready: a supervisor or test that stops
    it on seeing that line must not meet Python's default action (an exit by the
    signal, no drain), which a signal in the gap between the print and the handler
    used to get."""
    loop = asyncio.get_running_loop()
    stop: asyncio.Future[str] = loop.create_future()

    def handler(sig: signal.Signals) -> None:
        if not stop.done():
            stop.set_result(sig.name)

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, handler, sig)
    return stop


# --- serve / gateway / worker -------------------------------------------------------------


async def _serve(args: argparse.Namespace) -> int:
    from audiostream.embedded import embedded_server, sample_wav

    _check_exposure(args)
    async with embedded_server(
        token_secret=_secret(args),
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
        _freeze_heap()
        stop = _stop_signal()
        where = "in-process broker" if args.broker is None else "RabbitMQ"
        print(f"audiostream serving {redact_url(server.url)} ({where}, {args.workers} worker(s))")
        if server.api_key is not None:
            print("no --keys-file: a development API key, valid while this process runs:\n"
                  f"{server.api_key}", flush=True)
        else:
            print(f"API keys from {args.keys_file}; no development key", flush=True)
        if server.ops_url:
            print(f"metrics and probes on {server.ops_url}", flush=True)
        if args.demo is not None:
            if server.api_key is None:
                raise UsageError("--demo needs the development key: omit --keys-file")
            demo: asyncio.Future[Any] = asyncio.ensure_future(
                _demo(server.url, server.api_key, sample_wav(), args.demo, _ssl_from(args)))
            waits: set[asyncio.Future[Any]] = {demo, stop}
            await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
            if demo.done():
                demo.result()  # its errors end the command, as before
                print(f"still serving {redact_url(server.url)}; Ctrl-C to stop", flush=True)
            else:  # Ctrl-C during the demo stops it and the server
                demo.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await demo
        sig = await stop
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
    from audiostream.gateway.edge import EDGE_KEY
    from audiostream.transport import open_transport

    if args.keys_file is None:
        raise UsageError("--keys-file (or AUDIOSTREAM_KEYS_FILE) is required")
    _check_exposure(args)
    ssl_context = _ssl_from(args)  # option errors before any warning or connection
    transport = open_transport(args.broker, _topology(args))
    gateway = Gateway(transport, KeyStore(args.keys_file), settings=_gateway_settings(args),
                      token_secret=_secret(args))
    runner, port = await start_site(gateway.app(), args.host, args.port, ssl_context,
                                    reuse_port=args.reuse_port)
    _freeze_heap()
    stop = _stop_signal()
    scheme = "wss" if args.tls_cert else "ws"
    print(f"audiostream gateway on {scheme}://{args.host}:{port}/v1/stream", flush=True)
    print(f"metrics and probes on {runner.app[EDGE_KEY].ops_url}", flush=True)
    try:
        sig = await stop
        log.info("%s received; draining for up to %.0f s", sig, args.drain_grace_s)
        _exit_if_stuck(args.drain_grace_s + SHUTDOWN_SLACK_S)
        await gateway.drain(args.drain_grace_s)
    finally:
        await runner.cleanup()
    return 0


#: What a gateway's shutdown may take beyond ``--drain-grace-s`` (the drain's own 5 s
#: for clients to close, then the sites and the broker connection).
SHUTDOWN_SLACK_S = 30.0


def _exit_if_stuck(after_s: float) -> None:
    """After the first stop signal: a second one, or a shutdown still running after
    ``after_s``, ends the process at once. Nothing is lost that a crash would not
    lose either (the broker requeues what the process held, and sessions resume
    elsewhere), while a hung shutdown would keep the port and an orphan forever."""
    loop = asyncio.get_running_loop()

    def now(why: str) -> None:
        log.error("%s; exiting without finishing the shutdown", why)
        logging.shutdown()
        os._exit(EXIT_FAILURE)

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, now, f"{sig.name} received again")
    loop.call_later(after_s, now, f"the shutdown did not finish within {after_s:.0f} s")


async def _gateway_processes(args: argparse.Namespace) -> int:
    """``--processes N``: the options are checked here once, then each child (a whole
    ``audiostream gateway``) checks them again for itself."""
    from audiostream.gateway.processes import ProcessPlan, run

    if args.keys_file is None:
        raise UsageError("--keys-file (or AUDIOSTREAM_KEYS_FILE) is required")
    _check_exposure(args)
    _ssl_from(args)
    if args.token_secret_file is not None:
        _secret(args)  # unreadable: one error here rather than N from the children
    plan = ProcessPlan(argv=tuple(args.raw_argv), processes=args.processes, host=args.host,
                       port=args.port, ops_port=args.ops_port,
                       secret_given=bool(args.token_secret or args.token_secret_file),
                       stop_timeout_s=args.drain_grace_s + SHUTDOWN_SLACK_S + 5)
    return await run(plan, tls=args.tls_cert is not None)


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
        stop = _stop_signal()
        print(f"audiostream worker consuming {','.join(processing)}", flush=True)
        sig = await stop
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


def _server_rate(text: str) -> int | None:
    """``--server-rate``: ``auto`` or a rate the wire takes."""
    from audiostream.audio import SUPPORTED_RATES

    if text.strip().lower() == "auto":
        return None
    try:
        rate = int(text)
    except ValueError:
        rate = -1
    if rate not in SUPPORTED_RATES:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a rate the server takes; use auto or one of "
            f"{', '.join(map(str, SUPPORTED_RATES))}")
    return rate


def _parse_pipeline(text: str) -> list[Any]:
    return [p.strip() for p in text.split(",") if p.strip()]


async def _stream(args: argparse.Namespace) -> int:
    """File mode: the output keeps the input's rate, length and timeline; exit 3 if any
    chunk was answered without audio (its place holds silence, or the input with --fill
    input)."""
    from tqdm import tqdm

    from audiostream.audio import Codec
    from audiostream.audiofile import FileFormat
    from audiostream.client import AudioStreamClient
    from audiostream.filestream import FileStreamOptions, stream_file

    if str(args.input) != "-" and not args.input.is_file():
        raise AudioStreamError(f"input file {args.input} does not exist")
    if str(args.output) != "-":
        FileFormat.from_path(args.output)  # a bad output name fails before streaming
        if not args.output.parent.is_dir():
            raise UsageError(f"{args.output.parent} does not exist (for {args.output})")
    rate = None if args.rate == "max" else float(args.rate)
    options = FileStreamOptions(chunk_ms=args.chunk_ms, rate=rate,
                                compensate_delay=args.compensate_delay, fill=args.fill,
                                server_rate=args.server_rate, raw_format=args.raw_format,
                                encoding=Codec(args.encoding), bitrate=args.bitrate)
    client = AudioStreamClient(args.url, api_key=args.api_key, ssl_context=_client_ssl(args))
    to_stdout = str(args.output) == "-"
    bars: list[Any] = []  # made on the first answer: an input error stays one line

    def progress(done: int, total: int | None) -> None:
        if not bars:
            bars.append(tqdm(unit="chunk", disable=args.quiet, file=sys.stderr))
        bars[0].total = total
        bars[0].update(done - bars[0].n)

    try:
        report = await stream_file(client, args.input, args.output,
                                   _parse_pipeline(args.pipeline), options, progress=progress)
    finally:
        for bar in bars:
            bar.close()
    lat = report.latency_ms
    data = {
        "session_id": report.session_id,
        "chunks": report.chunks,
        "dropped": report.dropped,
        "dropped_by_reason": report.dropped_by_reason,
        "frames_in": report.frames_in,
        "frames_out": report.frames_out,
        "padded_frames": report.padded_frames,
        "input_rate": report.input_rate,
        "wire_rate": report.wire_rate,
        "codec": report.codec,
        "encoding": report.encoding,
        "wire_bytes": report.wire_bytes,
        "delay_compensated_frames": report.delay_frames,
        "codec_delay_frames": report.codec_delay_frames,
        "wall_s": round(report.wall_s, 3),
        "resumes": report.resumes,
        "latency_ms": lat,
        "server_summary": report.summary,
    }
    rates = (f"{report.input_rate} Hz" if report.wire_rate == report.input_rate else
             f"{report.input_rate} Hz sent at {report.wire_rate} Hz")
    # With audio on stdout, the report goes to stderr.
    print(json.dumps(data) if args.json else
          f"{report.chunks} chunks, {report.dropped} dropped"
          + (f" ({', '.join(f'{k}: {v}' for k, v in report.dropped_by_reason.items())})"
             if report.dropped else "")
          + f"; {report.frames_out}/{report.frames_in} frames ({rates}) in "
          f"{report.wall_s:.2f} s; round trip p50 {lat['p50']:.1f} ms p99 {lat['p99']:.1f} ms"
          f" -> {'stdout' if to_stdout else args.output}",
          file=sys.stderr if to_stdout else sys.stdout)
    return 3 if report.dropped else 0


def _offline(args: argparse.Namespace) -> int:
    """Files go through audiofile (any codec, container and rate) and come out at the
    input's rate and length, converted to and from the rate ``stream`` would send
    (so the two agree); ``-`` and raw PCM go through pcmio."""
    import numpy as np

    from audiostream.audio import AudioFormat, Encoding
    from audiostream.audiofile import FileFormat, decode, open_reader, open_writer, resample
    from audiostream.filestream import choose_wire_rate
    from audiostream.pcmio import is_stdio, open_input, open_output
    from audiostream.processors import ProcessorContext
    from audiostream.worker.offline import run_offline

    pipeline = _parse_pipeline(args.pipeline)
    if not pipeline:
        raise UsageError("--pipeline needs at least one step, e.g. --pipeline highpass")
    if not is_stdio(args.output) and not Path(args.output).parent.is_dir():
        raise UsageError(f"{Path(args.output).parent} does not exist (for {args.output})")
    to_file = not is_stdio(args.output) and args.raw_format is None
    if to_file:
        FileFormat.from_path(Path(args.output))  # a bad output name fails before the work
    file_rate: int | None = None
    compressed = None  # a compressed stream on stdin (MP3, Ogg/Opus, FLAC)
    if is_stdio(args.input) and args.raw_format is None:
        compressed = open_reader(args.input)
    if compressed is not None and compressed.pcm is not None:  # a WAV stream: as it is
        source = compressed.pcm
        fmt = source.format
        audio = source.read_all()
    elif compressed is None and (is_stdio(args.input) or args.raw_format is not None):
        source = open_input(args.input, args.raw_format)
        fmt = source.format
        audio = source.read_all()
    else:
        if compressed is not None:
            data, file_rate = compressed.read_all(), compressed.rate
        else:
            data, file_rate = decode(Path(args.input))  # any container/codec/rate
        wire = choose_wire_rate(file_rate, pipeline)
        fmt = AudioFormat(Encoding.PCM_S16LE, wire, data.shape[1])
        audio = resample(data, file_rate, wire).astype("<i2").tobytes()
    started = time.perf_counter()
    out = run_offline(audio, fmt, pipeline,
                      context=ProcessorContext(device=args.device, model_dir=args.model_dir))
    took = time.perf_counter() - started
    if file_rate is None and not to_file:  # PCM in, PCM out, in the input's own format
        with open_output(args.output, fmt, raw=args.raw_format is not None) as sink:
            sink.write(out)
        name = sink.name
    else:
        if fmt.encoding is not Encoding.PCM_S16LE:
            raise UsageError("writing a file needs 16-bit PCM; use '-' with --format instead")
        result = np.frombuffer(out, dtype="<i2").reshape(-1, fmt.channels)
        rate = fmt.sample_rate
        if file_rate is not None:  # back to the input's rate and exact length
            result = resample(result, rate, file_rate)[:len(data)]
            result = np.concatenate([result, np.zeros((len(data) - len(result),
                                                       fmt.channels), np.int16)])
            rate = file_rate
        with open_writer(args.output, rate, fmt.channels) as writer:  # .wav/.flac/.opus/-
            writer.write(result)
        name = writer.name
    # With audio on stdout, the report goes to stderr.
    report = sys.stderr if is_stdio(args.output) else sys.stdout
    print(f"processed {fmt.duration_s(len(audio)):.2f} s in {took:.2f} s -> {name}",
          file=report)
    return EXIT_OK


# --- healthcheck ------------------------------------------------------------------------------


def _transport_message(err: AudioStreamError) -> str:
    """A broker error's message, with a bare errno (aiormq's ``111``) spelt out."""
    message = redact_text(err.message)
    cause = err.__cause__
    if cause is not None and len(cause.args) == 2 and isinstance(cause.args[0], int):
        head, _, tail = message.rpartition(": ")
        if tail == str(cause.args[0]):
            message = f"{head}: {str(cause.args[1]).lower()}"
    return message


def _gateway_problem(exc: BaseException, url: str, timeout: float) -> str:
    """What went wrong talking to a gateway, said for an operator (no exception reprs)."""
    import aiohttp

    where = redact_url(url)
    if isinstance(exc, aiohttp.ClientConnectorCertificateError):
        return (f"TLS certificate of {where} not trusted ({exc.certificate_error}); "
                "--ca FILE trusts a private CA, --insecure skips the check")
    if isinstance(exc, aiohttp.ClientConnectorDNSError):
        return f"cannot resolve the host of {where} (DNS)"
    if isinstance(exc, aiohttp.ClientSSLError):
        return f"TLS handshake with {where} failed (is it serving wss://?)"
    if isinstance(exc, aiohttp.ClientConnectorError):
        if isinstance(exc.os_error, ConnectionRefusedError):
            return f"connection refused at {exc.host}:{exc.port} (is the gateway running?)"
        reason = exc.os_error.strerror or "network error"
        return f"cannot connect to {exc.host}:{exc.port} ({reason})"
    if isinstance(exc, aiohttp.WSServerHandshakeError):
        if exc.status == 503:
            return f"{where} refused the upgrade with HTTP 503 (draining or not ready)"
        return (f"{where} answered HTTP {exc.status}, not a WebSocket upgrade "
                "(is the path /v1/stream?)")
    if isinstance(exc, TimeoutError):
        return f"no answer from {where} within {timeout:g} s"
    if isinstance(exc, aiohttp.ServerDisconnectedError):
        return f"{where} closed the connection without answering"
    if isinstance(exc, aiohttp.ClientError | OSError):
        return f"cannot talk to {where} ({type(exc).__name__})"
    raise exc


async def _check_gateway(url: str, *, limit_s: float, ctx: ssl.SSLContext | bool) -> str | None:
    """A WebSocket upgrade and a keepalive round trip; None when healthy, else the problem."""
    import aiohttp

    from audiostream.errors import ErrorCode

    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=limit_s)) as s:
            async with s.ws_connect(url, ssl=ctx) as ws:
                started = time.perf_counter()
                await ws.send_str('{"type":"keepalive"}')
                msg = await ws.receive()
                took = (time.perf_counter() - started) * 1000
                if msg.type is aiohttp.WSMsgType.TEXT and '"keepalive"' in msg.data:
                    print(f"gateway {redact_url(url)}: ok (keepalive answered in {took:.1f} ms)")
                    return None
                if msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED):
                    code = ws.close_code
                    known = code is not None and code in ErrorCode._value2member_map_
                    name = ErrorCode(code).name if known and code is not None else ""
                    return (f"{redact_url(url)} closed the connection instead of answering "
                            f"(close code {code}{' ' + name if name else ''})")
                return (f"{redact_url(url)} gave an unexpected answer to a keepalive "
                        f"({msg.type.name})")
    except Exception as exc:  # every failure becomes one line
        return _gateway_problem(exc, url, limit_s)


async def _check_broker(args: argparse.Namespace) -> list[str]:
    """Connect, find every exchange and queue of the topology, and see workers consuming."""
    from audiostream.transport.rabbitmq import probe_topology

    topo = _topology(args)
    wanted = _parse_pipeline(args.processing) if args.processing else []
    unknown = [p for p in wanted if p not in topo.processing_types]
    if unknown:
        raise UsageError(f"--processing: unknown processing type(s) {', '.join(unknown)}; "
                         f"available: {', '.join(topo.processing_types)}")
    where = redact_url(args.broker)
    try:
        async with asyncio.timeout(args.timeout):
            probe = await probe_topology(args.broker, topo)
    except TimeoutError:
        return [f"no answer from {where} within {args.timeout:g} s"]
    except AudioStreamError as err:
        return [_transport_message(err)]
    missing = [f"exchange {name}" for name, present in probe.exchanges.items() if not present]
    missing += [f"queue {q.name}" for q in probe.queues if q.messages is None]
    if len(missing) == len(probe.exchanges) + len(probe.queues):
        return [f"no topology with prefix {topo.prefix!r} on {where} "
                "(run 'audiostream topology declare', with the same --prefix/--shards)"]
    problems = []
    if missing:
        problems.append(f"missing {', '.join(missing)} (run 'audiostream topology declare')")
    consumers: dict[str, int] = {}
    for ptype in topo.processing_types:
        counts = [q.consumers for q in probe.queues
                  if q.name in topo.work_queues(ptype) and q.messages is not None]
        consumers[ptype] = min(counts) if counts else 0
        if ptype in wanted and consumers[ptype] == 0:
            problems.append(f"no worker consumes {ptype} "
                            f"(every one of its {topo.shards} queues needs a consumer)")
    if not wanted and not any(consumers.values()):
        problems.append("no worker consumes any work queue")
    ready = sum(q.messages or 0 for q in probe.queues if q.name != topo.dead_letter_queue)
    serving = ", ".join(f"{p}={n}" for p, n in consumers.items() if n) or "none"
    print(f"broker {where}: connected; {len(probe.exchanges)} exchanges, "
          f"{len(probe.queues)} queues checked; {ready} messages waiting; "
          f"consumers per queue: {serving}")
    return problems


async def _healthcheck(args: argparse.Namespace) -> int:
    """Gateway readiness (WebSocket upgrade + keepalive) and, with --broker, the broker's."""
    url = args.url
    if url is None and args.broker is None:
        url = f"ws://127.0.0.1:{DEFAULT_PORT}/v1/stream"
    problems: list[str] = []
    if url is not None:
        if not url.startswith(("ws://", "wss://")):
            raise UsageError(f"--url must be a ws:// or wss:// URL, got {redact_url(url)!r}")
        ctx: ssl.SSLContext | bool = True
        if url.startswith("wss://"):
            if args.insecure:
                ctx = False
            elif args.ca is not None:
                ctx = ssl.create_default_context(cafile=str(args.ca))
        problem = await _check_gateway(url, limit_s=args.timeout, ctx=ctx)
        if problem is not None:
            problems.append(f"gateway: {problem}")
    if args.broker is not None:
        problems.extend(f"broker: {p}" for p in await _check_broker(args))
    if problems:
        for p in problems:
            print(f"unhealthy: {p}", file=sys.stderr)
        return EXIT_FAILURE
    print("healthy")
    return EXIT_OK


# --- keys / topology / models -----------------------------------------------------------------


def _keys(args: argparse.Namespace) -> int:
    from audiostream.gateway.keys import create_key, load_records, revoke_key
    from audiostream.processors import registry

    if args.keys_cmd == "create":
        pipelines = None
        if args.pipelines is not None:
            pipelines = _parse_pipeline(args.pipelines)
            if not pipelines:
                raise UsageError("--pipelines needs at least one step (omit it to allow all)")
        key, rec = create_key(
            args.keys_file,
            args.name,
            max_sessions=args.max_sessions,
            pipelines=pipelines,
            known_steps=registry.names(),
        )
        print(f"created key {rec.id} ({rec.name}) in {args.keys_file}; it is shown only once:")
        print(key)
    elif args.keys_cmd == "list":
        records = load_records(args.keys_file, must_exist=True)
        if not records:
            print(f"no keys in {args.keys_file}", file=sys.stderr)
        for rec in records.values():
            state = "revoked" if rec.revoked else "active"
            print(f"{rec.id}\t{rec.name}\t{state}\tmax_sessions={rec.max_sessions}\t"
                  f"pipelines={','.join(rec.pipelines) if rec.pipelines else '*'}")
    elif args.keys_cmd == "token":
        return _keys_token(args)
    else:
        rec = revoke_key(args.keys_file, args.key)
        print(f"revoked {rec.id} ({rec.name})")
    return EXIT_OK


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
              f"{len(topo.processing_types) * topo.shards} work queues on "
              f"{redact_url(args.broker)}")
        return EXIT_OK
    from audiostream.definitions import write_definitions

    write_definitions(args.out, topo)
    print(f"wrote {args.out}")
    return EXIT_OK


def _require_plot_extra() -> None:
    """Fail before a long benchmark, not after it, when the plot cannot be drawn."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise UsageError("--plot needs matplotlib: pip install 'audiostream[plot]'") from None


async def _bench(args: argparse.Namespace) -> int:
    from audiostream.bench import config_from_args, run_cli

    if args.api_key is None:
        raise UsageError("--api-key (or AUDIOSTREAM_API_KEY) is required")
    if args.plot is not None:
        _require_plot_extra()
    try:
        config_from_args(args)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    return await run_cli(args)


# --- parser --------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    from audiostream.audio import SUPPORTED_RATES
    from audiostream.pcmio import add_format_argument

    parser = Parser(
        prog="audiostream",
        description="Real-time audio processing over WebSockets, RabbitMQ and ONNX Runtime.",
        epilog="Exit codes: 0 ok, 1 runtime failure, 2 usage or user error, 70 internal "
        "error (run again with --debug for the traceback).",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("--debug", action="store_true",
                        default=_env_default("DEBUG", _flag, False),
                        help="on an error, print the traceback (env AUDIOSTREAM_DEBUG=1)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("serve", help="gateway and workers in one process (embedded default)")
    _add_common(p)
    _add_broker(p, required=False)
    _add_gateway(p)
    _add_worker(p)
    p.add_argument("--workers", type=_int_at_least(1), default=1,
                   help="in-process workers (default 1)")
    p.add_argument("--demo", type=Path, default=None, metavar="OUT_DIR",
                   help="after start, stream the bundled sample and write the result here")

    p = sub.add_parser("gateway", help="WebSocket gateway in front of RabbitMQ")
    _add_common(p)
    _add_broker(p, required=True)
    _add_gateway(p)
    p.add_argument("--processes", type=_int_at_least(1),
                   default=_env_default("PROCESSES", _int_at_least(1), 1),
                   help="gateway processes sharing --port through SO_REUSEPORT, one event "
                   "loop (one core) each; process i serves /metrics on --ops-port + i "
                   "(with --ops-port 0, a free port each), and all share one token secret "
                   "(default 1; env AUDIOSTREAM_PROCESSES)")
    p.add_argument("--reuse-port", action="store_true",
                   help="bind --port with SO_REUSEPORT, so that other gateway processes "
                   "can share it (set by --processes)")

    p = sub.add_parser("worker", help="consume work queues and process batches")
    _add_common(p)
    _add_broker(p, required=True)
    _add_worker(p)
    p.add_argument("--processing", required=True, help="processing types, e.g. denoise,vad")
    p.add_argument("--metrics-port", type=_port, default=None,
                   help="serve /metrics and /healthz on this port")
    p.add_argument("--metrics-host", default=_env("METRICS_HOST", "127.0.0.1"),
                   help="address for --metrics-port (default 127.0.0.1; env "
                   "AUDIOSTREAM_METRICS_HOST; the chart uses the pod IP behind a "
                   "NetworkPolicy)")

    p = sub.add_parser(
        "stream", help="stream an audio file through a gateway",
        description="Stream a file through a gateway's pipeline into a file of the same "
        "rate and length. IN may be WAV (any sample format), FLAC, Opus/Ogg or MP3 at any "
        "rate, or '-' for stdin (a WAV stream, a compressed stream, or raw PCM with "
        "--format). OUT is a .wav, .flac or .opus file, or '-' for a WAV stream on stdout "
        "(raw PCM with --format).")
    _add_common(p)
    p.add_argument("input", type=Path, help="audio file, or '-' for stdin")
    p.add_argument("output", type=Path, help=".wav, .flac or .opus file, or '-' for stdout")
    p.add_argument("--url", required=True, help="ws:// or wss:// URL of /v1/stream")
    p.add_argument("--api-key", default=_env("API_KEY"), required=_env("API_KEY") is None,
                   help="API key (env AUDIOSTREAM_API_KEY)")
    p.add_argument("--pipeline", required=True, help="steps, e.g. highpass,denoise")
    p.add_argument("--chunk-ms", type=float, default=20.0,
                   help="chunk duration, up to 1000 (default 20; larger chunks mean fewer "
                   "messages, which is faster at --rate max)")
    p.add_argument("--rate", default="1.0",
                   help="1.0 = real time, 2.0 = twice as fast, max = as fast as the server's "
                   "credit allows (no drops)")
    p.add_argument("--compensate-delay", action=argparse.BooleanOptionalAction, default=True,
                   help="remove the pipeline's fixed delay (e.g. NSNet2's 319 samples) and "
                   "flush the tail, so the output lines up with the input (default on)")
    p.add_argument("--fill", choices=("silence", "input"), default="silence",
                   help="what a chunk answered without audio becomes in the output "
                   "(default silence); the exit code is 3 whenever that happens")
    p.add_argument("--server-rate", type=_server_rate, default=None, metavar="HZ",
                   help="sample rate sent to the server: auto (default: the file's own rate "
                   "when the server takes it, else the pipeline's native rate, e.g. 16000 "
                   "for denoise, else the next rate up) or one of "
                   f"{', '.join(map(str, SUPPORTED_RATES))}; the output keeps the input's rate")
    p.add_argument("--encoding", choices=("pcm", "opus"), default="pcm",
                   help="how audio travels to the gateway: pcm (default; 16-bit) or opus "
                   "(lossy: 20 ms Opus packets, about an eighth of the bytes at 32 kbit/s and "
                   "16 kHz; the wire rate is then 8000, 16000, 24000 or 48000). The gateway "
                   "answers in PCM either way and OUT is written as without it; --fill input "
                   "needs pcm")
    p.add_argument("--bitrate", type=int, default=32000, metavar="BPS",
                   help="Opus bit rate for --encoding opus (default 32000) and for a .opus "
                   "OUT")
    add_format_argument(p)
    p.add_argument("--ca", type=Path, default=None, help="CA bundle to trust for wss://")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--quiet", action="store_true", help="no progress bar")

    p = sub.add_parser("bench", help="N concurrent real-time sessions against a gateway")
    _add_common(p)
    from audiostream import bench as _bench_module

    _bench_module.add_arguments(p)

    p = sub.add_parser("offline", help="run a pipeline on an audio file in-process (reference)",
                       description="Run a pipeline on a file or on stdin/stdout ('-'): "
                       "IN may be WAV, FLAC, Opus/Ogg or MP3 at any rate, or a WAV "
                       "stream on stdin; raw PCM needs --format. OUT is a .wav, .flac or "
                       ".opus file, or '-' for stdout (raw PCM with --format, else WAV).")
    _add_common(p)
    p.add_argument("input", help="audio file, or '-' for stdin")
    p.add_argument("output", help="WAV file, or '-' for stdout")
    p.add_argument("--pipeline", required=True, help="steps, e.g. highpass,denoise")
    add_format_argument(p)
    p.add_argument("--device", choices=("cpu", "gpu"), default="cpu",
                   help="execution device for model steps (default cpu)")
    p.add_argument("--model-dir", type=Path, default=_env("MODEL_DIR"),
                   help="prepared models (default: inside the environment; env "
                   "AUDIOSTREAM_MODEL_DIR)")

    p = sub.add_parser(
        "healthcheck", help="exit 0 if the gateway (and, with --broker, the broker) is healthy",
        description="Gateway: a WebSocket upgrade and a keepalive round trip at --url. "
        "Broker (--broker): connect, find every exchange and queue of the topology, and "
        "see workers consuming (every listed --processing type on each of its queues; "
        "without --processing, at least one). Checks the gateway unless only --broker is "
        "given. Exit 0 healthy, 1 unhealthy (one line per problem on stderr).")
    _add_common(p)
    p.add_argument("--url", default=None,
                   help=f"gateway URL (default ws://127.0.0.1:{DEFAULT_PORT}/v1/stream)")
    p.add_argument("--timeout", type=float, default=5.0, help="seconds per check (default 5)")
    p.add_argument("--insecure", action="store_true", help="skip certificate checks (local)")
    p.add_argument("--ca", type=Path, default=None, help="CA bundle to trust for wss://")
    p.add_argument("--broker", type=_broker_url, default=None,
                   help="AMQP URL: also check the broker, its topology and its consumers")
    p.add_argument("--shards", type=_int_at_least(1),
                   default=_env_default("SHARDS", _int_at_least(1), 2),
                   help="work queues per processing type (default 2; env AUDIOSTREAM_SHARDS)")
    p.add_argument("--prefix", default=_env("PREFIX", "audiostream"),
                   help="name prefix of exchanges and queues (env AUDIOSTREAM_PREFIX)")
    p.add_argument("--processing", default=None,
                   help="processing types that must have a consumer, e.g. denoise,vad")

    p = sub.add_parser("keys", help="manage API keys (stored as hashes)")
    _add_common(p)
    ks = p.add_subparsers(dest="keys_cmd", required=True, metavar="ACTION")
    kc = ks.add_parser("create", help="create a key; prints it as the last line")
    kc.add_argument("name", help="a unique name (revoke NAME refers to it)")
    kc.add_argument("--max-sessions", type=_int_at_least(1), default=None,
                    help="concurrent sessions this key may hold (default: no cap)")
    kc.add_argument("--pipelines", default=None,
                    help="allowed steps, comma separated (default: all); names are checked "
                    "against the processors, including those from --import")
    kc.add_argument("--import", dest="imports", action="append", default=[], metavar="MODULE",
                    help="import a module that registers more processors (repeatable)")
    kl = ks.add_parser("list", help="list keys (never the secrets)")
    kr = ks.add_parser("revoke", help="revoke one key by id or unique name")
    kr.add_argument("key", help="key id, or name if exactly one key has it")
    kt = ks.add_parser("token", help="mint a short-lived browser token (bt1.) for one "
                       "session; prints it as the last line")
    kt.add_argument("key", help="id or name of the API key it acts for")
    kt.add_argument("--pipelines", required=True, help="allowed steps, comma separated")
    kt.add_argument("--ttl", type=float, default=300.0, help="seconds, at most 600")
    kt.add_argument("--token-secret", default=_env("TOKEN_SECRET"),
                    help="the gateways' --token-secret (env AUDIOSTREAM_TOKEN_SECRET)")
    for k in (kc, kl, kr, kt):
        _add_common(k, nested=True)
        k.add_argument("--keys-file", type=Path, default=_env("KEYS_FILE"),
                       required=_env("KEYS_FILE") is None,
                       help="the keys file (env AUDIOSTREAM_KEYS_FILE)")

    p = sub.add_parser("topology", help="broker topology")
    _add_common(p)
    ts = p.add_subparsers(dest="topology_cmd", required=True, metavar="ACTION")
    td = ts.add_parser("declare", help="declare exchanges and queues on RabbitMQ (idempotent)")
    _add_common(td, nested=True)
    _add_broker(td, required=True)
    tdef = ts.add_parser("definitions", help="write RabbitMQ definitions JSON")
    _add_common(tdef, nested=True)
    _add_broker(tdef, required=False, note="; not used: the definitions follow --prefix "
                "and --shards alone")
    tdef.add_argument("--out", type=Path, required=True, help="the JSON file to write")

    p = sub.add_parser("models", help="model files")
    _add_common(p)
    ms = p.add_subparsers(dest="models_cmd", required=True, metavar="ACTION")
    mp = ms.add_parser("prepare", help="derive streaming/INT8/FP16 models and verify hashes")
    _add_common(mp, nested=True)
    with contextlib.suppress(ImportError):
        from audiostream.models import prepare as _prepare

        _prepare.add_arguments(mp)
    return parser


def _run_async(coro: Any) -> int:
    with contextlib.suppress(ImportError):
        import uvloop

        return int(uvloop.run(coro))
    return int(asyncio.run(coro))


def _dispatch(args: argparse.Namespace) -> int:
    for module in getattr(args, "imports", []):
        try:
            importlib.import_module(module)
        except ImportError as exc:
            raise UsageError(f"--import {module}: {exc}") from None
    # A mistyped input path is a user error, whatever the command does with it.
    source = getattr(args, "input", None)
    if source is not None and str(source) != "-" and not Path(source).exists():
        raise UsageError(f"input file {str(source)!r} does not exist")
    cmd = args.command
    if cmd == "serve":
        return _run_async(_serve(args))
    if cmd == "gateway" and args.processes > 1:
        return _run_async(_gateway_processes(args))
    if cmd == "gateway":
        return _run_async(_gateway(args))
    if cmd == "worker":
        return _run_async(_worker(args))
    if cmd == "stream":
        return _run_async(_stream(args))
    if cmd == "bench":
        return _run_async(_bench(args))
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

        return int(prepare.run(args))
    raise AssertionError(f"unhandled command {cmd!r}")


def _leaf(exc: BaseException) -> BaseException:
    """The first real error inside (nested) exception groups, e.g. from a TaskGroup."""
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]
    return exc


def classify(exc: BaseException) -> tuple[int, str]:
    """Exit code and one-line message (secrets redacted) for an error that ended a command."""
    import aiohttp
    import soundfile

    from audiostream.client_errors import ClientError

    exc = _leaf(exc)
    if isinstance(exc, UsageError):
        return EXIT_USAGE, redact_text(exc.message)
    if type(exc) is ClientError:
        # The SDK's own root class is what it raises for an argument it refuses before
        # anything is sent (a chunk size, a format, a pipeline): the caller's mistake.
        return EXIT_USAGE, redact_text(str(exc))
    if isinstance(exc, TransportError):
        return EXIT_FAILURE, f"{exc.code.name} ({int(exc.code)}): {_transport_message(exc)}"
    if isinstance(exc, AudioStreamError):
        user = isinstance(exc, ConfigError | ProtocolError | AuthError)
        return (EXIT_USAGE if user else EXIT_FAILURE), redact_text(str(exc))
    if isinstance(exc, BrokenPipeError):
        return EXIT_FAILURE, "output closed early (broken pipe)"
    if isinstance(exc, OSError):
        reason = exc.strerror or type(exc).__name__
        if exc.filename is not None:
            return EXIT_USAGE, f"{exc.filename}: {reason}"
        return EXIT_FAILURE, redact_text(reason if exc.strerror else str(exc) or reason)
    if isinstance(exc, soundfile.LibsndfileError):
        return EXIT_USAGE, f"cannot read the audio: {exc.error_string}"
    if isinstance(exc, aiohttp.ClientError):
        return EXIT_FAILURE, redact_text(f"{type(exc).__name__}: {exc}")
    text = redact_text(f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__)
    return EXIT_BUG, (f"internal error ({text}); this is a bug: run again with --debug for "
                      "the traceback and report it")


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.raw_argv = list(sys.argv[1:] if argv is None else argv)
    debug = getattr(args, "debug", False)
    if isinstance(debug, FromEnv):
        try:
            debug = _flag(debug.raw)
        except argparse.ArgumentTypeError:
            debug = False  # reported by _resolve_env below
    try:
        _resolve_env(args)
        setup_logging(args.log_level, args.json_logs)
        if args.command in _ONE_SHOT and args.log_level != "debug":
            logging.getLogger("aiormq").setLevel(logging.CRITICAL)
        return _dispatch(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except SystemExit:
        raise
    except BaseException as exc:  # the one place every error becomes a line
        code, message = classify(exc)
        if debug:
            print(redact_text("".join(traceback.format_exception(exc))), file=sys.stderr, end="")
        one_line = " ".join(message.split())  # an exception text may span lines
        print(f"audiostream {args.command}: error: {one_line}", file=sys.stderr)
        return code
