// Image jobs: one POST /process/request/{model} with the picture, the output shown beside it.

import { action, call } from "./api.js";
import { currentParams } from "./params.js";

let input = null; // the Blob to send

function show(img, blob) {
  if (img.src.startsWith("blob:")) URL.revokeObjectURL(img.src);
  img.src = URL.createObjectURL(blob);
}

async function useSample() {
  input = await (await call("/page/sample.jpg")).blob();
  show(document.getElementById("image-input"), input);
}

// Where the time went, from the browser's own timing of the request: sending the picture,
// waiting while gateway, orchestrator and container work, receiving the result.
function timing(url, started, orchestrator) {
  const total = performance.now() - started;
  const entry = performance.getEntriesByName(url).pop();
  let text = `round trip ${total.toFixed(0)} ms`;
  if (entry && entry.responseStart > 0) {
    const send = entry.requestStart - entry.startTime;
    const wait = entry.responseStart - entry.requestStart;
    const receive = entry.responseEnd - entry.responseStart;
    text += `: connect and send ${send.toFixed(0)} ms, gateway → orchestrator → container and back ` +
      `${wait.toFixed(0)} ms, receive ${receive.toFixed(0)} ms`;
  }
  if (orchestrator) text += ` (orchestrator ${orchestrator})`;
  return text;
}

async function run(model) {
  if (!input) await useSample();
  const params = currentParams();
  const url = new URL(`/process/request/${encodeURIComponent(model)}`, location.href).href;
  const started = performance.now();
  const response = await call(url, {
    method: "POST",
    headers: {
      "X-Model-Id": model,
      "Content-Type": input.type || "image/jpeg",
      "X-Params": JSON.stringify(params),
      "X-Timeout-Seconds": "30",
    },
    body: input,
  });
  const output = await response.blob();
  const img = document.getElementById("image-output");
  await new Promise((resolve, reject) => {
    img.onload = resolve;
    img.onerror = () => reject(new Error(`the answer (${output.type}) is not an image this browser shows`));
    show(img, output);
  });
  const shown = document.getElementById("image-timing");
  shown.textContent = timing(url, started, response.headers.get("X-Orchestrator-Url"));
  shown.dataset.ms = String(Math.round(performance.now() - started));
}

export function setUpImage(model) {
  document.getElementById("image-file").addEventListener("change", (event) => {
    const [file] = event.target.files;
    if (file) {
      input = file;
      show(document.getElementById("image-input"), file);
    }
  });
  action(document.getElementById("image-sample"), useSample);
  action(document.getElementById("image-run"), () => run(model()));
}
