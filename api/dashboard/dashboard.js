// The jobs dashboard: polls GET /jobs and draws rows with the DOM API only (textContent, never
// innerHTML: model names and errors come from users). The API key, when the service wants one, is
// asked for on the first 401 and kept in localStorage.
"use strict";
const KEY = "slim.apiKey";
const TERMINAL = new Set(["succeeded", "failed", "canceled"]);
const $ = (id) => document.getElementById(id);
const rows = new Map();

function headers() {
  const k = localStorage.getItem(KEY);
  return k ? { Authorization: "Bearer " + k } : {};
}

async function api(path, init = {}) {
  const r = await fetch(path, { ...init, headers: { ...headers(), ...(init.headers || {}) } });
  if (r.status === 401) {
    askKey(localStorage.getItem(KEY) ? "That key was refused." : "");
    throw new Error("unauthorized");
  }
  if (!r.ok) {
    let detail = r.statusText;
    try { detail = (await r.json()).detail || detail; } catch (e) { /* not JSON */ }
    throw new Error(detail);
  }
  return r;
}

function askKey(msg) {
  $("keybox").style.display = "block";
  $("banner").textContent = msg;
}

function el(tag, attrs = {}, text) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) e.setAttribute(k, v);
  if (text !== undefined) e.textContent = text;
  return e;
}

function latest(job) {
  const m = job.metrics || {};
  const parts = [];
  if (m.pilot_run !== undefined) parts.push("pilot " + m.pilot_run);
  if (m.epoch !== undefined) parts.push("epoch " + Number(m.epoch).toFixed(1));
  if (m.loss !== undefined) parts.push("loss " + Number(m.loss).toPrecision(3));
  if (m.removed_channels !== undefined) parts.push(m.removed_channels + " channels removed");
  const s = job.summary;
  if (job.status === "succeeded" && s && s.before && s.after) {
    if (s.before.params) parts.push((100 * (1 - s.after.params / s.before.params)).toFixed(0) + "% fewer params");
    if (s.before.accuracy != null && s.after.accuracy != null)
      parts.push("accuracy " + s.before.accuracy.toFixed(3) + " → " + s.after.accuracy.toFixed(3));
    if (s.warnings && s.warnings.length) parts.push(s.warnings.length + " warning(s)");
  }
  return parts.join(" · ");
}

async function openReport(job) {
  const r = await api(`/jobs/${job.id}/report.html`);
  const url = URL.createObjectURL(new Blob([await r.text()], { type: "text/html" }));
  window.open(url, "_blank");
}

async function download(job) {
  const r = await api(`/jobs/${job.id}/model`);
  const cd = r.headers.get("Content-Disposition") || "";
  const m = /filename="?([^";]+)"?/.exec(cd);
  const a = el("a", { href: URL.createObjectURL(await r.blob()), download: m ? m[1] : "slim-" + job.id });
  document.body.appendChild(a);
  a.click();
  a.remove();
}

function action(label, fn, cls) {
  const b = el("button", { type: "button", class: cls }, label);
  b.addEventListener("click", () => fn().catch((e) => { $("banner").textContent = e.message; }));
  return b;
}

function draw(job) {
  let tr = rows.get(job.id);
  if (!tr) {
    tr = el("tr", { "data-id": job.id });
    for (let i = 0; i < 9; i++) tr.appendChild(el("td"));
    rows.set(job.id, tr);
  }
  tr.className = job.status;
  const c = tr.children;
  c[0].textContent = job.id.slice(0, 8);
  c[0].title = job.id;
  c[1].textContent = job.model_name;
  c[2].replaceChildren(el("span", { class: "status" }, job.status));
  if (job.error) c[2].appendChild(el("div", { class: "err" }, job.error.detail || job.error.title || ""));
  c[3].textContent = job.phase || "";
  const pct = Math.round(100 * (job.status === "succeeded" ? 1 : job.progress || 0));
  const bar = el("span", { class: "bar", role: "progressbar", "aria-valuenow": String(pct),
                            "aria-valuemin": "0", "aria-valuemax": "100" });
  const fill = el("span");
  fill.style.width = pct + "%";
  bar.appendChild(fill);
  c[4].replaceChildren(bar, document.createTextNode(" " + pct + "%"));
  c[5].textContent = latest(job);
  c[6].textContent = new Date(job.created_at).toLocaleString();
  const acts = [];
  if (job.status === "succeeded") {
    acts.push(action("report", () => openReport(job), "report"), action("download", () => download(job), "download"));
  } else if (!TERMINAL.has(job.status)) {
    acts.push(action("cancel", () => api(`/jobs/${job.id}/cancel`, { method: "POST" }).then(refresh), "cancel"));
  }
  c[7].replaceChildren(...acts);
  if (job.status === "succeeded" && !c[8].querySelector("input")) {  // once: a refresh keeps the tick
    c[8].appendChild(el("input", { type: "checkbox", class: "pick", value: job.id, "aria-label": "compare" }));
  }
  return tr;
}

async function refresh() {
  let data;
  try {
    data = await (await api("/jobs?limit=50")).json();
  } catch (e) {
    if (e.message !== "unauthorized") $("banner").textContent = "Cannot load jobs: " + e.message;
    return;
  }
  $("banner").textContent = "";
  $("keybox").style.display = "none";
  $("forget").hidden = !localStorage.getItem(KEY);
  const body = $("jobs").tBodies[0];
  body.replaceChildren(...data.items.map(draw));
  $("empty").hidden = data.items.length > 0;
  document.body.dataset.loaded = "true";
}

$("keybox").addEventListener("submit", (ev) => {
  ev.preventDefault();
  const k = $("key").value.trim();
  if (k) localStorage.setItem(KEY, k);
  $("key").value = "";
  refresh();
});
$("forget").addEventListener("click", () => {
  localStorage.removeItem(KEY);
  rows.clear();
  $("jobs").tBodies[0].replaceChildren();
  refresh();
});
refresh();
setInterval(refresh, 2000);
