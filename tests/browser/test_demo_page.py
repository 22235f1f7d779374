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

# Levels (mean squares) since the marks: microphone, sent frames and their answers
# (the same seqs, so the same audio), and what was played.
LEVELS_SINCE = """([c0, p0, s0]) => {
  const d = window.audiostreamDemo;
  const ms = (blocks, scale) => {
    let sum = 0, n = 0;
    for (const b of blocks) for (const v of b) { sum += (v * scale) ** 2; n++; }
    return sum / Math.max(n, 1);
  };
  const s1 = Math.min(d.sent.length, d.received.length);
  return [ms(d.captured.slice(c0), 1 / 32768), ms(d.played.slice(p0), 1),
          ms(d.sent.slice(s0, s1), 1 / 32768), ms(d.received.slice(s0, s1), 1 / 32768),
          [d.captured.length, d.played.length, s1]];
}"""


@pytest.fixture
def fake_mic(tmp_path: Path) -> Path:
    """Steady tones at 22.05 kHz: a level that does not depend on which stretch is
    measured, at a rate the SDK must resample whatever the device gives."""
    rate = 22050
    t = np.arange(rate * 4) / rate
    tones = 0.2 * np.sin(2 * np.pi * 440 * t) + 0.1 * np.sin(2 * np.pi * 1250 * t)
    out = tmp_path / "mic.wav"
    soundfile.write(str(out), tones, rate, subtype="PCM_16")
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


Marks = tuple[int, int, int]


async def levels(page: Any, marks: Marks, seconds: float) -> tuple[dict[str, float], Marks]:
    """Levels (dB) over the next ``seconds``: ``played/mic`` and ``played/received`` on
    the same stretch of time, ``received/sent`` on the same seqs."""
    await page.wait_for_function(
        f"window.audiostreamDemo.played.length >= {marks[1] + int(seconds * 10)}",
        timeout=60_000)
    mic, played, sent, received, nxt = await page.evaluate(LEVELS_SINCE, list(marks))

    def db(a: float, b: float) -> float:
        return 10 * float(np.log10(a / b))

    return ({"played/mic": db(played, mic), "played/received": db(played, received),
             "received/sent": db(received, sent), "mic_rms": float(np.sqrt(mic))},
            (nxt[0], nxt[1], nxt[2]))


async def test_demo_streams_mic_and_plays_processed_audio(
        server: Embedded, chromium: str, fake_mic: Path) -> None:
    status, body = await mint(server, ["gain"], ttl_s=120)
    assert status == 200, body
    token = body["token"]
    pipeline = json.dumps([{"name": "gain", "params": {"db": GAIN_DB}}])
    # The browser's AGC and noise suppressor would move a steady tone's level.
    fragment = urllib.parse.urlencode({"token": token, "pipeline": pipeline,
                                       "browser_processing": "0"})
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
        _, marks = await levels(page, (0, 0, 0), 1.0)
        processed, marks = await levels(page, marks, 3.0)
        await page.check("input[value=raw]")
        _, marks = await levels(page, marks, 0.5)  # let the switch settle
        raw, _ = await levels(page, marks, 3.0)
        stats = await page.evaluate("window.audiostreamDemo.client.stats")
        # Acks (every 25 outcomes) and everything else were taken without complaint.
        assert await page.evaluate("window.audiostreamDemo.errors") == []
        assert await page.evaluate("window.audiostreamDemo.client.acked") >= 25
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
    # The gateway applied the gain to exactly the frames sent (same seqs) ...
    print(f"processed: {processed}\nraw: {raw}")
    assert processed["mic_rms"] > 0.1, processed  # the tones' own 0.158
    assert abs(processed["received/sent"] - GAIN_DB) < 0.1, processed
    # ... the speakers played what came back, and the raw switch plays the microphone.
    assert abs(processed["played/received"]) < 0.5, processed
    assert abs(processed["played/mic"] - GAIN_DB) < 0.5, processed
    assert abs(raw["played/mic"]) < 0.5, raw

    # The page only ever held the browser token.
    texts = [f for f in sent_frames if isinstance(f, str)]
    start_msg = json.loads(texts[0])
    assert start_msg["api_key"] == token and start_msg["version"] == 1.1
    everything = " ".join([*requests, *texts])
    assert server.api_key not in everything


# Noise between words: the 10th percentile of 20 ms frame levels (dB), of the frames
# sent and of their answers (the same seqs; the percentile does not mind the
# pipeline's few milliseconds of delay).
PAUSES = """(s0) => {
  const d = window.audiostreamDemo;
  const n = Math.min(d.sent.length, d.received.length);
  const db = (f) => { let x = 0; for (const v of f) x += (v / 32768) ** 2;
                      return 10 * Math.log10(x / f.length + 1e-12); };
  const p10 = (arr) => arr.slice(s0, n).map(db).sort((a, b) => a - b)[Math.floor((n - s0) / 10)];
  return [p10(d.sent), p10(d.received), n - s0];
}"""


async def test_demo_denoises_a_noisy_microphone(server: Embedded, chromium: str) -> None:
    """The real use: noisy speech in, NSNet2 in the pipeline; the noise between words
    drops. The screenshot for docs/clients/browser.md."""
    status, body = await mint(server, ["denoise"], ttl_s=120)
    assert status == 200, body
    fragment = urllib.parse.urlencode({"token": body["token"], "pipeline": "denoise"})
    pw, browser = await launch(chromium, sample_wav())
    try:
        page = await browser.new_page(viewport={"width": 900, "height": 760})
        await page.goto(f"{server.http_url}/demo#{fragment}")
        await page.click("#start")
        await page.wait_for_function(
            "['streaming', 'failed'].includes(window.audiostreamDemo.state)", timeout=60_000)
        state = await page.evaluate("[window.audiostreamDemo.state, window.audiostreamDemo.errors]")
        assert state[0] == "streaming", state
        _, marks = await levels(page, (0, 0, 0), 2.0)  # past the model's warm-up
        await levels(page, marks, 5.0)
        mic_floor, out_floor, frames = await page.evaluate(PAUSES, marks[2])
        await page.screenshot(path=str(DOCS_IMG))
        stats = await page.evaluate("window.audiostreamDemo.client.stats")
    finally:
        await browser.close()
        await pw.stop()
    assert stats["received"] > 150 and stats["notices"] == 0, stats
    print(f"pauses ({frames} frames): sent {mic_floor:.1f} dB, processed {out_floor:.1f} dB")
    assert frames >= 200
    assert out_floor < mic_floor - 10, (mic_floor, out_floor)
    assert DOCS_IMG.stat().st_size > 10_000
