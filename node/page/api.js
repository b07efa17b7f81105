// Calls to the gateway and the one way their errors reach the person: the JSON "detail".

const errorBox = () => document.getElementById("error");

export class ApiFailure extends Error {
  constructor(status, code, detail) {
    super(`${status} ${code}: ${detail}`);
    this.status = status;
    this.code = code;
    this.detail = detail;
  }
}

// The gateway answers every refusal as {"error", "detail"}; anything else is shown as text.
export async function failure(response) {
  const text = await response.text();
  try {
    const body = JSON.parse(text);
    if (body && typeof body.detail === "string") {
      return new ApiFailure(response.status, String(body.error), body.detail);
    }
  } catch (_) { /* not JSON: shown as it came */ }
  return new ApiFailure(response.status, "error", text.slice(0, 500) || response.statusText);
}

export function showError(error) {
  const box = errorBox();
  box.textContent = error instanceof ApiFailure
    ? `${error.code} (${error.status}): ${error.detail}`
    : String(error && error.message ? error.message : error);
  box.hidden = false;
}

export function clearError() {
  const box = errorBox();
  box.textContent = "";
  box.hidden = true;
}

// fetch() that turns a non-2xx answer into an ApiFailure.
export async function call(url, options = {}) {
  const response = await fetch(url, options);
  if (!response.ok) throw await failure(response);
  return response;
}

// Run an async action from a button: errors shown, the button disabled while it runs.
export function action(button, run) {
  button.addEventListener("click", async () => {
    clearError();
    button.disabled = true;
    try {
      await run();
    } catch (error) {
      showError(error);
    } finally {
      button.disabled = false;
    }
  });
}

// Browsers give the camera and microphone only to a secure context: https, or localhost.
export function mediaDevices() {
  if (!navigator.mediaDevices) {
    throw new Error(
      "this browser gives the camera and microphone only to pages on https or on localhost: open " +
      "the page as http://localhost:8935/ on the gateway's host (an SSH tunnel does: ssh -L 8935:localhost:8935 host)",
    );
  }
  return navigator.mediaDevices;
}
