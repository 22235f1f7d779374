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
from collections.abc import Callable, Collection, Sequence
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


def load_records(path: Path, *, must_exist: bool = False) -> dict[str, KeyRecord]:
    """The records of a keys file; a missing file is empty unless ``must_exist``.

    The gateway treats a missing file as "no keys yet" (a secret may be mounted later);
    ``keys list`` and ``keys revoke`` on a mistyped path must say so instead.
    """
    if not path.exists():
        if must_exist:
            raise ConfigError(f"keys file {str(path)!r} does not exist "
                              "(create one with 'audiostream keys create NAME --keys-file ...')")
        return {}
    if path.is_dir():
        raise ConfigError(f"keys file {str(path)!r} is a directory")
    try:
        data = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as exc:
        raise ConfigError(f"keys file {str(path)!r} is not valid JSON: {exc}") from exc
    if not isinstance(data, dict) or not isinstance(data.get("keys", []), list):
        raise ConfigError(f"keys file {str(path)!r} must be an object with a 'keys' list")
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
    known_steps: Collection[str] | None = None,
) -> tuple[str, KeyRecord]:
    """Add a key to the file; return the key (shown once) and its record.

    Names are unique, so that ``revoke NAME`` means one key. ``known_steps`` (the
    processor registry's names) catches a misspelt ``pipelines`` entry now rather than
    as a puzzling ``forbidden`` on the client's first session.
    """
    if not name.strip():
        raise ConfigError("a key needs a non-empty name")
    if max_sessions is not None and max_sessions < 1:
        raise ConfigError(f"max_sessions must be >= 1, got {max_sessions}")
    if pipelines is not None and known_steps is not None:
        unknown = [p for p in pipelines if p not in known_steps]
        if unknown:
            raise ConfigError(
                f"unknown processing step(s) {', '.join(map(repr, unknown))}; "
                f"available: {', '.join(sorted(known_steps))}", ErrorCode.UNKNOWN_STEP)
    records = load_records(path)
    clash = [r for r in records.values() if r.name == name]
    if clash:
        raise ConfigError(f"a key named {name!r} already exists (id {clash[0].id}); "
                          "choose another name or revoke it first")
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
    """Revoke exactly one key: by id, else by name; an ambiguous name is refused.

    Files written before names were unique may hold several keys with one name:
    those are revoked by id.
    """
    records = load_records(path, must_exist=True)
    if key_id_or_name in records:
        matches = [records[key_id_or_name]]
    else:
        matches = [r for r in records.values() if r.name == key_id_or_name]
    if not matches:
        raise ConfigError(f"no key with id or name {key_id_or_name!r} in {str(path)!r}")
    if len(matches) > 1:
        ids = ", ".join(r.id for r in matches)
        raise ConfigError(f"{len(matches)} keys are named {key_id_or_name!r} (ids {ids}); "
                          "revoke one by its id")
    rec = matches[0]
    revoked = KeyRecord(**{**asdict(rec), "revoked": True, "pipelines": rec.pipelines})
    records[rec.id] = revoked
    save_records(path, list(records.values()))
    return revoked


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
