"""aiohttp adapter for phone platforms: /v1/telephony/{twilio,telnyx,exotel,asterisk}.

The platforms dial us and speak their own formats (``audiostream.telephony`` owns
them); each call runs through the same ``SessionPipeline`` as a /v1/stream
session, so brokers, workers, deadlines and drop accounting are shared. The
handlers only move frames: one reader, one paced writer task per call, both owned
by the call and cancelled when it ends.

Auth: Twilio and its kin let us put nothing in headers, so the API key - or better,
a short-lived call token (``ct1.``, minted by ``POST /v1/telephony/tokens``) -
travels in ``start.customParameters``; an ``Authorization`` header (Basic with the
key as password, or Bearer) works too and is what Asterisk and Exotel send. When a
Twilio auth token is configured, ``X-Twilio-Signature`` is checked on the upgrade.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import hmac
import json
import logging
import os
import secrets
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from aiohttp import WSMsgType, web

from audiostream.errors import AudioStreamError, AuthError, ConfigError, ErrorCode
from audiostream.gateway.keys import KeyRecord
from audiostream.gateway.pipeline import Outcome, SessionPipeline
from audiostream.processors.pipeline import plan_raw
from audiostream.protocol import MAX_DEADLINE_MS, MIN_DEADLINE_MS
from audiostream.telephony import (
    AS_AUDIO,
    AS_HANGUP,
    DIALECTS,
    AudioSocketReader,
    CallSession,
    CallStarted,
    CallStopped,
    ClearIn,
    Connected,
    Dialect,
    DialectSpec,
    Drop,
    DtmfIn,
    FlowOff,
    FlowOn,
    Ignored,
    MarkIn,
    MediaIn,
    Outbound,
    PeerEvent,
    audiosocket_frame,
    parse_asterisk_text,
    parse_json_message,
)

if TYPE_CHECKING:
    from audiostream.gateway.server import Gateway

log = logging.getLogger(__name__)

CALL_TOKEN_PREFIX = "ct1."
MAX_TOKEN_TTL_S = 600.0
#: aiohttp's ceiling on one inbound frame (a Twilio media message is ~300 bytes).
MAX_INBOUND = 1 << 20


@dataclass(frozen=True, kw_only=True)
class TelephonySettings:
    default_pipeline: tuple[str, ...] = ("denoise",)
    """Steps a call runs when its start message names none (``pipeline`` parameter)."""
    twilio_auth_token: str | None = None
    """When set, the upgrade must carry a valid ``X-Twilio-Signature``."""
    public_url: str | None = None
    """The base URL the platform dials (``wss://host``), for the signature behind proxies."""
    deadline_ms: int = 1000
    stop_grace_s: float = 2.0
    """After ``stop``, how long queued audio may still go out before it is dropped."""
    audiosocket: tuple[str, int] | None = None
    """Also accept Asterisk AudioSocket calls on this TCP address. The protocol has no
    TLS and no authentication: bind it to a private network only."""
    audiosocket_key: str | None = None
    """The API key (or call token) every AudioSocket call runs under."""

    @classmethod
    def from_env(cls) -> TelephonySettings:
        steps = os.environ.get("AUDIOSTREAM_TELEPHONY_PIPELINE")
        return cls(
            default_pipeline=tuple(s for s in (steps or "denoise").split(",") if s),
            twilio_auth_token=os.environ.get("AUDIOSTREAM_TWILIO_AUTH_TOKEN") or None,
            public_url=os.environ.get("AUDIOSTREAM_PUBLIC_URL") or None,
            audiosocket=_host_port(os.environ.get("AUDIOSTREAM_AUDIOSOCKET") or None),
            audiosocket_key=os.environ.get("AUDIOSTREAM_AUDIOSOCKET_KEY") or None,
        )


def _host_port(text: str | None) -> tuple[str, int] | None:
    """``HOST:PORT`` (``AUDIOSTREAM_AUDIOSOCKET``) -> a bind address."""
    if text is None:
        return None
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit():
        raise ConfigError(f"AUDIOSTREAM_AUDIOSOCKET must be HOST:PORT, not {text!r}")
    return host or "127.0.0.1", int(port)


# -- call tokens ----------------------------------------------------------------------
def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


@dataclass(frozen=True, slots=True)
class CallGrant:
    key_id: str
    pipelines: tuple[str, ...] | None
    expires_at: float
    nonce: str


def mint_call_token(secret: bytes, key: KeyRecord, *, ttl_s: float = 300.0,
                    pipelines: tuple[str, ...] | None = None, now: float | None = None) -> str:
    """A token for one call: the key's id, allowed steps, expiry <= 10 min, signed."""
    if not 0 < ttl_s <= MAX_TOKEN_TTL_S:
        raise ConfigError(f"token lifetime must be in (0, {MAX_TOKEN_TTL_S:g}] s",
                          ErrorCode.INVALID_OPTION)
    allowed = pipelines
    if key.pipelines is not None:
        allowed = tuple(p for p in (pipelines or key.pipelines) if p in key.pipelines)
    payload = {"kid": key.id, "pl": list(allowed) if allowed is not None else None,
               "exp": round((time.time() if now is None else now) + ttl_s, 3),
               "n": secrets.token_hex(8)}
    body = _b64(json.dumps(payload, separators=(",", ":"), sort_keys=True).encode())
    sig = _b64(hmac.new(secret, (CALL_TOKEN_PREFIX + body).encode(), hashlib.sha256).digest())
    return f"{CALL_TOKEN_PREFIX}{body}.{sig}"


def verify_call_token(secret: bytes, token: str, *, now: float | None = None) -> CallGrant:
    body, _, sig = token[len(CALL_TOKEN_PREFIX):].partition(".")
    expected = _b64(hmac.new(secret, (CALL_TOKEN_PREFIX + body).encode(),
                             hashlib.sha256).digest())
    if not body or not hmac.compare_digest(expected, sig):
        raise AuthError("call token is invalid", ErrorCode.AUTH_FAILED)
    try:
        data = json.loads(_unb64(body))
        grant = CallGrant(str(data["kid"]),
                          tuple(data["pl"]) if data["pl"] is not None else None,
                          float(data["exp"]), str(data["n"]))
    except (ValueError, KeyError, TypeError) as exc:
        raise AuthError(f"call token is malformed: {exc}", ErrorCode.AUTH_FAILED) from None
    if grant.expires_at < (time.time() if now is None else now):
        raise AuthError("call token has expired", ErrorCode.AUTH_FAILED)
    return grant


def twilio_signature(auth_token: str, url: str, params: dict[str, str] | None = None) -> str:
    """Twilio's request signature: HMAC-SHA1 over the URL and the sorted POST fields."""
    data = url + "".join(k + v for k, v in sorted((params or {}).items()))
    return base64.b64encode(hmac.new(auth_token.encode(), data.encode(), hashlib.sha1)
                            .digest()).decode()


def _header_key(request: web.Request) -> str | None:
    """An API key or call token from ``Authorization`` (Basic: the password)."""
    auth = request.headers.get("Authorization", "")
    scheme, _, value = auth.partition(" ")
    if scheme.lower() == "bearer" and value:
        return value.strip()
    if scheme.lower() == "basic" and value:
        with contextlib.suppress(ValueError, UnicodeDecodeError):
            user, _, password = base64.b64decode(value).decode().partition(":")
            return password or user
    return None


# -- one call -------------------------------------------------------------------------
class Peer(Protocol):
    """Where a call's output goes: a WebSocket, or an AudioSocket TCP stream."""

    @property
    def closed(self) -> bool: ...

    async def send(self, item: Outbound) -> None: ...

    async def close(self, code: int, message: str) -> None: ...


class _WsPeer:
    def __init__(self, ws: web.WebSocketResponse) -> None:
        self.ws = ws

    @property
    def closed(self) -> bool:
        return self.ws.closed

    async def send(self, item: Outbound) -> None:
        if isinstance(item, bytes):
            await self.ws.send_bytes(item)
        else:
            await self.ws.send_str(item)

    async def close(self, code: int, message: str) -> None:
        with contextlib.suppress(ConnectionError, RuntimeError):
            await self.ws.close(code=code, message=message[:120].encode())


class _TcpPeer:
    """AudioSocket: each audio piece goes out as a type-0x10 frame."""

    def __init__(self, writer: asyncio.StreamWriter) -> None:
        self.writer = writer

    @property
    def closed(self) -> bool:
        return self.writer.is_closing()

    async def send(self, item: Outbound) -> None:
        if isinstance(item, bytes):
            self.writer.write(audiosocket_frame(AS_AUDIO, item))
            await self.writer.drain()

    async def close(self, code: int, message: str) -> None:
        """AudioSocket has no close code: the TCP stream ends (the gateway logs why)."""
        self.writer.close()


class _Hangup(Exception):
    """The AudioSocket peer hung up (internal control flow)."""


class _Call:
    def __init__(self, tel: Telephony, peer: Peer, spec: DialectSpec,
                 header_key: str | None) -> None:
        self.tel = tel
        self.gw = tel.gateway
        self.peer = peer
        self.spec = spec
        self.header_key = header_key
        self.id = uuid.uuid4().hex
        self.session = CallSession(spec, on_drop=self._on_drop, on_sent=self._on_sent)
        self.pipeline: SessionPipeline | None = None
        self.key: KeyRecord | None = None
        self._received: dict[int, float] = {}
        self._wake = asyncio.Event()
        self._written = asyncio.Event()
        self._urgent: list[Outbound] = []
        self._loop = asyncio.get_running_loop()
        self.writer = self._loop.create_task(self._write_loop(), name=f"call-{self.id}")
        self.started_at = time.monotonic()
        self._revoking: asyncio.Task[None] | None = None

    def revoke(self, err: AudioStreamError) -> bool:
        """Its key was revoked (``gateway/revocation.py``): drop what is queued and close
        the peer with the code; the call's serve loop then ends it as a hang-up."""
        if self.pipeline is None or self._revoking is not None or self.peer.closed:
            return False
        self.session.abandon(err.code.name.lower(), err.message)
        self._revoking = self._loop.create_task(self.peer.close(int(err.code), err.message))
        return True

    def kick(self) -> None:
        self._wake.set()

    # -- output ---------------------------------------------------------------------
    async def _write_loop(self) -> None:
        while True:
            self._wake.clear()  # before taking: a kick while we send is not lost
            now = self._loop.time()
            out, self._urgent = self._urgent, []
            out += self.session.take(now)
            for item in out:
                await self._send(item)
            if out:
                self._written.set()
            due = self.session.due_at(self._loop.time())
            if due is None:
                await self._wake.wait()
            else:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), max(0.0, due - self._loop.time()))

    async def _send(self, item: Outbound) -> None:
        await self.peer.send(item)
        if isinstance(item, bytes):
            self.gw.metrics.bytes_out.inc(len(item))

    def _on_sent(self, seq: int) -> None:
        self.gw.metrics.chunks_out.inc()
        rx = self._received.pop(seq, None)
        if rx is not None:
            self.gw.metrics.round_trip.observe(time.monotonic() - rx)

    def _on_drop(self, drop: Drop) -> None:
        self._received.pop(drop.seq, None)
        self.gw.metrics.dropped.labels(reason=drop.reason).inc()
        log.info("call=%s dialect=%s seq=%d stage=telephony: dropped (%s): %s",
                 self.id, self.spec.dialect, drop.seq, drop.reason, drop.message)

    def on_outcomes(self, outcomes: list[Outcome]) -> None:
        for o in outcomes:
            reason = o.code.name.lower() if o.code is not None else ""
            self.session.outcome(o.seq, o.audio, reason, o.message)
        self.kick()

    # -- input ----------------------------------------------------------------------
    def parse(self, msg_type: WSMsgType, data: Any) -> PeerEvent | bytes:
        if self.spec.dialect is Dialect.ASTERISK:
            return data if msg_type is WSMsgType.BINARY else parse_asterisk_text(data)
        if msg_type is WSMsgType.BINARY:
            raise AudioStreamError("binary frames are not part of this protocol",
                                   ErrorCode.UNEXPECTED_MESSAGE)
        return parse_json_message(self.spec, data)

    async def handle(self, ev: PeerEvent | bytes) -> bool:
        """Apply one event; False when the call is over."""
        s = self.session
        if isinstance(ev, bytes):
            self._submit(s.audio(ev))
        elif isinstance(ev, MediaIn):
            self._submit(s.media(ev))
        elif isinstance(ev, CallStarted):
            await self._start(ev)
        elif isinstance(ev, MarkIn):
            s.mark(ev)
        elif isinstance(ev, ClearIn):
            # The writer sends these before anything else: one task writes to the peer.
            self._urgent += s.clear(self._loop.time())
        elif isinstance(ev, FlowOff | FlowOn):
            s.flow(isinstance(ev, FlowOn))
            log.info("call=%s stage=telephony: peer flow %s", self.id,
                     "on" if s.flow_on else "off")
        elif isinstance(ev, DtmfIn):
            log.info("call=%s stage=telephony: dtmf %r", self.id, ev.digit)
        elif isinstance(ev, CallStopped):
            self._submit(s.stop())
            self.kick()  # a short last message (Exotel) may go out now
            return False
        elif isinstance(ev, Connected | Ignored):
            log.debug("call=%s stage=telephony: %s", self.id, ev)
        self.kick()
        return True

    def _submit(self, subs: list[Any]) -> None:
        if not subs:
            return
        assert self.pipeline is not None
        m = self.gw.metrics
        now = time.time()
        for sub in subs:
            m.chunks_in.inc()
            m.bytes_in.inc(len(sub.data))
            self._received[sub.seq] = time.monotonic()
            self.pipeline.submit(sub.seq, sub.data, now)

    async def _start(self, ev: CallStarted) -> None:
        gw = self.gw
        self.session.started(ev)
        params = ev.params
        credential = params.get("token") or params.get("api_key") or self.header_key
        reserved: str | None = None
        try:
            if gw.draining:
                raise AudioStreamError("gateway is draining", ErrorCode.SERVER_DRAINING)
            if not credential:
                raise AuthError("no api_key or token in the start message's custom "
                                "parameters, nor an Authorization header", ErrorCode.AUTH_FAILED)
            key, allowed = self.tel.authenticate(credential)
            raw = [p for p in params.get("pipeline", "").split(",") if p] or \
                list(self.tel.settings.default_pipeline)
            steps = plan_raw(raw, self.session.format, gw.processors)
            denied = [st.name for st in steps if not gw.processors.get(st.name).internal
                      and ((allowed is not None and st.name not in allowed)
                           or (key.pipelines is not None and st.name not in key.pipelines))]
            if denied:
                raise AuthError(f"this credential may not use {', '.join(denied)}",
                                ErrorCode.FORBIDDEN)
            # Counted here, before any await: checked here and counted after the open
            # below, concurrent calls all passed the cap (and skipped the start rate).
            gw.reserve(key, new=True, processing=steps[0].name if steps else None)
            reserved = key.id
            deadline_ms = int(params.get("deadline_ms") or self.tel.settings.deadline_ms)
            if not MIN_DEADLINE_MS <= deadline_ms <= MAX_DEADLINE_MS:
                raise ConfigError(f"deadline_ms must be {MIN_DEADLINE_MS}..{MAX_DEADLINE_MS}",
                                  ErrorCode.INVALID_OPTION)
            if "max_queue_ms" in params:
                queue_ms = int(params["max_queue_ms"])
                if not 0 <= queue_ms <= 5000:
                    raise ConfigError("max_queue_ms must be 0..5000", ErrorCode.INVALID_OPTION)
                self.session.max_behind_s = queue_ms / 1000
            pl = SessionPipeline(
                session_id=f"call-{self.id}", transport=gw.transport, pipeline=steps,
                fmt=self.session.format, deadline_s=deadline_ms / 1000, sink=self.on_outcomes,
                metrics=gw.metrics, bundler=gw.bundler, budget=gw.budget,
            )
            await pl.open()
        except (AudioStreamError, ValueError) as err:
            if reserved is not None:
                gw.release(reserved)
            code = err.code if isinstance(err, AudioStreamError) else ErrorCode.INVALID_OPTION
            gw.metrics.sessions_total.labels(result=code.name.lower()).inc()
            log.warning("call=%s dialect=%s stage=start: refused: %s", self.id,
                        self.spec.dialect, err)
            raise AudioStreamError(str(err), code) from None
        except BaseException:  # cancelled mid-open (the peer hung up): give the slot back
            if reserved is not None:
                gw.release(reserved)
            raise
        self.key = key
        self.pipeline = pl
        gw.metrics.sessions_total.labels(result="started").inc()
        log.info("call=%s dialect=%s stream=%s call_id=%s stage=start: %s", self.id,
                 self.spec.dialect, ev.stream_id, ev.call_id, [s.name for s in steps])

    async def finish(self, *, hung_up: bool) -> None:
        """Let queued audio go out (unless the peer is gone), then end every frame."""
        s = self.session
        if not hung_up and self.pipeline is not None:
            deadline = self._loop.time() + self.tel.settings.stop_grace_s
            while not s.finished and self._loop.time() < deadline and not self.peer.closed:
                self._written.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._written.wait(),
                                           max(0.0, deadline - self._loop.time()))
        s.abandon("call_ended", "the call ended before this audio could be played")

    async def close(self) -> None:
        if self._revoking is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._revoking
        if self.pipeline is not None:
            await self.pipeline.close(finished=True)
            if self.key is not None:
                self.gw.release(self.key.id)
        self.writer.cancel()
        with contextlib.suppress(asyncio.CancelledError, ConnectionError, RuntimeError):
            await self.writer
        self.gw.metrics.session_duration.observe(time.monotonic() - self.started_at)


# -- the routes -----------------------------------------------------------------------
@dataclass
class Telephony:
    gateway: Gateway
    settings: TelephonySettings = field(default_factory=TelephonySettings.from_env)
    calls: set[_Call] = field(default_factory=set)
    sockets: set[web.WebSocketResponse] = field(default_factory=set)
    streams: set[asyncio.StreamWriter] = field(default_factory=set)
    audiosocket_port: int | None = None
    used_tokens: dict[str, float] = field(default_factory=dict)

    def authenticate(self, credential: str, *, consume: bool = True
                     ) -> tuple[KeyRecord, tuple[str, ...] | None]:
        """An API key, or a call token (single use on this gateway: ``consume`` marks it
        used; the pre-upgrade check of a header does not)."""
        keys = self.gateway.keys
        if not credential.startswith(CALL_TOKEN_PREFIX):
            return keys.verify(credential), None
        grant = verify_call_token(self.gateway.signer.secret, credential)
        now = time.time()
        for nonce, exp in list(self.used_tokens.items()):
            if exp < now:
                del self.used_tokens[nonce]
        if grant.nonce in self.used_tokens:
            raise AuthError("call token was already used", ErrorCode.AUTH_FAILED)
        record = next((r for r in keys.records() if r.id == grant.key_id), None)
        if record is None or record.revoked:
            raise AuthError("the call token's key is revoked or gone", ErrorCode.FORBIDDEN)
        if consume:
            self.used_tokens[grant.nonce] = grant.expires_at
        return record, grant.pipelines

    def _signature_ok(self, request: web.Request) -> bool:
        token = self.settings.twilio_auth_token
        if token is None:
            return True
        sig = request.headers.get("X-Twilio-Signature", "")
        if not sig:
            return False
        if self.settings.public_url:
            urls = [self.settings.public_url.rstrip("/") + request.path_qs]
        else:
            host = request.headers.get("X-Forwarded-Host", request.host)
            urls = [f"{scheme}://{host}{request.path_qs}" for scheme in ("wss", "ws", "https")]
        return any(hmac.compare_digest(twilio_signature(token, u), sig) for u in urls)

    async def handle_token(self, request: web.Request) -> web.Response:
        """``POST /v1/telephony/tokens`` with the API key as Bearer: a call token."""
        key_text = _header_key(request)
        try:
            if key_text is None or key_text.startswith(CALL_TOKEN_PREFIX):
                raise AuthError("send the API key as 'Authorization: Bearer <key>'")
            key = self.gateway.keys.verify(key_text)
            body = await request.json() if request.can_read_body else {}
            if not isinstance(body, dict):
                raise ConfigError("the body must be a JSON object", ErrorCode.INVALID_OPTION)
            ttl = float(body.get("ttl_s", 300))
            pl = body.get("pipelines")
            token = mint_call_token(self.gateway.signer.secret, key, ttl_s=ttl,
                                    pipelines=tuple(pl) if pl else None)
        except (AudioStreamError, ValueError) as err:
            code = err.code if isinstance(err, AudioStreamError) else ErrorCode.INVALID_OPTION
            status = 401 if code is ErrorCode.AUTH_FAILED else \
                403 if code is ErrorCode.FORBIDDEN else 400
            return web.json_response({"type": "error", "code": int(code),
                                      "name": code.name.lower(), "message": str(err)},
                                     status=status)
        return web.json_response({"token": token, "expires_in_s": ttl})

    def handler(self, dialect: Dialect) -> Any:
        async def handle(request: web.Request) -> web.StreamResponse:
            return await self.handle_call(request, DIALECTS[dialect])
        return handle

    async def handle_call(self, request: web.Request, spec: DialectSpec) -> web.StreamResponse:
        gw = self.gateway

        def refuse(code: ErrorCode, message: str, status: int) -> web.Response:
            gw.metrics.sessions_total.labels(result=code.name.lower()).inc()
            return web.json_response({"type": "error", "code": int(code),
                                      "name": code.name.lower(), "message": message},
                                     status=status)

        if spec.dialect is Dialect.TWILIO and not self._signature_ok(request):
            return refuse(ErrorCode.AUTH_FAILED, "X-Twilio-Signature is missing or wrong", 403)
        header_key = _header_key(request)
        if spec.dialect is Dialect.ASTERISK:
            # Asterisk's websocket_client.conf sends Basic auth; there is no start payload.
            try:
                self.authenticate(header_key or "", consume=False)
            except AudioStreamError as err:
                return refuse(err.code, str(err), 401)
        if gw.draining or len(self.calls) + len(gw.connections) >= gw.settings.max_connections:
            return refuse(ErrorCode.SERVER_DRAINING if gw.draining
                          else ErrorCode.TOO_MANY_SESSIONS,
                          "gateway is not accepting calls", 503)
        ws = web.WebSocketResponse(heartbeat=gw.settings.heartbeat_s,
                                   max_msg_size=MAX_INBOUND, compress=False,
                                   protocols=("media",))  # what websocket_client.conf asks
        await ws.prepare(request)
        call = _Call(self, _WsPeer(ws), spec, header_key)
        self.calls.add(call)
        self.sockets.add(ws)
        gw.metrics.connections_total.inc()
        gw.metrics.connections_active.inc()
        try:
            await self._serve(call, ws)
        finally:
            try:
                await call.close()
            finally:
                self.calls.discard(call)
                self.sockets.discard(ws)
                gw.metrics.connections_active.dec()
                if not ws.closed:
                    with contextlib.suppress(ConnectionError, RuntimeError):
                        await ws.close()
        return ws

    async def _serve(self, call: _Call, ws: web.WebSocketResponse) -> None:
        settings = self.gateway.settings
        auth_deadline = time.monotonic() + settings.auth_timeout_s
        hung_up = True
        while True:
            timeout = (max(0.0, auth_deadline - time.monotonic()) if call.pipeline is None
                       else settings.idle_timeout_s)
            try:
                msg = await ws.receive(timeout=timeout)
            except TimeoutError:
                log.info("call=%s stage=telephony: nothing received for %.0f s", call.id,
                         timeout)
                await ws.close(code=int(ErrorCode.IDLE_TIMEOUT if call.pipeline
                                        else ErrorCode.AUTH_TIMEOUT))
                break
            if msg.type not in (WSMsgType.TEXT, WSMsgType.BINARY):
                break
            try:
                ev = call.parse(msg.type, msg.data)
                if call.pipeline is None and not isinstance(ev, CallStarted | Connected
                                                            | Ignored | FlowOff | FlowOn):
                    raise AudioStreamError("the call must start with a start message",
                                           ErrorCode.UNEXPECTED_MESSAGE)
                if not await call.handle(ev):
                    hung_up = False
                    break
            except AudioStreamError as err:
                log.warning("call=%s dialect=%s seq=%d stage=telephony: %s", call.id,
                            call.spec.dialect, call.session.next_seq, err)
                self.gateway.metrics.errors.labels(code=err.code.name.lower()).inc()
                await call.finish(hung_up=True)
                await ws.close(code=int(err.code), message=err.message[:120].encode())
                return
        await call.finish(hung_up=hung_up)

    # -- AudioSocket ----------------------------------------------------------------------
    async def audiosocket_ctx(self, _app: web.Application) -> AsyncIterator[None]:
        """Serve AudioSocket for the app's lifetime when it is configured (off by default)."""
        addr = self.settings.audiosocket
        if addr is None:
            yield
            return
        if not self.settings.audiosocket_key:
            raise ConfigError("AudioSocket needs AUDIOSTREAM_AUDIOSOCKET_KEY: the protocol "
                              "carries no credentials")
        server = await asyncio.start_server(self._audiosocket_conn, addr[0], addr[1])
        self.audiosocket_port = int(server.sockets[0].getsockname()[1])
        log.info("audiosocket on %s:%d", addr[0], self.audiosocket_port)
        try:
            yield
        finally:
            server.close()
            for w in list(self.streams):
                w.close()
            await server.wait_closed()

    async def _audiosocket_conn(self, reader: asyncio.StreamReader,
                                writer: asyncio.StreamWriter) -> None:
        gw = self.gateway
        spec = DIALECTS[Dialect.AUDIOSOCKET]
        call = _Call(self, _TcpPeer(writer), spec, self.settings.audiosocket_key)
        self.calls.add(call)
        self.streams.add(writer)
        gw.metrics.connections_total.inc()
        gw.metrics.connections_active.inc()
        parser = AudioSocketReader()
        hung_up = True
        try:
            while True:
                timeout = (gw.settings.auth_timeout_s if call.pipeline is None
                           else gw.settings.idle_timeout_s)
                data = await asyncio.wait_for(reader.read(65_536), timeout)
                if not data:
                    break
                for ev in parser.feed(data):
                    if call.pipeline is None and not isinstance(ev, CallStarted | Ignored):
                        raise AudioStreamError("an AudioSocket call starts with its UUID",
                                               ErrorCode.UNEXPECTED_MESSAGE)
                    if not await call.handle(ev):
                        hung_up = False
                        raise _Hangup
        except _Hangup:
            pass
        except (AudioStreamError, TimeoutError, ConnectionError) as err:
            log.warning("call=%s dialect=audiosocket stage=telephony: %s", call.id, err)
            with contextlib.suppress(ConnectionError, RuntimeError):
                writer.write(audiosocket_frame(AS_HANGUP))
        finally:
            try:
                await call.finish(hung_up=hung_up)
                await call.close()
            finally:
                self.calls.discard(call)
                self.streams.discard(writer)
                gw.metrics.connections_active.dec()
                writer.close()
                with contextlib.suppress(ConnectionError, RuntimeError):
                    await writer.wait_closed()

    async def close_calls(self, _app: web.Application) -> None:
        for ws in list(self.sockets):
            with contextlib.suppress(Exception):
                await ws.close(code=1001, message=b"server shutting down")


TELEPHONY_KEY = web.AppKey("telephony", Telephony)


def add_telephony_routes(app: web.Application, gateway: Gateway,
                         settings: TelephonySettings | None = None) -> Telephony:
    """Mount the telephony endpoints on the gateway's app (one call from server.py)."""
    tel = Telephony(gateway, settings or TelephonySettings.from_env())
    app[TELEPHONY_KEY] = tel
    for dialect in (Dialect.TWILIO, Dialect.TELNYX, Dialect.EXOTEL, Dialect.ASTERISK):
        app.router.add_get(f"/v1/telephony/{dialect.value}", tel.handler(dialect))
    app.router.add_post("/v1/telephony/tokens", tel.handle_token)
    app.on_shutdown.append(tel.close_calls)
    app.cleanup_ctx.append(tel.audiosocket_ctx)
    # Calls load the workers like /v1/stream sessions do: the queue-age gauges (what
    # KEDA scales workers on) must see them too.
    gateway.revocation.calls = lambda: list(tel.calls)  # a revoked key ends its calls too
    streams = gateway.load.sessions
    gateway.load.sessions = lambda: [
        *streams(), *(c.pipeline for c in tel.calls if c.pipeline is not None)]
    return tel
