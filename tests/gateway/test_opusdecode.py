"""gateway/opusdecode.py with plain values: the CPU bucket, and a decoder charged by an
injected CPU clock (no sockets, no timing)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from audiostream.audio import frame_opus_packets
from audiostream.audiofile import OpusPacketDecoder, OpusPacketEncoder
from audiostream.cli import main
from audiostream.errors import ConfigError, ProtocolError
from audiostream.gateway import GatewaySettings
from audiostream.gateway.opusdecode import BudgetedDecoder, CpuBucket


def test_a_bucket_starts_full_goes_negative_and_refills_at_its_rate() -> None:
    b = CpuBucket(0.1, 0.2)
    assert b.wait_s(0.0) == 0.0
    b.charge(0.15, 0.0)
    assert b.wait_s(0.0) == 0.0  # 0.05 left
    b.charge(0.1, 0.0)  # a decode's cost is known afterwards: the level may go below 0
    assert b.wait_s(0.0) == pytest.approx(0.5)  # 0.05 CPU-s owed at 0.1 per s
    assert b.wait_s(0.25) == pytest.approx(0.25)
    assert b.wait_s(0.5) == 0.0
    assert b.wait_s(100.0) == 0.0 and b.level == pytest.approx(0.2)  # capped at the burst


def test_a_clock_going_back_refills_nothing() -> None:
    b = CpuBucket(1.0, 1.0)
    b.charge(2.0, 10.0)
    assert b.wait_s(5.0) == pytest.approx(1.0)
    assert b.wait_s(10.5) == pytest.approx(0.5)


@pytest.mark.parametrize(("rate", "burst"), [(0.0, 1.0), (1.0, 0.0), (-1.0, 1.0)])
def test_a_bucket_needs_a_positive_rate_and_burst(rate: float, burst: float) -> None:
    with pytest.raises(ConfigError):
        CpuBucket(rate, burst)


@pytest.mark.parametrize("field", ["opus_cpu_share", "opus_cpu_share_total"])
def test_gateway_settings_refuse_a_zero_share(field: str) -> None:
    with pytest.raises(ConfigError, match="Opus CPU shares"):
        GatewaySettings(**{field: 0.0})  # type: ignore[arg-type]


class FakeCpu:
    """A CPU clock that moves by ``step`` on every read: each decode "costs" ``step``."""

    def __init__(self, step: float) -> None:
        self.t, self.step = 0.0, step

    def __call__(self) -> float:
        self.t += self.step
        return self.t


def chunks(n: int) -> list[bytes]:
    rng = np.random.default_rng(1)
    enc = OpusPacketEncoder(16000, 1)
    x = (rng.standard_normal((16000 * n // 5, 1)) * 2000).astype(np.int16)
    packets = enc.encode(x) + enc.flush()
    return [frame_opus_packets(packets[i:i + 10]) for i in range(0, 10 * n, 10)]


def test_each_decode_is_charged_to_the_session_and_the_gateway() -> None:
    now = [0.0]
    shared = CpuBucket(0.5, 0.5)
    dec = BudgetedDecoder(16000, 1, session=CpuBucket(0.1, 0.1), shared=shared,
                          clock=lambda: now[0], cpu_clock=FakeCpu(0.03))
    plain = OpusPacketDecoder(16000, 1)
    waits = []
    for c in chunks(5):
        assert dec.decode(c) == plain.decode(c)  # the budget changes nothing in the audio
        waits.append(dec.wait_s())
    assert dec.cpu_s == pytest.approx(5 * 0.03)
    # the session's 0.1 s burst covers three decodes; the fourth leaves it 0.02 short
    assert waits[:3] == [0.0, 0.0, 0.0]
    assert waits[3] == pytest.approx(0.2) and waits[4] == pytest.approx(0.5)
    assert shared.level == pytest.approx(0.5 - 0.15)
    now[0] = 0.51
    assert dec.wait_s() == 0.0


def test_the_gateway_budget_holds_back_a_session_within_its_own() -> None:
    shared = CpuBucket(0.05, 0.05)
    dec = BudgetedDecoder(16000, 1, session=CpuBucket(1.0, 1.0), shared=shared,
                          clock=lambda: 0.0, cpu_clock=FakeCpu(0.03))
    for c in chunks(2):
        dec.decode(c)
    assert dec.session.wait_s(0.0) == 0.0
    assert dec.wait_s() == pytest.approx(0.01 / 0.05)


def test_a_corrupt_chunk_is_charged_too() -> None:
    dec = BudgetedDecoder(16000, 1, session=CpuBucket(1.0, 1.0), shared=CpuBucket(1.0, 1.0),
                          clock=lambda: 0.0, cpu_clock=FakeCpu(0.25))
    with pytest.raises(ProtocolError):
        dec.decode(frame_opus_packets([bytes([0x0B, 0x02, 1, 2, 3])]))
    assert dec.cpu_s == pytest.approx(0.25)
    assert dec.session.level == pytest.approx(0.75)


@pytest.mark.parametrize("flag", ["--opus-cpu-share", "--opus-cpu-share-total"])
def test_the_cli_takes_the_shares_and_refuses_zero(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], flag: str
) -> None:
    keys = tmp_path / "keys.json"
    keys.write_text(json.dumps({"keys": []}))
    code = main(["gateway", "--broker", "amqp://127.0.0.1:1/", "--keys-file", str(keys),
                 flag, "0"])
    err = capsys.readouterr().err
    assert code == 2 and "CONFIG_ERROR" in err and "Opus CPU shares" in err, err
