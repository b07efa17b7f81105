// Audio jobs: a WAV file, the bundled sample or a recording from the microphone, transcribed by
// one POST /process/request/{model}; the transcript is shown with each segment's times.

import { action, call, mediaDevices, showError } from "./api.js";
import { currentParams } from "./params.js";

const RATE = 16000; // what transcribers want; the browser resamples the microphone to it
const MAX_SECONDS = 30;
let input = null; // the WAV Blob to send
let recording = null; // {stop()} while the microphone records

function show(blob) {
  input = blob;
  const player = document.getElementById("audio-input");
  if (player.src.startsWith("blob:")) URL.revokeObjectURL(player.src);
  player.src = URL.createObjectURL(blob);
}

// 16-bit mono PCM in a RIFF/WAVE container: what every transcriber here reads without ffmpeg.
export function wav(samples, rate) {
  const view = new DataView(new ArrayBuffer(44 + samples.length * 2));
  const text = (offset, value) => [...value].forEach((c, i) => view.setUint8(offset + i, c.charCodeAt(0)));
  text(0, "RIFF"); view.setUint32(4, 36 + samples.length * 2, true); text(8, "WAVE");
  text(12, "fmt "); view.setUint32(16, 16, true); view.setUint16(20, 1, true); view.setUint16(22, 1, true);
  view.setUint32(24, rate, true); view.setUint32(28, rate * 2, true); view.setUint16(32, 2, true);
  view.setUint16(34, 16, true); text(36, "data"); view.setUint32(40, samples.length * 2, true);
  samples.forEach((s, i) => view.setInt16(44 + i * 2, Math.max(-1, Math.min(1, s)) * 0x7fff, true));
  return new Blob([view], { type: "audio/wav" });
}

async function record(button) {
  if (recording) return recording.stop();
  const media = await mediaDevices().getUserMedia({ audio: { channelCount: 1 } });
  const context = new AudioContext({ sampleRate: RATE });
  const source = context.createMediaStreamSource(media);
  // ScriptProcessor: deprecated but everywhere, and it needs no second module file.
  const tap = context.createScriptProcessor(4096, 1, 1);
  const chunks = [];
  let length = 0;
  tap.onaudioprocess = (event) => {
    const chunk = new Float32Array(event.inputBuffer.getChannelData(0));
    chunks.push(chunk);
    length += chunk.length;
    if (length >= MAX_SECONDS * RATE) recording.stop();
  };
  source.connect(tap);
  tap.connect(context.destination);
  button.textContent = "Stop recording";
  recording = {
    stop() {
      recording = null;
      tap.disconnect();
      source.disconnect();
      media.getTracks().forEach((t) => t.stop());
      context.close();
      button.textContent = "Record";
      const samples = new Float32Array(length);
      let at = 0;
      for (const chunk of chunks) { samples.set(chunk, at); at += chunk.length; }
      show(wav(samples, RATE));
    },
  };
}

function seconds(value) {
  return typeof value === "number" ? `${value.toFixed(2)} s` : "";
}

async function run(model) {
  if (recording) recording.stop();
  if (!input) show(await (await call("/page/sample.wav")).blob());
  const started = performance.now();
  const response = await call(`/process/request/${encodeURIComponent(model)}`, {
    method: "POST",
    headers: { "X-Model-Id": model, "Content-Type": "audio/wav", "X-Timeout-Seconds": "60",
               "X-Params": JSON.stringify(currentParams()) },
    body: input,
  });
  const result = await response.json();
  const elapsed = performance.now() - started;
  document.getElementById("transcript").textContent = result.text || "(no speech heard)";
  const rows = (result.segments || []).map((segment) => {
    const row = document.createElement("tr");
    for (const value of [seconds(segment.start), seconds(segment.end), segment.text]) {
      row.insertCell().textContent = value;
    }
    return row;
  });
  document.querySelector("#segments tbody").replaceChildren(...rows);
  let text = `round trip ${elapsed.toFixed(0)} ms`;
  if (result.processing_seconds !== undefined) {
    text += `; the container took ${(result.processing_seconds * 1000).toFixed(0)} ms` +
      ` for ${seconds(result.audio_seconds)} of sound`;
  }
  document.getElementById("audio-timing").textContent = text;
}

export function setUpAudio(model) {
  document.getElementById("audio-file").addEventListener("change", (event) => {
    const [file] = event.target.files;
    if (file) show(file);
  });
  action(document.getElementById("audio-sample"), async () => show(await (await call("/page/sample.wav")).blob()));
  const recordButton = document.getElementById("audio-record");
  recordButton.addEventListener("click", () => record(recordButton).catch((error) => {
    recording = null;
    recordButton.textContent = "Record";
    showError(`the microphone: ${error.message || error}`);
  }));
  action(document.getElementById("audio-run"), () => run(model()));
}
