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
from collections import deque
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from aiohttp import WSMsgType, web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from audiostream.bundler import WorkBundler
from audiostream.envelope import Step
from audiostream.errors import (
    AudioStreamError,
    AuthError,
    ConfigError,
    ErrorCode,
    LimitError,
)
from audiostream.gateway.keys import KeyRecord, KeyStore
from audiostream.gateway.load import LoadMonitor
from audiostream.gateway.pipeline import Outcome, SessionPipeline, reply_outcomes
from audiostream.gateway.telephony import add_telephony_routes
from audiostream.gateway.tokens import SessionGrant, TokenSigner
from audiostream.metrics import GatewayMetrics
from audiostream.processors import ProcessorRegistry, registry
from audiostream.processors.pipeline import plan_raw
from audiostream.protocol import (
    AckReceived,
    ChunkReceived,
    Close,
    SendBytes,
    SendText,
    ServerProtocol,
    StartMessage,
    StartRequested,
    State,
)
from audiostream.transport.base import DeadLetterProbe, Transport

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
    idle_timeout_s: float = 60.0
    """A session with no frame (audio, control or keepalive) for this long is closed."""
    chunk_rate: float | None = 120.0
    """Token bucket per connection: chunks per second ..."""
    chunk_burst: float = 60.0
    """... and how many may come at once; chunks over it get a rate_limited notice."""
    allowed_origins: tuple[str, ...] = ()
    """Browser origins allowed to connect (``*`` for any); requests without an Origin
    header (SDKs, telephony bridges) are always allowed."""
    resume_window_s: float = 60.0
    depth_poll_s: float = 5.0
    """How often the work-queue depth gauge is refreshed; 0 disables polling."""
    load_sample_s: float = 1.0
    """How often the oldest-chunk age gauges are refreshed; 0 disables sampling."""
    bundle_max: int = 64
    """Most sessions' work messages packed into one broker message."""
    linger_ms: float = 0.0
    """Hold a session's next message until its oldest chunk is this old (0: send as soon
    as the previous one is answered). Fewer, larger messages per session for up to this
    much latency: a throughput knob for workers that are the bottleneck."""
    bundle_wait_ms: float = 5.0
    """Longest an envelope waits for its bundle while an earlier one awaits its confirm
    (with none in flight it goes out at once)."""

    def __post_init__(self) -> None:
        if self.linger_ms < 0:
            raise ConfigError(f"linger must be >= 0 ms, not {self.linger_ms:g}")


class _Connection:
    """One WebSocket: its protocol core, its writer task and its pipeline."""

    def __init__(self, ws: web.WebSocketResponse, gateway: Gateway) -> None:
        self.ws = ws
        self.gateway = gateway
        settings = gateway.settings
        self.proto = ServerProtocol(chunk_rate=settings.chunk_rate,
                                    chunk_burst=settings.chunk_burst)
        self.pipeline: SessionPipeline | None = None
        self.key: KeyRecord | None = None
        self.grant: SessionGrant | None = None
        self._refresh: asyncio.TimerHandle | None = None
        self._wake = asyncio.Event()
        self.writer = asyncio.get_running_loop().create_task(self._write_loop())
        self.started_at = time.monotonic()
        # One entry per audio outcome queued in the protocol's outbox, in order:
        # (chunk received or None if unknown, reply received, last audio of that reply),
        # monotonic seconds.
        self._audio_marks: deque[tuple[float | None, float, bool]] = deque()

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
                    self._observe_written()
                elif isinstance(out, SendText):
                    await self.ws.send_str(out.text)
                    self._count_text(out)
                elif isinstance(out, Close):
                    await self.ws.close(code=out.code, message=out.reason.encode())
                    return

    def _observe_written(self) -> None:
        if not self._audio_marks:
            return
        received, replied, last = self._audio_marks.popleft()
        now = time.monotonic()
        metrics = self.gateway.metrics
        if received is not None:
            metrics.round_trip.observe(now - received)
        if last:
            metrics.stage.labels(stage="gateway_to_client").observe(now - replied)

    def _count_text(self, out: SendText) -> None:
        """Count drop notices and errors as they leave."""
        if out.kind == "notice":
            self.gateway.metrics.dropped.labels(reason=out.label).inc()
        elif out.kind == "error":
            self.gateway.metrics.errors.labels(code=out.label).inc()

    def on_outcomes(self, outcomes: list[Outcome]) -> None:
        replied = time.monotonic()
        sent_before = self.proto.chunks_out
        measured_before = self.proto.measured
        for o in outcomes:
            for ev in o.events:
                self.proto.deliver_event(o.seq, ev)
            if o.audio is not None:
                self.proto.deliver_audio(o.seq, o.audio)
            else:
                assert o.code is not None
                self.proto.deliver_notice(o.seq, o.code, o.message)
        queued = self.proto.chunks_out - sent_before
        if queued:
            # The protocol measured each queued chunk's latency just now, on the same clock
            # (chunks it has no receive time for, e.g. replays, come first and get None).
            now = time.monotonic()
            fresh = self.proto.measured - measured_before
            lat = self.proto.latencies_ms[len(self.proto.latencies_ms) - fresh:] if fresh else []
            rx: list[float | None] = [None] * (queued - len(lat))
            rx += [now - ms / 1000 for ms in lat[-queued:]]
            for i, received in enumerate(rx):
                self._audio_marks.append((received, replied, i == queued - 1))
        self.kick()

    async def start_session(self, start: StartMessage) -> None:
        gw = self.gateway
        try:
            if gw.draining:
                raise AudioStreamError("gateway is draining; reconnect elsewhere",
                                       ErrorCode.SERVER_DRAINING)
            self.key = key = gw.keys.verify(start.api_key)
            if start.resume is not None:
                await self._resume(start)
                return
            pipeline = plan_raw(start.pipeline, start.format, gw.processors)
            self._check_key(pipeline)
            deadline_ms = start.deadline_ms or gw.settings.default_deadline_ms
            self.grant = SessionGrant(
                session_id=uuid.uuid4().hex,
                key_id=key.id,
                format=start.format,
                pipeline=pipeline,
                deadline_ms=deadline_ms,
                generation=0,
                expires_at=0.0,
            )
            pl = self._make_pipeline(self.grant)
            await pl.open()
        except AudioStreamError as err:
            gw.metrics.sessions_total.labels(result=err.code.name.lower()).inc()
            self.proto.reject(err)
            self.key = None
            return
        if await self._closed_meanwhile(pl):
            return
        self._started(pl, "started")
        self.proto.accept(self.grant.session_id, start.format, self._ready_extra())

    async def _closed_meanwhile(self, pl: SessionPipeline) -> bool:
        """The gateway began draining while the session was being set up."""
        if self.proto.state is State.STARTING:
            return False
        self.key = None
        await pl.close(finished=False)
        return True

    def _check_key(self, pipeline: tuple[Step, ...]) -> None:
        gw = self.gateway
        assert self.key is not None
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

    def _make_pipeline(
        self, grant: SessionGrant, state: Mapping[str, bytes] | None = None
    ) -> SessionPipeline:
        return SessionPipeline(
            session_id=grant.session_id,
            transport=self.gateway.transport,
            pipeline=grant.pipeline,
            fmt=grant.format,
            deadline_s=grant.deadline_ms / 1000,
            sink=self.on_outcomes,
            metrics=self.gateway.metrics,
            generation=grant.generation,
            state=state,
            on_displaced=self.on_displaced,
            bundler=self.gateway.bundler,
            linger_s=self.gateway.settings.linger_ms / 1000,
        )

    def _started(self, pl: SessionPipeline, result: str) -> None:
        gw = self.gateway
        assert self.key is not None
        self.pipeline = pl
        gw.sessions_per_key[self.key.id] = gw.sessions_per_key.get(self.key.id, 0) + 1
        gw.metrics.sessions_total.labels(result=result).inc()
        self._arm_refresh()

    def _ready_extra(self) -> dict[str, Any]:
        assert self.grant is not None
        return {
            "pipeline": [s.name for s in self.grant.pipeline],
            "deadline_ms": self.grant.deadline_ms,
            "token": self.gateway.signer.issue(self.grant),
            "resume_window_s": self.gateway.signer.ttl_s,
        }

    async def _resume(self, start: StartMessage) -> None:
        """Take over a session another connection (on any gateway) held."""
        gw = self.gateway
        assert start.resume is not None and self.key is not None
        old = gw.signer.verify(start.resume.token)
        if old.key_id != self.key.id:
            raise AuthError("the resume token belongs to another API key",
                            ErrorCode.RESUME_FAILED)
        self._check_key(old.pipeline)
        self.grant = replace(old, generation=old.generation + 1)
        pl = self._make_pipeline(self.grant)
        try:
            history = await pl.take_over()
        except AudioStreamError:
            await pl.close(finished=False)
            raise
        if await self._closed_meanwhile(pl):
            return
        received = start.resume.received
        covered = max((r.seq + r.chunk_count for r in history), default=0)
        resume_from = max(covered, received)
        self._started(pl, "resumed")
        self.proto.accept(
            self.grant.session_id,
            self.grant.format,
            {**self._ready_extra(), "resumed": True, "resume_from": resume_from},
            next_seq=resume_from,
            delivered=received,
        )
        replay: list[Outcome] = []
        answered: set[int] = set()
        for reply in history:
            seqs = list(range(reply.seq, reply.seq + reply.chunk_count))
            for o in reply_outcomes(reply, seqs):
                if o.seq >= received and o.seq not in answered:
                    answered.add(o.seq)
                    replay.append(o)
        for seq in range(received, resume_from):
            if seq not in answered:
                replay.append(Outcome(seq, code=ErrorCode.EXPIRED,
                                      message="expired while the session moved"))
        gw.metrics.replayed.inc(len(replay))
        self.on_outcomes(sorted(replay, key=lambda o: o.seq))
        pl.confirm(received)

    def on_displaced(self) -> None:
        self.proto.displace()
        self.kick()

    def _arm_refresh(self) -> None:
        """Send a fresh resume token before the last one expires."""
        loop = asyncio.get_running_loop()
        self._refresh = loop.call_later(self.gateway.signer.ttl_s / 3, self._refresh_token)

    def _refresh_token(self) -> None:
        if self.grant is None or self.proto.state is State.CLOSED:
            return
        self.proto.send_json({"type": "token", "token": self.gateway.signer.issue(self.grant)})
        self.kick()
        self._arm_refresh()

    def token(self) -> str | None:
        return self.gateway.signer.issue(self.grant) if self.grant is not None else None

    async def close(self) -> None:
        gw = self.gateway
        if self._refresh is not None:
            self._refresh.cancel()
        if self.pipeline is not None:
            finished = self.proto.state is State.CLOSED and self.proto.close_code == 1000
            await self.pipeline.close(finished=finished)
        if self.key is not None and self.pipeline is not None:
            gw.sessions_per_key[self.key.id] -= 1
        if not self.writer.done():
            if self.proto.state is State.CLOSED and not self.ws.closed:
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
        token_secret: bytes | None = None,
    ) -> None:
        self.transport = transport
        self.keys = keys
        self.settings = settings or GatewaySettings()
        self.signer = TokenSigner(token_secret, ttl_s=self.settings.resume_window_s)
        self.processors = processors
        self.metrics_registry = metrics_registry or CollectorRegistry()
        self.metrics = GatewayMetrics(self.metrics_registry)
        self.metrics.connections_capacity.set(self.settings.max_connections)
        self.bundler = WorkBundler(
            transport,
            max_items=self.settings.bundle_max,
            max_wait_s=self.settings.bundle_wait_ms / 1000,
            on_sent=lambda _n: self.metrics.bundles_published.inc(),
        )
        self.connections: set[_Connection] = set()
        self.sessions_per_key: dict[str, int] = {}
        self.draining = False
        self._changed = asyncio.Event()
        self.load = LoadMonitor(  # queue-age gauges for KEDA and alerts (gateway/load.py)
            self.metrics, lambda: [c.pipeline for c in self.connections if c.pipeline is not None],
            transport.topology.processing_types, interval_s=self.settings.load_sample_s)

    # -- aiohttp wiring -------------------------------------------------------------------
    def app(self) -> web.Application:
        app = web.Application()
        app[GATEWAY_KEY] = self
        app.router.add_get("/v1/stream", self.handle_stream)
        app.router.add_get("/healthz", self.handle_health)
        app.router.add_get("/readyz", self.handle_ready)
        app.router.add_get("/metrics", self.handle_metrics)
        add_telephony_routes(app, self)  # /v1/telephony/*: Twilio, Telnyx, Exotel, Asterisk
        app.cleanup_ctx.append(self._lifecycle)
        return app

    async def _lifecycle(self, _app: web.Application) -> AsyncIterator[None]:
        if not self.transport.is_connected:
            await self.transport.connect()
        await self.transport.declare()
        poller = None
        if self.settings.depth_poll_s > 0:
            poller = asyncio.get_running_loop().create_task(self._poll_depth(), name="depth")
        self.load.start()
        yield
        await self.load.close()
        if poller is not None:
            poller.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await poller
        await self.close_connections()
        await self.bundler.close()
        await self.transport.close()

    async def _poll_depth(self) -> None:
        """Export work-queue depth from here too: it matters most when no worker runs."""
        failing: set[str] = set()
        while True:
            for name in self.transport.topology.processing_types:
                try:
                    depth = await self.transport.work_queue_depth(name)
                except AudioStreamError as err:
                    if name not in failing:
                        log.warning("stage=queue_depth processing=%s: unavailable: %s",
                                    name, err)
                    failing.add(name)
                    continue
                failing.discard(name)
                self.metrics.queue_depth.labels(processing=name).set(depth)
            with contextlib.suppress(AudioStreamError):
                if isinstance(self.transport, DeadLetterProbe) and (
                        dead := await self.transport.dead_letter_depth()) is not None:
                    self.metrics.dead_letters.set(dead)
            await asyncio.sleep(self.settings.depth_poll_s)

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
        origin = request.headers.get("Origin")
        allowed = self.settings.allowed_origins
        if origin is not None and "*" not in allowed and origin not in allowed:
            self.metrics.sessions_total.labels(result="origin_refused").inc()
            return web.json_response(
                {"type": "error", "code": int(ErrorCode.FORBIDDEN), "name": "forbidden",
                 "message": f"origin {origin!r} is not allowed"},
                status=403,
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
            try:
                await conn.close()
            finally:
                self.connections.discard(conn)
                self.metrics.connections_active.dec()
                self._changed.set()
        return ws

    async def _serve(self, conn: _Connection) -> None:
        proto = conn.proto
        ws = conn.ws
        auth_deadline = time.monotonic() + self.settings.auth_timeout_s
        while proto.state is not State.CLOSED:
            if proto.state is State.AWAITING_START:
                timeout = max(0.0, auth_deadline - time.monotonic())
            else:
                timeout = self.settings.idle_timeout_s
            try:
                msg = await ws.receive(timeout=timeout)
            except TimeoutError:
                if proto.state is State.AWAITING_START:
                    proto.fail(AuthError("no start message in time", ErrorCode.AUTH_TIMEOUT))
                else:
                    proto.fail(LimitError(
                        f"nothing received for {self.settings.idle_timeout_s:g} s",
                        ErrorCode.IDLE_TIMEOUT))
                conn.kick()
                break
            if msg.type is WSMsgType.TEXT:
                events = proto.receive_text(msg.data)
            elif msg.type is WSMsgType.BINARY:
                seq = proto.next_in
                events = proto.receive_bytes(msg.data)
                if proto.next_in != seq:  # numbered: it gets audio or a notice
                    self.metrics.chunks_in.inc()
                    self.metrics.bytes_in.inc(len(msg.data))
            elif msg.type is WSMsgType.ERROR:
                log.info("session=%s seq=%d stage=websocket: connection error: %s",
                         proto.session_id, proto.next_in, ws.exception())
                break
            else:  # CLOSE, CLOSING, CLOSED
                break
            for ev in events:
                if isinstance(ev, StartRequested):
                    await conn.start_session(ev.start)
                elif isinstance(ev, ChunkReceived):
                    assert conn.pipeline is not None
                    conn.pipeline.submit(ev.seq, ev.data, time.time())
                elif isinstance(ev, AckReceived) and conn.pipeline is not None:
                    conn.pipeline.confirm(ev.received)
            conn.kick()
        if proto.state is State.CLOSED and not ws.closed:
            # Let the writer finish sending (summary and close frame).
            with contextlib.suppress(TimeoutError, ConnectionError, RuntimeError):
                await asyncio.wait_for(asyncio.shield(conn.writer), 5.0)

    async def drain(self, grace_s: float) -> None:
        """Fail readiness and refuse new sessions; tell every client to resume elsewhere
        (``going_away`` with its token); deliver what is in flight for up to ``grace_s``;
        then close with 1001. Each session's journal goes back to its reply queue."""
        self.draining = True
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace_s
        conns = list(self.connections)
        for conn in conns:
            conn.proto.go_away({"reason": "gateway draining; resume on another gateway",
                                "token": conn.token()})
            conn.kick()

        async def settle(conn: _Connection) -> None:
            if conn.pipeline is not None:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(conn.pipeline.wait_idle(),
                                           max(0.0, deadline - loop.time()))
            conn.proto.finish_drain()
            conn.kick()

        await asyncio.gather(*(settle(c) for c in conns))
        while self.connections and loop.time() < deadline + 5:
            self._changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), 0.5)
        await self.close_connections()

    async def close_connections(self) -> None:
        for conn in list(self.connections):
            conn.proto.go_away({"reason": "server shutting down", "token": conn.token()})
            conn.proto.finish_drain()
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
