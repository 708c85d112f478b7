// The dashboard's submit form and compare view. The spec is checked in the browser against the JobSpec
// JSON Schema that /openapi.json publishes (the same pydantic model the server validates with), so a
// mistake is shown next to the field before anything is uploaded; the server's answer still decides.
"use strict";

const DEFAULT_SPEC = {
  input_shape: [1, 3, 32, 32],
  method: { name: "l1" },
  sparse_training: { epochs: 10 },
  prune: { target: "channels", amount: 0.5 },
  finetune: { epochs: 5 },
};
let openapi = null;

async function specSchema() {
  if (!openapi) openapi = await (await fetch("/openapi.json")).json();
  return openapi;
}

function resolveRef(root, ref) {
  return ref.replace(/^#\//, "").split("/").reduce((o, k) => o[k], root);
}

function typeOk(t, v) {
  switch (t) {
    case "object": return v !== null && typeof v === "object" && !Array.isArray(v);
    case "array": return Array.isArray(v);
    case "integer": return Number.isInteger(v);
    case "number": return typeof v === "number" && Number.isFinite(v);
    case "string": return typeof v === "string";
    case "boolean": return typeof v === "boolean";
    case "null": return v === null;
    default: return true;
  }
}

// A JSON Schema check covering what JobSpec's schema uses; errors are {path, message}.
function check(schema, v, path, root, out) {
  if (schema.$ref) return check(resolveRef(root, schema.$ref), v, path, root, out);
  for (const s of schema.allOf || []) check(s, v, path, root, out);
  for (const key of ["anyOf", "oneOf"]) {
    if (!schema[key]) continue;
    let best = null;
    for (const s of schema[key]) {
      const e = [];
      check(s, v, path, root, e);
      if (!e.length) { best = []; break; }
      if (!best || e.length <= best.length) best = e;
    }
    out.push(...best);
  }
  if (schema.const !== undefined && v !== schema.const) out.push({ path, message: `must be ${JSON.stringify(schema.const)}` });
  if (schema.enum && !schema.enum.includes(v)) out.push({ path, message: "must be one of " + schema.enum.map((x) => JSON.stringify(x)).join(", ") });
  const types = schema.type === undefined ? [] : [].concat(schema.type);
  if (types.length && !types.some((t) => typeOk(t, v))) {
    out.push({ path, message: "must be " + types.join(" or ") });
    return;
  }
  if (typeof v === "number") {
    if (schema.minimum !== undefined && v < schema.minimum) out.push({ path, message: `must be ≥ ${schema.minimum}` });
    if (schema.maximum !== undefined && v > schema.maximum) out.push({ path, message: `must be ≤ ${schema.maximum}` });
    if (schema.exclusiveMinimum !== undefined && v <= schema.exclusiveMinimum) out.push({ path, message: `must be > ${schema.exclusiveMinimum}` });
    if (schema.exclusiveMaximum !== undefined && v >= schema.exclusiveMaximum) out.push({ path, message: `must be < ${schema.exclusiveMaximum}` });
  }
  if (typeof v === "string") {
    if (schema.minLength !== undefined && v.length < schema.minLength) out.push({ path, message: "too short" });
    if (schema.maxLength !== undefined && v.length > schema.maxLength) out.push({ path, message: "too long" });
    if (schema.pattern && !new RegExp(schema.pattern).test(v)) out.push({ path, message: "has the wrong form" });
  }
  if (Array.isArray(v)) {
    if (schema.minItems !== undefined && v.length < schema.minItems) out.push({ path, message: `needs at least ${schema.minItems} items` });
    if (schema.maxItems !== undefined && v.length > schema.maxItems) out.push({ path, message: `takes at most ${schema.maxItems} items` });
    if (schema.items) v.forEach((x, i) => check(schema.items, x, `${path}[${i}]`, root, out));
  }
  if (typeOk("object", v)) {
    const props = schema.properties || {};
    for (const r of schema.required || []) if (!(r in v)) out.push({ path: path ? `${path}.${r}` : r, message: "is required" });
    for (const [k, x] of Object.entries(v)) {
      const p = path ? `${path}.${k}` : k;
      if (props[k]) check(props[k], x, p, root, out);
      else if (schema.additionalProperties === false) out.push({ path: p, message: "unknown field" });
    }
  }
}

async function validateSpec(text) {
  let spec;
  try {
    spec = JSON.parse(text);
  } catch (e) {
    return [{ path: "spec", message: "not JSON: " + e.message }];
  }
  const root = await specSchema();
  const errors = [];
  check({ $ref: "#/components/schemas/JobSpec" }, spec, "", root, errors);
  return errors;
}

function showErrors(field, errors) {
  const box = document.querySelector(`.field-err[data-for="${field}"]`);
  box.replaceChildren(...errors.map((e) => el("div", { class: "err", "data-path": e.path },
    (e.path ? e.path + ": " : "") + e.message)));
}

async function submitJob(ev) {
  ev.preventDefault();
  const form = $("submit");
  const model = form.elements.model.files[0], datasetId = form.elements.dataset_id.value;
  const data = datasetId ? null : form.elements.dataset.files[0];
  const specText = form.elements.spec.value, callback = form.elements.callback_url.value.trim();
  showErrors("model", model ? [] : [{ path: "", message: "choose the model file" }]);
  showErrors("dataset", data || datasetId ? [] : [{ path: "", message: "choose the data file or a registered dataset" }]);
  const specErrors = await validateSpec(specText);
  showErrors("spec", specErrors);
  $("submit-status").textContent = "";
  if (!model || !(data || datasetId) || specErrors.length) return;
  const body = new FormData();
  body.append("model", model, model.name);
  body.append("spec", specText);
  if (datasetId) body.append("dataset_id", datasetId);
  else body.append("dataset", data, data.name);
  if (callback) body.append("callback_url", callback);
  $("submit-status").textContent = "uploading…";
  const r = await fetch("/jobs", { method: "POST", body, headers: headers() });
  if (r.status === 401) { askKey(""); $("submit-status").textContent = ""; return; }
  const answer = await r.json();
  if (!r.ok) {  // the server's problem, next to the field it names
    const field = (answer.fields && answer.fields[0]) || "spec";
    const shown = field === "dataset_id" ? "dataset" : field;
    showErrors(["model", "dataset", "callback_url"].includes(shown) ? shown : "spec",
               [{ path: "", message: answer.detail || answer.title }]);
    $("submit-status").textContent = "refused (" + r.status + ")";
    return;
  }
  $("submit-status").textContent = "submitted job " + answer.id.slice(0, 8);
  $("submit-status").dataset.job = answer.id;
  refresh();
}

function selected() {
  return [...document.querySelectorAll("input.pick:checked")].map((c) => c.value);
}

const COMPARE_ROWS = [
  ["model size (bytes)", (r) => r.model_bytes && r.model_bytes.after],
  ["parameters", (r) => r.stages.finetuned.params],
  ["FLOPs", (r) => r.stages.finetuned.flops],
  ["CPU latency (ms)", (r) => r.stages.finetuned.latency_ms],
  ["runtime latency (ms)", (r) => r.latency && r.latency.stages.finetuned && r.latency.stages.finetuned.median_ms],
  ["accuracy", (r) => r.stages.finetuned.accuracy],
  ["accuracy before", (r) => r.stages.baseline.accuracy],
  ["parameters removed", (r) => r.stages.baseline.params ? 1 - r.stages.finetuned.params / r.stages.baseline.params : null],
  ["method", (r) => r.method && r.method.name],
  ["target", (r) => r.target && `${r.target.kind} ${r.target.requested}`],
];

function fmt(v) {
  if (v === null || v === undefined) return "—";
  if (typeof v !== "number") return String(v);
  return Number.isInteger(v) ? v.toLocaleString("en") : v.toPrecision(4);
}

async function compare() {
  const ids = selected();
  if (ids.length < 2) { $("banner").textContent = "Pick two or more finished jobs to compare."; return; }
  const reports = await Promise.all(ids.map(async (id) => (await api(`/jobs/${id}/report`)).json()));
  const plots = await Promise.all(ids.map(async (id) => {
    try { return URL.createObjectURL(await (await api(`/jobs/${id}/plots/gamma.png`)).blob()); } catch (e) { return null; }
  }));
  const table = el("table", { id: "compare-table" });
  const head = el("tr");
  head.appendChild(el("th"));
  ids.forEach((id) => head.appendChild(el("th", { title: id }, id.slice(0, 8))));
  table.appendChild(head);
  for (const [label, get] of COMPARE_ROWS) {
    const tr = el("tr");
    tr.appendChild(el("th", {}, label));
    reports.forEach((r, i) => {
      let v = null;
      try { v = get(r); } catch (e) { v = null; }
      tr.appendChild(el("td", { "data-job": ids[i], "data-row": label, "data-value": JSON.stringify(v ?? null) }, fmt(v)));
    });
    table.appendChild(tr);
  }
  const tr = el("tr");
  tr.appendChild(el("th", {}, "|γ| before and after"));
  plots.forEach((src) => {
    const td = el("td");
    if (src) td.appendChild(el("img", { src, alt: "gamma plot", class: "gamma" }));
    tr.appendChild(td);
  });
  table.appendChild(tr);
  $("compare").replaceChildren(el("h2", {}, "Compare"), table);
  $("compare").hidden = false;
}

// The data select: "a file" first, then the caller's registered datasets (GET /datasets), newest first.
async function loadDatasets() {
  const pick = $("dataset_id"), keep = pick.value;
  const body = await (await api("/datasets?limit=100")).json();
  const options = [pick.options[0]];
  for (const d of body.items) {
    options.push(el("option", { value: d.id }, `${d.name} · ${d.kind} · ${d.id.slice(0, 8)}`));
  }
  pick.replaceChildren(...options);
  pick.value = body.items.some((d) => d.id === keep) ? keep : "";
  $("dataset-file").hidden = pick.value !== "";
}

function initSubmit() {
  $("new-job").addEventListener("toggle", () => { if ($("new-job").open) loadDatasets().catch(() => {}); });
  $("dataset_id").addEventListener("change", () => { $("dataset-file").hidden = $("dataset_id").value !== ""; });
  $("submit").elements.spec.value = JSON.stringify(DEFAULT_SPEC, null, 2);
  $("submit").addEventListener("submit", (ev) => submitJob(ev).catch((e) => { $("submit-status").textContent = e.message; }));
  $("spec").addEventListener("input", () => validateSpec($("spec").value).then((e) => showErrors("spec", e)).catch(() => {}));
  $("compare-btn").addEventListener("click", () => compare().catch((e) => { $("banner").textContent = e.message; }));
}

initSubmit();
