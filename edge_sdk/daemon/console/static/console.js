// The edge-sdk console: polls the daemon and draws sources, device health, models and events.
// Every value from the daemon goes into the page as text (textContent), never as markup.
"use strict";

const STATE_EVERY_MS = 2000;
const EVENTS_EVERY_MS = 3000;
const FRAME_EVERY_MS = 400;
let csrf = "";
let eventsShown = "";
const reloading = new Set();  // models being reloaded: their buttons stay disabled across redraws

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs || {})) {
    if (key === "class") node.className = value;
    else if (key.startsWith("data-")) node.setAttribute(key, value);
    else node[key] = value;
  }
  for (const child of children) {
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

function loggedOut() {
  window.location.assign("/console/login");
}

async function api(path, options) {
  const response = await fetch(path, Object.assign({ credentials: "same-origin", cache: "no-store" }, options));
  if (response.status === 401) {
    loggedOut();
    throw new Error("the console session ended; log in again");
  }
  const body = await response.json().catch(() => ({}));
  if (!response.ok) {
    throw new Error((body.error || ("HTTP " + response.status)) + (body.hint ? " (" + body.hint + ")" : ""));
  }
  return body;
}

function post(path, data) {
  return api(path, {
    method: "POST",
    headers: { "Content-Type": "application/json", "X-CSRF-Token": csrf },
    body: JSON.stringify(data || {}),
  });
}

function fixed(value, digits, unit) {
  return value === null || value === undefined ? "–" : Number(value).toFixed(digits) + (unit || "");
}

function when(seconds) {
  return new Date(seconds * 1000).toLocaleString();
}

// -- sources --------------------------------------------------------------------------------
function frameUrl(name) {
  return "/console/sources/" + encodeURIComponent(name) + "/frame.jpg?n=" + Date.now();
}

function makeTile(source) {
  const img = el("img", { class: "frame", alt: "latest frame of " + source.source });
  const message = el("p", { class: "muted waiting" }, "waiting for the first frame");
  const tile = el("div", { class: "tile", "data-source": source.source }, img, message,
    el("div", { class: "caption" }, el("span", { class: "name" }, source.source), " ",
      el("span", { class: "badge" }), el("div", { class: "numbers" }), el("div", { class: "error last-error" })));
  let loads = 0;
  img.addEventListener("load", () => {
    loads += 1;
    tile.setAttribute("data-loads", String(loads));
    message.hidden = true;
    img.hidden = false;
    setTimeout(() => { img.src = frameUrl(source.source); }, FRAME_EVERY_MS);
  });
  img.addEventListener("error", () => {
    message.hidden = false;
    img.hidden = true;
    setTimeout(() => { img.src = frameUrl(source.source); }, FRAME_EVERY_MS * 3);
  });
  img.src = frameUrl(source.source);
  return tile;
}

function drawSources(sources) {
  const box = document.getElementById("sources");
  document.getElementById("no-sources").hidden = sources.length > 0;
  for (const source of sources) {
    let tile = box.querySelector('[data-source="' + CSS.escape(source.source) + '"]');
    if (!tile) {
      tile = makeTile(source);
      box.append(tile);
    }
    const badge = tile.querySelector(".badge");
    badge.textContent = source.status;
    badge.className = "badge " + source.status;
    tile.querySelector(".numbers").textContent =
      "asset " + source.asset + " · model " + source.model + " · " + fixed(source.fps, 1, " frames/s") +
      " · latency " + fixed(source.latency_ms, 0, " ms") + " · frames " + source.frames +
      " · dropped " + source.dropped + " · reconnects " + source.reconnects;
    tile.querySelector(".last-error").textContent = source.last_error || "";
  }
}

// -- device health --------------------------------------------------------------------------
function drawHealth(health) {
  const facts = [];
  const t = health.telemetry;
  if (t) {
    const cores = t.cpu_percent.length ? " (" + t.cpu_percent.length + " cores)" : "";
    facts.push(["CPU load", fixed(t.cpu_mean_percent, 0, " %") + cores]);
    facts.push(["GPU load", fixed(t.gpu_percent, 0, " %")]);
    const temps = Object.entries(t.temperatures).map(([zone, c]) => zone + " " + fixed(c, 1, " °C"));
    facts.push(["Temperatures", temps.length ? temps.join(", ") : "–"]);
    facts.push(["Memory", t.ram_used_mb === null ? "–" : t.ram_used_mb + " / " + t.ram_total_mb + " MB"]);
  } else {
    facts.push(["Telemetry", "not available on this device"]);
  }
  const mb = (bytes) => (bytes / 1048576).toFixed(1) + " MB";
  facts.push(["Events", health.events + " stored, " + mb(health.events_disk_bytes) + " on disk" +
    (health.events_max_bytes ? " (limit " + mb(health.events_max_bytes) + ")" : "")]);
  const m = health.mqtt;
  facts.push(["MQTT", m ? (m.connected ? "connected" : "disconnected") + ", outbox " + m.outbox +
    ", dead letters " + m.dead_letters + (m.last_error ? ", last error: " + m.last_error : "") : "not configured"]);
  facts.push(["Uptime", fixed(health.uptime_s / 3600, 1, " h")]);
  const list = document.getElementById("health");
  list.replaceChildren(...facts.flatMap(([key, value]) => [el("dt", {}, key), el("dd", {}, value)]));
}

// -- models ---------------------------------------------------------------------------------
function parityText(parity) {
  if (!parity) return "not verified";
  return (parity.ok ? "passed" : "FAILED") + ": max |diff| " + Number(parity.max_abs_diff).toPrecision(3) +
    " ≤ " + Number(parity.tolerance).toPrecision(3) + " over " + parity.samples + " samples";
}

function drawModels(models) {
  const body = document.querySelector("#models tbody");
  const rows = models.map((m) => {
    const skipped = m.skipped_backends.length
      ? el("ul", {}, ...m.skipped_backends.map((s) => el("li", {}, s.backend + ": " + s.reason))) : "none";
    const report = m.report
      ? el("a", { href: "/console/models/" + encodeURIComponent(m.name) + "/report", target: "_blank",
        rel: "noopener" }, "conversion report")
      : el("span", { class: "muted" }, "no report in this package");
    const button = el("button", { type: "button", class: "reload", "data-model": m.name,
      disabled: reloading.has(m.name) }, "Reload");
    button.addEventListener("click", () => reload(m.name, button));
    return el("tr", { "data-model": m.name }, el("td", {}, m.name), el("td", {}, m.model), el("td", {}, m.version),
      el("td", {}, m.backend), el("td", {}, m.precision), el("td", {}, parityText(m.parity)), el("td", {}, skipped),
      el("td", {}, report), el("td", {}, button));
  });
  body.replaceChildren(...rows);
}

async function reload(name, button) {
  const result = document.getElementById("reload-result");
  button.disabled = true;
  reloading.add(name);
  result.hidden = false;
  result.className = "result";
  result.textContent = "reloading " + name + "…";
  try {
    const info = await post("/v1/models/" + encodeURIComponent(name) + "/reload");
    result.textContent = "reloaded " + info.name + ": " + info.model + " version " + info.version + " on " +
      info.backend + " (" + info.precision + ")";
  } catch (error) {
    result.className = "result failed";
    result.textContent = "reload of " + name + " failed: " + error.message;
  } finally {
    reloading.delete(name);
    button.disabled = false;
    refreshState().catch(() => null);
  }
}

// -- events ---------------------------------------------------------------------------------
function eventItem(event) {
  const snapshot = event.snapshot
    ? el("img", { src: "/v1/events/" + event.id + "/snapshot", alt: "snapshot of event " + event.id })
    : el("span", { class: "muted" }, "no snapshot");
  const ack = event.acknowledged_at
    ? el("span", { class: "acked" }, "acknowledged " + when(event.acknowledged_at) + " (" + event.acknowledged_by + ")")
    : el("button", { type: "button", class: "ack" }, "Acknowledge");
  if (!event.acknowledged_at) {
    ack.addEventListener("click", () => acknowledge(event.id, ack));
  }
  return el("li", { "data-event-id": String(event.id) }, snapshot,
    el("div", {}, el("div", {}, el("span", { class: "fault" }, event.fault), " on ",
      el("span", { class: "asset" }, event.asset), " · " + fixed(event.confidence, 2)),
    el("div", { class: "muted" }, "#" + event.id + " · " + when(event.timestamp)), ack));
}

async function acknowledge(id, button) {
  button.disabled = true;
  try {
    await post("/v1/events/" + id + "/acknowledge");
    eventsShown = "";
    await refreshEvents();
  } catch (error) {
    showEventsError(error);
    button.disabled = false;
  }
}

function showEventsError(error) {
  const box = document.getElementById("events-error");
  box.hidden = !error;
  box.textContent = error ? error.message : "";
}

async function refreshEvents() {
  const query = new URLSearchParams({ limit: "30" });
  for (const key of ["asset", "fault"]) {
    const value = document.getElementById("filter-" + key).value.trim();
    if (value) query.set(key, value);
  }
  const data = await api("/v1/events?" + query.toString());
  showEventsError(null);
  const signature = query.toString() + JSON.stringify(data.events.map((e) => [e.id, e.acknowledged_at]));
  if (signature === eventsShown) return;
  eventsShown = signature;
  document.getElementById("events").replaceChildren(...data.events.map(eventItem));
  document.getElementById("no-events").hidden = data.events.length > 0;
}

// -- the loop -------------------------------------------------------------------------------
async function refreshState() {
  const state = await api("/console/state");
  drawSources(state.sources);
  drawHealth(state.health);
  drawModels(state.models);
  const status = document.getElementById("status");
  status.textContent = (state.health.ready ? "ready" : "not ready") + " · updated " + new Date().toLocaleTimeString();
}

function every(ms, task) {
  const run = async () => {
    try {
      await task();
    } catch (error) {
      document.getElementById("status").textContent = "error: " + error.message;
    }
    setTimeout(run, ms);
  };
  run();
}

async function start() {
  csrf = (await api("/console/session")).csrf;
  document.getElementById("logout").addEventListener("click", async () => {
    await post("/console/logout").catch(() => null);
    loggedOut();
  });
  document.getElementById("event-filter").addEventListener("submit", (e) => {
    e.preventDefault();
    refreshEvents().catch(showEventsError);
  });
  document.getElementById("filter-clear").addEventListener("click", () => {
    document.getElementById("filter-asset").value = "";
    document.getElementById("filter-fault").value = "";
    refreshEvents().catch(showEventsError);
  });
  every(STATE_EVERY_MS, refreshState);
  every(EVENTS_EVERY_MS, refreshEvents);
}

document.addEventListener("DOMContentLoaded", () => {
  start().catch((error) => { document.getElementById("status").textContent = "error: " + error.message; });
});
