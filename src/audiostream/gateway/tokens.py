"""Signed session tokens for resumption across gateways.

A token carries what another gateway needs to take the session over (its id,
format, planned pipeline, deadline, key id and message generation), an expiry,
and an HMAC-SHA256 over all of it with a secret every gateway shares. Nothing
in it is secret; everything in it is tamper-evident.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import secrets
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from audiostream.audio import AudioFormat
from audiostream.envelope import Step
from audiostream.errors import AuthError, ErrorCode

TOKEN_VERSION = 1


@dataclass(frozen=True, slots=True)
class SessionGrant:
    session_id: str
    key_id: str
    format: AudioFormat
    pipeline: tuple[Step, ...]
    deadline_ms: int
    generation: int
    """Bumped at every takeover; message ids carry it, so replies to messages an
    earlier holder published are recognised as stale."""
    expires_at: float


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


class TokenSigner:
    def __init__(self, secret: bytes | None = None, *, ttl_s: float = 60.0) -> None:
        self.secret = secret or secrets.token_bytes(32)
        self.ttl_s = ttl_s

    def issue(self, grant: SessionGrant, *, now: float | None = None) -> str:
        expires = (time.time() if now is None else now) + self.ttl_s
        payload: dict[str, Any] = {
            "v": TOKEN_VERSION,
            "sid": grant.session_id,
            "kid": grant.key_id,
            "fmt": grant.format.to_dict(),
            "pl": [s.to_wire() for s in grant.pipeline],
            "dl": grant.deadline_ms,
            "gen": grant.generation,
            "exp": round(expires, 3),
        }
        body = _b64(json.dumps(payload, separators=(",", ":"), sort_keys=True).encode())
        return f"{body}.{self._sign(body)}"

    def _sign(self, body: str) -> str:
        return _b64(hmac.new(self.secret, body.encode(), hashlib.sha256).digest())

    def verify(self, token: str, *, now: float | None = None) -> SessionGrant:
        """Check signature and expiry; raise ``AuthError`` (RESUME_FAILED) otherwise."""
        body, _, sig = token.partition(".")
        if not body or not sig or not hmac.compare_digest(self._sign(body), sig):
            raise AuthError("resume token is invalid or was tampered with",
                            ErrorCode.RESUME_FAILED)
        try:
            data: Mapping[str, Any] = json.loads(_unb64(body))
            if data.get("v") != TOKEN_VERSION:
                raise ValueError(f"token version {data.get('v')!r}")
            grant = SessionGrant(
                session_id=str(data["sid"]),
                key_id=str(data["kid"]),
                format=AudioFormat.from_dict(data["fmt"]),
                pipeline=tuple(Step.from_wire(s) for s in data["pl"]),
                deadline_ms=int(data["dl"]),
                generation=int(data["gen"]),
                expires_at=float(data["exp"]),
            )
        except Exception as exc:
            raise AuthError(f"resume token is malformed: {exc}",
                            ErrorCode.RESUME_FAILED) from exc
        if grant.expires_at < (time.time() if now is None else now):
            raise AuthError("resume token has expired; start a new session",
                            ErrorCode.RESUME_FAILED)
        return grant
