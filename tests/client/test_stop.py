"""After ``stop`` the SDK keeps reading (and acking) until the summary, and the gateway
closes with 1000: a busy SDK reader gets every outcome and the summary, never a reset.

The bug this guards (issue #12, observed 4; seen again with Opus output in file mode):
the gateway closed the WebSocket while its reader task waited in ``receive()``;
aiohttp then drops the socket at once, with the SDK's acks unread, so the kernel resets
it and the SDK loses the summary (1006) while the gateway counts it delivered (resume
then fails with 4040). Before the fix, 2-5 runs in 30 of the loop below failed here.
"""

from __future__ import annotations

import contextlib
import io
import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from audiostream.cli import main
from audiostream.gateway import GatewaySettings
from audiostream.testing import ThreadedServer, sample_wav
from audiostream.topology import Topology

RUNS = 60


@pytest.fixture(scope="module")
def srv() -> Iterator[ThreadedServer]:
    """The gateway on its own thread and loop, so it runs on while the SDK is busy."""
    with ThreadedServer(topology=Topology(processing_types=("passthrough",)),
                        gateway_settings=GatewaySettings()) as s:
        yield s



def test_a_busy_sdk_reader_gets_every_outcome_and_the_summary(
    srv: ThreadedServer, tmp_path: Path
) -> None:
    """`audiostream stream IN OUT.opus`: each outcome is Opus-encoded as it arrives, real
    work on the SDK's loop, so its reading lags the gateway's writing at the end."""
    failures = []
    for i in range(RUNS):
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            code = main(["stream", str(sample_wav()), str(tmp_path / "out.opus"),
                         "--pipeline", "passthrough", "--rate", "max", "--url",
                         srv.server.url, "--api-key", srv.server.api_key, "--json",
                         "--quiet", "--log-level", "error"])
        report = json.loads(out.getvalue().splitlines()[-1]) if code == 0 else {}
        if code != 0 or report["resumes"] or not report["server_summary"]:
            failures.append((i, code, report.get("resumes")))
    assert not failures
