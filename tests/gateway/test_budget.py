"""The gateway-wide load budget: pure, clock injected (no I/O, no sleeps); and once in
a gateway on RabbitMQ."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import numpy as np
import pytest

from audiostream.audio import AudioFormat, Encoding
from audiostream.client import AudioStreamClient
from audiostream.gateway import GatewaySettings
from audiostream.gateway.budget import BudgetPolicy, LoadBudget
from audiostream.gateway.coalescer import CoalescePolicy, Coalescer
from audiostream.testing import eventually
from tests.gateway.conftest import TLS, ServerFactory

FMT = AudioFormat(Encoding.PCM_S16LE, 16000, 1)

PERIOD = 0.25


def feed(budget: LoadBudget, rate: float, samples: int, t: float = 0.0,
         lag: float = 0.0) -> float:
    """``samples`` sampling periods at ``rate`` chunks/s; returns the time after them."""
    if t == 0.0:
        budget.sample(t)
    for _ in range(samples):
        for _ in range(round(rate * PERIOD)):
            budget.note_chunk()
        t += PERIOD
        budget.sample(t, lag)
    return t


def test_idle_and_light_load_keep_the_floor_at_one() -> None:
    b = LoadBudget(BudgetPolicy(coalesce_above=1000))
    assert b.floor == 1
    feed(b, 0, 10)
    assert b.floor == 1
    light = LoadBudget(BudgetPolicy(coalesce_above=1000))
    feed(light, 999, 20)
    assert light.floor == 1
    assert light.rate == pytest.approx(999, rel=0.01)


def test_the_floor_brings_the_message_rate_back_to_the_threshold() -> None:
    b = LoadBudget(BudgetPolicy(coalesce_above=1000, max_floor=8))
    feed(b, 2500, 20)
    assert b.floor == 3  # 2500 chunks/s in messages of 3: ~830 messages/s
    feed(b, 5000, 20, t=20 * PERIOD)
    assert b.floor == 5


def test_the_floor_is_capped() -> None:
    b = LoadBudget(BudgetPolicy(coalesce_above=100, max_floor=4))
    feed(b, 10_000, 10)
    assert b.floor == 4


def test_hysteresis_holds_the_floor_near_the_threshold_and_idle_brings_it_to_one() -> None:
    b = LoadBudget(BudgetPolicy(coalesce_above=1000, max_floor=8))
    t = feed(b, 2500, 20)
    assert b.floor == 3
    # 1900/s would fit floor 2 exactly (950/s), but not with headroom: it stays at 3.
    t = feed(b, 1900, 20, t=t)
    assert b.floor == 3
    # 1500/s fits floor 2 with headroom (1500 / 0.8 = 1875 <= 2000).
    t = feed(b, 1500, 20, t=t)
    assert b.floor == 2
    # Alternating around the threshold does not flap.
    floors = []
    for rate in (1050, 950) * 10:
        t = feed(b, rate, 1, t=t)
        floors.append(b.floor)
    assert len(set(floors)) == 1
    feed(b, 0, 20, t=t)
    assert b.floor == 1


def test_the_floor_falls_one_step_per_sample() -> None:
    b = LoadBudget(BudgetPolicy(coalesce_above=100, max_floor=4))
    t = feed(b, 10_000, 10)
    assert b.floor == 4
    for _ in range(50):  # until the moving average of the rate has come down
        t = feed(b, 0, 1, t=t)
        if b.floor < 4:
            break
    floors = [b.floor]
    for _ in range(3):
        t = feed(b, 0, 1, t=t)
        floors.append(b.floor)
    assert floors == [3, 2, 1, 1]


def test_loop_lag_raises_the_floor_at_any_rate_and_holds_it_while_lagging() -> None:
    b = LoadBudget(BudgetPolicy(coalesce_above=1000, lag_high_s=0.02, max_floor=4))
    t = feed(b, 100, 1, lag=0.05)
    assert b.floor == 2
    t = feed(b, 100, 1, t=t, lag=0.05)
    assert b.floor == 3
    t = feed(b, 100, 5, t=t, lag=0.05)
    assert b.floor == 4
    # Lag between half the threshold and the threshold: no change either way.
    t = feed(b, 100, 3, t=t, lag=0.015)
    assert b.floor == 4
    # Calm again: down one step per sample, to one.
    t = feed(b, 100, 1, t=t, lag=0.001)
    assert b.floor == 3
    feed(b, 100, 5, t=t, lag=0.001)
    assert b.floor == 1


def test_disabled_budget_never_coalesces() -> None:
    b = LoadBudget(BudgetPolicy(coalesce_above=0, lag_high_s=0.02))
    feed(b, 100_000, 10, lag=1.0)
    assert b.floor == 1
    assert not b.policy.enabled


def test_first_sample_only_starts_the_clock() -> None:
    b = LoadBudget(BudgetPolicy(coalesce_above=10))
    for _ in range(1000):
        b.note_chunk()
    assert b.sample(5.0) == 1
    assert b.rate == 0.0
    assert b.sample(5.0) == 1  # no time passed: nothing to divide by


@pytest.mark.parametrize("kwargs", [{"coalesce_above": -1}, {"lag_high_s": -0.1},
                                    {"max_floor": 0}])
def test_policy_is_validated(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        BudgetPolicy(**kwargs)  # type: ignore[arg-type]


# --- how a session's coalescer follows the floor ---------------------------------------


def streaming(co: Coalescer, t: float, n: int, gap: float = 0.02) -> float:
    for i in range(n):
        co.add(i, b"x", t)
        t += gap
    return t


def test_a_session_waits_for_the_floor_within_its_hold_limit() -> None:
    co = Coalescer(deadline_s=1.0, policy=CoalescePolicy(max_hold_s=0.045))
    t = 0.0
    for seq in range(5):  # learn the chunk interval; each goes out alone and is answered
        co.add(seq, b"x", t)
        msg = co.take(t)
        assert msg is not None and len(msg.chunks) == 1
        co.answered(msg.msg_id, t + 0.001)
        t += 0.02
    co.set_floor(8, t)
    assert co.floor == 3  # 1 + 45 ms // 20 ms: no hold beyond max_hold_s
    co.add(5, b"x", t)
    assert co.take(t) is None  # held for more
    due = co.due_at()
    assert due is not None and due - t <= 0.045 + 1e-9
    co.add(6, b"x", t + 0.02)
    assert co.take(t + 0.02) is None
    co.add(7, b"x", t + 0.04)
    msg = co.take(t + 0.04)
    assert msg is not None and [c.seq for c in msg.chunks] == [5, 6, 7]
    co.answered(msg.msg_id, t + 0.041)
    co.set_floor(1, t + 0.06)
    co.add(8, b"x", t + 0.06)
    msg = co.take(t + 0.06)
    assert msg is not None and len(msg.chunks) == 1  # floor back at one: no hold


def test_the_floor_is_ignored_before_the_interval_is_known_and_after_a_miss() -> None:
    co = Coalescer(deadline_s=1.0)
    co.set_floor(3, 0.0)
    assert co.floor == 1  # one chunk seen: no interval yet
    co.add(0, b"x", 0.0)
    co.add(1, b"x", 0.02)
    msg = co.take(0.02)
    assert msg is not None
    co.answered(msg.msg_id, 0.03)
    co.set_floor(3, 0.03)
    assert co.floor == 3
    co.add(2, b"x", 0.04)  # then nothing more arrives: the hold ends with one chunk
    assert co.take(0.04) is None
    release = co.due_at()
    assert release is not None
    msg = co.take(release)
    assert msg is not None and len(msg.chunks) == 1
    assert co.misses == 1
    co.set_floor(3, release + 0.01)  # within the miss backoff
    assert co.floor == 1


def test_a_fixed_linger_is_not_changed_by_the_floor() -> None:
    co = Coalescer(deadline_s=1.0, policy=CoalescePolicy(linger_s=0.1))
    t = streaming(co, 0.0, 3)
    co.set_floor(4, t)
    assert co.floor == 1


def test_reply_floors_are_shared_per_pipeline_and_bounded(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from audiostream.gateway import budget as budget_module

    monkeypatch.setattr(budget_module, "MAX_REPLY_FLOORS", 2)
    b = LoadBudget()
    a1, a2, other = b.reply_floor("a"), b.reply_floor("a"), b.reply_floor("b")
    assert a1 is a2 and a1 is not other
    a1.observe(0.004)
    a2.observe(0.009)
    assert b.reply_floor("a").value == 0.004  # the quickest; it never rises
    # Past the bound a pipeline gets a floor of its own, not kept: clients choose
    # pipelines, and the map must not grow with them.
    c1, c2 = b.reply_floor("c"), b.reply_floor("c")
    assert c1 is not c2


# --- in the gateway, on RabbitMQ ---------------------------------------------------------


async def _live(stop: asyncio.Event, seed: int) -> AsyncIterator[bytes]:
    x = (np.random.default_rng(seed).standard_normal(320) * 3000).astype(np.int16).tobytes()
    while not stop.is_set():
        yield x


@pytest.mark.rabbitmq
@pytest.mark.parametrize("transport_kind", [pytest.param("rabbitmq")])
async def test_the_floor_rises_under_load_and_returns_to_one_when_idle(
    make_server: ServerFactory, tls: TLS
) -> None:
    """Four real-time sessions are 200 chunks/s, over a 50/s budget: the floor rises,
    sessions send several chunks per message, and once they stop it is back at 1."""
    settings = GatewaySettings(chunk_rate=None, coalesce_above=50, budget_sample_s=0.05)
    stop = asyncio.Event()
    async with make_server(gateway_settings=settings) as srv:
        gw = srv.gateway
        assert gw.budget.floor == 1
        clients = [AudioStreamClient(srv.url, api_key=srv.api_key, pipeline=["passthrough"],
                                     format=FMT, ssl_context=tls.client) for _ in range(4)]
        streams = [asyncio.create_task(c.stream(_live(stop, i), rate=1.0))
                   for i, c in enumerate(clients)]
        try:
            assert await eventually(lambda: gw.budget.floor > 1, within=20)
            reg = gw.metrics_registry
            assert (reg.get_sample_value("audiostream_gateway_coalesce_floor") or 0) > 1
            chunks0 = reg.get_sample_value("audiostream_chunks_in_total") or 0
            messages0 = reg.get_sample_value(
                "audiostream_gateway_messages_published_total") or 0
            assert await eventually(
                lambda: (reg.get_sample_value("audiostream_chunks_in_total") or 0)
                >= chunks0 + 200, within=20)
            # The four sessions of one pipeline measure against one reply floor.
            assert await eventually(
                lambda: sum(c.pipeline is not None for c in gw.connections) == 4, within=20)
            pipelines = [c.pipeline for c in gw.connections if c.pipeline is not None]
            assert len({id(pl.coalescer.reply_floor) for pl in pipelines}) == 1
            quickest = pipelines[0].coalescer.reply_floor.value
            assert 0 < quickest < 1
        finally:
            stop.set()
            results = await asyncio.gather(*streams, return_exceptions=True)
        chunks = (reg.get_sample_value("audiostream_chunks_in_total") or 0) - chunks0
        messages = (reg.get_sample_value(
            "audiostream_gateway_messages_published_total") or 0) - messages0
        assert chunks >= 200
        assert messages < chunks / 1.5  # coalesced: well over one chunk per message
        # Idle: the floor comes back down to one.
        assert await eventually(lambda: gw.budget.floor == 1, within=20)
    for r in results:
        assert not isinstance(r, BaseException), r
        assert r.audio and not r.dropped  # every chunk came back as audio
