"""`healthcheck` against a live gateway and the real RabbitMQ, and `bench` with its env key
and plot; the CLI runs as a subprocess while the embedded server runs in this process."""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path

import pytest

from audiostream.cli import EXIT_FAILURE, EXIT_USAGE, main
from audiostream.testing import default_topology, embedded_server
from audiostream.transport.rabbitmq import declare_topology, probe_topology
from tests.cli.test_errors import ROOT
from tests.conftest import delete_prefixed, unique_prefix

CONSUMED = ("gain", "highpass", "passthrough", "resample")


async def cli(*argv: str, env: dict[str, str] | None = None) -> tuple[int, str, str]:
    """The real CLI in a subprocess, awaited without blocking the server in this loop."""
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("AUDIOSTREAM_")}
    full_env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), str(ROOT)])
    full_env.update(env or {})
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "audiostream", *argv, env=full_env, cwd=ROOT,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 120)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


@pytest.mark.rabbitmq
async def test_healthcheck_gateway_and_broker(rabbitmq_url: str, tmp_path: Path) -> None:
    prefix = unique_prefix()
    topo = default_topology(prefix=prefix)
    broker = rabbitmq_url
    try:
        async with embedded_server(broker_url=rabbitmq_url, topology=topo,
                                   processing=CONSUMED) as server:
            code, out, err = await cli("healthcheck", "--url", server.url, "--broker", broker,
                                       "--prefix", prefix, "--processing", "gain,highpass")
            assert code == 0, err
            assert "keepalive answered" in out and "healthy" in out
            assert "guest:guest" not in out and "guest:***@" in out
            assert "gain=1" in out and "denoise" not in out.split("consumers per queue")[1]

            # A type nobody consumes is named; the gateway line still says ok.
            code, out, err = await cli("healthcheck", "--url", server.url, "--broker", broker,
                                       "--prefix", prefix, "--processing", "denoise")
            assert code == EXIT_FAILURE
            assert err.strip() == ("unhealthy: broker: no worker consumes denoise (every one "
                                   "of its 2 queues needs a consumer)")

            # Only --broker: the gateway is not checked.
            code, out, _ = await cli("healthcheck", "--broker", broker, "--prefix", prefix)
            assert code == 0 and "gateway" not in out

            # bench takes its key from AUDIOSTREAM_API_KEY and draws the plot.
            png = tmp_path / "bench.png"
            code, out, err = await cli(
                "bench", "--url", server.url, "--sessions", "1", "--duration", "1",
                "--pipeline", "gain", "--quiet", "--plot", str(png),
                env={"AUDIOSTREAM_API_KEY": server.api_key})
            assert code == 0, err
            assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        # The server is gone: the workers' consumers with it.
        probe = await probe_topology(rabbitmq_url, topo)
        assert all(probe.exchanges.values())
        assert all(q.consumers == 0 for q in probe.queues)
        code, _, err = await cli("healthcheck", "--url", server.url, "--timeout", "3")
        assert code == EXIT_FAILURE and "connection refused" in err and "Traceback" not in err
    finally:
        await delete_prefixed(rabbitmq_url, topo)


@pytest.mark.rabbitmq
async def test_healthcheck_broker_without_workers_or_topology(rabbitmq_url: str) -> None:
    prefix = unique_prefix()
    topo = default_topology(prefix=prefix)
    code, _, err = await cli("healthcheck", "--broker", rabbitmq_url, "--prefix", prefix)
    assert code == EXIT_FAILURE and "no topology with prefix" in err
    await declare_topology(rabbitmq_url, topo)
    try:
        code, out, err = await cli("healthcheck", "--broker", rabbitmq_url, "--prefix", prefix)
        assert code == EXIT_FAILURE and "no worker consumes any work queue" in err
        assert "connected" in out
    finally:
        await delete_prefixed(rabbitmq_url, topo)


def test_bench_plot_without_matplotlib_fails_before_running(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if the extra were missing
    code = main(["bench", "--url", "ws://127.0.0.1:1/v1/stream", "--api-key", "k",
                 "--sessions", "1", "--duration", "1", "--pipeline", "gain",
                 "--plot", str(tmp_path / "p.png")])
    assert code == EXIT_USAGE
    assert "pip install 'audiostream[plot]'" in capsys.readouterr().err
