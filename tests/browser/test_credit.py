"""The SDK's flow control against a scripted gateway: v1.1 credit, and the v1 fallback.

The page and SDK come from the real gateway; the WebSocket goes to a small
aiohttp server in the test that plays the gateway's side of V1.1 step by step.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from aiohttp import WSMsgType, web
from playwright.async_api import async_playwright

from audiostream.testing import Embedded, sample_wav


@dataclass
class Scripted:
    """One scripted gateway connection at a time; records what the client sent."""

    credit: int | None
    refuse_v11: bool = False
    starts: list[dict[str, Any]] = field(default_factory=list)
    frames: int = 0
    ws: web.WebSocketResponse | None = None
    changed: asyncio.Condition = field(default_factory=asyncio.Condition)

    async def handle(self, request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        async for msg in ws:
            if msg.type is WSMsgType.TEXT:
                start = json.loads(msg.data)
                if start["type"] != "start":
                    continue
                self.starts.append(start)
                if self.refuse_v11 and start.get("version") != 1:
                    await ws.send_str(json.dumps({"type": "error", "code": 4007,
                                                  "name": "unsupported_version",
                                                  "message": "v1 only", "retryable": False}))
                    await ws.close(code=4007)
                    break
                ready: dict[str, Any] = {"type": "ready", "session_id": "s",
                                         "max_frame_bytes": 32000,
                                         "version": 1 if self.credit is None else 1.1}
                if self.credit is not None:
                    ready["credit"] = self.credit
                self.ws = ws
                await ws.send_str(json.dumps(ready))
            elif msg.type is WSMsgType.BINARY:
                async with self.changed:
                    self.frames += 1
                    self.changed.notify_all()
                await ws.send_bytes(msg.data)  # echo: the page plays it
        return ws

    async def wait_frames(self, n: int) -> None:
        async with self.changed:
            await asyncio.wait_for(self.changed.wait_for(lambda: self.frames >= n), 30)


@pytest.fixture
async def page(server: Embedded, chromium: str) -> AsyncIterator[Any]:
    pw = await async_playwright().start()
    try:
        browser = await pw.chromium.launch(
            executable_path=chromium, headless=True,
            args=["--no-sandbox", "--use-fake-ui-for-media-stream",
                  "--use-fake-device-for-media-stream",
                  f"--use-file-for-fake-audio-capture={sample_wav()}",
                  "--autoplay-policy=no-user-gesture-required"])
    except Exception as exc:
        await pw.stop()
        pytest.fail(f"Chromium at {chromium} did not start: {exc}")
    try:
        p = await browser.new_page()
        await p.goto(f"{server.http_url}/demo")
        yield p
    finally:
        await browser.close()
        await pw.stop()


async def scripted_site(script: Scripted) -> tuple[web.AppRunner, str]:
    app = web.Application()
    app.router.add_get("/v1/stream", script.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    return runner, f"ws://127.0.0.1:{port}/v1/stream"


START = """async (url) => {
  const { AudioStreamClient } = await import('/sdk/audiostream.js');
  const c = new AudioStreamClient({url, token: 'bt1.test', pipeline: ['gain'],
                                   browserProcessing: false});
  window.c = c;
  await c.start();
  return c.version;
}"""


async def test_frames_stay_within_credit(page: Any) -> None:
    script = Scripted(credit=3)
    runner, url = await scripted_site(script)
    try:
        assert await page.evaluate(START, url) == 1.1
        assert script.starts[0]["version"] == 1.1 and script.starts[0]["api_key"] == "bt1.test"
        await script.wait_frames(3)
        # The microphone goes on; frames queue on the client instead of being sent.
        await page.wait_for_function("window.c.queue.length >= 5", timeout=30_000)
        assert script.frames == 3
        assert script.ws is not None
        await script.ws.send_str(json.dumps({"type": "credit", "credit": 8}))
        await script.wait_frames(8)
        await page.wait_for_function("window.c.queue.length >= 5", timeout=30_000)
        assert script.frames == 8
        assert await page.evaluate("window.c.stats.sent") == 8
        await page.evaluate("window.c.ws.close()")
    finally:
        await runner.cleanup()


async def test_v1_gateway_gets_real_time_frames(page: Any) -> None:
    script = Scripted(credit=None, refuse_v11=True)
    runner, url = await scripted_site(script)
    try:
        assert await page.evaluate(START, url) == 1
        assert [s.get("version") for s in script.starts] == [1.1, 1]
        # No credit: frames flow as the microphone makes them, nothing queues up.
        await script.wait_frames(50)
        assert await page.evaluate("window.c.queue.length") <= 1
        await page.wait_for_function("window.c.stats.received >= 50", timeout=30_000)
        await page.evaluate("window.c.ws.close()")
    finally:
        await runner.cleanup()
