// The page: the models the gateway reaches (GET /process/models), the model chosen, the tabs.
// It is interactive once the first model list is in; body[data-ready] then holds how long that
// took from the start of navigation, in ms (the browser tests read it).

import { setUpAudio } from "./audio.js";
import { setUpImage } from "./image.js";
import { setUpLive } from "./live.js";
import { showParamsFor } from "./params.js";

const POLL_MS = 2000;
const $ = (id) => document.getElementById(id);
const kinds = new Map(); // model id -> "image" | "audio", from the last list
let shownParamsFor = null;

const model = () => $("model").value.trim();
const kind = () => kinds.get(model()) || "image";

// A model of the other kind switches between the Image and Audio tabs; Live takes either.
function choose(id) {
  $("model").value = id;
  chosen();
  const open = document.querySelector('.tabs button[aria-selected="true"]').dataset.panel;
  if (open !== "live") openTab(kind());
}

function chosen() {
  if (model() !== shownParamsFor) {
    shownParamsFor = model();
    showParamsFor(shownParamsFor);
  }
  for (const row of document.querySelectorAll("#models tbody tr")) {
    row.classList.toggle("chosen", row.dataset.model === model());
  }
}

function openTab(name) {
  for (const tab of document.querySelectorAll(".tabs button")) {
    const on = tab.dataset.panel === name;
    tab.setAttribute("aria-selected", String(on));
    $(`panel-${tab.dataset.panel}`).hidden = !on;
  }
}

function row(entry) {
  const tr = document.createElement("tr");
  tr.dataset.model = entry.id;
  tr.insertCell().textContent = entry.id;
  tr.insertCell().textContent = entry.kind;
  const health = tr.insertCell();
  health.textContent = entry.health;
  health.className = `health-${entry.health}`;
  tr.insertCell().textContent = `${entry.load} / ${entry.capacity}`;
  tr.addEventListener("click", () => choose(entry.id));
  return tr;
}

async function refresh() {
  let body;
  try {
    const response = await fetch("/process/models", { cache: "no-store" });
    body = await response.json();
    if (!response.ok) throw new Error(body.detail || response.statusText);
  } catch (error) {
    $("models-note").textContent = `the model list is unavailable: ${error.message || error}`;
    return;
  }
  const models = body.models || [];
  kinds.clear();
  models.forEach((entry) => kinds.set(entry.id, entry.kind));
  $("models").tBodies[0].replaceChildren(...models.map(row));
  $("model-ids").replaceChildren(...models.map((entry) => new Option(entry.id, entry.id)));
  const notes = [];
  if (!models.length) notes.push("no orchestrator serves a model yet");
  if (body.unreachable) notes.push(`${body.unreachable} orchestrator(s) did not answer`);
  $("models-note").textContent = notes.join("; ");
  if (!model() && models.length) choose(models[0].id);
  chosen();
}

async function main() {
  for (const tab of document.querySelectorAll(".tabs button")) {
    tab.addEventListener("click", () => openTab(tab.dataset.panel));
  }
  $("model").addEventListener("change", chosen);
  setUpImage(model);
  setUpAudio(model);
  setUpLive(model, kind);
  await refresh();
  setInterval(refresh, POLL_MS);
  document.body.dataset.ready = String(Math.round(performance.now()));
}

main();
