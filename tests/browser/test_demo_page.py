"""The demo page in a real Chromium with a fake microphone playing a WAV file.

It checks the whole browser path: the SDK captures at the context's native rate,
resamples in its worklet, streams 20 ms frames with a browser token, and the
processed audio comes back and is played: the page records what reaches the
speakers, and the test compares its level with the microphone's, through a -12 dB
gain step, then with the raw monitor. A screenshot goes to docs/img/demo.png.
"""

from __future__ import annotations

import json
import urllib.parse
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import soundfile
from playwright.async_api import Browser, async_playwright

from audiostream.testing import Embedded, sample_wav
from tests.browser.conftest import mint

DOCS_IMG = Path(__file__).resolve().parents[2] / "docs" / "img" / "demo.png"
GAIN_DB = -12.0

# Mean squares of what the microphone gave and what was played since the marks.
LEVELS_SINCE = """([c0, p0]) => {
  const d = window.audiostreamDemo;
  const ms = (blocks, scale) => {
    let sum = 0, n = 0;
    for (const b of blocks) for (const v of b) { sum += (v * scale) ** 2; n++; }
    return sum / Math.max(n, 1);
  };
  return [ms(d.captured.slice(c0), 1 / 32768), ms(d.played.slice(p0), 1),
          d.captured.length, d.played.length];
}"""


@pytest.fixture
def fake_mic(tmp_path: Path) -> Path:
    """The bundled speech at 22.05 kHz: the SDK must resample whatever the device gives."""
    data, rate = soundfile.read(str(sample_wav()), dtype="float32")
    import soxr

    out = tmp_path / "mic.wav"
    soundfile.write(str(out), soxr.resample(data, rate, 22050), 22050, subtype="PCM_16")
    return out


async def launch(chromium: str, mic: Path) -> Any:
    pw = await async_playwright().start()
    try:
        browser: Browser = await pw.chromium.launch(
            executable_path=chromium, headless=True,
            args=["--no-sandbox", "--use-fake-ui-for-media-stream",
                  "--use-fake-device-for-media-stream",
                  f"--use-file-for-fake-audio-capture={mic}",
                  "--autoplay-policy=no-user-gesture-required"])
    except Exception as exc:
        await pw.stop()
        pytest.fail(f"Chromium at {chromium} did not start: {exc}")
    return pw, browser


async def gain_db(page: Any, marks: tuple[int, int], seconds: float
                  ) -> tuple[float, float, tuple[int, int]]:
    """Played level over microphone level (dB) during the next ``seconds``, measured
    on the same stretch of the (looping) speech file, and the microphone's RMS."""
    await page.wait_for_function(
        f"window.audiostreamDemo.played.length >= {marks[1] + int(seconds * 10)}",
        timeout=60_000)
    mic, played, c1, p1 = await page.evaluate(LEVELS_SINCE, list(marks))
    return 10 * float(np.log10(played / mic)), float(np.sqrt(mic)), (c1, p1)


async def test_demo_streams_mic_and_plays_processed_audio(
        server: Embedded, chromium: str, fake_mic: Path) -> None:
    status, body = await mint(server, ["gain"], ttl_s=120)
    assert status == 200, body
    token = body["token"]
    pipeline = json.dumps([{"name": "gain", "params": {"db": GAIN_DB}}])
    fragment = urllib.parse.urlencode({"token": token, "pipeline": pipeline})
    pw, browser = await launch(chromium, fake_mic)
    try:
        page = await browser.new_page(viewport={"width": 900, "height": 760})
        sent_frames: list[str | bytes] = []
        requests: list[str] = []
        page.on("websocket", lambda ws: ws.on("framesent", lambda f: sent_frames.append(f)))
        page.on("request", lambda r: requests.append(
            f"{r.url} {r.headers} {r.post_data or ''}"))
        page.on("console", lambda m: print("console:", m.text))
        await page.goto(f"{server.http_url}/demo#{fragment}")
        await page.click("#start")
        await page.wait_for_function(
            "['streaming', 'failed'].includes(window.audiostreamDemo.state)", timeout=60_000)
        state = await page.evaluate("[window.audiostreamDemo.state, window.audiostreamDemo.errors]")
        assert state[0] == "streaming", state
        # Skip the first second (cushion, fake-device start-up), then measure 3 s.
        _, _, marks = await gain_db(page, (0, 0), 1.0)
        processed_db, mic_rms, marks = await gain_db(page, marks, 3.0)
        await page.screenshot(path=str(DOCS_IMG))
        await page.check("input[value=raw]")
        _, _, marks = await gain_db(page, marks, 0.5)  # let the switch settle
        raw_db, _, _ = await gain_db(page, marks, 3.0)
        stats = await page.evaluate("window.audiostreamDemo.client.stats")
        await page.click("#stop")
        await page.wait_for_function("window.audiostreamDemo.state === 'stopped'",
                                     timeout=60_000)
    finally:
        await browser.close()
        await pw.stop()

    # Processed audio came back for (nearly) every frame sent, and was played.
    assert stats["sent"] > 150 and stats["received"] >= stats["sent"] - 10, stats
    assert stats["notices"] == 0, stats
    assert stats["playback"]["played"] > 0
    # Speech at the speakers: -12 dB below the microphone processed, 0 dB raw.
    assert mic_rms > 0.01, mic_rms
    assert GAIN_DB - 2 < processed_db < GAIN_DB + 2, (processed_db, raw_db)
    assert -2 < raw_db < 2, (processed_db, raw_db)

    # The page only ever held the browser token.
    texts = [f for f in sent_frames if isinstance(f, str)]
    start_msg = json.loads(texts[0])
    assert start_msg["api_key"] == token and start_msg["version"] == 1.1
    everything = " ".join([*requests, *texts])
    assert server.api_key not in everything
    assert DOCS_IMG.stat().st_size > 10_000
