"""The gateway's edge: what happens to a socket before and beside the session protocol.

A hostile client can hurt a gateway without ever sending a valid ``start``: by holding
sockets open with slow or no headers (slowloris), by sending malformed HTTP to flood the
error log, by putting keys into URLs that end up in logs, or by speaking sloppy
WebSocket (unmasked frames, ping floods). aiohttp leaves all of these open by default:

- it has no header-read timeout (only a keep-alive timer of an hour) and does not count
  sockets that have not sent a request yet;
- its ``WebSocketReader`` ignores the mask bit, answers every ping and lets each ping
  restart ``receive(timeout=...)``;
- it logs every malformed request with a traceback at ERROR, and its default access log
  carries the full request line (query string included) and unescaped headers;
- it announces ``Server: Python/3.x aiohttp/3.x``.

This module closes those gaps with public aiohttp extension points only: a site whose
protocol factory builds a ``RequestHandler`` subclass (so each socket gets a handshake
timer and is counted until its first request arrives), a wrapper around the WebSocket
frame parser (mask check, ping answering and rate limit), a middleware (one request per
connection before the upgrade, key-shaped query strings refused), an access logger that
never logs query strings or subprotocols and escapes every client-controlled field, and a
separate operations site for ``/metrics``, ``/healthz`` and ``/readyz``.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import re
import ssl
import time
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Generator, Sequence
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any, Generic, TypeVar, cast
from urllib.parse import unquote_plus

from aiohttp import hdrs, web
from aiohttp.abc import AbstractAccessLogger
from aiohttp.http_parser import RawRequestMessage
from aiohttp.web_protocol import RequestHandler
from multidict import CIMultiDict, CIMultiDictProxy
from prometheus_client import CollectorRegistry, Counter, Gauge
from yarl import URL

from audiostream.errors import ConfigError, ErrorCode

log = logging.getLogger(__name__)
access_log = logging.getLogger("audiostream.access")
T = TypeVar("T")

#: What every response says in its ``Server`` header (no versions to fingerprint).
SERVER_NAME = "audiostream"

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclass(frozen=True, kw_only=True)
class EdgeSettings:
    """Limits applied before (and beside) the session protocol; docs/security.md lists
    them with their reasons."""

    handshake_timeout_s: float = 10.0
    """From accept to a complete request head: TLS handshake plus request line and
    headers. A socket that has not sent a whole request by then is closed."""
    max_pending: int = 512
    """Sockets that have not yet sent a whole request. When a new socket would exceed it,
    the oldest such socket is closed (a slowloris holds old sockets; real clients finish
    their request within milliseconds)."""
    max_line_size: int = 8190
    max_field_size: int = 8190
    max_headers: int = 64
    control_rate: float = 2.0
    """WebSocket pings and pongs per second a client may send ..."""
    control_burst: float = 20.0
    """... and at once; beyond that the connection is closed with 1008."""
    ops_host: str = "127.0.0.1"
    """Address of the operations site (``/metrics``, ``/healthz``, ``/readyz``)."""
    ops_port: int | None = 0
    """Its port; 0 picks a free one (tests), None serves no operations site."""
    log_interval_s: float = 10.0
    """At most one log line per kind of refusal in this interval (with a count)."""
    conn_rate_per_ip: float | None = None
    """New connections per second one client address may open (token bucket) ...
    None: no limit (the library default, for tests and proxies that hide client
    addresses; ``audiostream serve``/``gateway`` default to 50)."""
    conn_burst_per_ip: float = 200.0
    """... and at once. Over it, the socket is refused at accept, before aiohttp builds
    anything for it: without TLS it gets a canned ``429``; with TLS it is closed before
    its handshake (a TLS handshake is what a reconnect loop would otherwise cost)."""
    max_pending_per_ip: int | None = None
    """Sockets one client address may hold open before their request head is complete,
    counted from accept (the TLS handshake included). Over it, a new socket from that
    address is closed at accept, before any TLS or HTTP parsing, with a log line, so one
    address cannot fill ``max_pending``. None: no cap (the library default, for tests and
    proxies that hide client addresses; ``audiostream serve``/``gateway`` default to 32
    unless ``--behind-proxy``)."""

    def __post_init__(self) -> None:
        if self.handshake_timeout_s <= 0:
            raise ConfigError("the handshake timeout must be > 0 s")
        if self.max_pending < 1:
            raise ConfigError("max pending sockets must be >= 1")
        if self.max_pending_per_ip is not None and self.max_pending_per_ip < 1:
            raise ConfigError("max pending sockets per address must be >= 1")
        if self.control_rate <= 0 or self.control_burst < 1:
            raise ConfigError("the control frame rate must be > 0 with a burst >= 1")
        if self.conn_rate_per_ip is not None and (
                self.conn_rate_per_ip <= 0 or self.conn_burst_per_ip < 1):
            raise ConfigError("the per-address connection rate must be > 0 with a burst >= 1")


class EdgeMetrics:
    """Refusals at the edge, by reason, and the sockets still in their handshake."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.refused = Counter(
            "audiostream_gateway_edge_refused_total",
            "Sockets or requests the edge refused or closed, by reason",
            ["reason"], registry=registry)
        self.pending = Gauge(
            "audiostream_gateway_pending_sockets",
            "Sockets that have not sent a whole request yet (TLS done, headers pending)",
            registry=registry)


class Throttled:
    """One log line per ``key`` per interval; the next one says how many were skipped."""

    def __init__(self, logger: logging.Logger, interval_s: float,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._logger = logger
        self._interval = interval_s
        self._clock = clock
        self._last: dict[str, float] = {}
        self._skipped: dict[str, int] = {}

    def warning(self, key: str, msg: str, *args: object) -> bool:
        now = self._clock()
        last = self._last.get(key)
        if last is not None and now - last < self._interval:
            self._skipped[key] = self._skipped.get(key, 0) + 1
            return False
        self._last[key] = now
        skipped = self._skipped.pop(key, 0)
        suffix = f" ({skipped} more since the last such line)" if skipped else ""
        self._logger.warning(msg + suffix, *args)
        return True


def escape(value: object, limit: int = 200) -> str:
    """A client-controlled value made safe for a log line: quoted, ASCII, no control
    characters, ``"`` and ``\\`` escaped, truncated (so it cannot forge fields)."""
    text = str(value)
    cut = len(text) > limit
    return json.dumps(text[:limit] + ("..." if cut else ""), ensure_ascii=True)


# --- keys in URLs --------------------------------------------------------------------------

#: Parameter names that announce a credential, compared after lower-casing and ``-`` -> ``_``.
CREDENTIAL_NAMES = frozenset({
    "api_key", "apikey", "key", "token", "access_token", "auth", "authorization",
    "x_api_key", "secret", "password", "bearer", "session_token",
})
_KEY_SHAPES = re.compile(
    r"as_[0-9a-f]{4,}_[A-Za-z0-9\-]{8,}"   # an API key (keys.py)
    r"|bt1\."                               # a browser token (POST /v1/tokens)
    r"|[A-Za-z0-9+/_\-.~]{32,}",            # any other long opaque secret
    re.IGNORECASE,
)


def credential_in_query(query: str) -> bool:
    """True when a query string carries, or names, something that looks like a secret.

    The gateway takes no query parameters, so being strict costs nothing; the value is
    decoded twice to see through double encoding."""
    if not query:
        return False
    decoded = unquote_plus(unquote_plus(query))
    if _KEY_SHAPES.search(decoded):
        return True
    for part in re.split(r"[&;]", decoded):
        name = part.split("=", 1)[0].strip().lower().replace("-", "_")
        if name in CREDENTIAL_NAMES:
            return True
    return False


# --- access log ------------------------------------------------------------------------------


class SafeAccessLogger(AbstractAccessLogger):
    """One line per request: peer, method, path (never the query string), status, bytes,
    seconds and user agent, each client-controlled field escaped. Subprotocol values and
    other headers are never logged: a key sent as ``Sec-WebSocket-Protocol`` stays out."""

    def log(self, request: web.BaseRequest, response: web.StreamResponse, time: float) -> None:
        self.logger.info(
            "%s %s %s %d %d %.3f %s",
            escape(request.remote or "-", 64),
            escape(request.method, 16),
            escape(request.rel_url.raw_path, 200),
            response.status,
            response.body_length,
            time,
            escape(request.headers.get(hdrs.USER_AGENT, "-"), 120),
        )


class _RedactSubprotocols(logging.Filter):
    """aiohttp logs the client's subprotocol list in full when none matches (web_ws.py),
    and clients put keys there: keep the line, drop the values."""

    def filter(self, record: logging.LogRecord) -> bool:
        if "protocols" in str(record.msg) and isinstance(record.args, tuple) and record.args:
            record.msg = "%s: client subprotocols match none of the server's (not logged)"
            record.args = (escape(record.args[0], 64),)
        return True


_REDACT = _RedactSubprotocols()


# --- the socket before its request ------------------------------------------------------------

#: What a socket over its address's connection rate gets, before its request is read
#: (without TLS; with TLS it is closed before its handshake, see ``_Gate``).
TOO_MANY_CONNECTIONS = (b"HTTP/1.1 429 Too Many Requests\r\nServer: " + SERVER_NAME.encode()
                        + b"\r\nRetry-After: 1\r\nContent-Type: text/plain\r\n"
                        b"Content-Length: 38\r\nConnection: close\r\n\r\n"
                        b"too many connections from this address\n")
#: Addresses tracked at most; beyond it, idle ones (bucket full again) are forgotten.
MAX_TRACKED_ADDRESSES = 65_536


def count_down(counts: dict[str, int], key: str) -> None:
    """One fewer for ``key``; the entry goes at zero, so counters of many addresses or
    keys do not keep an entry per one ever seen."""
    left = counts.get(key, 0) - 1
    if left > 0:
        counts[key] = left
    else:
        counts.pop(key, None)


class AddressRate:
    """A token bucket of new connections per client address (no I/O, clock injected).

    Reconnect loops are the cheapest way to load a gateway: each connection costs an
    accept, a request parse, an upgrade and a ``start`` whatever the answer is. Refusing
    at accept time turns that into a write and a close."""

    def __init__(self, rate: float, burst: float,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.rate, self.burst = rate, burst
        self._clock = clock
        self._buckets: dict[str, tuple[float, float]] = {}

    def allow(self, address: str) -> bool:
        now = self._clock()
        tokens, stamp = self._buckets.get(address, (self.burst, now))
        tokens = min(self.burst, tokens + (now - stamp) * self.rate)
        ok = tokens >= 1
        if ok:
            tokens -= 1
        if address not in self._buckets and len(self._buckets) >= MAX_TRACKED_ADDRESSES:
            self._forget_idle(now)
        self._buckets[address] = (tokens, now)
        return ok

    def _forget_idle(self, now: float) -> None:
        refill = self.burst / self.rate
        for address, (_tokens, stamp) in list(self._buckets.items()):
            if now - stamp >= refill:
                del self._buckets[address]
        if len(self._buckets) >= MAX_TRACKED_ADDRESSES:  # all busy: start over
            self._buckets.clear()

    def __len__(self) -> int:
        return len(self._buckets)


class EdgeGuard:
    """The state one site shares across its sockets: the pending ones, oldest first."""

    def __init__(self, settings: EdgeSettings, metrics: EdgeMetrics) -> None:
        self.settings = settings
        self.metrics = metrics
        self.pending: dict[_EdgeHandler, None] = {}
        self.throttled = Throttled(log, settings.log_interval_s)
        self.ops_port: int | None = None
        self.rate = (AddressRate(settings.conn_rate_per_ip, settings.conn_burst_per_ip)
                     if settings.conn_rate_per_ip is not None else None)
        self.per_address: dict[str, int] = {}
        """Sockets per client address not yet past their request head."""
        self.tasks: set[asyncio.Task[None]] = set()
        """TLS handshakes the gate runs (``_Gate``); each ends within its timeout, or when
        the site stops (``stop_handshakes``)."""

    async def stop_handshakes(self) -> None:
        """The site stops: handshakes still running are cut (their sockets closed, their
        counts given back) instead of holding sockets open until their timeout."""
        tasks = list(self.tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def enter(self, address: str) -> bool:
        """Count one more socket before its request for ``address``, or refuse it."""
        cap = self.settings.max_pending_per_ip
        if cap is None:
            return True
        held = self.per_address.get(address, 0)
        if held >= cap:
            self.refused("address_pending_cap",
                         "edge: %s already holds %d sockets without a complete request "
                         "(the cap per address); closed a new one at accept",
                         escape(address, 64), cap)
            return False
        self.per_address[address] = held + 1
        return True

    def exit(self, address: str) -> None:
        count_down(self.per_address, address)

    @property
    def ops_url(self) -> str | None:
        if self.ops_port is None:
            return None
        return f"http://{self.settings.ops_host}:{self.ops_port}"

    def refused(self, reason: str, msg: str, *args: object) -> None:
        self.metrics.refused.labels(reason=reason).inc()
        self.throttled.warning(reason, msg, *args)

    def admit(self, handler: _EdgeHandler) -> None:
        while len(self.pending) >= self.settings.max_pending:
            oldest = next(iter(self.pending))
            self.leave(oldest)
            self.refused("pending_cap",
                         "edge: %d sockets without a complete request (the cap); closed "
                         "the oldest, from %s", self.settings.max_pending,
                         escape(oldest.peer, 64))
            oldest.force_close()
        self.pending[handler] = None
        self.metrics.pending.set(len(self.pending))

    def leave(self, handler: _EdgeHandler) -> None:
        if handler in self.pending:
            del self.pending[handler]
            self.metrics.pending.set(len(self.pending))


class _Started(Generic[T]):
    """A coroutine run to its first suspension now, awaited to its end later: what 3.12's
    eager tasks do (``_Gate`` needs it on 3.11). Its exception, if the first step raises,
    is raised when it is awaited."""

    __slots__ = ("_coro", "_done", "_error", "_first", "_value")

    def __init__(self, coro: Coroutine[Any, Any, T]) -> None:
        self._coro = coro
        self._first: Any = None
        self._error: BaseException | None = None
        self._done = False
        self._value: T | None = None
        try:
            self._first = coro.send(None)
        except StopIteration as stop:
            self._done, self._value = True, stop.value
        except Exception as exc:
            self._done, self._error = True, exc

    def __await__(self) -> Generator[Any, None, T]:
        if self._done:
            if self._error is not None:
                raise self._error
            return cast(T, self._value)
        try:
            yield self._first  # the future the coroutine waits on: the task waits on it
        except BaseException:
            self._coro.close()  # cancelled: the coroutine's own cleanup runs
            raise
        return (yield from self._coro.__await__())

    def close(self) -> None:
        """Never to be awaited (its task was cancelled before it began): the coroutine's
        own cleanup runs now, not whenever the garbage collector gets to it."""
        self._coro.close()


class _Gate(asyncio.Protocol):
    """Every accepted socket starts here, and is judged at accept, before TLS or HTTP.
    Over its address's connection rate it is refused: without TLS it gets a canned
    ``429``; with TLS it is closed before its handshake, the expensive part (no HTTP
    answer can reach it without one). With a cap per address (``max_pending_per_ip``) it
    is counted and refused when its address holds too many sockets without a request.
    The gate runs the TLS handshake itself (``tls``), so that both decisions come before
    it and sockets in their handshake count too; then the real handler is built and takes
    the transport over (``set_protocol``)."""

    __slots__ = ("_address", "_counted", "_early", "_eof", "_guard", "_judged", "_lost",
                 "_make", "_refused", "_tls", "_tls_timeout_s")

    def __init__(self, guard: EdgeGuard, make: Callable[[], _EdgeHandler],
                 tls: ssl.SSLContext | None = None, tls_timeout_s: float = 10.0) -> None:
        self._guard = guard
        self._make = make
        self._tls = tls
        self._tls_timeout_s = tls_timeout_s
        self._address = "-"
        self._counted = False
        self._judged = False
        self._refused = False
        self._early: list[bytes] = []
        """Bytes that arrived between the end of the TLS handshake and the handler."""
        self._eof = False
        self._lost = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if self._judged:  # start_tls hands us the TLS transport: _handshake goes on
            return
        self._judged = True
        peer = transport.get_extra_info("peername")
        self._address = str(peer[0]) if isinstance(peer, tuple) and peer else "-"
        rate = self._guard.rate
        if rate is not None and not rate.allow(self._address):
            self._refuse_rate(transport)
            return
        if self._guard.settings.max_pending_per_ip is not None:
            if not self._guard.enter(self._address):
                self._refused = True
                transport.close()
                return
            self._counted = True
        if self._tls is not None:
            loop = asyncio.get_running_loop()
            # start_tls's first step (it pauses reading and puts its SSL protocol on the
            # transport) must run here, not in a task: uvloop starts reading as soon as
            # connection_made returns, whatever pause_reading() said (asyncio too, before
            # 3.12), and the ClientHello would reach this gate instead of the SSL protocol,
            # leaving the handshake waiting for its timeout. SSL protocols keep the bytes
            # that arrive before their connection_made for the handshake.
            handshake = _Started(loop.start_tls(
                cast(asyncio.WriteTransport, transport), self,
                self._tls, server_side=True,
                ssl_handshake_timeout=self._tls_timeout_s))
            task = loop.create_task(self._handshake(handshake))
            self._guard.tasks.add(task)
            task.add_done_callback(functools.partial(self._handshake_done, handshake))
            return
        self._proceed(transport)

    def _handshake_done(self, handshake: _Started[asyncio.Transport | None],
                        task: asyncio.Task[None]) -> None:
        self._guard.tasks.discard(task)
        if task.cancelled():  # the site stops (EdgeSite.stop), maybe before it began
            handshake.close()  # start_tls closes the socket
            self._release()

    async def _handshake(self, handshake: _Started[asyncio.Transport | None]) -> None:
        try:
            tls = await handshake
        except Exception as exc:  # any failed handshake: the count goes back
            log.debug("edge: TLS handshake from %s failed: %s", escape(self._address, 64),
                      type(exc).__name__)
            tls = None  # start_tls closed the socket
        if tls is None or self._lost or tls.is_closing():
            self._release()
            if tls is not None:
                tls.close()
            return
        self._proceed(tls)

    def _release(self) -> None:
        if self._counted:
            self._counted = False
            self._guard.exit(self._address)

    def _refuse_rate(self, transport: asyncio.BaseTransport) -> None:
        """Over the rate: a canned 429 without TLS; with TLS the socket is just closed,
        before its handshake. A TLS alert could not say "too many connections" (clients
        would report a TLS failure, the SDK a ``TlsError``); a cut connection reads as
        the transient failure it is, and clients retry it with their backoff."""
        rate = self._guard.rate
        assert rate is not None
        answer = "closed before TLS" if self._tls is not None else "answered 429"
        self._refused = True
        self._guard.refused(
            "connection_rate", "edge: %s opens connections faster than %g/s (burst %g); %s",
            escape(self._address, 64), rate.rate, rate.burst, answer)
        if self._tls is None:
            cast(asyncio.WriteTransport, transport).write(TOO_MANY_CONNECTIONS)
        transport.close()

    def _proceed(self, transport: asyncio.BaseTransport) -> None:
        handler = self._make()
        if self._counted:  # the handler gives the count back with its request head
            self._counted = False
            handler.on_request = functools.partial(self._guard.exit, self._address)
        transport.set_protocol(handler)
        handler.connection_made(transport)
        if self._early:
            handler.data_received(b"".join(self._early))
            self._early = []
        if self._eof:
            handler.eof_received()

    def data_received(self, data: bytes) -> None:
        """Bytes of a refused socket are dropped; those after the TLS handshake and before
        the handler took over are kept for it."""
        if not self._refused:
            self._early.append(data)

    def eof_received(self) -> bool | None:
        self._eof = True
        return None

    def connection_lost(self, exc: BaseException | None) -> None:
        self._lost = True
        self._release()


class _EdgeHandler(RequestHandler):
    """aiohttp's per-socket protocol with a handshake deadline, pre-request accounting,
    quiet malformed-request handling and a WebSocket frame guard."""

    def __init__(self, manager: web.Server, guard: EdgeGuard, **kwargs: Any) -> None:
        super().__init__(manager, **kwargs)
        self.guard = guard
        self.peer = "-"
        self._deadline: asyncio.TimerHandle | None = None
        self.frame_cap: int | None = None
        """Largest WebSocket data frame accepted right now (None: aiohttp's own cap);
        the session handler lowers it until ``start`` is accepted."""
        self.hard_cap: int | None = None
        self.closing = False
        """The server sent its close frame: data frames are dropped unread."""
        self.on_request: Callable[[], None] | None = None
        """Gives the socket's count per address back (``_Gate``) when its request head is
        complete or it closes."""
        # aiohttp 3.14's parser turns "CONNECT \r\n\r\n" into a request whose url is
        # None, and building the request then raises inside the connection task, which
        # dies with the socket left open (found by tests/security/test_fuzz_edge.py).
        make = self._request_factory
        if make is not None:
            def request_factory(message: RawRequestMessage, *args: Any) -> web.BaseRequest:
                if message.url is None:
                    self.guard.refused("malformed_http", "edge: malformed HTTP from %s: "
                                       "no request target", escape(self.peer, 64))
                    message = message._replace(method="UNKNOWN", path="/", url=URL("/"))
                expect = message.headers.get(hdrs.EXPECT)
                if expect is not None and not expect.isascii():
                    # aiohttp answers an unknown Expect with a 417 that quotes it, and a
                    # value that is not UTF-8 made building that answer fail: a 500 (found
                    # by tests/security/test_fuzz_edge.py). The quote is made ASCII.
                    headers = CIMultiDict(message.headers)
                    headers[hdrs.EXPECT] = expect.encode("utf-8", "surrogateescape").decode(
                        "ascii", "backslashreplace")
                    message = message._replace(headers=CIMultiDictProxy(headers))
                return make(message, *args)

            self._request_factory = request_factory

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        peer = transport.get_extra_info("peername")
        self.peer = str(peer[0]) if isinstance(peer, tuple) and peer else "-"
        super().connection_made(transport)
        self.guard.admit(self)
        self._deadline = self._loop.call_later(self.guard.settings.handshake_timeout_s,
                                               self._handshake_expired)

    def connection_lost(self, exc: BaseException | None) -> None:
        self.request_arrived()
        super().connection_lost(exc)
        # aiohttp drops the parser here but keeps the data callback, which (through the
        # WebSocket response and its request) leads back to this protocol: a cycle that
        # only the cyclic GC would free.
        self._data_received_cb = None

    def request_arrived(self) -> None:
        """The request head is complete: the socket leaves the handshake phase."""
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None
        self.guard.leave(self)
        done, self.on_request = self.on_request, None
        if done is not None:
            done()

    def _handshake_expired(self) -> None:
        self._deadline = None
        if self in self.guard.pending:
            self.guard.leave(self)
            self.guard.refused("handshake_timeout",
                               "edge: no complete request within %g s from %s; closed",
                               self.guard.settings.handshake_timeout_s, escape(self.peer, 64))
            self.force_close()

    def handle_error(self, request: web.BaseRequest, status: int = 500,
                     exc: BaseException | None = None,
                     message: str | None = None) -> web.StreamResponse:
        if isinstance(exc, ConnectionError):
            # The client left while its request was handled (e.g. before the upgrade
            # could be written): nothing to answer, nothing to log at ERROR. aiohttp's
            # connection loop treats this exception as a premature disconnection.
            raise ConnectionError("client disconnected") from exc
        if status >= 500:  # our own failure: keep aiohttp's traceback
            resp = super().handle_error(request, status, exc, message)
            resp.headers[hdrs.SERVER] = SERVER_NAME
            return resp
        self.request_arrived()
        # The exception's text quotes the request line (query string included): only
        # its class is logged.
        self.guard.refused("malformed_http", "edge: malformed HTTP from %s: %s",
                           escape(self.peer, 64), type(exc).__name__)
        if request.writer.output_size > 0:
            raise ConnectionError("response already started")
        try:
            phrase = HTTPStatus(status).phrase
        except ValueError:
            phrase = ""
        resp = web.Response(status=status, text=f"{status} {phrase}\n",
                            headers={hdrs.SERVER: SERVER_NAME})
        resp.force_close()
        return resp

    def set_parser(self, parser: Any, data_received_cb: Callable[[], None] | None = None
                   ) -> None:
        # Every WebSocket byte now passes the frame guard before aiohttp's reader.
        # (aiohttp only calls feed_data/feed_eof on it; its annotation names the class)
        if data_received_cb is not None:
            data_received_cb = _while_open(data_received_cb)
        super().set_parser(FrameGuard(parser, self), data_received_cb)  # type: ignore[arg-type]


def _while_open(callback: Callable[[], None]) -> Callable[[], None]:
    """The WebSocket response's data callback (its heartbeat reset), held weakly and
    skipped once the response is closed.

    aiohttp (3.14) calls it for every read, also for the client's close frame after
    ours: it then re-arms the heartbeat timer of a closed response, and the event loop
    keeps the ended connection alive for a whole heartbeat period. Held strongly, it
    also makes a protocol -> response -> request -> protocol cycle."""
    owner = getattr(callback, "__self__", None)
    if not isinstance(owner, web.WebSocketResponse):
        return callback
    method = weakref.WeakMethod(callback)
    response = weakref.ref(owner)

    def on_data() -> None:
        bound, ws = method(), response()
        if bound is not None and ws is not None and not ws.closed:
            bound()

    return on_data


# --- WebSocket frames ------------------------------------------------------------------------

OP_CLOSE, OP_PING, OP_PONG = 0x8, 0x9, 0xA
#: Data bytes after our close frame past which the client is reported (once, as
#: ``data_after_close``): a client that kept streaming. The edge goes on reading and
#: dropping them until the client's close frame or the close timeout: a socket closed
#: with unread input is reset by the kernel, and the reset discards what we had queued
#: for the client, our close frame included (it would see 1006, not our code).
MAX_AFTER_CLOSE = 1024 * 1024
CLOSE_PROTOCOL_ERROR, CLOSE_POLICY_VIOLATION, CLOSE_TOO_BIG = 1002, 1008, 1009


def closing(request: web.BaseRequest) -> None:
    """The server is closing this WebSocket: from now on, data frames from the client
    are dropped as their bytes arrive; only its close frame matters."""
    if isinstance(request.protocol, _EdgeHandler):
        request.protocol.closing = True


def limit_frames(request: web.BaseRequest, cap: int | None, *, hard_cap: int | None = None
                 ) -> None:
    """Refuse WebSocket data frames over ``cap`` bytes on this request's socket (4004)
    from their header on, before a byte of the payload is buffered; None lifts the cap.
    ``hard_cap``, if given, is the never-legal size (1009)."""
    if isinstance(request.protocol, _EdgeHandler):
        request.protocol.frame_cap = cap
        if hard_cap is not None:
            request.protocol.hard_cap = hard_cap


def close_frame(code: int, reason: str) -> bytes:
    """A server close frame (servers never mask)."""
    payload = code.to_bytes(2, "big") + reason.encode()[:120]
    return bytes([0x80 | OP_CLOSE, len(payload)]) + payload


def _frame_head(buf: bytearray) -> tuple[int, int, int, bool] | None:
    """(header length, payload length, opcode, masked) once the header is complete."""
    if len(buf) < 2:
        return None
    opcode, masked, length = buf[0] & 0x0F, bool(buf[1] & 0x80), buf[1] & 0x7F
    head = {126: 4, 127: 10}.get(length, 2)
    if head > 2:
        if len(buf) < head:
            return None
        length = int.from_bytes(buf[2:head], "big")
    head += 4 if masked else 0
    if len(buf) < head:
        return None
    return head, length, opcode, masked


class FrameGuard:
    """Sits between the socket and aiohttp's ``WebSocketReader``.

    - RFC 6455 5.1: a server must close on an unmasked client frame (aiohttp does not
      check the bit): close 1002.
    - Pings are answered here and never reach the reader, so they cannot keep a session
      alive past its idle timeout; pings and pongs together are rate-limited (token
      bucket), a flood is closed with 1008.
    - A data frame longer than the socket's ``frame_cap`` (small before ``start``) is
      closed with 4004 as soon as its header arrives, and one longer than the hard cap
      with 1009: its payload is never buffered, parsed or decoded.
    Everything else passes through unchanged, byte for byte."""

    def __init__(self, inner: Any, handler: _EdgeHandler) -> None:
        self._inner = inner
        self._handler = handler
        settings = handler.guard.settings
        self._rate, self._burst = settings.control_rate, settings.control_burst
        self._tokens = settings.control_burst
        self._stamp = time.monotonic()
        self._head = bytearray()
        self._left = 0  # payload bytes of the current data frame still to pass through
        self._skip = 0  # ... or to drop (the server is closing: data frames are moot)
        self._dropped = 0  # bytes of data frames dropped since our close frame
        self._done = False
        self._peer_closed = False

    def feed_eof(self) -> None:
        self._inner.feed_eof()

    def feed_data(self, data: bytes) -> tuple[bool, bytes]:
        if self._done:
            return False, b""
        out: list[bytes] = []
        i, n = 0, len(data)
        while i < n:
            if self._left:
                k = min(self._left, n - i)
                out.append(data[i:i + k])
                i += k
                self._left -= k
                continue
            if self._skip:
                k = min(self._skip, n - i)
                i += k
                self._skip -= k
                continue
            self._head += data[i:]
            i = n
            if not self._frames(out):
                return False, b""
        return self._inner.feed_data(b"".join(out)) if out else (False, b"")

    def _frames(self, out: list[bytes]) -> bool:
        """Consume whole headers (and whole pings) from the buffer; False: closed."""
        while True:
            if len(self._head) >= 2 and not self._head[1] & 0x80:
                return self._refuse("unmasked_frame", CLOSE_PROTOCOL_ERROR,
                                    "client frames must be masked")
            parsed = _frame_head(self._head)
            if parsed is None:
                return True
            head, length, opcode, _masked = parsed
            if opcode in (OP_PING, OP_PONG) and not self._take():
                return self._refuse("control_flood", CLOSE_POLICY_VIOLATION,
                                    "too many pings")
            if opcode == OP_CLOSE:
                self._peer_closed = True
            elif opcode < OP_CLOSE:  # data (text, binary, continuation)
                hard = self._handler.hard_cap
                if hard is not None and length > hard:
                    return self._refuse("frame_too_big", CLOSE_TOO_BIG,
                                        "frame_too_large")
                cap = self._handler.frame_cap
                if cap is not None and length > cap:
                    return self._refuse("frame_too_big", int(ErrorCode.FRAME_TOO_LARGE),
                                        "frame_too_large")
            if opcode == OP_PING and length <= 125 and not self._peer_closed:
                if len(self._head) < head + length:
                    return True  # wait for the whole (small) ping
                mask = self._head[head - 4:head]
                body = bytes(b ^ mask[j % 4] for j, b in enumerate(
                    self._head[head:head + length]))
                del self._head[:head + length]
                self._pong(body)
                continue
            avail = min(length, len(self._head) - head)
            if opcode < OP_CLOSE and self._handler.closing:
                # Our close frame is out: what a client still sends is dropped here,
                # unparsed, instead of being unmasked, decoded and discarded by
                # aiohttp's reader during the close handshake. Reading goes on (the
                # close timeout bounds it), so the socket never closes with unread
                # input, which would reset it (see MAX_AFTER_CLOSE).
                del self._head[:head + avail]
                self._skip = length - avail
                before = self._dropped
                self._dropped += head + length
                if before <= MAX_AFTER_CLOSE < self._dropped:
                    self._handler.guard.refused(
                        "data_after_close", "edge: %s kept sending data after our close "
                        "frame; dropped", escape(self._handler.peer, 64))
                if self._skip:
                    return True
                continue
            out.append(bytes(self._head[:head + avail]))
            del self._head[:head + avail]
            self._left = length - avail
            if self._left:
                return True

    def _take(self) -> bool:
        now = time.monotonic()
        self._tokens = min(self._burst, self._tokens + (now - self._stamp) * self._rate)
        self._stamp = now
        if self._tokens < 1:
            return False
        self._tokens -= 1
        return True

    def _pong(self, body: bytes) -> None:
        transport = self._handler.transport
        if transport is not None and not transport.is_closing():
            transport.write(bytes([0x80 | OP_PONG, len(body)]) + body)

    def _refuse(self, reason: str, code: int, text: str) -> bool:
        self._done = True
        self._head.clear()
        self._handler.guard.refused(reason, "edge: %s from %s; closed with %d", reason,
                                    escape(self._handler.peer, 64), code)
        transport = self._handler.transport
        if transport is not None and not transport.is_closing():
            transport.write(close_frame(code, text))
            transport.close()
        return False


# --- wiring ------------------------------------------------------------------------------------


EDGE_KEY = web.AppKey("edge", EdgeGuard)


async def _server_header(_request: web.Request, response: web.StreamResponse) -> None:
    response.headers[hdrs.SERVER] = SERVER_NAME


def _refusal(code: ErrorCode, status: int, message: str) -> web.Response:
    resp = web.json_response({"type": "error", "code": int(code), "name": code.name.lower(),
                              "message": message}, status=status)
    resp.force_close()
    return resp


def install(
    app: web.Application,
    settings: EdgeSettings,
    registry: CollectorRegistry,
    ops_routes: Sequence[tuple[str, Handler]] = (),
) -> EdgeGuard:
    """Put the edge in front of ``app``; serve ``ops_routes`` on the operations site,
    which starts and stops with ``app``."""
    guard = EdgeGuard(settings, EdgeMetrics(registry))
    app[EDGE_KEY] = guard

    @web.middleware
    async def edge(request: web.Request, handler: Handler) -> web.StreamResponse:
        if isinstance(request.protocol, _EdgeHandler):
            request.protocol.request_arrived()
        if credential_in_query(request.query_string):
            guard.refused("credentials_in_url", "edge: key-shaped query string from %s",
                          escape(request.remote or "-", 64))
            return _refusal(ErrorCode.CREDENTIALS_IN_URL, 400,
                            "credentials must not travel in the URL; send the API key in "
                            "the start message")
        try:
            resp = await handler(request)
        except web.HTTPException as exc:
            exc.force_close()  # one request per connection before the upgrade
            raise
        resp.force_close()
        return resp

    app.middlewares.append(edge)
    ws_log = logging.getLogger("aiohttp.websocket")
    if _REDACT not in ws_log.filters:
        ws_log.addFilter(_REDACT)
    app.on_response_prepare.append(_server_header)
    if ops_routes and settings.ops_port is not None:
        app.cleanup_ctx.append(lambda _app: _ops_site(guard, ops_routes))
    return guard


@contextlib.asynccontextmanager
async def _ops_context(guard: EdgeGuard, routes: Sequence[tuple[str, Handler]]
                       ) -> AsyncIterator[web.AppRunner]:
    ops = web.Application()
    for path, handler in routes:
        ops.router.add_get(path, handler)
    ops.on_response_prepare.append(_server_header)
    runner = web.AppRunner(ops, handle_signals=False)
    await runner.setup()
    try:
        # Its own accounting (probes are not clients) and no access log (probes every
        # few seconds would drown it).
        site = EdgeSite(runner, guard.settings.ops_host, guard.settings.ops_port or 0,
                        guard=EdgeGuard(guard.settings, EdgeMetrics(CollectorRegistry())),
                        log_access=False)
        try:
            await site.start()
        except OSError as exc:
            raise ConfigError(f"cannot serve operations endpoints on "
                              f"{guard.settings.ops_host}:{guard.settings.ops_port}: {exc}"
                              ) from exc
        guard.ops_port = site.port
        yield runner
    finally:
        guard.ops_port = None
        await runner.cleanup()


async def _ops_site(guard: EdgeGuard, routes: Sequence[tuple[str, Handler]]
                    ) -> AsyncIterator[None]:
    async with _ops_context(guard, routes):
        yield


class EdgeSite(web.BaseSite):
    """A TCP site whose sockets are ``_EdgeHandler``s, with the TLS handshake bounded
    by the same handshake timeout (asyncio's default is 60 s)."""

    def __init__(self, runner: web.BaseRunner, host: str, port: int, *,
                 ssl_context: ssl.SSLContext | None = None, guard: EdgeGuard | None = None,
                 backlog: int = 128, log_access: bool = True,
                 reuse_port: bool = False) -> None:
        super().__init__(runner, ssl_context=ssl_context, backlog=backlog)
        self._log_access = log_access
        self._reuse_port = reuse_port
        self._host = host
        self._port = port
        if guard is None and isinstance(runner, web.AppRunner):
            guard = runner.app.get(EDGE_KEY)
        self.guard = guard or EdgeGuard(EdgeSettings(), EdgeMetrics(CollectorRegistry()))

    @property
    def name(self) -> str:
        scheme = "https" if self._ssl_context else "http"
        return f"{scheme}://{self._host}:{self._port}"

    @property
    def port(self) -> int:
        return self._port

    async def stop(self) -> None:
        await super().stop()  # no new sockets
        await self.guard.stop_handshakes()

    async def start(self) -> None:
        await super().start()
        loop = asyncio.get_running_loop()
        server = self._runner.server
        assert server is not None
        guard, s = self.guard, self.guard.settings

        def handler() -> _EdgeHandler:
            return _EdgeHandler(
                server, guard, loop=loop,
                # Backstop only: one request per connection before the upgrade.
                keepalive_timeout=s.handshake_timeout_s,
                access_log_class=SafeAccessLogger,
                access_log=access_log if self._log_access else None,
                max_line_size=s.max_line_size, max_field_size=s.max_field_size,
                max_headers=s.max_headers, lingering_time=1.0,
            )

        # With a rate or a cap per address the gate judges sockets at accept and runs TLS
        # itself, so a socket is refused before its handshake costs anything.
        gated = guard.rate is not None or s.max_pending_per_ip is not None
        gated_tls = self._ssl_context if gated else None

        def factory() -> asyncio.Protocol:
            if not gated:
                return handler()
            return _Gate(guard, handler, gated_tls, s.handshake_timeout_s)

        extra: dict[str, Any] = {}
        site_tls = self._ssl_context if gated_tls is None else None
        if site_tls is not None:
            extra["ssl_handshake_timeout"] = s.handshake_timeout_s
        self._server = await loop.create_server(
            factory, self._host, self._port, ssl=site_tls, backlog=self._backlog,
            reuse_port=self._reuse_port or None, **extra)
        if self._server.sockets:
            self._port = int(self._server.sockets[0].getsockname()[1])
