"""Revoking a key ends its live sessions, not only its future ones (issue #13, hole 4).

``KeyStore.verify`` refuses a revoked key at ``start``, but a session that was
already streaming kept running and kept receiving fresh resume tokens. This
module re-reads the keys file (``KeyStore.records`` reloads it when its
modification time changes) every ``interval_s`` and fails every live session
whose key is revoked, or gone from a keys file that was read successfully,
with ``key_revoked`` (4014). Token refresh asks ``allows`` first, so no token
is issued to a revoked key even between two sweeps.

A keys file that is missing or unreadable does not end sessions (new ``start``s
are refused by ``KeyStore`` in that case anyway): a half-written Secret must not
hang up every call on the gateway.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Iterable
from typing import Protocol

from audiostream.errors import AuthError, ConfigError, ErrorCode
from audiostream.gateway.keys import KeyRecord, KeyStore
from audiostream.protocol import ServerProtocol, State

log = logging.getLogger(__name__)

#: States in which a session holds broker resources on behalf of its key.
_LIVE = frozenset({State.STREAMING, State.STOPPING, State.DRAINING})


class LiveSession(Protocol):
    """What the watcher needs of a gateway connection."""

    @property
    def key(self) -> KeyRecord | None: ...

    @property
    def proto(self) -> ServerProtocol: ...

    def kick(self) -> None: ...


class RevocableCall(Protocol):
    """What the watcher needs of a telephony call (``gateway/telephony.py``)."""

    @property
    def key(self) -> KeyRecord | None: ...

    def revoke(self, err: AuthError) -> bool:
        """End the call with ``err``'s code; False if it was not live."""
        ...


class KeyRevocation:
    """Owns the re-check task; ``sweep`` and ``allows`` are also callable directly."""

    def __init__(
        self,
        keys: KeyStore,
        sessions: Callable[[], Iterable[LiveSession]],
        *,
        interval_s: float = 1.0,
    ) -> None:
        self.keys = keys
        self.sessions = sessions
        self.calls: Callable[[], Iterable[RevocableCall]] = tuple
        """Telephony calls, which the telephony routes plug in: a revoked key ends them
        too (they are sessions on another wire)."""
        self.interval_s = interval_s
        self.ended = 0
        """Sessions ended because their key was revoked (for tests and logs)."""
        self._task: asyncio.Task[None] | None = None
        self._unreadable = False

    def start(self) -> None:
        if self.interval_s > 0 and self.keys.path is not None and self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(),
                                                                name="key-revocation")

    async def close(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)  # a poll period, not a synchronisation
            self.sweep()

    def _current(self) -> dict[str, KeyRecord] | None:
        """The keys as the file says now, or None when it cannot be trusted to revoke."""
        path = self.keys.path
        try:
            records = {r.id: r for r in self.keys.records()}
            if path is not None and not path.exists():
                raise ConfigError(f"keys file {path} is missing")
        except ConfigError as err:
            if not self._unreadable:
                log.warning("stage=keys: cannot re-check keys, live sessions keep running: %s",
                            err)
            self._unreadable = True
            return None
        self._unreadable = False
        return records

    def revoked(self, key: KeyRecord, current: dict[str, KeyRecord] | None) -> bool:
        if current is None or key.id in self.keys.extra:
            return False
        now = current.get(key.id)
        return now is None or now.revoked

    def _end(self, session: LiveSession, key: KeyRecord) -> None:
        session.proto.fail(AuthError(f"API key {key.id} was revoked; the session ends",
                                     ErrorCode.KEY_REVOKED))
        session.kick()
        self.ended += 1

    def sweep(self) -> int:
        """End every live session of a revoked key; returns how many were ended."""
        current = self._current()
        if current is None:
            return 0
        ended: dict[str, int] = {}
        for session in list(self.sessions()):
            key = session.key
            if key is None or session.proto.state not in _LIVE:
                continue
            if self.revoked(key, current):
                self._end(session, key)
                ended[key.id] = ended.get(key.id, 0) + 1
        for call in list(self.calls()):
            key = call.key
            if key is not None and self.revoked(key, current) and call.revoke(AuthError(
                    f"API key {key.id} was revoked; the call ends", ErrorCode.KEY_REVOKED)):
                self.ended += 1
                ended[key.id] = ended.get(key.id, 0) + 1
        for key_id, n in ended.items():
            log.warning("stage=keys key=%s: key revoked; ended %d live session(s) with %d",
                        key_id, n, int(ErrorCode.KEY_REVOKED))
        return sum(ended.values())

    def allows(self, session: LiveSession) -> bool:
        """Before a token is issued: False (and the session ended) if its key is revoked."""
        key = session.key
        if key is None:
            return True
        if self.revoked(key, self._current()):
            if session.proto.state in _LIVE:
                self._end(session, key)
            return False
        return True
