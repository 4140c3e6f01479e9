// AudioWorklet: microphone samples at the context's rate -> 16 kHz 16-bit PCM frames of 100 ms.
// A windowed-sinc low-pass (cut below 8 kHz) before linear interpolation keeps aliasing out.
const TARGET = 16000;
const TAPS = 33;
const FRAME = 1600;

function lowpass(step) {
  if (step <= 1) return new Float32Array([1]);
  const fc = 0.45 / step; // cycles per input sample
  const h = new Float32Array(TAPS);
  const mid = (TAPS - 1) / 2;
  let sum = 0;
  for (let k = 0; k < TAPS; k++) {
    const x = k - mid;
    const sinc = x === 0 ? 2 * fc : Math.sin(2 * Math.PI * fc * x) / (Math.PI * x);
    h[k] = sinc * (0.5 - 0.5 * Math.cos((2 * Math.PI * (k + 0.5)) / TAPS));
    sum += h[k];
  }
  return h.map((v) => v / sum);
}

class Pcm16k extends AudioWorkletProcessor {
  constructor() {
    super();
    this.step = Math.max(1, sampleRate / TARGET); // input samples per output sample
    this.h = lowpass(this.step);
    this.ring = new Float32Array(this.h.length);
    this.at = 0;
    this.prev = 0;
    this.t = 1; // position of the next output, in input samples after `prev`
    this.out = new Int16Array(FRAME);
    this.len = 0;
    this.port.onmessage = (e) => {
      if (e.data === "flush") {
        this.send();
        this.port.postMessage("flushed");
      }
    };
  }

  send() {
    if (this.len === 0) return;
    const frame = this.out.slice(0, this.len);
    this.port.postMessage(frame.buffer, [frame.buffer]);
    this.len = 0;
  }

  emit(v) {
    v = Math.max(-1, Math.min(1, v));
    this.out[this.len++] = Math.round(v < 0 ? v * 32768 : v * 32767);
    if (this.len === FRAME) this.send();
  }

  process(inputs) {
    const channels = inputs[0];
    if (!channels || channels.length === 0) return true;
    const n = channels[0].length;
    const h = this.h, ring = this.ring, taps = h.length;
    for (let i = 0; i < n; i++) {
      let x = 0;
      for (const c of channels) x += c[i];
      ring[this.at] = x / channels.length;
      this.at = (this.at + 1) % taps;
      let y = 0;
      for (let k = 0; k < taps; k++) y += h[k] * ring[(this.at + k) % taps];
      while (this.t <= 1) {
        this.emit(this.prev + (y - this.prev) * this.t);
        this.t += this.step;
      }
      this.t -= 1;
      this.prev = y;
    }
    return true;
  }
}

registerProcessor("pcm16k", Pcm16k);
