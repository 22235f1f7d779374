// audiostream browser SDK: microphone -> gateway pipeline -> speakers.
// Dependency-free ES module, served by the gateway at /sdk/audiostream.js.
//
//   import { AudioStreamClient } from "https://gateway.example/sdk/audiostream.js";
//   const client = new AudioStreamClient({ url: "wss://gateway.example/v1/stream",
//                                          token, pipeline: ["denoise"] });
//   await client.start();   // asks for the microphone, plays the processed audio
//   client.monitor("raw");  // or "processed" (default)
//   await client.stop();
//
// `token` is a browser token (bt1.…) minted by your server with POST /v1/tokens:
// never put an API key in a page.

const WORKLET_URL = new URL("./audiostream-worklet.js", import.meta.url);
const UNSUPPORTED_VERSION = 4007;
// Acknowledge outcomes this often, so the gateway can drop them from its resume journal.
const ACK_EVERY = 25;

export class AudioStreamClient extends EventTarget {
  constructor({
    url, token, pipeline, sampleRate = 16000, frameMs = 20, cushionMs = 60,
    maxQueuedFrames = 50, denoise, browserProcessing, audioContext,
  }) {
    super();
    if (!url || !token || !pipeline) throw new Error("url, token and pipeline are required");
    this.url = url;
    this.token = token;
    this.pipeline = pipeline;
    this.sampleRate = sampleRate;
    this.frameMs = frameMs;
    this.cushionMs = cushionMs;
    this.maxQueuedFrames = maxQueuedFrames;
    const names = pipeline.map((s) => (typeof s === "string" ? s : s.name));
    this.denoise = denoise ?? names.includes("denoise");
    this.browserProcessing = browserProcessing ?? !this.denoise;
    this.ctx = audioContext ?? null;
    this.queue = [];
    this.seq = 0;
    this.outcomes = 0;
    this.acked = 0;
    this.credit = null; // null: v1 (real-time capture is the pacing)
    this.version = null;
    this.stats = { sent: 0, received: 0, notices: 0, droppedBeforeSend: 0, playback: null };
  }

  async start() {
    const ctx = (this.ctx ??= new AudioContext({ latencyHint: "interactive" }));
    await ctx.audioWorklet.addModule(WORKLET_URL);
    this.media = await navigator.mediaDevices.getUserMedia({ audio: this.audioConstraints() });
    this.source = ctx.createMediaStreamSource(this.media);
    this.capture = new AudioWorkletNode(ctx, "audiostream-capture", {
      numberOfInputs: 1, numberOfOutputs: 1, outputChannelCount: [1],
      processorOptions: { targetRate: this.sampleRate, frameMs: this.frameMs },
    });
    this.playback = new AudioWorkletNode(ctx, "audiostream-playback", {
      numberOfInputs: 0, numberOfOutputs: 1, outputChannelCount: [1],
      processorOptions: { cushionMs: this.cushionMs },
    });
    this.tap = new AudioWorkletNode(ctx, "audiostream-tap", {
      numberOfInputs: 1, numberOfOutputs: 1, outputChannelCount: [1],
    });
    this.rawGain = new GainNode(ctx, { gain: 0 });
    this.processedGain = new GainNode(ctx, { gain: 1 });
    // Analysers for the page: what the microphone hears and what the speakers play.
    this.inputAnalyser = new AnalyserNode(ctx, { fftSize: 1024 });
    this.outputAnalyser = new AnalyserNode(ctx, { fftSize: 1024 });
    this.processedAnalyser = new AnalyserNode(ctx, { fftSize: 1024 });
    this.source.connect(this.capture);
    this.capture.connect(this.inputAnalyser);
    this.capture.connect(this.rawGain).connect(this.tap);
    this.playback.connect(this.processedAnalyser);
    this.playback.connect(this.processedGain).connect(this.tap);
    this.tap.connect(this.outputAnalyser);
    this.tap.connect(ctx.destination);
    this.capture.port.onmessage = (e) => {
      if (e.data instanceof ArrayBuffer) this._frame(e.data);
    };
    this.playback.port.onmessage = (e) => {
      this.stats.playback = e.data;
      this.dispatchEvent(new CustomEvent("playback", { detail: e.data }));
    };
    this.tap.port.onmessage = (e) => {
      this.dispatchEvent(new CustomEvent("played", { detail: new Float32Array(e.data) }));
    };
    if (ctx.state === "suspended") await ctx.resume();
    await this._connect(1.1);
  }

  // Our denoiser replaces the browser's own processing: two in a row only add artefacts.
  audioConstraints() {
    const on = this.browserProcessing;
    return { channelCount: 1, noiseSuppression: on, echoCancellation: on, autoGainControl: on };
  }

  // Which stream reaches the speakers: "processed" (default) or "raw".
  monitor(which) {
    const raw = which === "raw";
    this.rawGain.gain.value = raw ? 1 : 0;
    this.processedGain.gain.value = raw ? 0 : 1;
  }

  _connect(version) {
    return new Promise((resolve, reject) => {
      const ws = new WebSocket(this.url);
      ws.binaryType = "arraybuffer";
      this.ws = ws;
      let ready = false;
      ws.onopen = () => {
        ws.send(JSON.stringify({
          type: "start", version, api_key: this.token,
          format: { encoding: "pcm_s16le", sample_rate: this.sampleRate, channels: 1 },
          pipeline: this.pipeline,
        }));
      };
      ws.onmessage = (e) => {
        if (typeof e.data !== "string") { this._audio(e.data); return; }
        const msg = JSON.parse(e.data);
        if (msg.type === "ready") {
          ready = true;
          this.version = msg.version;
          this.credit = typeof msg.credit === "number" ? msg.credit : null;
          this.session = msg;
          this.dispatchEvent(new CustomEvent("ready", { detail: msg }));
          resolve(msg);
          this._pump();
        } else if (msg.type === "credit") {
          this.credit = Math.max(this.credit ?? 0, msg.credit);
          this._pump();
        } else if (msg.type === "notice") {
          this.stats.notices += msg.count ?? 1;
          // A dropped chunk still takes its place in time: play silence for it.
          for (let i = 0; i < (msg.count ?? 1); i++) {
            this._audio(new Int16Array(Math.round(this.sampleRate * this.frameMs / 1000)).buffer,
              true);
          }
          this.dispatchEvent(new CustomEvent("notice", { detail: msg }));
        } else if (msg.type === "error") {
          if (!ready && msg.code === UNSUPPORTED_VERSION && version !== 1) {
            ws.onclose = null;
            ws.close();
            this._connect(1).then(resolve, reject); // a v1 gateway: real-time pacing
            return;
          }
          this.dispatchEvent(new CustomEvent("error", { detail: msg }));
          if (!ready) reject(new Error(`${msg.name}: ${msg.message}`));
        } else if (msg.type === "summary") {
          this.dispatchEvent(new CustomEvent("summary", { detail: msg }));
        }
      };
      ws.onclose = (e) => {
        this.dispatchEvent(new CustomEvent("close", { detail: { code: e.code, reason: e.reason } }));
        if (!ready) reject(new Error(`connection closed (${e.code}) ${e.reason}`));
      };
    });
  }

  _frame(buffer) {
    this.dispatchEvent(new CustomEvent("captured", { detail: new Int16Array(buffer) }));
    if (!this.ws || this.ws.readyState !== WebSocket.OPEN || this.version === null) return;
    this.queue.push(buffer);
    // Beyond the queue limit the oldest frames go: live audio is useless late.
    while (this.queue.length > this.maxQueuedFrames) {
      this.queue.shift();
      this.stats.droppedBeforeSend++;
    }
    this._pump();
  }

  // Send what credit allows (v1.1); a v1 gateway gets frames as the microphone makes
  // them, which is real time.
  _pump() {
    while (this.queue.length && this.ws.readyState === WebSocket.OPEN &&
           (this.credit === null || this.seq < this.credit)) {
      const frame = this.queue.shift();
      this.ws.send(frame);
      this.dispatchEvent(new CustomEvent("sent", { detail: { seq: this.seq, pcm: new Int16Array(frame) } }));
      this.seq++;
      this.stats.sent++;
    }
  }

  _audio(buffer, silence = false) {
    if (!silence) this.stats.received++;
    this.outcomes++;
    if (this.outcomes - this.acked >= ACK_EVERY && this.ws.readyState === WebSocket.OPEN) {
      this.acked = this.outcomes;
      this.ws.send(JSON.stringify({ type: "ack", received: this.outcomes }));
    }
    const pcm = new Int16Array(buffer);
    // In seq order: the n-th "processed" answers the n-th "sent" (silence for a notice).
    this.dispatchEvent(new CustomEvent("processed", { detail: pcm }));
    this.playback.port.postMessage({ pcm, rate: this.sampleRate });
  }

  async stop() {
    this.capture?.port.postMessage("stop");
    this.media?.getTracks().forEach((t) => t.stop());
    const ws = this.ws;
    if (ws && ws.readyState === WebSocket.OPEN) {
      const closed = new Promise((r) => ws.addEventListener("close", r, { once: true }));
      ws.send(JSON.stringify({ type: "stop" }));
      await closed;
    }
    await this.ctx?.close();
  }
}

// Root-mean-square level of a block in dBFS (for meters).
export function levelDb(block) {
  let sum = 0;
  const scale = block instanceof Int16Array ? 1 / 32768 : 1;
  for (let i = 0; i < block.length; i++) sum += (block[i] * scale) ** 2;
  return 10 * Math.log10(sum / Math.max(1, block.length) + 1e-12);
}
