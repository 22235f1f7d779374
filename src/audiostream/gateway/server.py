"""aiohttp adapter: WebSocket sessions at /v1/stream, health, readiness and metrics.

The handler only moves frames: the protocol core (``audiostream.protocol``)
decides, ``SessionPipeline`` talks to the broker. Every task a connection
starts is owned by it and cancelled when it ends.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

from aiohttp import WSMsgType, web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from audiostream.errors import AudioStreamError, AuthError, ErrorCode, LimitError
from audiostream.gateway.keys import KeyRecord, KeyStore
from audiostream.gateway.pipeline import Outcome, SessionPipeline
from audiostream.metrics import GatewayMetrics
from audiostream.processors import ProcessorRegistry, registry
from audiostream.processors.pipeline import plan_raw
from audiostream.protocol import (
    ChunkReceived,
    Close,
    SendBytes,
    SendText,
    ServerProtocol,
    StartMessage,
    StartRequested,
    State,
)
from audiostream.transport.base import Transport

log = logging.getLogger(__name__)

#: Query parameters that look like credentials; such a request is refused before the upgrade.
CREDENTIAL_PARAMS = frozenset({"api_key", "apikey", "key", "token", "access_token", "auth"})
#: aiohttp's own ceiling on one frame; the protocol applies a tighter, format-derived one.
HARD_MAX_FRAME = 16 * 1024 * 1024


@dataclass(frozen=True, kw_only=True)
class GatewaySettings:
    default_deadline_ms: int = 1000
    auth_timeout_s: float = 10.0
    heartbeat_s: float = 30.0
    max_connections: int = 10_000
    drain_grace_s: float = 20.0


class _Connection:
    """One WebSocket: its protocol core, its writer task and its pipeline."""

    def __init__(self, ws: web.WebSocketResponse, gateway: Gateway) -> None:
        self.ws = ws
        self.gateway = gateway
        self.proto = ServerProtocol()
        self.pipeline: SessionPipeline | None = None
        self.key: KeyRecord | None = None
        self._wake = asyncio.Event()
        self.writer = asyncio.get_running_loop().create_task(self._write_loop())
        self.started_at = time.monotonic()

    def kick(self) -> None:
        self._wake.set()

    async def _write_loop(self) -> None:
        metrics = self.gateway.metrics
        while True:
            await self._wake.wait()
            self._wake.clear()
            for out in self.proto.data_to_send():
                if isinstance(out, SendBytes):
                    await self.ws.send_bytes(out.data)
                    metrics.chunks_out.inc()
                    metrics.bytes_out.inc(len(out.data))
                elif isinstance(out, SendText):
                    await self.ws.send_str(out.text)
                elif isinstance(out, Close):
                    await self.ws.close(code=out.code, message=out.reason.encode())
                    return

    def on_outcomes(self, outcomes: list[Outcome]) -> None:
        for o in outcomes:
            for ev in o.events:
                self.proto.deliver_event(o.seq, ev)
            if o.audio is not None:
                self.proto.deliver_audio(o.seq, o.audio)
            else:
                assert o.code is not None
                self.proto.deliver_notice(o.seq, o.code, o.message)
                self.gateway.metrics.dropped.labels(reason=o.code.name.lower()).inc()
        self.kick()

    async def start_session(self, start: StartMessage) -> None:
        gw = self.gateway
        try:
            self.key = gw.keys.verify(start.api_key)
            pipeline = plan_raw(start.pipeline, start.format, gw.processors)
            if self.key.pipelines is not None:
                denied = [s.name for s in pipeline if s.name not in self.key.pipelines
                          and not gw.processors.get(s.name).internal]
                if denied:
                    raise AuthError(f"this key may not use {', '.join(denied)}",
                                    ErrorCode.FORBIDDEN)
            if self.key.max_sessions is not None and (
                gw.sessions_per_key.get(self.key.id, 0) >= self.key.max_sessions
            ):
                raise LimitError(
                    f"key {self.key.id} already has {self.key.max_sessions} sessions",
                    ErrorCode.TOO_MANY_SESSIONS,
                )
            if gw.draining:
                raise AudioStreamError("gateway is draining; reconnect elsewhere",
                                       ErrorCode.SERVER_DRAINING)
            session_id = uuid.uuid4().hex
            deadline_ms = start.deadline_ms or gw.settings.default_deadline_ms
            pl = SessionPipeline(
                session_id=session_id,
                transport=gw.transport,
                pipeline=pipeline,
                fmt=start.format,
                deadline_s=deadline_ms / 1000,
                sink=self.on_outcomes,
                metrics=gw.metrics,
            )
            await pl.open()
        except AudioStreamError as err:
            gw.metrics.sessions_total.labels(result=err.code.name.lower()).inc()
            self.proto.reject(err)
            self.key = None
            return
        self.pipeline = pl
        gw.sessions_per_key[self.key.id] = gw.sessions_per_key.get(self.key.id, 0) + 1
        gw.metrics.sessions_total.labels(result="started").inc()
        self.proto.accept(
            session_id,
            start.format,
            {
                "pipeline": [s.name for s in pipeline],
                "deadline_ms": deadline_ms,
            },
        )

    async def close(self) -> None:
        gw = self.gateway
        if self.pipeline is not None:
            finished = self.proto.state is State.CLOSED and self.proto.close_code == 1000
            await self.pipeline.close(delete_reply_queue=finished)
        if self.key is not None:
            gw.sessions_per_key[self.key.id] -= 1
        if not self.writer.done():
            self.kick()
            with contextlib.suppress(TimeoutError, ConnectionError, RuntimeError):
                await asyncio.wait_for(asyncio.shield(self.writer), 1.0)
            self.writer.cancel()
        with contextlib.suppress(asyncio.CancelledError, ConnectionError, RuntimeError):
            await self.writer
        gw.metrics.session_duration.observe(time.monotonic() - self.started_at)


class Gateway:
    def __init__(
        self,
        transport: Transport,
        keys: KeyStore,
        *,
        settings: GatewaySettings | None = None,
        processors: ProcessorRegistry = registry,
        metrics_registry: CollectorRegistry | None = None,
    ) -> None:
        self.transport = transport
        self.keys = keys
        self.settings = settings or GatewaySettings()
        self.processors = processors
        self.metrics_registry = metrics_registry or CollectorRegistry()
        self.metrics = GatewayMetrics(self.metrics_registry)
        self.metrics.connections_capacity.set(self.settings.max_connections)
        self.connections: set[_Connection] = set()
        self.sessions_per_key: dict[str, int] = {}
        self.draining = False
        self._changed = asyncio.Event()

    # -- aiohttp wiring -------------------------------------------------------------------
    def app(self) -> web.Application:
        app = web.Application()
        app[GATEWAY_KEY] = self
        app.router.add_get("/v1/stream", self.handle_stream)
        app.router.add_get("/healthz", self.handle_health)
        app.router.add_get("/readyz", self.handle_ready)
        app.router.add_get("/metrics", self.handle_metrics)
        app.cleanup_ctx.append(self._lifecycle)
        return app

    async def _lifecycle(self, _app: web.Application) -> AsyncIterator[None]:
        if not self.transport.is_connected:
            await self.transport.connect()
        await self.transport.declare()
        yield
        await self.close_connections()
        await self.transport.close()

    async def handle_health(self, _request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def handle_ready(self, _request: web.Request) -> web.Response:
        ready = self.transport.is_connected and not self.draining
        body = {
            "ready": ready,
            "broker_connected": self.transport.is_connected,
            "draining": self.draining,
            "connections": len(self.connections),
        }
        return web.json_response(body, status=200 if ready else 503)

    async def handle_metrics(self, _request: web.Request) -> web.Response:
        data = generate_latest(self.metrics_registry)
        return web.Response(body=data, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def handle_stream(self, request: web.Request) -> web.StreamResponse:
        leaked = CREDENTIAL_PARAMS.intersection(k.lower() for k in request.query)
        if leaked:
            self.metrics.sessions_total.labels(result="credentials_in_url").inc()
            return web.json_response(
                {
                    "type": "error",
                    "code": int(ErrorCode.CREDENTIALS_IN_URL),
                    "name": "credentials_in_url",
                    "message": "credentials must not travel in the URL; send the API key "
                    "in the start message",
                },
                status=400,
            )
        if len(self.connections) >= self.settings.max_connections or self.draining:
            code = ErrorCode.SERVER_DRAINING if self.draining else ErrorCode.TOO_MANY_SESSIONS
            return web.json_response(
                {"type": "error", "code": int(code), "name": code.name.lower(),
                 "message": "gateway is not accepting connections"},
                status=503,
            )
        ws = web.WebSocketResponse(
            heartbeat=self.settings.heartbeat_s,
            max_msg_size=HARD_MAX_FRAME,
            compress=False,
        )
        await ws.prepare(request)
        conn = _Connection(ws, self)
        self.connections.add(conn)
        self.metrics.connections_total.inc()
        self.metrics.connections_active.inc()
        try:
            await self._serve(conn)
        finally:
            self.connections.discard(conn)
            self.metrics.connections_active.dec()
            await conn.close()
            self._changed.set()
        return ws

    async def _serve(self, conn: _Connection) -> None:
        proto = conn.proto
        ws = conn.ws
        auth_deadline = time.monotonic() + self.settings.auth_timeout_s
        while proto.state is not State.CLOSED:
            timeout = None
            if proto.state is State.AWAITING_START:
                timeout = max(0.0, auth_deadline - time.monotonic())
            try:
                msg = await ws.receive(timeout=timeout)
            except TimeoutError:
                proto.fail(AuthError("no start message in time", ErrorCode.AUTH_TIMEOUT))
                conn.kick()
                break
            if msg.type is WSMsgType.TEXT:
                events = proto.receive_text(msg.data)
            elif msg.type is WSMsgType.BINARY:
                events = proto.receive_bytes(msg.data)
            elif msg.type is WSMsgType.ERROR:
                log.info("websocket error: %s", ws.exception())
                break
            else:  # CLOSE, CLOSING, CLOSED
                break
            for ev in events:
                if isinstance(ev, StartRequested):
                    await conn.start_session(ev.start)
                elif isinstance(ev, ChunkReceived):
                    self.metrics.chunks_in.inc()
                    self.metrics.bytes_in.inc(len(ev.data))
                    assert conn.pipeline is not None
                    conn.pipeline.submit(ev.seq, ev.data, time.time())
            conn.kick()
        # Let the writer finish sending (summary and close frame).
        with contextlib.suppress(TimeoutError, ConnectionError, RuntimeError):
            await asyncio.wait_for(asyncio.shield(conn.writer), 5.0)

    async def drain(self, grace_s: float) -> None:
        """Refuse new sessions, let current ones finish for up to ``grace_s``, then close."""
        self.draining = True
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace_s
        while self.connections and loop.time() < deadline:
            self._changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), deadline - loop.time())
        await self.close_connections()

    async def close_connections(self) -> None:
        for conn in list(self.connections):
            conn.proto.go_away({"reason": "server shutting down"})
            conn.kick()
        for conn in list(self.connections):
            with contextlib.suppress(Exception):
                await conn.ws.close()


GATEWAY_KEY = web.AppKey("gateway", Gateway)


def server_ssl_context(cert: Path, key: Path) -> ssl.SSLContext:
    """TLS 1.3 only: older clients are refused during the handshake."""
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.load_cert_chain(str(cert), str(key))
    return ctx


async def start_site(
    app: web.Application, host: str, port: int, ssl_context: ssl.SSLContext | None = None
) -> tuple[web.AppRunner, int]:
    """Start serving; returns the runner and the bound port (useful with port 0)."""
    runner = web.AppRunner(app, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, host, port, ssl_context=ssl_context)
    await site.start()
    bound = port
    for address in runner.addresses:
        bound = int(address[1])
        break
    return runner, bound
