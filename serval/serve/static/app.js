// serval's page: a file -> POST v1/emotion and v1/timeline; the microphone -> WS v1/stream.
// Every URL is relative, so the page works under any prefix the server is mounted at.
"use strict";

const COLORS = ["#94a3b8", "#f59e0b", "#3b82f6", "#dc2626", "#8b5cf6", "#16a34a", "#ec4899", "#0d9488"];
const $ = (id) => document.getElementById(id);
let model = { name: "", classes: [], dimensions: [] };
let recorder = null;

function color(label) {
  const i = model.classes.indexOf(label);
  return i < 0 ? "#64748b" : COLORS[i % COLORS.length];
}

function say(text, error = false) {
  $("status").textContent = text;
  $("status").classList.toggle("error", error);
}

function el(tag, cls, text) {
  const e = document.createElement(tag);
  if (cls) e.className = cls;
  if (text !== undefined) e.textContent = text;
  return e;
}

function bars(box, values, colored, emptyText) {
  const entries = Object.entries(values);
  if (entries.length === 0) {
    box.replaceChildren(el("div", "empty", emptyText));
    return;
  }
  const top = Math.max(...entries.map(([, v]) => v));
  box.replaceChildren(
    ...entries.map(([name, v]) => {
      const row = el("div", colored && v === top ? "bar top" : "bar");
      const rail = el("div", "rail");
      const fill = el("div", "fill");
      fill.style.width = `${(100 * Math.max(0, Math.min(1, v))).toFixed(1)}%`;
      fill.style.background = colored ? color(name) : "#475569";
      rail.append(fill);
      row.append(el("span", "name", name), rail, el("span", "value", v.toFixed(2)));
      return row;
    }),
  );
}

// only the dimensions the model was trained for: the API gives the others as null (or leaves them out)
function trained(scores) {
  return Object.fromEntries(Object.entries(scores || {}).filter(([, v]) => typeof v === "number"));
}

function show(record, source, note) {
  const label = $("label");
  label.textContent = record.label ?? "—";
  label.dataset.source = source;
  label.style.color = color(record.label);
  $("source").textContent = note;
  bars($("probs"), record.probabilities || {}, true, "no classes");
  bars($("dims"), trained(record.scores), false, "this model has no dimensional outputs");
}

function timeline(windows, duration) {
  const track = $("track");
  const total = Math.max(duration, ...windows.map((w) => w.end), 1e-3);
  track.replaceChildren(
    ...windows.map((w, i) => {
      // a window is drawn up to the next one's start: the overlap belongs to the newer window
      const end = i + 1 < windows.length ? Math.min(w.end, windows[i + 1].start) : w.end;
      const box = el("div", w.label ? "win" : "win unscored");
      box.style.left = `${(100 * w.start) / total}%`;
      box.style.width = `${(100 * (end - w.start)) / total}%`;
      if (w.label) box.style.background = color(w.label);
      const p = w.label && w.probabilities ? ` (${w.probabilities[w.label].toFixed(2)})` : "";
      box.title = `${w.start.toFixed(1)}–${w.end.toFixed(1)} s: ${w.label ?? "not scored"}${p}`;
      return box;
    }),
  );
  $("end").textContent = windows.length ? `${total.toFixed(1)} s` : "";
}

function legend() {
  $("legend").replaceChildren(
    ...model.classes.map((c) => {
      const s = el("span");
      const swatch = el("i");
      swatch.style.background = color(c);
      s.append(swatch, c);
      return s;
    }),
  );
}

async function loadModel() {
  try {
    const r = await fetch("v1/model");
    model = await r.json();
    const dims = model.dimensions.length ? `, ${model.dimensions.join(", ")}` : "";
    $("model").textContent = `model ${model.name}: ${model.classes.length} classes${dims}`;
    legend();
  } catch (e) {
    say(`cannot reach the server: ${e.message}`, true);
  }
}

// a duration as people say it: 45 s, 20 min, 4 h
function span(seconds) {
  const round = (x) => String(+x.toFixed(1));
  if (seconds < 120) return `${round(seconds)} s`;
  if (seconds < 7200) return `${round(seconds / 60)} min`;
  return `${round(seconds / 3600)} h`;
}

class ApiError extends Error {
  constructor(status, body) {
    super(body.error?.message || `HTTP ${status}`);
    this.type = body.error?.type;
  }
}

async function post(path, file) {
  const form = new FormData();
  // a type the server accepts whatever the browser guessed (video/mp4 for .mp4, nothing for .sph)
  const type = file.type.startsWith("audio/") ? file.type : "application/octet-stream";
  form.append("file", new Blob([file], { type }), file.name);
  const r = await fetch(path, { method: "POST", body: form });
  const body = await r.json().catch(() => ({}));
  if (!r.ok) throw new ApiError(r.status, body);
  return body;
}

// the server's limits (GET v1/model): a clip's own record up to max_clip_seconds, the timeline (and the
// overall label pooled from its windows) up to max_timeline_seconds, uploads up to max_upload_mb
function limits() {
  const l = model.limits || {};
  return {
    clip: l.max_clip_seconds ?? Infinity,
    timeline: l.max_timeline_seconds ?? Infinity,
    mb: l.max_upload_mb ?? Infinity,
  };
}

function tooLong(file) {
  const longest = Math.max(limits().clip, limits().timeline);
  return `${file.name} is too long for this server: it takes files of up to ${span(longest)}`;
}

function fail(text) {
  $("label").textContent = "—";
  say(text, true);
}

async function analyse(file) {
  if (!file) return;
  if (recorder) await recorder.stop();
  say(`analysing ${file.name} …`);
  $("label").textContent = "…";
  $("label").dataset.source = "";
  timeline([], 0);
  const { clip, timeline: longest, mb } = limits();
  if (file.size > mb * 2 ** 20) {
    const size = (file.size / 2 ** 20).toFixed(1);
    return fail(`${file.name} is ${size} MB: this server takes uploads of up to ${mb} MB`);
  }
  const errors = [];
  let t = null;
  try {
    t = await post("v1/timeline", file);
    timeline(t.windows, t.duration);
  } catch (e) {
    // too long for the timeline is too long for a clip too, unless the server allows longer clips
    if (e.type === "audio_too_long" && clip <= longest) return fail(tooLong(file));
    errors.push(`timeline: ${e.message}`);
  }
  try {
    await overall(file, t);
  } catch (e) {
    $("label").textContent = "—";
    errors.unshift(e.type === "audio_too_long" ? tooLong(file) : e.message);
  }
  say(errors.join("; ") || `${file.name}: done`, errors.length > 0);
}

// the clip's own record (as `serval predict` gives it) where the clip endpoint takes the file; past
// its limit, the timeline's windows pooled over the whole file
async function overall(file, t) {
  if (t && t.duration > limits().clip) {
    const note = `${t.file}, ${span(t.duration)}: ${t.windows.length} windows pooled`;
    if (t.overall) show(t.overall, "timeline", note);
    else $("label").textContent = "—";
    return;
  }
  const rec = await post("v1/emotion", file);
  show(rec, "file", `${rec.file}, ${rec.duration.toFixed(2)} s`);
}

class Recorder {
  // microphone -> AudioWorklet (16 kHz int16) -> WS v1/stream; a result per window comes back
  async start() {
    if (!navigator.mediaDevices?.getUserMedia || !window.AudioWorkletNode) {
      throw new Error("the microphone needs a secure page: open it on localhost or over https");
    }
    this.windows = [];
    this.stream = await navigator.mediaDevices.getUserMedia({
      audio: { channelCount: 1, echoCancellation: false, noiseSuppression: false, autoGainControl: false },
    });
    this.ctx = new AudioContext();
    await this.ctx.audioWorklet.addModule("static/recorder.js");
    const rate = Math.min(16000, Math.round(this.ctx.sampleRate));
    const url = new URL(`v1/stream?sample_rate=${rate}&encoding=pcm_s16le`, location.href);
    url.protocol = url.protocol === "https:" ? "wss:" : "ws:";
    this.ws = new WebSocket(url);
    this.ws.binaryType = "arraybuffer";
    this.closed = new Promise((resolve) => this.ws.addEventListener("close", resolve));
    const ready = await new Promise((resolve, reject) => {
      this.ws.onmessage = (e) => {
        const msg = JSON.parse(e.data);
        if (msg.type === "ready") resolve(msg);
        else reject(new Error(msg.error?.message || "the server refused the stream"));
      };
      this.ws.onclose = () => reject(new Error("the server closed the stream"));
    });
    this.ws.onmessage = (e) => this.receive(JSON.parse(e.data));
    this.ws.onclose = () => this.lost("the server closed the stream");
    this.node = new AudioWorkletNode(this.ctx, "pcm16k", { numberOfOutputs: 1 });
    this.flushed = new Promise((resolve) => {
      this.node.port.onmessage = (e) => {
        if (e.data === "flushed") resolve();
        else if (this.ws.readyState === WebSocket.OPEN) this.ws.send(e.data);
      };
    });
    this.source = this.ctx.createMediaStreamSource(this.stream);
    const mute = this.ctx.createGain(); // keeps the node pulled by the graph, plays nothing
    mute.gain.value = 0;
    this.source.connect(this.node).connect(mute).connect(this.ctx.destination);
    this.window = ready.window;
    return ready;
  }

  receive(msg) {
    if (msg.type === "window") {
      this.windows.push(msg);
      show(msg, "stream", `live, ${msg.start.toFixed(1)}–${msg.end.toFixed(1)} s`);
      timeline(this.windows, msg.end);
      say(`recording: ${this.windows.length} window${this.windows.length > 1 ? "s" : ""}`);
    } else if (msg.type === "summary") {
      timeline(this.windows, msg.duration);
      if (msg.overall) {
        show(msg.overall, "summary", `whole recording, ${msg.duration.toFixed(1)} s`);
        say(`recorded ${msg.duration.toFixed(1)} s in ${msg.windows} windows`);
      } else {
        say(`recorded ${msg.duration.toFixed(1)} s: too short for a result`);
      }
    } else if (msg.type === "error") {
      this.lost(msg.error.message);
    }
  }

  // the stream ended without the client's Stop: an error from the server, or the server gone
  lost(why) {
    if (recorder !== this) return;
    recorder = null;
    this.release();
    setIdle();
    say(`stream: ${why}`, true);
  }

  release() {
    this.stream?.getTracks().forEach((t) => t.stop());
    this.source?.disconnect();
    this.node?.disconnect();
    if (this.ctx && this.ctx.state !== "closed") this.ctx.close();
  }

  async stop() {
    recorder = null;
    setIdle(true);
    if (this.node && this.ws.readyState === WebSocket.OPEN) {
      this.node.port.postMessage("flush");
      await Promise.race([this.flushed, new Promise((r) => setTimeout(r, 1000))]);
    }
    this.release();
    if (this.ws?.readyState === WebSocket.OPEN) {
      this.ws.send(JSON.stringify({ type: "end" }));
      say("scoring the end of the recording …");
      // the server sends the summary and closes; do not wait forever for it
      const late = setTimeout(() => this.ws.close(), 30000);
      await this.closed;
      clearTimeout(late);
    }
    setIdle();
  }
}

function setIdle(busy = false) {
  const b = $("record");
  b.textContent = "Record";
  b.classList.remove("recording");
  b.disabled = busy;
}

async function toggle() {
  const b = $("record");
  if (recorder) {
    await recorder.stop();
    return;
  }
  b.disabled = true;
  const r = new Recorder();
  try {
    $("label").textContent = "…";
    $("label").dataset.source = "";
    timeline([], 0);
    say("starting the microphone …");
    const ready = await r.start();
    recorder = r;
    b.textContent = "Stop";
    b.classList.add("recording");
    b.disabled = false;
    say(`recording: the first result comes after ${ready.window} s`);
  } catch (e) {
    r.release();
    r.ws?.close();
    $("label").textContent = "—";
    setIdle();
    say(`microphone: ${e.message}`, true);
  }
}

function setup() {
  const drop = $("drop");
  $("file").addEventListener("change", (e) => analyse(e.target.files[0]));
  $("record").addEventListener("click", toggle);
  // a file dropped anywhere is analysed, never opened by the browser in place of the page
  window.addEventListener("dragover", (e) => {
    e.preventDefault();
    drop.classList.add("over");
  });
  window.addEventListener("dragleave", (e) => {
    if (e.relatedTarget === null) drop.classList.remove("over");
  });
  window.addEventListener("drop", (e) => {
    e.preventDefault();
    drop.classList.remove("over");
    analyse(e.dataTransfer.files[0]);
  });
  bars($("probs"), {}, true, "choose, drop or record audio");
  bars($("dims"), {}, false, "—");
  loadModel();
}

setup();
