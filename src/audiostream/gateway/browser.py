"""Browser clients: the JS SDK, the demo page, and short-lived browser tokens.

Browsers must never hold an API key: anything a page holds, its user (and any
script on it) can read. A server the customer runs calls ``POST /v1/tokens``
with its API key and hands the page a *browser token*: ``bt1.<payload>.<mac>``,
HMAC-SHA256 under a key derived from the gateway's token secret (so every
gateway that can resume a session can also check a browser token), limited to
a list of pipeline steps, valid for at most ten minutes and for one session.
The page sends it in the ``api_key`` field of ``start`` (docs/protocol.md).

Single use is kept in this gateway's memory (a token id is remembered until it
expires): behind a load balancer a stolen token could open one session per
gateway within its lifetime, which the short expiry bounds.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import secrets
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from importlib import resources
from typing import TYPE_CHECKING, Any

from aiohttp import web

from audiostream.errors import AuthError, ErrorCode
from audiostream.gateway.keys import KeyRecord, KeyStore

if TYPE_CHECKING:
    from audiostream.gateway.server import Gateway

PREFIX = "bt1."
MAX_TTL_S = 600.0
DEFAULT_TTL_S = 300.0
_DERIVE = b"audiostream browser token v1"
#: Files of the JS SDK, served from the package (src/audiostream/web/).
WEB_FILES = {
    "/sdk/audiostream.js": ("audiostream.js", "text/javascript"),
    "/sdk/audiostream-worklet.js": ("audiostream-worklet.js", "text/javascript"),
    "/demo": ("demo.html", "text/html"),
}


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


@dataclass(frozen=True, slots=True)
class BrowserGrant:
    token_id: str
    key_id: str
    pipelines: tuple[str, ...]
    expires_at: float


@dataclass
class BrowserTokens:
    """Mints and checks browser tokens; remembers the ids already used."""

    secret: bytes
    keys: KeyStore
    clock: Callable[[], float] = time.time
    _used: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        # A key of its own: a browser token can never pass as a resume token or back.
        self._mac_key = hmac.new(self.secret, _DERIVE, hashlib.sha256).digest()

    def _sign(self, body: str) -> str:
        return _b64(hmac.new(self._mac_key, body.encode(), hashlib.sha256).digest())

    def mint(self, parent: KeyRecord, pipelines: Sequence[str],
             ttl_s: float = DEFAULT_TTL_S) -> tuple[str, BrowserGrant]:
        """A token for ``pipelines`` (a subset of what ``parent`` may use)."""
        if parent.revoked:
            raise AuthError(f"API key {parent.id} has been revoked", ErrorCode.FORBIDDEN)
        steps = tuple(dict.fromkeys(pipelines))
        if not steps:
            raise AuthError("a browser token needs at least one pipeline step",
                            ErrorCode.INVALID_OPTION)
        if parent.pipelines is not None:
            denied = [s for s in steps if s not in parent.pipelines]
            if denied:
                raise AuthError(f"this key may not use {', '.join(denied)}",
                                ErrorCode.FORBIDDEN)
        if not 0 < ttl_s <= MAX_TTL_S:
            raise AuthError(f"ttl_s must be in (0, {MAX_TTL_S:g}] seconds, not {ttl_s:g}",
                            ErrorCode.INVALID_OPTION)
        grant = BrowserGrant(secrets.token_urlsafe(12), parent.id, steps,
                             round(self.clock() + ttl_s, 3))
        payload = {"jti": grant.token_id, "kid": grant.key_id, "pl": list(steps),
                   "exp": grant.expires_at}
        body = _b64(json.dumps(payload, separators=(",", ":"), sort_keys=True).encode())
        return f"{PREFIX}{body}.{self._sign(body)}", grant

    def check(self, token: str) -> BrowserGrant:
        """Signature and expiry only (does not use the token up)."""
        body, _, sig = token.removeprefix(PREFIX).partition(".")
        if not token.startswith(PREFIX) or not body or not sig or not hmac.compare_digest(
                self._sign(body), sig):
            raise AuthError("invalid browser token", ErrorCode.AUTH_FAILED)
        try:
            data = json.loads(_unb64(body))
            grant = BrowserGrant(str(data["jti"]), str(data["kid"]),
                                 tuple(str(s) for s in data["pl"]), float(data["exp"]))
        except (ValueError, KeyError, TypeError) as exc:
            raise AuthError(f"malformed browser token: {exc}", ErrorCode.AUTH_FAILED) from exc
        if grant.expires_at <= self.clock():
            raise AuthError("browser token has expired; ask your server for a new one",
                            ErrorCode.AUTH_FAILED)
        return grant

    def verify(self, token: str) -> KeyRecord:
        """The ``KeyStore`` hook: check, use up, and return a record scoped to the token."""
        grant = self.check(token)
        now = self.clock()
        for jti in [j for j, exp in self._used.items() if exp <= now]:
            del self._used[jti]
        if grant.token_id in self._used:
            raise AuthError("browser token was already used; each opens one session",
                            ErrorCode.AUTH_FAILED)
        parent = next((r for r in self.keys.records() if r.id == grant.key_id), None)
        if parent is None or parent.revoked:
            raise AuthError(f"the API key behind this browser token ({grant.key_id}) is "
                            "revoked or gone", ErrorCode.FORBIDDEN)
        self._used[grant.token_id] = grant.expires_at
        return KeyRecord(id=parent.id, name=f"{parent.name} (browser token)", sha256="",
                         created=parent.created, max_sessions=parent.max_sessions,
                         pipelines=grant.pipelines)


def _bearer(request: web.Request) -> str:
    auth = request.headers.get("Authorization", "")
    scheme, _, key = auth.partition(" ")
    if scheme.lower() != "bearer" or not key.strip():
        raise AuthError("send the API key as 'Authorization: Bearer <key>'",
                        ErrorCode.AUTH_FAILED)
    return key.strip()


def _error(err: AuthError, status: int) -> web.Response:
    return web.json_response({"type": "error", "code": int(err.code),
                              "name": err.code.name.lower(), "message": str(err)},
                             status=status)


_STATUS = {ErrorCode.AUTH_FAILED: 401, ErrorCode.FORBIDDEN: 403, ErrorCode.INVALID_OPTION: 400}


def install(app: web.Application, gateway: Gateway) -> BrowserTokens:
    """Add the SDK, demo and token routes, and let the key store accept browser tokens."""
    tokens = BrowserTokens(gateway.signer.secret, gateway.keys)
    gateway.keys.token_verifiers[PREFIX] = tokens.verify
    web_dir = resources.files("audiostream") / "web"

    def static(name: str, content_type: str) -> Any:
        async def handler(_request: web.Request) -> web.Response:
            return web.Response(body=(web_dir / name).read_bytes(), content_type=content_type,
                                headers={"Cache-Control": "no-cache"})
        return handler

    for path, (name, content_type) in WEB_FILES.items():
        app.router.add_get(path, static(name, content_type))

    async def mint(request: web.Request) -> web.Response:
        origin = request.headers.get("Origin")
        allowed = gateway.settings.allowed_origins
        if origin is not None and "*" not in allowed and origin not in allowed:
            return _error(AuthError(f"origin {origin!r} is not allowed", ErrorCode.FORBIDDEN),
                          403)
        try:
            key = _bearer(request)
            if key.startswith(PREFIX):
                raise AuthError("a browser token cannot mint tokens", ErrorCode.FORBIDDEN)
            parent = gateway.keys.verify(key)
            try:
                body = await request.json() if request.can_read_body else {}
                pipelines = body.get("pipelines")
                ttl_s = float(body.get("ttl_s", DEFAULT_TTL_S))
                if not isinstance(pipelines, list) or not all(
                        isinstance(p, str) for p in pipelines):
                    raise ValueError("'pipelines' must be a list of step names")
            except (ValueError, TypeError, AttributeError) as exc:
                raise AuthError(f"bad token request: {exc}", ErrorCode.INVALID_OPTION) from exc
            unknown = [p for p in pipelines if p not in gateway.processors]
            if unknown:
                raise AuthError(f"unknown pipeline steps: {', '.join(unknown)}",
                                ErrorCode.INVALID_OPTION)
            token, grant = tokens.mint(parent, pipelines, ttl_s)
        except AuthError as err:
            return _error(err, _STATUS.get(err.code, 400))
        return web.json_response({"token": token, "expires_at": grant.expires_at,
                                  "pipelines": list(grant.pipelines)},
                                 headers={"Cache-Control": "no-store"})

    app.router.add_post("/v1/tokens", mint)
    return tokens
