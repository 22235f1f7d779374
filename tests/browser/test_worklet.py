"""The SDK's worklet and constraints in Chromium, without a server in the loop.

The capture worklet is run in an OfflineAudioContext at 48 kHz (faster than real
time, deterministic): it must hand out 20 ms frames at 16 kHz, keep a tone in the
passband at its level, and not alias a tone above the new Nyquist into the band.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest
from playwright.async_api import async_playwright

from audiostream.testing import Embedded, sample_wav

RUN_CAPTURE = """async ([freq, from, to]) => {
  const ctx = new OfflineAudioContext(1, from, from);  // one second
  await ctx.audioWorklet.addModule('/sdk/audiostream-worklet.js');
  const node = new AudioWorkletNode(ctx, 'audiostream-capture', {
    outputChannelCount: [1], processorOptions: {targetRate: to, frameMs: 20}});
  window.frames = [];
  window.captureDone = false;
  node.port.onmessage = (e) => {
    if (e.data === 'stopped') window.captureDone = true;
    else window.frames.push(new Int16Array(e.data));
  };
  const osc = new OscillatorNode(ctx, {frequency: freq});
  osc.connect(new GainNode(ctx, {gain: 0.5})).connect(node).connect(ctx.destination);
  osc.start();
  await ctx.startRendering();
  node.port.postMessage('stop');  // answered after the last frame
}"""

RMS_AFTER_FIRST = """() => {
  let sum = 0, n = 0;
  for (const f of window.frames.slice(1)) for (const v of f) { sum += (v / 32768) ** 2; n++; }
  return [window.frames.length, window.frames[0].length, Math.sqrt(sum / n)];
}"""


@pytest.fixture
async def page(server: Embedded, chromium: str) -> AsyncIterator[Any]:
    pw = await async_playwright().start()
    try:
        browser = await pw.chromium.launch(
            executable_path=chromium, headless=True,
            args=["--no-sandbox", "--use-fake-ui-for-media-stream",
                  "--use-fake-device-for-media-stream",
                  f"--use-file-for-fake-audio-capture={sample_wav()}"])
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


@pytest.mark.parametrize(("source_rate", "target_rate"), [(48000, 16000), (44100, 16000),
                                                         (16000, 48000)])
async def test_capture_resamples_in_the_worklet(page: Any, source_rate: int,
                                                target_rate: int) -> None:
    await page.evaluate(RUN_CAPTURE, [1000, source_rate, target_rate])
    # One second, rendered in whole 128-sample quanta, at the target rate: all of it
    # comes out as frames but what the resampler's look-ahead holds back (< 1 frame).
    rendered = -(-source_rate // 128) * 128
    expected = rendered * target_rate / source_rate
    frame_len = target_rate // 50  # 20 ms
    await page.wait_for_function("window.captureDone", timeout=30_000)
    count, got_len, rms = await page.evaluate(RMS_AFTER_FIRST)
    assert got_len == frame_len
    assert expected - 2 * frame_len < count * frame_len <= expected, (count, expected)
    assert abs(rms - 0.5 / 2**0.5) < 0.01, rms  # passband level kept (within 0.2 dB)


async def test_capture_does_not_alias(page: Any) -> None:
    # 12 kHz is above 16 kHz's Nyquist: it must vanish, not fold down to 4 kHz.
    await page.evaluate(RUN_CAPTURE, [12000, 48000, 16000])
    await page.wait_for_function("window.captureDone", timeout=30_000)
    _, _, rms = await page.evaluate(RMS_AFTER_FIRST)
    assert rms < 0.354 * 10 ** (-60 / 20), rms


async def test_browser_processing_is_off_when_the_pipeline_denoises(page: Any) -> None:
    settings = await page.evaluate("""async () => {
      const { AudioStreamClient } = await import('/sdk/audiostream.js');
      const out = {};
      for (const pipeline of [['denoise'], ['gain']]) {
        const c = new AudioStreamClient({url: 'ws://unused', token: 'bt1.x', pipeline});
        const media = await navigator.mediaDevices.getUserMedia({audio: c.audioConstraints()});
        const s = media.getAudioTracks()[0].getSettings();
        out[pipeline[0]] = [s.noiseSuppression, s.echoCancellation, s.autoGainControl];
        media.getTracks().forEach((t) => t.stop());
      }
      return out;
    }""")
    assert settings["denoise"] == [False, False, False]
    assert settings["gain"] == [True, True, True]

