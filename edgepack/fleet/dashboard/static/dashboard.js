// The fleet page: one EventSource on /api/events carries a snapshot whenever the registry changed;
// the page redraws the rollouts, the charts and the device table from it. Everything a device
// reports is shown with textContent, never parsed as HTML (device ids and versions come from devices).
"use strict";

const CHARTS = ["p95_ms", "error_rate", "drift", "shadow_agreement"];
const PALETTE = ["#0969da", "#cf222e", "#1a7f37", "#9a6700", "#8250df", "#bf3989", "#0550ae", "#57606a"];
const IN_FLIGHT = ["offered", "downloading", "staging", "switching", "probation", "rollback_offered", "shadow_offered"];
const charts = {};
let source = null;
let token = sessionStorage.getItem("edgepack-token") || "";

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs || {})) {
    if (key === "class") node.className = value;
    else if (key.startsWith("data-")) node.setAttribute(key, value);
    else node[key] = value;
  }
  for (const child of children) {
    if (child === null || child === undefined) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

function ago(ts) {
  if (!ts) return "never";
  const s = Math.max(0, Date.now() / 1000 - ts);
  if (s < 90) return `${Math.round(s)} s ago`;
  if (s < 5400) return `${Math.round(s / 60)} min ago`;
  return `${Math.round(s / 3600)} h ago`;
}

function filters() {
  const params = new URLSearchParams();
  for (const select of document.querySelectorAll("#filters select")) {
    if (select.value) params.set(select.name, select.value);
  }
  return params;
}

function connect() {
  if (source) source.close();
  const query = filters().toString();
  history.replaceState(null, "", query ? `?${query}` : location.pathname);
  source = new EventSource(`/api/events${query ? `?${query}` : ""}`);
  setStatus("connecting", "connecting");
  source.addEventListener("snapshot", (event) => {
    const snapshot = JSON.parse(event.data);
    setStatus(snapshot.error ? "error" : "live", snapshot.error || "live");
    render(snapshot);
  });
  source.onerror = () => setStatus("connecting", "reconnecting…");
}

function setStatus(state, text) {
  const status = document.getElementById("status");
  status.dataset.state = state;
  status.textContent = text;
}

const drawn = {};

// Redraws a part only when its data changed, so a button is not replaced under a click
function once(part, value, draw) {
  const key = JSON.stringify(value);
  if (drawn[part] === key) return;
  drawn[part] = key;
  draw(value);
}

function render(snapshot) {
  renderSummary(snapshot.devices);
  renderFilters(snapshot.devices.choices);
  once("devices", snapshot.devices.devices, () => renderDevices(snapshot.devices));
  once("rollouts", snapshot.rollouts || [], renderRollouts);
  once("series", snapshot.series || {x: [], charts: {}}, renderCharts);
  window.edgepackDashboard = {snapshot, charts};  // for scripts and tests that look at the page
}

function renderSummary(fleet) {
  document.getElementById("summary").textContent =
    `${fleet.total} devices, ${fleet.online} online`;
  document.getElementById("device-count").textContent =
    fleet.shown === fleet.total ? `(${fleet.total})` : `(${fleet.shown} of ${fleet.total})`;
}

function renderFilters(choices) {
  for (const select of document.querySelectorAll("#filters select")) {
    if (select.name === "online") continue;
    const wanted = new URLSearchParams(location.search).get(select.name) || select.value;
    const values = choices[select.name] || [];
    const have = [...select.options].slice(1).map((o) => o.value);
    if (have.join("\n") === values.join("\n")) continue;
    select.replaceChildren(el("option", {value: ""}, "all"), ...values.map((v) => el("option", {value: v}, v)));
    if (values.includes(wanted)) select.value = wanted;
  }
}

function renderDevices(fleet) {
  const rows = fleet.devices.map((d) => {
    const models = Object.entries(d.models);
    const versions = models.map(([name, m]) =>
      `${name} ${m.active || "-"}${m.previous ? ` (prev ${m.previous})` : ""}${m.shadow ? ` shadow ${m.shadow}` : ""}`);
    const updates = models.map(([, m]) => m.state || "-");
    const labels = [...d.groups.map((g) => `@${g}`), ...d.tags.map((t) => `#${t}`)];
    return el("tr", {"data-device": d.device, "data-online": String(d.online)},
      el("td", {}, d.device), el("td", {class: d.online ? "online" : "offline"}, d.online ? "online" : "offline"),
      el("td", {}, d.profile || "-"), el("td", {class: "versions"}, versions.join("; ")),
      el("td", {}, updates.join("; ")), el("td", {}, labels.join(" ")), el("td", {}, ago(d.last_seen)));
  });
  const body = document.querySelector("#devices tbody");
  body.replaceChildren(...(rows.length ? rows : [el("tr", {}, el("td", {colSpan: 7, class: "empty"}, "no device matches"))]));
}

function stageBar(counts, total) {
  const sum = (keys) => keys.reduce((n, k) => n + (counts[k] || 0), 0);
  const parts = [["committed", sum(["committed"])], ["shadowing", sum(["shadowing", "shadow_passed"])], ["in-flight", sum(IN_FLIGHT)],
                 ["failed", sum(["failed", "timed_out", "shadow_failed"])], ["rolled-back", sum(["rolled_back", "shadow_ended"])]];
  const bar = el("div", {class: "bar"});
  for (const [name, count] of parts) {
    if (!count) continue;
    const part = el("span", {class: name, title: `${name}: ${count}`});
    part.style.width = `${100 * count / total}%`;  // CSSOM: allowed by the page's style-src 'self'
    bar.append(part);
  }
  return bar;
}

// A verdict as "key value" pairs, nested objects flattened to dotted keys
function flatten(value, prefix, out) {
  for (const [key, item] of Object.entries(value)) {
    const name = prefix ? `${prefix}.${key}` : key;
    if (item && typeof item === "object" && !Array.isArray(item)) flatten(item, name, out);
    else if (item !== null && item !== undefined) {
      out.push(`${name} ${typeof item === "number" ? Math.round(item * 1000) / 1000 : item}`);
    }
  }
  return out;
}

const round = (v) => (typeof v === "number" ? Math.round(v * 1000) / 1000 : v);

// The numbers an operator reads first, per verdict kind; anything else is flattened
function verdictLine(name, verdict) {
  const pick = (object, keys) => keys.filter((k) => object[k] !== null && object[k] !== undefined && object[k] !== "")
    .map((k) => `${k.replace(/_/g, " ")} ${round(object[k])}`).join(", ");
  if (name === "failures") return `install failures: ${verdict.failed} of ${verdict.finished} finished (${verdict.decision})`;
  if (name === "shadow") {
    const failed = (verdict.failed_devices || []).length ? `, failed on ${verdict.failed_devices.length}` : "";
    return `shadow: ${verdict.decision}: ${pick(verdict, ["agreement", "samples", "reporting", "error_rate", "latency_ratio"])}` +
      `${failed} (agreement >= ${verdict.criteria ? verdict.criteria.min_agreement : "?"})`;
  }
  if (name === "metrics") {
    const profiles = Object.entries(verdict.profiles || {}).map(([profile, v]) =>
      `${profile} ${v.decision}${v.message && v.decision !== "pass" ? ` (${v.message})` : ""}: ` +
      pick(v, ["prediction_psi", "latency_ratio", "error_delta", "drift_delta"]));
    return `metrics vs the old version: ${verdict.decision}${profiles.length ? "; " + profiles.join("; ") : ""}`;
  }
  const text = flatten(verdict, "", []).join(", ");
  return `${name}: ${text.length > 300 ? text.slice(0, 300) + "…" : text}`;
}

function verdictText(verdicts) {
  return Object.entries(verdicts || {}).filter(([, v]) => v && typeof v === "object")
    .map(([name, v]) => verdictLine(name, v)).join("\n");
}

function renderRollouts(rollouts) {
  const box = document.getElementById("rollouts");
  if (!rollouts.length) {
    box.replaceChildren(el("p", {class: "empty"}, "no rollout yet"));
    return;
  }
  box.replaceChildren(...rollouts.map((r) => {
    const perStage = {...r.per_stage};
    // a shadow stage's devices move on to the next stage when it passes: its row shows the verdict
    for (const index of r.shadow_stages) {
      if (!perStage[String(index)] && r.stage > index) perStage[String(index)] = {};
    }
    const stages = Object.entries(perStage).sort(([a], [b]) => (a === "-" ? 1 : b === "-" ? -1 : a - b));
    const committed = r.counts.committed || 0;
    const title = el("h3", {},
      el("span", {}, `#${r.id} ${r.kind} ${r.release}`),
      el("span", {class: "state", "data-state": r.state}, r.requested ? `${r.state} (${r.requested} requested)` : r.state),
      el("span", {class: "progress"}, `committed ${committed}/${r.devices}`),
      el("span", {class: "empty"}, r.stage >= 0 && r.stages.length ? `stage ${r.stage + 1} of ${r.stages.length}` : ""));
    const rows = stages.map(([stage, counts]) => {
      const total = Object.values(counts).reduce((a, b) => a + b, 0);
      const shadowVerdict = r.verdicts.shadow;
      if (!total && r.shadow_stages.includes(+stage)) {
        return el("div", {class: "stage", "data-stage": stage},
          el("span", {}, `stage ${+stage + 1} (${r.stages[+stage]}) shadow`), el("div", {class: "bar shadow-done"}),
          el("span", {class: "counts"}, shadowVerdict ? `${shadowVerdict.decision}: agreement ${round(shadowVerdict.agreement)}, ` +
                                                       `${shadowVerdict.reporting} devices, promoted` : "promoted"));
      }
      const percent = stage !== "-" && r.stages[+stage] !== undefined ? ` (${r.stages[+stage]})` : "";
      const shadow = r.shadow_stages.includes(+stage) ? " shadow" : "";
      return el("div", {class: "stage", "data-stage": stage},
        el("span", {}, stage === "-" ? "not staged" : `stage ${+stage + 1}${percent}${shadow}`), stageBar(counts, total),
        el("span", {class: "counts"}, Object.entries(counts).map(([k, v]) => `${k} ${v}`).join(", ")));
    });
    const actions = el("div", {class: "actions"});
    const possible = {running: ["pause", "abort"], paused: ["resume", "abort"]}[r.state] || [];
    if (r.kind === "rollout" && (r.state === "done" || r.state === "aborted")) possible.push("rollback");
    for (const action of possible) {
      actions.append(el("button", {type: "button", "data-action": action, onclick: () => act(r.id, action)}, action));
    }
    return el("div", {class: "rollout", "data-id": String(r.id), "data-state": r.state},
      title, el("div", {class: "stages"}, ...rows),
      r.reason ? el("p", {class: "reason"}, r.reason) : null,
      el("p", {class: "verdict"}, verdictText(r.verdicts)), actions);
  }));
}

async function act(id, action) {
  const result = document.getElementById("action-result");
  const response = await fetch(`/api/rollouts/${id}/${action}`, {
    method: "POST", headers: token ? {Authorization: `Bearer ${token}`} : {}});
  const body = await response.json().catch(() => ({}));
  result.dataset.status = String(response.status);
  result.textContent = response.ok ? `${action} of rollout ${id}: done${body.rollback ? ` (rollback #${body.rollback})` : ""}`
                                   : `${action} of rollout ${id} refused: ${body.error || response.status}`;
}

function renderCharts(series) {
  for (const name of CHARTS) {
    const box = document.getElementById(`chart-${name}`);
    const chart = series.charts[name] || {releases: [], values: []};
    if (!chart.releases.length || !series.x.length) {
      if (charts[name]) { charts[name].plot.destroy(); delete charts[name]; }
      box.replaceChildren(el("p", {class: "empty"}, "no data yet"));
      continue;
    }
    const scale = name === "p95_ms" ? 1 : 100;  // rates and shares in percent
    const data = [series.x, ...chart.values.map((line) => line.map((v) => (v === null ? null : v * scale)))];
    const key = chart.releases.join("\n");
    if (charts[name] && charts[name].key === key) {
      charts[name].plot.setData(data);
      continue;
    }
    if (charts[name]) charts[name].plot.destroy();
    box.replaceChildren();
    const options = {
      width: Math.max(300, box.clientWidth || 440), height: 200, spanGaps: true,
      series: [{}, ...chart.releases.map((release, i) => ({
        label: release, stroke: PALETTE[i % PALETTE.length], width: 2, points: {show: true, size: 4}}))],
      axes: [{}, {size: 60}],
      // at least the last 15 minutes on the x axis, so one minute of data is not stretched over years
      scales: {x: {time: true, range: (u, min, max) => [Math.min(min, max - 900), max + 30]},
               y: {range: (u, min, max) => (name === "shadow_agreement" ? [Math.min(90, min - 1), 100]
                                                                         : [0, Math.max(1, max * 1.15)])}},
    };
    charts[name] = {key, plot: new uPlot(options, data, box)};
  }
}

document.getElementById("filters").addEventListener("change", connect);
document.getElementById("token-form").addEventListener("submit", (event) => {
  event.preventDefault();
  token = document.getElementById("token").value.trim();
  sessionStorage.setItem("edgepack-token", token);
  document.getElementById("action-result").textContent = token ? "token set for actions" : "token cleared";
});
for (const [name, value] of new URLSearchParams(location.search)) {
  const select = document.querySelector(`#filters select[name="${CSS.escape(name)}"]`);
  if (select) {
    if (![...select.options].some((o) => o.value === value)) select.append(el("option", {value}, value));
    select.value = value;
  }
}
connect();
