"""A gateway + worker for browser tests, and Debian's Chromium driven by Playwright.

The browser is the system's ``/usr/bin/chromium`` (scripts/ensure-system-deps.sh
installs it): Playwright never downloads one. A browser that cannot start fails
the test; it never skips.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from audiostream.gateway import GatewaySettings
from audiostream.testing import Embedded, embedded_server

CHROMIUM = os.environ.get("AUDIOSTREAM_CHROMIUM", "/usr/bin/chromium")
ALLOWED_ORIGIN = "https://app.example"


@pytest.fixture
async def server() -> AsyncIterator[Embedded]:
    """In-memory broker, one worker; the test origin and the page's own are allowed."""
    settings = GatewaySettings(chunk_rate=None, allowed_origins=(ALLOWED_ORIGIN,),
                               depth_poll_s=0, load_sample_s=0)
    steps = ("passthrough", "gain", "highpass", "denoise", "resample")
    async with embedded_server(gateway_settings=settings, processing=steps) as s:
        # The demo page is served by the gateway itself: its origin must be allowed.
        s.gateway.settings = replace(settings, allowed_origins=(ALLOWED_ORIGIN, s.http_url))
        yield s


async def mint(server: Embedded, pipelines: list[str], *, key: str | None = None,
               ttl_s: float | None = None, headers: dict[str, str] | None = None
               ) -> tuple[int, dict[str, Any]]:
    body: dict[str, Any] = {"pipelines": pipelines}
    if ttl_s is not None:
        body["ttl_s"] = ttl_s
    hdrs = {"Authorization": f"Bearer {key or server.api_key}", **(headers or {})}
    async with aiohttp.ClientSession() as http, http.post(
            f"{server.http_url}/v1/tokens", json=body, headers=hdrs) as resp:
        return resp.status, await resp.json()


@pytest.fixture(scope="session")
def chromium() -> str:
    if not (Path(CHROMIUM).is_file() and os.access(CHROMIUM, os.X_OK)) and not shutil.which(
            CHROMIUM):
        pytest.fail(f"Chromium is required at {CHROMIUM} (run scripts/ensure-system-deps.sh)")
    return CHROMIUM
