// tether's web UI: one page, rendered from the URL. Each page polls its JSON under /api/ once
// a second and redraws its content in place (the filters above it are drawn once, so typing in
// them is never interrupted). Text from the server is always escaped.
"use strict";

const PAGES = [
  ["fleet", "Fleet"], ["sessions", "Sessions"], ["workflows", "Workflows"],
  ["activities", "Activities"], ["queues", "Task queues"],
];
const REFRESH_MS = 1000;

function esc(v) {
  return String(v == null ? "" : v).replace(/[&<>"']/g, c =>
    ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" }[c]));
}
const enc = encodeURIComponent;
function badge(state) { return `<span class="badge s-${esc(state)}">${esc(state)}</span>`; }
function bytes(n) {
  if (!n) return "-";
  const u = ["B", "KiB", "MiB", "GiB", "TiB"]; let i = 0;
  while (n >= 1024 && i < u.length - 1) { n /= 1024; i++; }
  return `${n.toFixed(n >= 10 || i === 0 ? 0 : 1)} ${u[i]}`;
}
function age(ms) {
  if (ms == null || ms < 0) return "-";
  const s = Math.round(ms / 1000);
  if (s < 60) return `${s}s`;
  if (s < 3600) return `${Math.floor(s / 60)}m ${s % 60}s`;
  if (s < 86400) return `${Math.floor(s / 3600)}h ${Math.floor(s % 3600 / 60)}m`;
  return `${Math.floor(s / 86400)}d ${Math.floor(s % 86400 / 3600)}h`;
}
function when(ms) { return ms > 0 ? new Date(ms).toISOString().replace("T", " ").replace("Z", "") : "-"; }
function kvList(obj) {
  const e = Object.entries(obj || {});
  return e.length ? e.map(([k, v]) => `${esc(k)}=${esc(v)}`).join(", ") : "-";
}

// --- where we are -------------------------------------------------------------------------
function route() {
  const parts = location.pathname.split("/").filter(Boolean).map(decodeURIComponent);
  // /ns/{ns}/{page}/{id?}
  return { ns: parts[1] || "default", page: parts[2] || "fleet", id: parts[3] || "",
           query: new URLSearchParams(location.search) };
}
function href(ns, page, id, query) {
  let h = `/ns/${enc(ns)}/${page}`;
  if (id) h += `/${enc(id)}`;
  const q = query ? new URLSearchParams(query).toString() : "";
  return q ? `${h}?${q}` : h;
}
function workflowLink(ns, id, runId, kind) {
  const page = kind === "activity" ? "activities" : "workflows";
  return `<a href="${esc(href(ns, page, id, runId ? { run_id: runId } : null))}">${esc(id)}</a>`;
}
// A workflow's session links to its workflow; a client's names the client.
function owner(ns, s) {
  if (s.owner_workflow_id) return workflowLink(ns, s.owner_workflow_id);
  return s.owner ? `client ${esc(s.owner)}` : "-";
}
function sessionLink(ns, id) { return `<a href="${esc(href(ns, "sessions", id))}">${esc(id)}</a>`; }

async function getJson(path) {
  const r = await fetch(path, { cache: "no-store" });
  const body = await r.json().catch(() => ({ error: `HTTP ${r.status}` }));
  if (!r.ok) throw new Error(body.error || `HTTP ${r.status}`);
  return body;
}

// --- payloads: JSON as JSON; encrypted ones stay encrypted unless a codec server decodes them
// in this browser (the tether server never does) --------------------------------------------
const decoded = new Map();
function codecUrl() { return (localStorage.getItem("tether.codec") || "").replace(/\/+$/, ""); }
function payload(p) {
  if (p == null) return `<span class="muted">none</span>`;
  if (typeof p === "object" && p.payload && p.encoding) {
    const key = p.payload.data;
    let got = decoded.get(key);
    // A failure is tried again now and then: the codec server may have been started (or
    // restarted with --allow-origin) since.
    if (got && !got.ok && Date.now() - got.at > 5000) { decoded.delete(key); decoding.delete(key); got = undefined; }
    if (got && got.ok) return `<pre data-decoded="1" title="decoded in this browser by the codec server">${esc(got.text)}</pre>`;
    if (got) return `<span class="badge" data-encrypted="1">${esc(p.key_id ? "encrypted, key " + p.key_id : p.encoding)}</span> <span class="error" data-decode-failed="1">${esc(got.text)}</span>`;
    const what = p.key_id ? `encrypted, key ${esc(p.key_id)}` : esc(p.encoding);
    if (codecUrl()) decodeLater(p.payload);
    return `<span class="badge" data-encrypted="1">${what}, ${esc(p.bytes)} bytes</span>`;
  }
  return `<pre>${esc(JSON.stringify(p, null, 2))}</pre>`;
}
const decoding = new Set();
async function decodeLater(raw) {
  if (decoding.has(raw.data)) return;
  decoding.add(raw.data);
  const asked = codecUrl();
  const settle = (answer) => {
    // An answer from a codec server the user has since replaced is dropped.
    if (codecUrl() === asked) decoded.set(raw.data, { ...answer, at: Date.now() });
  };
  try {
    let r;
    try {
      r = await fetch(`${asked}/decode`, {
        method: "POST", headers: { "content-type": "application/json" },
        body: JSON.stringify({ payloads: [raw] }),
      });
    } catch (_) {
      // The browser says no more than this when the server is down or refused the origin.
      throw new Error(`no answer from ${asked}: is it running, and was it started with --allow-origin ${location.origin}?`);
    }
    const body = await r.json().catch(() => ({}));
    if (!r.ok) throw new Error(body.error || `HTTP ${r.status}`);
    const text = new TextDecoder().decode(Uint8Array.from(atob(body.payloads[0].data), c => c.charCodeAt(0)));
    let shown = text;
    try { shown = JSON.stringify(JSON.parse(text), null, 2); } catch (_) { /* not JSON: as text */ }
    settle({ ok: true, text: shown });
  } catch (e) {
    settle({ ok: false, text: `the codec server could not decode it: ${e.message}` });
  }
  refresh();
}
function failure(f) {
  if (!f) return "";
  let t = `${f.kind}${f.error_type ? " " + f.error_type : ""}: ${f.message}`;
  for (let c = f.cause; c; c = c.cause) t += ` ← ${c.message}`;
  return esc(t);
}

// --- pages --------------------------------------------------------------------------------
function fleetPage(ns, d) {
  const totals = d.gpu_totals.map(g => `<div class="total" data-model="${esc(g.model)}">
      <div class="muted">${esc(g.model)}</div><b>${g.reserved}</b> reserved · <b>${g.free}</b> free
      <span class="muted">of ${g.total}</span></div>`).join("");
  const states = Object.entries(d.workers_by_state).map(([s, n]) =>
    `<div class="total">${badge(s)} <b>${n}</b> worker${n === 1 ? "" : "s"}</div>`).join("");
  const workers = d.workers.map(w => {
    const c = w.capabilities || { host: {}, gpus: [], labels: {}, resources: {}, credentials: [] };
    const gpus = w.gpu_grid.map(g => `<div class="gpu${g.held_by ? " held" : ""}" data-gpu="${esc(w.identity)}:${g.index}">
        <b>GPU ${g.index}</b> ${esc(g.name)}<br><span class="muted">${bytes(g.memory_total_bytes)}
        · ${g.utilization_percent == null ? "util n/a" : g.utilization_percent + "% util"}
        · ${g.source === "nvml" ? "detected" : esc(g.source || "declared")}</span>
        <span class="holder">${g.held_by ? "held by " + sessionLink(ns, g.held_by.session_id)
          + ` <span class="muted">(${owner(ns, g.held_by)})</span>`
          : `<span class="muted">free</span>`}</span></div>`).join("");
    return `<div class="worker" data-worker="${esc(w.identity)}">
      <h3>${esc(w.identity)} ${badge(w.state)} <span class="muted">seen ${age(w.last_seen_age_ms)} ago</span></h3>
      <div class="facts"><span>host ${esc(c.host.hostname)}</span><span>${esc(c.host.cpu_model)} · ${c.host.logical_cores || "?"} cores</span>
        <span>${bytes(c.host.memory_total_bytes)} memory</span></div>
      <div class="facts"><span>queues ${esc(w.task_queues.join(", ") || "-")}</span><span>host queue <code>${esc(w.host_queue)}</code></span></div>
      <div class="facts"><span>labels ${kvList(c.labels)}</span><span>credentials ${esc((c.credentials || []).join(", ") || "-")}</span></div>
      <div class="facts"><span>resources ${kvList(c.resources)}</span><span>reserved ${kvList(w.resources_reserved)}</span>
        <span>${w.open_sessions} open session${w.open_sessions === 1 ? "" : "s"}</span></div>
      ${w.gpu_grid.length ? `<div class="gpus">${gpus}</div>` : `<div class="facts">no GPUs${c.gpu_note ? ": " + esc(c.gpu_note) : ""}</div>`}
    </div>`;
  }).join("");
  return `<h1>Fleet</h1><div class="totals" id="gpu-totals">${totals || `<div class="total muted">no GPUs on live workers</div>`}${states}</div>
    ${d.truncated ? `<p class="muted">showing the first 10,000 workers</p>` : ""}
    <div class="workers">${workers || `<p class="muted">no workers have registered in ${esc(ns)}</p>`}</div>`;
}

function sessionsControls(r) {
  const states = ["", "creating", "open", "completed", "failed", "timed_out", "terminated"];
  return `<form class="filters" data-filters><label>state<select name="state">${states.map(s =>
      `<option value="${s}"${r.query.get("state") === s ? " selected" : ""}>${s || "any"}</option>`).join("")}</select></label>
    <label>worker<input name="worker" value="${esc(r.query.get("worker") || "")}"></label><button>filter</button></form>`;
}
function sessionRow(ns, s) {
  return `<tr data-session="${esc(s.session_id)}"><td>${sessionLink(ns, s.session_id)}</td><td>${badge(s.state)}</td>
    <td>${esc(s.worker || "-")}</td><td>${s.gpus.map(g => `GPU ${g.index}`).join(", ") || "-"}</td><td>${kvList(s.resources)}</td>
    <td>${owner(ns, s)}</td><td>${age(s.age_seconds * 1000)}</td><td>${s.activities_run}</td>
    <td>${esc(s.reason)}${s.state === "creating" ? ` <span class="muted">(waiting for a placement)</span>` : ""}</td></tr>`;
}
function sessionsPage(ns, d, r) {
  if (r.id) {
    const s = d.sessions.find(x => x.session_id === r.id);
    if (!s) return `<p class="error">no session ${esc(r.id)} in ${esc(ns)}</p>`;
    return `<h1>Session ${esc(s.session_id)} ${badge(s.state)}</h1><dl class="kv">
      <dt>worker</dt><dd>${esc(s.worker || "-")} <span class="muted">${esc(s.host)}</span></dd>
      <dt>owner</dt><dd>${owner(ns, s)}</dd>
      <dt>GPUs</dt><dd>${s.gpus.map(g => `GPU ${g.index} ${esc(g.name)} (${bytes(g.memory_total_bytes)})`).join("<br>") || "-"}</dd>
      <dt>resources</dt><dd>${kvList(s.resources)}</dd><dt>requirements</dt><dd><code>${esc(s.requirements || "-")}</code></dd>
      <dt>created</dt><dd>${esc(s.created)} (${age(s.age_seconds * 1000)})</dd><dt>closed</dt><dd>${esc(s.closed || "-")}</dd>
      <dt>activities run</dt><dd>${s.activities_run}</dd><dt>reason</dt><dd>${esc(s.reason || "-")}</dd></dl>`;
  }
  const counts = Object.entries(d.sessions_by_state).map(([s, n]) => `${badge(s)} ${n}`).join(" ");
  return `<h1>Sessions</h1><p>${counts || `<span class="muted">no sessions</span>`}</p>
    <table><thead><tr><th>session</th><th>state</th><th>worker</th><th>GPUs</th><th>units</th><th>owner</th><th>age</th><th>activities</th><th>reason</th></tr></thead>
    <tbody>${d.sessions.map(s => sessionRow(ns, s)).join("") || `<tr><td colspan="9" class="muted">none match</td></tr>`}</tbody></table>`;
}

function runsControls(r) {
  const statuses = ["", "running", "completed", "failed", "canceled", "terminated", "timed_out"];
  const q = n => esc(r.query.get(n) || "");
  return `<form class="filters" data-filters><label>status<select name="status">${statuses.map(s =>
      `<option value="${s}"${r.query.get("status") === s ? " selected" : ""}>${s || "any"}</option>`).join("")}</select></label>
    <label>type<input name="type" value="${q("type")}"></label><label>task queue<input name="task_queue" value="${q("task_queue")}"></label>
    <label>id prefix<input name="prefix" value="${q("prefix")}"></label><button>filter</button></form>`;
}
function runsPage(ns, d, r, kind) {
  const rows = d.executions.map(e => `<tr data-run="${esc(e.workflow_id)}"><td>${workflowLink(ns, e.workflow_id, e.run_id, kind)}</td>
      <td>${badge(e.status)}</td><td>${esc(e.type)}</td><td>${esc(e.task_queue)}</td><td>${esc(when(e.start_ms))}</td>
      <td>${e.close_ms > 0 ? esc(when(e.close_ms)) : "-"}</td><td><code class="muted">${esc(e.run_id)}</code></td></tr>`).join("");
  const tokens = (r.query.get("back") || "").split(",").filter(Boolean);
  const here = r.query.get("page_token") || "";
  const q = Object.fromEntries(r.query);
  const prev = tokens.length || here ? `<a href="${esc(href(ns, r.page, "", { ...q, page_token: tokens.length ? tokens[tokens.length - 1] : "", back: tokens.slice(0, -1).join(",") }))}">← newer</a>` : "";
  const next = d.next_page_token ? `<a data-next href="${esc(href(ns, r.page, "", { ...q, page_token: d.next_page_token, back: [...tokens, here].join(",") }))}">older →</a>` : "";
  return `<h1>${kind === "activity" ? "Standalone activities" : "Workflows"}</h1>
    <table><thead><tr><th>id</th><th>status</th><th>type</th><th>task queue</th><th>started</th><th>closed</th><th>run</th></tr></thead>
    <tbody>${rows || `<tr><td colspan="7" class="muted">none match</td></tr>`}</tbody></table><div class="pager">${prev}${next}</div>`;
}

function gantt(t) {
  if (!t.bars.length) return `<p class="muted">no activities yet</p>`;
  const laneH = 26, left = 180, width = 1000, top = 20;
  const span = Math.max(1, t.end_ms - t.start_ms);
  const x = ms => left + (ms - t.start_ms) / span * (width - left - 10);
  const lanes = t.lanes.map((l, i) => `<text x="4" y="${top + i * laneH + 16}" data-lane="${esc(l)}">${esc(l.length > 26 ? l.slice(0, 25) + "…" : l)}</text>
      <line x1="${left}" x2="${width}" y1="${top + i * laneH + laneH}" y2="${top + i * laneH + laneH}" stroke="#eee"/>`).join("");
  const bars = t.bars.map(b => {
    const i = t.lanes.indexOf(b.lane), x0 = x(b.start_ms), w = Math.max(2, x(b.end_ms) - x0);
    const tip = `${b.activity_type} on ${b.lane}: ${b.outcome}, attempt ${b.attempt}, ${age(b.end_ms - b.start_ms)}${b.failure ? " — " + (b.failure.message || "") : ""}`;
    return `<rect class="bar-${esc(b.outcome)}" data-bar="${b.scheduled_event_id}" data-lane="${esc(b.lane)}" data-outcome="${esc(b.outcome)}"
      x="${x0.toFixed(1)}" y="${top + i * laneH + 4}" width="${w.toFixed(1)}" height="${laneH - 8}" rx="3"><title>${esc(tip)}</title></rect>`;
  }).join("");
  const h = top + t.lanes.length * laneH + 8;
  return `<svg class="gantt" viewBox="0 0 ${width} ${h}" preserveAspectRatio="none" height="${h}">
    <text x="${left}" y="12" class="muted">${esc(when(t.start_ms))}</text><text x="${width - 150}" y="12">+${age(span)}</text>${lanes}${bars}</svg>`;
}
function runPage(ns, d) {
  const run = d.run;
  const pending = d.pending_activities.map(p => `<tr><td>${esc(p.activity_type)} <span class="muted">${esc(p.activity_id)}</span></td>
    <td>${badge(p.state)}</td><td>${p.attempt}</td><td>${esc(p.last_worker || "-")}</td>
    <td>${p.last_heartbeat_ms > 0 ? age(d.now_ms - p.last_heartbeat_ms) + " ago" : "-"}</td><td>${failure(p.last_failure) || "-"}</td></tr>`).join("");
  const events = d.events.map(e => `<tr><td>${e.event_id}</td><td>${esc(e.time)}</td><td>${esc(e.type)}</td>
    <td><code>${esc(JSON.stringify(e.details))}</code></td></tr>`).join("");
  return `<h1>${run.kind === "activity" ? "Activity" : "Workflow"} ${esc(run.workflow_id)} ${badge(run.status)}</h1>
    <dl class="kv"><dt>type</dt><dd>${esc(run.type)}</dd><dt>task queue</dt><dd>${esc(run.task_queue)}</dd>
      <dt>run</dt><dd><code>${esc(run.run_id)}</code></dd><dt>started</dt><dd>${esc(when(run.start_ms))}</dd>
      <dt>closed</dt><dd>${run.close_ms > 0 ? esc(when(run.close_ms)) : "-"}</dd><dt>events</dt><dd>${run.history_length}</dd>
      ${d.last_workflow_task_failure ? `<dt>workflow task failing</dt><dd class="error">${esc(d.last_workflow_task_failure.cause)}: ${esc(d.last_workflow_task_failure.message)}</dd>` : ""}</dl>
    <h2>Input</h2>${payload(d.input)}
    <h2>${d.failure ? "Failure" : "Result"}</h2>${d.failure ? `<p class="error">${failure(d.failure)}</p>` : payload(d.result)}
    <h2>Pending activities</h2>${pending ? `<table><thead><tr><th>activity</th><th>state</th><th>attempt</th><th>worker</th><th>last heartbeat</th><th>last failure</th></tr></thead><tbody>${pending}</tbody></table>` : `<p class="muted">none</p>`}
    <h2>Timeline, per worker</h2><div id="timeline">${gantt(d.timeline)}</div>
    <h2>History</h2><table id="history"><thead><tr><th>#</th><th>time</th><th>event</th><th>details</th></tr></thead><tbody>${events}</tbody></table>`;
}

function queuesPage(ns, d) {
  const qs = d.queues.map(q => `<div class="worker" data-queue="${esc(q.task_queue)}"><h3>${esc(q.task_queue)}</h3>
    <div class="facts"><span>${q.workflow_backlog} workflow tasks waiting</span><span>${q.activity_backlog} activity tasks waiting</span></div>
    <table><thead><tr><th>poller</th><th>kind</th><th>worker</th><th>last poll</th></tr></thead><tbody>${q.pollers.map(p =>
      `<tr><td>${esc(p.identity)}</td><td>${esc(p.kind)}</td><td>${badge(p.state === "alive" ? "live" : p.state)}</td><td>${age(Date.now() - p.last_poll_ms)} ago</td></tr>`).join("")
      || `<tr><td colspan="4" class="muted">no pollers</td></tr>`}</tbody></table>
    ${q.requirement_backlogs.map(b => `<div class="facts${b.unplaceable ? " error" : ""}" data-unplaceable="${b.unplaceable}">
      ${b.tasks} task(s) needing <code>${esc(b.requirements || "nothing")}</code>${b.unplaceable ? `: unplaceable — ${esc(b.explanation)}` : ""}</div>`).join("")}
    </div>`).join("");
  return `<h1>Task queues</h1><div class="workers">${qs || `<p class="muted">no task queues in use</p>`}</div>`;
}

// --- the loop -----------------------------------------------------------------------------
let current = null;
function apiFor(r) {
  const q = new URLSearchParams(r.query);
  q.delete("back");
  switch (r.page) {
    case "fleet": return `/api/ns/${enc(r.ns)}/fleet`;
    case "sessions": return r.id ? `/api/ns/${enc(r.ns)}/sessions` : `/api/ns/${enc(r.ns)}/sessions?${q}`;
    case "workflows": case "activities": {
      const kind = r.page === "activities" ? "activity" : "workflow";
      if (r.id) return `/api/ns/${enc(r.ns)}/runs/${kind}/${enc(r.id)}?run_id=${enc(r.query.get("run_id") || "")}`;
      q.set("kind", kind);
      return `/api/ns/${enc(r.ns)}/workflows?${q}`;
    }
    case "queues": return `/api/ns/${enc(r.ns)}/queues`;
    default: return null;
  }
}
function render(r, d) {
  switch (r.page) {
    case "fleet": return fleetPage(r.ns, d);
    case "sessions": return sessionsPage(r.ns, d, r);
    case "workflows": case "activities":
      return r.id ? runPage(r.ns, d) : runsPage(r.ns, d, r, r.page === "activities" ? "activity" : "workflow");
    case "queues": return queuesPage(r.ns, d);
  }
  return "";
}
async function refresh() {
  const r = current;
  const api = apiFor(r);
  const content = document.getElementById("content");
  const live = document.getElementById("live");
  if (!api) { content.innerHTML = `<p class="error">no page ${esc(r.page)}</p>`; return; }
  try {
    const d = await getJson(api);
    if (r !== current) return;
    content.innerHTML = render(r, d);
    document.body.dataset.updates = String(Number(document.body.dataset.updates || 0) + 1);
    live.className = ""; live.textContent = `live · ${new Date().toLocaleTimeString()}`;
  } catch (e) {
    content.innerHTML = `<p class="error">${esc(e.message)}</p>`;
    live.className = "stale"; live.textContent = "not updating";
  }
}
async function start() {
  current = route();
  const r = current;
  document.getElementById("nav").innerHTML = PAGES.map(([p, name]) =>
    `<a href="${esc(href(r.ns, p))}"${p === r.page ? ` class="here"` : ""}>${name}</a>`).join("");
  const controls = document.getElementById("controls");
  controls.innerHTML = r.id ? "" : r.page === "sessions" ? sessionsControls(r)
    : (r.page === "workflows" || r.page === "activities") ? runsControls(r) : "";
  const form = controls.querySelector("[data-filters]");
  if (form) form.addEventListener("submit", ev => {
    ev.preventDefault();
    const q = {};
    for (const [k, v] of new FormData(form)) if (v) q[k] = v;
    location.href = href(r.ns, r.page, "", q);
  });
  const codec = document.getElementById("codec");
  codec.value = localStorage.getItem("tether.codec") || "";
  codec.addEventListener("change", () => { localStorage.setItem("tether.codec", codec.value.trim()); decoded.clear(); decoding.clear(); refresh(); });
  const select = document.getElementById("namespace");
  select.addEventListener("change", () => { location.href = href(select.value, r.page); });
  getJson("/api/namespaces").then(d => {
    const names = d.namespaces.map(n => n.name);
    if (!names.includes(r.ns)) names.unshift(r.ns);
    select.innerHTML = names.map(n => `<option${n === r.ns ? " selected" : ""}>${esc(n)}</option>`).join("");
  }).catch(() => { select.innerHTML = `<option>${esc(r.ns)}</option>`; });
  await refresh();
  setInterval(refresh, REFRESH_MS);
}
start();
