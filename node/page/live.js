// Live: the camera (and microphone) to the gateway by WHIP, through a stream at an orchestrator
// and its container, and back by WHEP, shown next to the camera. Parameter changes go to the
// stream's update_url, captions come from its data_url (Server-Sent Events).

import { call, clearError, mediaDevices, showError } from "./api.js";
import { currentParams, onParamsChange } from "./params.js";
import { BLOCK, STAMP_WIDTH, age, drawStamp, readStamp } from "./stamp.js";
import { whep, whip } from "./webrtc.js";

const WIDTH = 640;
const HEIGHT = 480;
const FPS = 30;
const LATENCIES_KEPT = 300; // the p50 is over the last ~10 s of frames
const UPDATE_DELAY_MS = 150; // a slider sends at most one update per this long

const $ = (id) => document.getElementById(id);
let session = null;

function setState(text) {
  $("live-state").textContent = text;
}

function readout(id, value, digits) {
  $(id).dataset.value = value === null ? "" : String(value);
  $(id).textContent = value === null ? "–" : value.toFixed(digits);
}

// The camera's frames redrawn with a timestamp stamp, as the track WHIP sends.
function stampedTrack(camera, stopped) {
  const canvas = document.createElement("canvas");
  Object.assign(canvas, { width: WIDTH, height: HEIGHT });
  const ctx = canvas.getContext("2d");
  const draw = () => {
    if (stopped()) return;
    ctx.drawImage(camera, 0, 0, WIDTH, HEIGHT);
    drawStamp(ctx, HEIGHT, performance.now());
    camera.requestVideoFrameCallback(draw);
  };
  camera.requestVideoFrameCallback(draw);
  return canvas.captureStream(FPS).getVideoTracks()[0];
}

// The frame rate the WHIP connection sends at (the browser's encoder may send fewer frames than
// the camera gives when the CPU is short), for the readout next to the played fps.
async function sentFps(pc) {
  const stats = await pc.getStats();
  for (const report of stats.values()) {
    if (report.type === "outbound-rtp" && report.kind === "video" && report.framesPerSecond !== undefined) {
      return report.framesPerSecond;
    }
  }
  return null;
}

// What WHEP plays: fps as the player counts frames shown (getVideoPlaybackQuality), the latency
// p50 from each frame's stamp (only the stamp's strip is copied out), and the fps WHIP sends.
function measure(output, sender, stopped) {
  const strip = document.createElement("canvas");
  Object.assign(strip, { width: STAMP_WIDTH, height: BLOCK });
  const ctx = strip.getContext("2d", { willReadFrequently: true });
  const latencies = [];
  const shown = () => {
    const quality = output.getVideoPlaybackQuality();
    return quality.totalVideoFrames - quality.droppedVideoFrames;
  };
  let frames = shown();
  let since = performance.now();
  const onFrame = () => {
    if (stopped()) return;
    const now = performance.now();
    const width = (STAMP_WIDTH * output.videoWidth) / WIDTH; // the strip in the played frame's pixels
    const height = (BLOCK * output.videoHeight) / HEIGHT;
    ctx.drawImage(output, 0, output.videoHeight - height, width, height, 0, 0, STAMP_WIDTH, BLOCK);
    const stamp = readStamp(ctx, BLOCK);
    if (stamp !== null) {
      latencies.push(age(stamp, now));
      if (latencies.length > LATENCIES_KEPT) latencies.shift();
    }
    if (now - since >= 1000) {
      const count = shown();
      readout("live-fps", ((count - frames) * 1000) / (now - since), 1);
      const sorted = [...latencies].sort((a, b) => a - b);
      readout("live-latency", sorted.length ? sorted[Math.floor(sorted.length / 2)] : null, 0);
      sentFps(sender).then((fps) => readout("live-sent-fps", fps, 0), () => {});
      frames = count;
      since = now;
    }
    output.requestVideoFrameCallback(onFrame);
  };
  output.requestVideoFrameCallback(onFrame);
}

function follow(dataUrl, end) {
  const captions = $("captions");
  const events = new EventSource(dataUrl);
  events.onmessage = (message) => {
    let line;
    try {
      line = JSON.parse(message.data);
    } catch (_) {
      return;
    }
    if (typeof line.text !== "string" || !line.text.trim()) return;
    const piece = document.createElement("div");
    const time = document.createElement("span");
    time.className = "time";
    time.textContent = typeof line.start === "number" ? `${line.start.toFixed(1)} s ` : "";
    piece.append(time, line.text);
    captions.append(piece);
    while (captions.childElementCount > 20) captions.firstElementChild.remove();
  };
  events.addEventListener("end", (message) => {
    let reason = "the stream ended";
    try {
      reason = JSON.parse(message.data).reason || reason;
    } catch (_) { /* keep the plain reason */ }
    end(reason);
  });
  return events;
}

async function start(model, kind) {
  const params = currentParams();
  mediaDevices(); // before a stream is started for nothing
  setState("starting");
  const response = await call("/process/stream/start", {
    method: "POST",
    headers: { "X-Model-Id": model, "Content-Type": "application/json" },
    body: JSON.stringify({ stream_name: "page", params }),
  });
  const urls = await response.json();
  const s = { urls, closed: false, peers: [], media: null, events: null, timer: null };
  session = s;
  try {
    if (!urls.whip_url || !urls.whep_url) {
      throw new Error("this gateway offers no WHIP/WHEP for streams (whip_url is empty): update the node");
    }
    if (kind === "audio") $("live-mic").checked = true; // a transcriber hears the microphone
    const withMic = $("live-mic").checked;
    $("live-output-caption").textContent = kind === "audio"
      ? "through the pipeline (a transcriber answers with the captions below)"
      : "through the pipeline";
    s.media = await mediaDevices().getUserMedia({
      video: { width: WIDTH, height: HEIGHT, frameRate: FPS },
      audio: withMic,
    });
    const camera = $("live-camera");
    camera.srcObject = s.media;
    await camera.play();
    const stopped = () => s.closed;
    const tracks = [stampedTrack(camera, stopped), ...s.media.getAudioTracks()];
    s.peers.push(await whip(urls.whip_url, tracks));
    const played = new MediaStream();
    s.peers.push(await whep(urls.whep_url, played, withMic));
    const output = $("live-output");
    output.srcObject = played;
    measure(output, s.peers[0].pc, stopped);
    if (urls.data_url) s.events = follow(urls.data_url, (reason) => end(s, `ended: ${reason}`));
    setState("live");
  } catch (error) {
    await stop(s, "stopped");
    throw error;
  }
}

function end(s, state) {
  if (s.closed) return;
  s.closed = true;
  clearTimeout(s.timer);
  if (s.events) s.events.close();
  s.peers.forEach((peer) => peer.close());
  if (s.media) s.media.getTracks().forEach((track) => track.stop());
  if (session === s) session = null;
  setState(state);
  $("live-start").disabled = false;
  $("live-stop").disabled = true;
}

async function stop(s, state) {
  const wasOpen = !s.closed;
  end(s, state);
  if (wasOpen) await call(s.urls.stop_url, { method: "POST" }).catch(() => {});
}

// A slider moved while live: the new parameters to the container, at most every UPDATE_DELAY_MS.
function scheduleUpdate() {
  const s = session;
  if (!s || s.closed) return;
  clearTimeout(s.timer);
  s.timer = setTimeout(async () => {
    try {
      await call(s.urls.update_url, {
        method: "POST",
        headers: { "Content-Type": "application/json" },
        body: JSON.stringify(currentParams()), // relayed as is to the container's /stream/params
      });
    } catch (error) {
      showError(error);
    }
  }, UPDATE_DELAY_MS);
}

export function setUpLive(model, kind) {
  const startButton = $("live-start");
  const stopButton = $("live-stop");
  startButton.addEventListener("click", async () => {
    startButton.disabled = true;
    clearError();
    try {
      await start(model(), kind());
      stopButton.disabled = false;
    } catch (error) {
      showError(error);
      if (!session) setState("stopped");
      startButton.disabled = false;
    }
  });
  stopButton.addEventListener("click", () => session && stop(session, "stopped"));
  onParamsChange(scheduleUpdate);
  // Leaving the page ends its stream at once (its unit freed), not at the gateway's idle timeout.
  window.addEventListener("pagehide", () => {
    if (session) navigator.sendBeacon(session.urls.stop_url);
  });
  $("params-extra").addEventListener("change", scheduleUpdate);
}
