// AudioWorklet processors of the audiostream browser SDK (loaded by audiostream.js).
//
// Capture runs at the AudioContext's native rate and resamples here, in the audio
// thread: AudioContext({sampleRate}) is refused by Firefox, and a main-thread
// resampler would glitch whenever the page is busy.

// Streaming windowed-sinc resampler (Blackman window, 12 zero crossings, cutoff just
// under the lower Nyquist). State: the last input samples and a fractional position.
class Resampler {
  constructor(from, to) {
    this.same = from === to;
    this.step = from / to;
    this.cutoff = Math.min(1, to / from) * 0.95;
    this.half = Math.ceil(12 / this.cutoff);
    this.res = 128;
    const n = this.half * this.res + 2;
    this.table = new Float32Array(n);
    for (let i = 0; i < n; i++) this.table[i] = this.kernel(i / this.res);
    this.buf = new Float32Array(this.half); // zeros: the first output lines up with input 0
    this.pos = this.half;
  }

  kernel(x) {
    if (x >= this.half) return 0;
    const t = x * this.cutoff;
    const sinc = t === 0 ? 1 : Math.sin(Math.PI * t) / (Math.PI * t);
    const a = (Math.PI * x) / this.half;
    return this.cutoff * sinc * (0.42 + 0.5 * Math.cos(a) + 0.08 * Math.cos(2 * a));
  }

  process(input) {
    if (this.same) return Float32Array.from(input);
    const buf = new Float32Array(this.buf.length + input.length);
    buf.set(this.buf);
    buf.set(input, this.buf.length);
    const out = [];
    const { half, res, table } = this;
    while (this.pos + half < buf.length) {
      const c = this.pos;
      const i1 = Math.floor(c + half);
      let acc = 0;
      for (let i = Math.ceil(c - half); i <= i1; i++) {
        const d = Math.abs(i - c) * res;
        const k = d | 0;
        acc += buf[i] * (table[k] + (table[k + 1] - table[k]) * (d - k));
      }
      out.push(acc);
      this.pos += this.step;
    }
    const drop = Math.max(0, Math.floor(this.pos - half));
    this.buf = buf.slice(drop);
    this.pos -= drop;
    return Float32Array.from(out);
  }
}

// Microphone -> 20 ms pcm_s16le frames at the wire rate, posted to the main thread.
// The input is also passed through to the node's output (the page's "raw" monitor).
class CaptureProcessor extends AudioWorkletProcessor {
  constructor(options) {
    super();
    const { targetRate, frameMs } = options.processorOptions;
    this.resampler = new Resampler(sampleRate, targetRate);
    this.frameLen = Math.round((targetRate * frameMs) / 1000);
    this.frame = new Int16Array(this.frameLen);
    this.fill = 0;
    this.running = true;
    // "stopped" comes after every frame posted before it: the main thread knows it
    // has them all.
    this.port.onmessage = (e) => {
      if (e.data !== "stop") return;
      this.running = false;
      this.port.postMessage("stopped");
    };
  }

  process(inputs, outputs) {
    const input = inputs[0];
    if (!input || input.length === 0) return this.running;
    const mono = input[0];
    const out = outputs[0];
    if (out) for (const ch of out) ch.set(mono);
    const y = this.resampler.process(mono);
    for (let i = 0; i < y.length; i++) {
      const v = Math.max(-1, Math.min(1, y[i]));
      this.frame[this.fill++] = v < 0 ? Math.round(v * 32768) : Math.round(v * 32767);
      if (this.fill === this.frameLen) {
        this.port.postMessage(this.frame.buffer, [this.frame.buffer]);
        this.frame = new Int16Array(this.frameLen);
        this.fill = 0;
      }
    }
    return this.running;
  }
}

// Processed frames -> speakers. A ring buffer at the context rate; playback starts
// once a small jitter cushion is queued, and an underrun plays silence and waits
// for the cushion again (no stale audio is ever replayed).
class PlaybackProcessor extends AudioWorkletProcessor {
  constructor(options) {
    super();
    const { cushionMs = 60, capacityMs = 2000 } = options.processorOptions || {};
    this.cushion = Math.round((sampleRate * cushionMs) / 1000);
    this.ring = new Float32Array(Math.round((sampleRate * capacityMs) / 1000));
    this.read = 0;
    this.size = 0;
    this.playing = false;
    this.resamplers = new Map();
    this.stats = { received: 0, played: 0, silence: 0, underruns: 0, overflowed: 0 };
    this.sinceReport = 0;
    this.port.onmessage = (e) => this.push(e.data);
  }

  push({ pcm, rate }) {
    let rs = this.resamplers.get(rate);
    if (!rs) this.resamplers.set(rate, (rs = new Resampler(rate, sampleRate)));
    const f = new Float32Array(pcm.length);
    for (let i = 0; i < pcm.length; i++) f[i] = pcm[i] / 32768;
    const y = rs.process(f);
    const cap = this.ring.length;
    for (let i = 0; i < y.length; i++) {
      if (this.size === cap) { // full: drop the oldest sample (latency stays bounded)
        this.read = (this.read + 1) % cap;
        this.size--;
        this.stats.overflowed++;
      }
      this.ring[(this.read + this.size) % cap] = y[i];
      this.size++;
    }
    this.stats.received += y.length;
  }

  process(_inputs, outputs) {
    const out = outputs[0][0];
    if (!this.playing && this.size >= this.cushion) this.playing = true;
    const cap = this.ring.length;
    for (let i = 0; i < out.length; i++) {
      if (this.playing && this.size > 0) {
        out[i] = this.ring[this.read];
        this.read = (this.read + 1) % cap;
        this.size--;
        this.stats.played++;
      } else {
        if (this.playing) { this.playing = false; this.stats.underruns++; }
        out[i] = 0;
        this.stats.silence++;
      }
    }
    for (let c = 1; c < outputs[0].length; c++) outputs[0][c].set(out);
    this.sinceReport += out.length;
    if (this.sinceReport >= sampleRate / 10) {
      this.sinceReport = 0;
      this.port.postMessage({ ...this.stats, queued: this.size });
    }
    return true;
  }
}

// Records what actually reaches the speakers, for meters, tests and debugging.
class TapProcessor extends AudioWorkletProcessor {
  constructor() {
    super();
    this.blockLen = Math.round(sampleRate / 10);
    this.block = new Float32Array(this.blockLen);
    this.fill = 0;
  }

  process(inputs, outputs) {
    const input = inputs[0];
    const mono = input && input.length ? input[0] : null;
    if (outputs[0]) for (const ch of outputs[0]) if (mono) ch.set(mono);
    if (!mono) return true;
    for (let i = 0; i < mono.length; i++) {
      this.block[this.fill++] = mono[i];
      if (this.fill === this.blockLen) {
        this.port.postMessage(this.block.buffer, [this.block.buffer]);
        this.block = new Float32Array(this.blockLen); // the old one was transferred
        this.fill = 0;
      }
    }
    return true;
  }
}

registerProcessor("audiostream-capture", CaptureProcessor);
registerProcessor("audiostream-playback", PlaybackProcessor);
registerProcessor("audiostream-tap", TapProcessor);
