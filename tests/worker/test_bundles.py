"""A worker serving bundles of many sessions, on both transports."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import replace

import msgpack
import numpy as np
from prometheus_client import CollectorRegistry

from audiostream.audio import AudioFormat, Encoding
from audiostream.envelope import (
    Reply,
    ReplyStatus,
    Step,
    WorkEnvelope,
    decode_reply,
    encode_work_bundle,
)
from audiostream.errors import TransportError
from audiostream.metrics import WorkerMetrics
from audiostream.topology import Topology
from audiostream.transport import MemoryBroker, MemoryTransport, Transport
from audiostream.worker import Worker, WorkerSettings
from tests.conftest import DeadLetters, TransportFactory
from tests.transport.helpers import Inbox, eventually

FMT = AudioFormat(Encoding.PCM_S16LE, 16000, 1)


def envelope(t: Transport, name: str, pipeline: tuple[Step, ...]) -> WorkEnvelope:
    now = time.time()
    pcm = (np.arange(320, dtype=np.int16) * (len(name) + 1)).tobytes()
    return WorkEnvelope(
        session_id=name, msg_id=1, seq=0, chunk_frames=(320,), received_at=now,
        deadline=now + 30, format=FMT, output_format=FMT, audio=pcm, pipeline=pipeline,
        step_index=0, reply_to=t.topology.reply_queue(name),
    )


async def replies_for(t: Transport, names: list[str]) -> dict[str, Inbox]:
    inboxes = {}
    for name in names:
        queue = t.topology.reply_queue(name)
        await t.declare_reply_queue(queue)
        inboxes[name] = Inbox()
        await t.consume_replies(queue, inboxes[name])
    return inboxes


async def test_a_bad_item_costs_only_its_own_session_and_the_bundle_is_acked(
    transport_factory: TransportFactory, dead_letters: DeadLetters,
) -> None:
    gw = await transport_factory()
    await gw.declare()
    names = ["alpha", "bravo", "charlie"]
    inboxes = await replies_for(gw, names)
    envs = [envelope(gw, n, (Step("passthrough"),)) for n in names]
    body = msgpack.unpackb(encode_work_bundle(envs), raw=False)
    body["items"][1]["pcm"] = "not audio bytes"
    worker = Worker(await transport_factory(), WorkerSettings(processing=("passthrough",)))
    await worker.start()
    try:
        await gw.publish_work("passthrough", 0, msgpack.packb(body, use_bin_type=True), ttl=30)
        for name, env in ((n, e) for n, e in zip(names, envs, strict=True) if n != "bravo"):
            (delivery,) = await inboxes[name].wait_for(1)
            reply = decode_reply(delivery.body)
            assert reply.status is ReplyStatus.OK
            assert reply.session_id == name
            assert reply.audio == env.audio  # passthrough: bit-identical
    finally:
        await worker.stop()
    assert inboxes["bravo"].bodies == []
    assert worker.handled == 2
    # Acked, not left unacked (stopping would have returned it) nor dead-lettered.
    assert await gw.work_queue_depth("passthrough") == 0
    assert await dead_letters() == []


async def test_a_bundle_with_nothing_usable_is_dead_lettered(
    transport_factory: TransportFactory, dead_letters: DeadLetters,
) -> None:
    gw = await transport_factory()
    await gw.declare()
    body = {"k": "b", "v": 1, "items": [{"k": "w", "v": 1, "sid": 3}]}
    worker = Worker(await transport_factory(), WorkerSettings(processing=("passthrough",)))
    await worker.start()
    try:
        await gw.publish_work("passthrough", 1, msgpack.packb(body), ttl=30)
        got: list[tuple[str, bytes]] = []

        async def dead() -> bool:
            got.extend(await dead_letters())
            return bool(got)

        await eventually(dead)
    finally:
        await worker.stop()
    assert [reason for reason, _ in got] == ["rejected"]


async def test_results_for_the_next_step_travel_in_bundles_too(
    transport_factory: TransportFactory,
) -> None:
    gw = await transport_factory()
    await gw.declare()
    names = [f"s{i}" for i in range(12)]
    inboxes = await replies_for(gw, names)
    pipeline = (Step("gain", {"db": 0.0}), Step("passthrough"))
    envs = [envelope(gw, n, pipeline) for n in names]
    registry = CollectorRegistry()
    worker = Worker(await transport_factory(),
                    WorkerSettings(processing=("gain", "passthrough")),
                    metrics=WorkerMetrics(registry))
    await worker.start()
    try:
        await gw.publish_work("gain", 0, encode_work_bundle(envs), ttl=30)
        for name, env in zip(names, envs, strict=True):
            (delivery,) = await inboxes[name].wait_for(1)
            reply: Reply = decode_reply(delivery.body)
            assert reply.status is ReplyStatus.OK
            assert reply.audio == env.audio  # 0 dB gain then passthrough
    finally:
        await worker.stop()

    def deliveries(step: str) -> float:
        value = registry.get_sample_value("audiostream_worker_bundle_size_count",
                                          {"processing": step})
        return value or 0.0

    assert deliveries("gain") == 1
    assert 1 <= deliveries("passthrough") < len(names)  # forwarded as bundles, not one by one
    assert registry.get_sample_value("audiostream_worker_bundle_size_sum",
                                     {"processing": "passthrough"}) == len(names)


async def test_an_expired_item_gets_an_expired_reply_and_its_neighbours_their_audio(
    transport_factory: TransportFactory, dead_letters: DeadLetters,
) -> None:
    """The bundle lives as long as its longest-lived item; the worker expires the others
    one by one, each with an explicit reply, never late audio."""
    gw = await transport_factory()
    await gw.declare()
    inboxes = await replies_for(gw, ["late", "live"])
    late = replace(envelope(gw, "late", (Step("passthrough"),)), deadline=time.time() - 1.0)
    live = envelope(gw, "live", (Step("passthrough"),))
    worker = Worker(await transport_factory(), WorkerSettings(processing=("passthrough",)))
    await worker.start()
    try:
        await gw.publish_work("passthrough", 0, encode_work_bundle([late, live]), ttl=30)
        (expired,) = await inboxes["late"].wait_for(1)
        (served,) = await inboxes["live"].wait_for(1)
    finally:
        await worker.stop()
    late_reply, live_reply = decode_reply(expired.body), decode_reply(served.body)
    assert late_reply.status is ReplyStatus.EXPIRED
    assert late_reply.audio == b""
    assert live_reply.status is ReplyStatus.OK
    assert live_reply.audio == live.audio
    assert await dead_letters() == []


async def test_a_reply_queue_that_is_gone_costs_nobody_else_and_the_bundle_is_acked(
    transport_factory: TransportFactory, dead_letters: DeadLetters,
) -> None:
    """The batch's replies go out in one publish; one session whose queue expired (its
    client left) must not hold back the others' replies or the bundle's ack."""
    gw = await transport_factory()
    await gw.declare()
    inboxes = await replies_for(gw, ["first", "third"])
    envs = [envelope(gw, n, (Step("passthrough"),)) for n in ("first", "left", "third")]
    worker = Worker(await transport_factory(), WorkerSettings(processing=("passthrough",)))
    await worker.start()
    try:
        await gw.publish_work("passthrough", 0, encode_work_bundle(envs), ttl=30)
        (first,) = await inboxes["first"].wait_for(1)
        (third,) = await inboxes["third"].wait_for(1)

        async def all_handled() -> bool:
            return worker.handled == 3

        await eventually(all_handled)
    finally:
        await worker.stop()
    assert decode_reply(first.body).audio == envs[0].audio
    assert decode_reply(third.body).audio == envs[2].audio
    assert await gw.work_queue_depth("passthrough") == 0
    assert await dead_letters() == []


class _RefusesOneReply(MemoryTransport):
    """The broker refuses the reply to one queue (as a ``basic.nack`` would)."""

    refused = ""

    async def publish_replies(
        self, replies: Sequence[tuple[str, bytes]]
    ) -> list[bool | TransportError]:
        outcomes = await super().publish_replies(
            [(q, b) for q, b in replies if q != self.refused])
        sent = iter(outcomes)
        return [TransportError("refused by the test") if q == self.refused else next(sent)
                for q, _ in replies]


async def test_a_refused_reply_leaves_its_bundle_unacked_for_redelivery() -> None:
    broker = MemoryBroker()
    topology = Topology(processing_types=("passthrough",))
    gw = MemoryTransport(broker, topology)
    worker_transport = _RefusesOneReply(broker, topology)
    await gw.connect()
    await worker_transport.connect()
    await gw.declare()
    inboxes = await replies_for(gw, ["kept", "refused"])
    worker_transport.refused = topology.reply_queue("refused")
    envs = [envelope(gw, n, (Step("passthrough"),)) for n in ("kept", "refused")]
    registry = CollectorRegistry()
    worker = Worker(worker_transport, WorkerSettings(processing=("passthrough",)),
                    metrics=WorkerMetrics(registry))
    await worker.start()
    try:
        await gw.publish_work("passthrough", 0, encode_work_bundle(envs), ttl=30)
        await inboxes["kept"].wait_for(1)

        def transport_errors() -> float:
            return registry.get_sample_value(
                "audiostream_worker_errors_total",
                {"processing": "passthrough", "kind": "transport"}) or 0.0

        async def counted() -> bool:
            return transport_errors() == 1.0

        await eventually(counted)
    finally:
        await worker.stop()
        await worker_transport.close()
    assert worker.handled == 1
    assert inboxes["refused"].bodies == []
    # Unacked, so closing gave it back: another worker will serve both sessions again
    # (the kept session's gateway discards the duplicate by message id).
    assert await gw.work_queue_depth("passthrough") == 1
    await gw.close()
