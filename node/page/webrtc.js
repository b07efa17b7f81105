// WHIP (send) and WHEP (receive) against the gateway: one POST of an SDP offer with every ICE
// candidate in it (no trickle ICE), a 201 with the answer, and a Location that DELETE ends.

import { failure } from "./api.js";

const GATHER_MS = 3000; // host candidates gather in milliseconds; past this, go with what we have

function gathered(pc) {
  if (pc.iceGatheringState === "complete") return Promise.resolve();
  return new Promise((resolve) => {
    const timer = setTimeout(done, GATHER_MS);
    function done() {
      clearTimeout(timer);
      pc.removeEventListener("icegatheringstatechange", check);
      resolve();
    }
    function check() {
      if (pc.iceGatheringState === "complete") done();
    }
    pc.addEventListener("icegatheringstatechange", check);
  });
}

// A peer connection to the gateway: {pc, location, close()}; close() also DELETEs the session.
async function negotiate(url, pc) {
  try {
    await pc.setLocalDescription(await pc.createOffer());
    await gathered(pc);
    const response = await fetch(url, {
      method: "POST",
      headers: { "Content-Type": "application/sdp" },
      body: pc.localDescription.sdp,
    });
    if (response.status !== 201) throw await failure(response);
    const answer = await response.text();
    const where = response.headers.get("Location");
    await pc.setRemoteDescription({ type: "answer", sdp: answer });
    const location = where ? new URL(where, url).href : null;
    return {
      pc,
      location,
      close() {
        pc.close();
        if (location) fetch(location, { method: "DELETE" }).catch(() => {});
      },
    };
  } catch (error) {
    pc.close();
    throw error;
  }
}

export function whip(url, tracks) {
  const pc = new RTCPeerConnection();
  for (const track of tracks) pc.addTransceiver(track, { direction: "sendonly" });
  return negotiate(url, pc);
}

// Receives video (and audio when asked) into `stream`, a MediaStream for a <video>.
export function whep(url, stream, withAudio) {
  const pc = new RTCPeerConnection();
  pc.addTransceiver("video", { direction: "recvonly" });
  if (withAudio) pc.addTransceiver("audio", { direction: "recvonly" });
  pc.addEventListener("track", (event) => stream.addTrack(event.track));
  return negotiate(url, pc);
}
