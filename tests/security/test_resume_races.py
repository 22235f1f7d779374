"""Resume races across gateways (issue 13, open items on resume), on both transports.

1. Two takers with one token at once, on two gateways or one: before, both read the
   journal (the broker shares a queue's messages among its consumers, so each got part
   of it, or one got it all and the other waited out its takeover) and both were
   ``ready``, or neither was. Now a takeover lock serialises them: exactly one wins
   with the whole journal, the other gets ``resume_failed``.
2. A gateway that dies after its ``HELD`` mark and before its ``ready``: the broker
   returns the mark with the journal, and the client, which never got the new token,
   resumes with the one it has. Before, the mark carried the generation of a token
   nobody received, and that resume was refused (4040) for good. The mark before
   ``ready`` still carries the token it was given, so older tokens stay out even when
   the journal's other evidence of it was acked by the dead taker.
3. A taker whose broker connection drops mid-takeover and comes back (RabbitMQ's robust
   connection): the broker deleted the takeover lock with the connection, and the
   restored consumer went on reading the journal, so another taker could read it beside
   it. Before, the takeover went on to ``ready`` as if it still held the lock, and its
   own gateway's stale record of the lock refused the next takeover there. Now it fails
   retryably (``broker_unavailable``), hands the journal back, and the lock is free.

A gateway's transport is wrapped to hold a step (``Overlapping``) or to drop its broker
connection at a step (``DiesAfterMark``, ``DropsMidTakeover``): the point of each race is
reached by waiting on events, never on time."""

from __future__ import annotations

import asyncio
import weakref
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from audiostream.envelope import Control, decode_reply_queue_message
from audiostream.errors import ErrorCode, TransportError
from audiostream.gateway import create_key
from audiostream.gateway.pipeline import HELD
from audiostream.protocol import ResumeRequest, start_json
from audiostream.testing import Embedded, eventually
from audiostream.transport.base import Delivery, Handler, LockToken, Subscription, Transport
from audiostream.transport.rabbitmq import RabbitTransport
from tests.gateway.conftest import (
    TLS,
    ServerFactory,
    expect_close,
    make_server,  # noqa: F401  (the two-transport fixture)
    read_json,
)
from tests.security.conftest import FMT, Wrapped, shared_gateways

pytestmark = pytest.mark.integration
N = 5


def chunk(i: int) -> bytes:
    return bytes([i + 1, 0]) * 320


def gateways(make_server: ServerFactory, keys: Path, count: int = 2  # noqa: F811
             ) -> list[Any]:
    """Gateways sharing a broker and a token secret. The takeover wait is 10 s: long
    enough never to decide these tests on a loaded machine, short enough that the old
    code's loser (which waited it out and then said ``ready``) fails by assertion."""
    return shared_gateways(make_server, keys, takeover_s=10.0, count=count)


async def receives_the_journal(ws: aiohttp.ClientWebSocketResponse) -> None:
    """The N answers of ``detached_with_journal``, in order (first sent, or replayed)."""
    for i in range(N):
        msg = await ws.receive(timeout=10)
        assert msg.type is aiohttp.WSMsgType.BINARY and msg.data == chunk(i), (i, msg)


async def goes_on(ws: aiohttp.ClientWebSocketResponse) -> None:
    """A resumed session takes and answers the next chunk."""
    await ws.send_bytes(chunk(N))
    msg = await ws.receive(timeout=10)
    assert msg.type is aiohttp.WSMsgType.BINARY and msg.data == chunk(N)


async def detached_with_journal(http: aiohttp.ClientSession, gw: Embedded, tls: TLS,
                                key: str) -> tuple[str, str]:
    """A session on ``gw`` answered N chunks that the client never acked, then its link
    dropped: (session id, generation 0's token)."""
    ws = await http.ws_connect(gw.url, ssl=tls.client)
    await ws.send_str(start_json(key, FMT, ["passthrough"]))
    ready = await read_json(ws)
    for i in range(N):
        await ws.send_bytes(chunk(i))
    await receives_the_journal(ws)
    await ws.close()
    assert await eventually(lambda: not gw.gateway.holders)  # the journal is back
    return str(ready["session_id"]), str(ready["token"])


class Takers:
    """The takeovers of one session seen so far, each known by its task (a gateway runs
    every takeover in a task of its own)."""

    def __init__(self, queue: str) -> None:
        self.queue = queue
        # Weak: a finished takeover's task (its exception's traceback) must not keep the
        # session's objects alive past the test (test_pipeline.py counts them).
        self._tasks: weakref.WeakSet[asyncio.Task[Any]] = weakref.WeakSet()
        self._count = 0
        self._changed = asyncio.Event()

    def began(self) -> None:
        task = asyncio.current_task()
        if task is not None and task not in self._tasks:
            self._tasks.add(task)
            self._count += 1
            self._changed.set()

    async def two_began(self) -> None:
        while self._count < 2:
            self._changed.clear()
            await self._changed.wait()


class Overlapping:
    """A gateway's transport that holds a takeover's consume of the session's reply queue
    (its reading of the journal) until two takeovers have begun (asked a transport
    anything about the session), so that they overlap."""

    def __init__(self, inner: Transport, takers: Takers) -> None:
        self._inner = inner
        self._takers = takers

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._inner, name)
        if not asyncio.iscoroutinefunction(attr):
            return attr

        async def call(*args: Any, **kw: Any) -> Any:
            if args and isinstance(args[0], str) and args[0].startswith(self._takers.queue):
                self._takers.began()
            return await attr(*args, **kw)

        return call

    async def consume_replies(self, name: str, handler: Handler, **kw: Any) -> Subscription:
        if name == self._takers.queue:
            self._takers.began()
            await self._takers.two_began()
        return await self._inner.consume_replies(name, handler, **kw)


async def first_answer(ws: aiohttp.ClientWebSocketResponse, key: str, token: str
                       ) -> dict[str, object]:
    await ws.send_str(start_json(key, FMT, ["passthrough"], resume=ResumeRequest(token, 0)))
    return await read_json(ws)


@pytest.mark.parametrize("where", ["two gateways", "one gateway"])
async def test_two_takers_with_one_token_at_once_one_wins_with_the_whole_journal(
    make_server: ServerFactory, tls: TLS, tmp_path: Path, where: str  # noqa: F811
) -> None:
    keys = tmp_path / "keys.json"
    key, _ = create_key(keys, "tenant")
    a, b = gateways(make_server, keys)
    async with a as gw_a, b as gw_b, aiohttp.ClientSession() as http:
        session_id, token = await detached_with_journal(http, gw_a, tls, key)
        takers = Takers(gw_a.gateway.transport.topology.reply_queue(session_id))
        for gw in (gw_a, gw_b):
            gw.gateway.transport = Overlapping(gw.gateway.transport, takers)  # type: ignore[assignment]
        second = gw_b if where == "two gateways" else gw_a
        ws_a = await http.ws_connect(gw_a.url, ssl=tls.client)
        ws_b = await http.ws_connect(second.url, ssl=tls.client)
        answers = await asyncio.gather(first_answer(ws_a, key, token),
                                       first_answer(ws_b, key, token))
        kinds = sorted(str(m["type"]) for m in answers)
        assert kinds == ["error", "ready"], answers
        (winner, ready), (loser, error) = sorted(zip((ws_a, ws_b), answers, strict=True),
                                                 key=lambda p: p[1]["type"] != "ready")
        assert error["code"] == ErrorCode.RESUME_FAILED, error
        await expect_close(loser, ErrorCode.RESUME_FAILED)
        # The winner replays every outcome of the journal: none went to the loser.
        assert ready["resume_from"] == N, ready
        await receives_the_journal(winner)
        await goes_on(winner)
        await winner.close()


class DiesAfterMark(Wrapped):
    """A gateway's transport whose broker connection drops (as when the gateway dies)
    right after its resumed session's ``HELD`` mark reached the journal, before the
    session's ``ready``: the broker takes back the journal and the unacked mark."""

    def __init__(self, inner: Transport) -> None:
        super().__init__(inner)
        self.died = asyncio.Event()

    async def publish_reply(self, queue: str, body: bytes) -> bool:
        ok = await self._inner.publish_reply(queue, body)
        msg = decode_reply_queue_message(body)
        if isinstance(msg, Control) and msg.command == HELD and not self.died.is_set():
            await self._inner.close()
            self.died.set()
            raise TransportError("the gateway died")
        return ok


async def test_a_gateway_dying_between_its_held_mark_and_ready_leaves_the_token_valid(
    make_server: ServerFactory, tls: TLS, tmp_path: Path  # noqa: F811
) -> None:
    keys = tmp_path / "keys.json"
    key, _ = create_key(keys, "tenant")
    a, b = gateways(make_server, keys)
    async with a as gw_a, b as gw_b, aiohttp.ClientSession() as http:
        _, token = await detached_with_journal(http, gw_a, tls, key)
        dying = DiesAfterMark(gw_a.gateway.transport)
        gw_a.gateway.transport = dying  # type: ignore[assignment]
        async with http.ws_connect(gw_a.url, ssl=tls.client) as ws:
            answer = await first_answer(ws, key, token)
            assert answer["type"] == "error", answer  # no ready: no new token
        assert dying.died.is_set()
        # The client resumes elsewhere with the only token it has, and gets the journal.
        async with http.ws_connect(gw_b.url, ssl=tls.client) as ws:
            ready = await first_answer(ws, key, token)
            assert ready["type"] == "ready" and ready["resume_from"] == N, ready
            await receives_the_journal(ws)
            await goes_on(ws)


async def test_a_mark_before_ready_keeps_older_tokens_out_after_two_deaths(
    make_server: ServerFactory, tls: TLS, tmp_path: Path  # noqa: F811
) -> None:
    """Why the mark before ``ready`` is not dropped: generation 1 holds the session on A,
    A dies (its mark of generation 1 goes back to the queue); B takes the session over
    with generation 1's token, acks that dead holder's mark, and dies after its own mark
    and before ``ready``. The journal must still say that generation 1 was issued: the
    stale generation-0 token is refused on C, and generation 1's token resumes there with
    the whole journal."""
    keys = tmp_path / "keys.json"
    key, _ = create_key(keys, "tenant")
    a, b, c = gateways(make_server, keys, 3)
    async with a as gw_a, b as gw_b, aiohttp.ClientSession() as http:
        session_id, old_token = await detached_with_journal(http, gw_a, tls, key)
        holder = await http.ws_connect(gw_a.url, ssl=tls.client)
        ready = await first_answer(holder, key, old_token)
        assert ready["type"] == "ready" and ready["resume_from"] == N, ready
        new_token = str(ready["token"])
        pl = gw_a.gateway.holders[session_id].pipeline
        assert pl is not None
        assert await eventually(lambda: pl.marked == 1)
        await gw_a.gateway.transport.close()  # A dies
        dying = DiesAfterMark(gw_b.gateway.transport)
        gw_b.gateway.transport = dying  # type: ignore[assignment]
        async with http.ws_connect(gw_b.url, ssl=tls.client) as ws:
            answer = await first_answer(ws, key, new_token)
            assert answer["type"] == "error", answer
        assert dying.died.is_set()  # B died after its mark, before its ready
        async with c as gw_c:
            async with http.ws_connect(gw_c.url, ssl=tls.client) as ws:
                refused = await first_answer(ws, key, old_token)
                assert refused["type"] == "error", refused
                assert refused["code"] == ErrorCode.RESUME_FAILED, refused
            async with http.ws_connect(gw_c.url, ssl=tls.client) as ws:
                ready = await first_answer(ws, key, new_token)
                assert ready["type"] == "ready" and ready["resume_from"] == N, ready
                await receives_the_journal(ws)
        await holder.close()


class DropsMidTakeover(Wrapped):
    """A gateway's RabbitMQ transport whose broker connection drops as soon as a takeover
    began consuming the session's reply queue (its journal), and comes back: the broker
    deletes the takeover lock and requeues the journal. The transport must not restore
    the taker's consumer, which would read the journal beside the lock's next holder.

    ``unseen``: the taker sees none of the journal before the drop (its deliveries are
    withheld, and the broker requeues them with the connection), so nothing it reads
    can end its wait: only the news of the lost lock can."""

    def __init__(self, inner: RabbitTransport, queue: str, *, unseen: bool = False) -> None:
        super().__init__(inner)
        self._queue = queue
        self._unseen = unseen
        self.dropped = asyncio.Event()

    async def consume_replies(self, name: str, handler: Handler, **kw: Any) -> Subscription:
        if name == self._queue and self._unseen:
            real = handler

            async def handler(delivery: Delivery) -> None:
                if self.dropped.is_set():
                    await real(delivery)

        subscription = await self._inner.consume_replies(name, handler, **kw)
        if name == self._queue and not self.dropped.is_set():
            self.dropped.set()
            robust = self._inner._connection
            assert robust is not None and robust.transport is not None
            dropped = robust.transport.connection
            earlier = self._inner._restore_task
            await dropped.close(ConnectionError("dropped by the test"))

            async def restore_ran() -> bool:
                """Connected again, and the restore that follows the drop has finished."""
                now, task = robust.transport, self._inner._restore_task
                return (now is not None and now.connection is not dropped
                        and self._inner.is_connected
                        and task is not None and task is not earlier and task.done())

            assert await eventually(restore_ran)
            stats = await self._inner.reply_queue_stats(self._queue)
            assert stats is not None and stats[1] == 0, stats  # the taker's is not back
        return subscription


@pytest.mark.parametrize("transport_kind",
                         [pytest.param("rabbitmq", marks=pytest.mark.rabbitmq)])
@pytest.mark.parametrize("unseen", [False, True], ids=["after-reading", "before-reading"])
async def test_a_takeover_whose_broker_connection_drops_fails_retryably_and_loses_nothing(
    make_server: ServerFactory, tls: TLS, tmp_path: Path, unseen: bool  # noqa: F811
) -> None:
    keys = tmp_path / "keys.json"
    key, _ = create_key(keys, "tenant")
    # The takeover wait far beyond the answer's 30 s receive timeout: the loss must end
    # the takeover when the transport learns of it (the reconnect), not the wait.
    a, b = shared_gateways(make_server, keys, takeover_s=600.0)
    async with a as gw_a, b as gw_b, aiohttp.ClientSession() as http:
        session_id, token = await detached_with_journal(http, gw_a, tls, key)
        inner = gw_a.gateway.transport
        assert isinstance(inner, RabbitTransport)
        queue = inner.topology.reply_queue(session_id)
        dropping = DropsMidTakeover(inner, queue, unseen=unseen)
        gw_a.gateway.transport = dropping  # type: ignore[assignment]
        async with http.ws_connect(gw_a.url, ssl=tls.client) as ws:
            answer = await first_answer(ws, key, token)
            assert dropping.dropped.is_set()
            # Not ready on a journal another taker may have shared: a retryable error.
            assert answer["type"] == "error", answer
            assert answer["code"] == ErrorCode.BROKER_UNAVAILABLE, answer
            assert answer["retryable"] is True, answer
            await expect_close(ws, ErrorCode.BROKER_UNAVAILABLE)
        gw_a.gateway.transport = inner
        # The lock is free: for the gateway that lost it (no stale record of its own) and
        # for another.
        lock = f"{queue}.lock"
        for gw in (gw_a, gw_b):
            taken = await gw.gateway.transport.try_lock(lock)
            assert isinstance(taken, LockToken), (gw.url, taken)
            await gw.gateway.transport.unlock(taken)
        # The same token resumes with the whole journal, every reply once, and goes on.
        async with http.ws_connect(gw_b.url, ssl=tls.client) as ws:
            ready = await first_answer(ws, key, token)
            assert ready["type"] == "ready" and ready["resume_from"] == N, ready
            await receives_the_journal(ws)
            await goes_on(ws)
