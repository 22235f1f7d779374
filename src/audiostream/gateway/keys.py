"""API keys: stored only as SHA-256 hashes, compared in constant time, reloaded on change.

A key looks like ``as_<id>_<secret>``. The id is public and indexes the file;
only ``sha256(secret)`` is stored. The file may be a mounted Kubernetes secret:
it is re-read whenever its modification time changes.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import secrets
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from audiostream.errors import AuthError, ConfigError, ErrorCode

KEY_PREFIX = "as"


@dataclass(frozen=True, slots=True)
class KeyRecord:
    id: str
    name: str
    sha256: str
    created: float
    revoked: bool = False
    max_sessions: int | None = None
    pipelines: tuple[str, ...] | None = None
    """Processing types the key may use; None means all."""

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["pipelines"] = list(self.pipelines) if self.pipelines is not None else None
        return d

    @classmethod
    def from_json(cls, raw: Any) -> KeyRecord:
        try:
            pipelines = raw.get("pipelines")
            return cls(
                id=str(raw["id"]),
                name=str(raw["name"]),
                sha256=str(raw["sha256"]),
                created=float(raw.get("created", 0)),
                revoked=bool(raw.get("revoked", False)),
                max_sessions=raw.get("max_sessions"),
                pipelines=tuple(pipelines) if pipelines is not None else None,
            )
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise ConfigError(f"bad key record {raw!r}: {exc}") from exc


def _hash(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def _split(key: str) -> tuple[str, str]:
    parts = key.split("_")
    if len(parts) != 3 or parts[0] != KEY_PREFIX or not parts[1] or not parts[2]:
        raise AuthError("malformed API key", ErrorCode.AUTH_FAILED)
    return parts[1], parts[2]


def load_records(path: Path) -> dict[str, KeyRecord]:
    if not path.exists():
        return {}
    try:
        data = json.loads(path.read_text())
    except ValueError as exc:
        raise ConfigError(f"keys file {path} is not valid JSON: {exc}") from exc
    records = [KeyRecord.from_json(r) for r in data.get("keys", [])]
    return {r.id: r for r in records}


def save_records(path: Path, records: Sequence[KeyRecord]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps({"keys": [r.to_json() for r in records]}, indent=2) + "\n")
    os.chmod(tmp, 0o600)
    tmp.replace(path)


def create_key(
    path: Path,
    name: str,
    *,
    max_sessions: int | None = None,
    pipelines: Sequence[str] | None = None,
) -> tuple[str, KeyRecord]:
    """Add a key to the file; return the key (shown once) and its record."""
    records = load_records(path)
    key_id = secrets.token_hex(6)
    secret = secrets.token_urlsafe(24).replace("_", "-")
    record = KeyRecord(
        id=key_id,
        name=name,
        sha256=_hash(secret),
        created=time.time(),
        max_sessions=max_sessions,
        pipelines=tuple(pipelines) if pipelines else None,
    )
    records[key_id] = record
    save_records(path, list(records.values()))
    return f"{KEY_PREFIX}_{key_id}_{secret}", record


def revoke_key(path: Path, key_id_or_name: str) -> KeyRecord:
    records = load_records(path)
    for rid, rec in records.items():
        if key_id_or_name in (rid, rec.name):
            revoked = KeyRecord(**{**asdict(rec), "revoked": True, "pipelines": rec.pipelines})
            records[rid] = revoked
            save_records(path, list(records.values()))
            return revoked
    raise ConfigError(f"no key with id or name {key_id_or_name!r} in {path}")


@dataclass
class KeyStore:
    """Verifies keys against a keys file, re-reading it when it changes."""

    path: Path | None
    _records: dict[str, KeyRecord] = field(default_factory=dict)
    _mtime: float | None = None
    extra: dict[str, KeyRecord] = field(default_factory=dict)
    """Keys added in memory (the embedded server's development key)."""
    token_verifiers: dict[str, Callable[[str], KeyRecord]] = field(default_factory=dict)
    """Other credentials by prefix (``bt1.``: browser tokens, gateway/browser.py)."""

    def reload_if_changed(self) -> None:
        if self.path is None:
            return
        try:
            mtime = self.path.stat().st_mtime_ns
        except FileNotFoundError:
            self._records, self._mtime = {}, None
            return
        if mtime != self._mtime:
            self._records = load_records(self.path)
            self._mtime = mtime

    def add_in_memory(self, name: str) -> str:
        key_id = secrets.token_hex(6)
        secret = secrets.token_urlsafe(24).replace("_", "-")
        self.extra[key_id] = KeyRecord(key_id, name, _hash(secret), time.time())
        return f"{KEY_PREFIX}_{key_id}_{secret}"

    def verify(self, key: str) -> KeyRecord:
        for prefix, verifier in self.token_verifiers.items():
            if key.startswith(prefix):
                return verifier(key)
        self.reload_if_changed()
        key_id, secret = _split(key)
        record = self._records.get(key_id) or self.extra.get(key_id)
        # Compare against a dummy hash when the id is unknown, so timing does not
        # reveal which ids exist.
        expected = record.sha256 if record else _hash("unknown-key-id")
        if not hmac.compare_digest(_hash(secret), expected) or record is None:
            raise AuthError("invalid API key", ErrorCode.AUTH_FAILED)
        if record.revoked:
            raise AuthError(f"API key {key_id} has been revoked", ErrorCode.FORBIDDEN)
        return record

    def records(self) -> list[KeyRecord]:
        self.reload_if_changed()
        return [*self._records.values(), *self.extra.values()]
