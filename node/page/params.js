// The model's parameters: a slider for each one the page knows, plus free JSON for the rest.
// The gateway does not list parameters, so the known ones mirror the processors' declarations
// (processors/*/ "parameters"); a wrong value is refused by the container with its detail.

const KNOWN = {
  "green-tint-cpu": { strength: { value: 0.3, min: 0, max: 1, step: 0.05 } },
};

let changed = () => {};

export function onParamsChange(listener) {
  changed = listener;
}

export function showParamsFor(model) {
  const box = document.getElementById("param-sliders");
  box.replaceChildren();
  for (const [name, spec] of Object.entries(KNOWN[model] || {})) {
    const row = document.createElement("div");
    const label = document.createElement("label");
    const slider = document.createElement("input");
    const shown = document.createElement("output");
    slider.type = "range";
    slider.id = `param-${name}`;
    slider.dataset.param = name;
    Object.assign(slider, { min: spec.min, max: spec.max, step: spec.step, value: spec.value });
    label.htmlFor = slider.id;
    label.textContent = name;
    shown.textContent = slider.value;
    slider.addEventListener("input", () => {
      shown.textContent = slider.value;
      changed();
    });
    row.append(label, slider, shown);
    box.append(row);
  }
}

// The parameters as an object: sliders, then the JSON field (it wins). Throws on bad JSON.
export function currentParams() {
  const params = {};
  for (const slider of document.querySelectorAll("#param-sliders input[data-param]")) {
    params[slider.dataset.param] = Number(slider.value);
  }
  const extra = document.getElementById("params-extra").value.trim();
  if (extra) {
    let parsed;
    try {
      parsed = JSON.parse(extra);
    } catch (_) {
      throw new Error(`the parameters field is not JSON: write an object such as {"strength": 0.5}`);
    }
    if (!parsed || typeof parsed !== "object" || Array.isArray(parsed)) {
      throw new Error(`the parameters field must hold a JSON object, such as {"strength": 0.5}`);
    }
    Object.assign(params, parsed);
  }
  return params;
}
