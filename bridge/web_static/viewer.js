// fluorosam-rt live view: draws the newest frame the viewer sends, acknowledges it once drawn
// (the server sends a tab a new frame only against acknowledgements, so a hidden tab, whose
// animation frames the browser pauses, is sent nothing until it is shown again), and shows the
// node's figures and prompts. Packet layout: bridge/web_packet.py. Every text from the node is
// set with textContent, never parsed as HTML.
"use strict";

const PALETTE = [
  [255, 80, 80], [80, 170, 255], [90, 220, 120], [255, 200, 60],
  [200, 110, 255], [60, 220, 220], [255, 130, 200], [170, 200, 80],
];
const OVERLAY_ALPHA = 110;
const $ = (id) => document.getElementById(id);

const state = {
  ws: null,
  pending: null, // newest frame received, not drawn yet
  drawing: false,
  frames: 0,
  lastHeader: null,
  control: null,
  nextCommandId: 1,
  retryMs: 500,
};

// A prompt keeps its colour for the page's lifetime: colours go out in order of first appearance.
const colours = new Map();
function colorFor(id) {
  if (!colours.has(id)) colours.set(id, PALETTE[colours.size % PALETTE.length]);
  return colours.get(id);
}
const css = (c, a = 1) => `rgba(${c[0]},${c[1]},${c[2]},${a})`;

function el(tag, text, cls) {
  const e = document.createElement(tag);
  if (text !== undefined && text !== null) e.textContent = String(text);
  if (cls) e.className = cls;
  return e;
}

function ms(v) {
  return v === null || v === undefined ? "–" : `${Number(v).toFixed(1)} ms`;
}

// ------------------------------------------------------------------ connection

function connect() {
  const scheme = location.protocol === "https:" ? "wss:" : "ws:";
  const ws = new WebSocket(`${scheme}//${location.host}/ws`);
  ws.binaryType = "arraybuffer";
  state.ws = ws;
  ws.onopen = () => {
    state.retryMs = 500;
    setConn(true);
  };
  ws.onclose = () => {
    setConn(false);
    setTimeout(connect, state.retryMs);
    state.retryMs = Math.min(state.retryMs * 2, 5000);
  };
  ws.onmessage = (ev) => {
    if (typeof ev.data === "string") onText(JSON.parse(ev.data));
    else onFrame(ev.data);
  };
}

function setConn(on) {
  const b = $("conn");
  b.textContent = on ? "live" : "disconnected";
  b.className = "badge " + (on ? "on" : "off");
}

function send(obj) {
  if (state.ws && state.ws.readyState === WebSocket.OPEN) state.ws.send(JSON.stringify(obj));
}

// ------------------------------------------------------------------ frames

function onFrame(buf) {
  const n = new DataView(buf).getUint32(0, true);
  const header = JSON.parse(new TextDecoder().decode(new Uint8Array(buf, 4, n)));
  state.pending = { header, body: new Uint8Array(buf, 4 + n) };
  if (!state.drawing) {
    state.drawing = true;
    requestAnimationFrame(drawPending);
  }
}

async function drawPending() {
  const f = state.pending;
  state.pending = null;
  try {
    if (f) await drawFrame(f.header, f.body);
  } catch (e) {
    console.error("frame not drawn", e);
  }
  send({ type: "ack" });
  if (state.pending) requestAnimationFrame(drawPending);
  else state.drawing = false;
}

function slice(body, loc) {
  return body.subarray(loc.offset, loc.offset + loc.length);
}

function decodePlane(mask, body, n) {
  const data = slice(body, mask);
  const out = new Uint8Array(n);
  if (mask.encoding === "bits") {
    for (let i = 0; i < n; i++) out[i] = (data[i >> 3] >> (7 - (i & 7))) & 1;
  } else if (mask.encoding === "rle") {
    const runs = new DataView(data.buffer, data.byteOffset, data.byteLength);
    let pos = 0;
    for (let r = 0; r * 4 < data.byteLength; r++) {
      const len = runs.getUint32(r * 4, true);
      if (r & 1) out.fill(1, pos, Math.min(n, pos + len));
      pos += len;
    }
  }
  return out;
}

async function drawFrame(h, body) {
  const canvas = $("view");
  if (canvas.width !== h.width || canvas.height !== h.height) {
    canvas.width = h.width;
    canvas.height = h.height;
  }
  const ctx = canvas.getContext("2d");
  if (h.image) {
    const bmp = await createImageBitmap(new Blob([slice(body, h.image)], { type: "image/jpeg" }));
    ctx.drawImage(bmp, 0, 0, h.width, h.height);
    bmp.close();
  } else {
    ctx.fillStyle = "#000";
    ctx.fillRect(0, 0, h.width, h.height);
  }
  const n = h.width * h.height;
  const overlay = new ImageData(h.width, h.height);
  const px = overlay.data;
  let any = false;
  for (const p of h.prompts) {
    if (!p.mask || !p.present) continue;
    const m = decodePlane(p.mask, body, n);
    const c = colorFor(p.id);
    for (let i = 0; i < n; i++) {
      if (m[i]) {
        const k = i * 4;
        px[k] = c[0]; px[k + 1] = c[1]; px[k + 2] = c[2]; px[k + 3] = OVERLAY_ALPHA;
        any = true;
      }
    }
  }
  if (any) {
    const off = new OffscreenCanvas(h.width, h.height);
    off.getContext("2d").putImageData(overlay, 0, 0);
    ctx.drawImage(off, 0, 0);
  }
  drawGeometry(ctx, h);
  state.frames += 1;
  state.lastHeader = h;
  canvas.dataset.frames = String(state.frames);
  showFrameInfo(h);
}

// Protocol v2 geometry (bridge/prompt_geometry.py), drawn when the node publishes it: contours
// are polygons of rings ([x, y] in source pixels, ring 0 the outline, then holes); a linear
// tool's instance has a centre line, a tip and a unit axis pointing towards the tip.
function rings(contours) {
  const out = [];
  for (const poly of contours || []) for (const ring of poly || []) if (Array.isArray(ring)) out.push(ring);
  return out;
}

function drawGeometry(ctx, h) {
  const s = 1 / (h.downsample || 1);
  const path = (pts, closed) => {
    if (!pts || pts.length < 2) return;
    ctx.beginPath();
    ctx.moveTo(pts[0][0] * s, pts[0][1] * s);
    for (let i = 1; i < pts.length; i++) ctx.lineTo(pts[i][0] * s, pts[i][1] * s);
    if (closed) ctx.closePath();
    ctx.stroke();
  };
  ctx.save();
  ctx.lineWidth = Math.max(1, h.width / 400);
  for (const p of h.prompts) {
    if (!p.present) continue;
    const c = colorFor(p.id);
    ctx.strokeStyle = css(c);
    for (const ring of rings(p.contours)) path(ring, true);
    for (const inst of p.instances || []) {
      if (inst.polyline) {
        ctx.setLineDash([4, 3]);
        path(inst.polyline, false);
        ctx.setLineDash([]);
      }
      if (!inst.tip) continue;
      const [tx, ty] = [inst.tip[0] * s, inst.tip[1] * s];
      if (inst.axis) {
        const len = h.width / 10;
        ctx.beginPath();
        ctx.moveTo(tx - inst.axis[0] * len, ty - inst.axis[1] * len);
        ctx.lineTo(tx, ty);
        ctx.stroke();
      }
      ctx.fillStyle = "#fff";
      ctx.beginPath();
      ctx.arc(tx, ty, Math.max(3, h.width / 150), 0, 2 * Math.PI);
      ctx.fill();
      ctx.stroke();
      ctx.fillStyle = css(c);
      ctx.font = `${Math.max(10, h.width / 40)}px sans-serif`;
      ctx.fillText(`#${inst.id}`, tx + 6, ty - 6);
    }
  }
  ctx.restore();
}

function showFrameInfo(h) {
  $("frame-id").textContent = String(h.frame_id);
  $("seq").textContent = String(h.seq);
  $("stream").textContent = `${h.stream}${h.model ? " · " + h.model : ""}`;
  const src = h.source || {};
  $("source-info").textContent = Object.entries(src).map(([k, v]) => `${k} ${v}`).join(" · ");
  const legend = $("legend");
  legend.replaceChildren();
  for (const p of h.prompts) {
    const li = el("li", null, p.present ? "present" : "absent");
    li.dataset.id = p.id;
    const sw = el("span", null, "swatch");
    sw.style.background = css(colorFor(p.id));
    li.append(sw, el("span", p.text), el("span", p.score === null ? "–" : p.score.toFixed(2), "dim"),
      el("span", p.present ? "present" : "absent", "dim"));
    if (p.instances && p.instances.length) {
      const tips = p.instances.filter((i) => i.tip).length;
      li.append(el("span", `${p.instances.length} inst.${tips ? `, ${tips} tip${tips > 1 ? "s" : ""}` : ""}`, "dim"));
    }
    legend.append(li);
  }
  const stages = $("stages");
  stages.replaceChildren();
  for (const [k, v] of Object.entries(h.stages_ms || {})) {
    const tr = el("tr");
    tr.append(el("th", k), el("td", ms(v)));
    stages.append(tr);
  }
  if (!state.control) renderPrompts(h.prompts, false);
}

// ------------------------------------------------------------------ status and figures

function onText(msg) {
  if (msg.type === "status") onStatus(msg);
  else if (msg.type === "reply") onReply(msg);
}

function onStatus(st) {
  const v = st.viewer || {};
  const node = st.node || {};
  state.control = st.control;
  $("fps").textContent = v.fps === undefined ? "–" : Number(v.fps).toFixed(1);
  $("lat-p50").textContent = ms(v.latency_p50_ms);
  $("lat-p99").textContent = ms(v.latency_p99_ms);
  $("transport-p50").textContent = ms(v.transport_p50_ms);
  drawSpark(v.sparkline_ms || []);

  const dropped = $("dropped");
  dropped.replaceChildren();
  const rows = [];
  for (const [k, n] of Object.entries(node.dropped || {})) rows.push([`node: ${k}`, n]);
  if (st.control === null) rows.push(["node", "(no --control)"]);
  else if (!rows.length && st.control === "ok") rows.push(["node", 0]);
  rows.push(["viewer: skipped stale", v.skipped ?? 0], ["viewer: missed (seq gaps)", v.lost ?? 0]);
  rows.push(["node latest-frame-wins (seen)", v.node_dropped ?? 0]);
  for (const [k, n] of rows) {
    const tr = el("tr");
    tr.dataset.reason = k;
    tr.append(el("th", k), el("td", n));
    dropped.append(tr);
  }

  const nt = $("node");
  nt.replaceChildren();
  const info = [
    ["control", st.control === null ? "not connected (no --control)" : st.control],
    ["model", node.model], ["engine", node.engine && (node.engine.engine || JSON.stringify(node.engine))],
    ["node fps", node.fps], ["received", node.received], ["published", node.published],
    ["in flight", node.in_flight], ["tabs watching", v.tabs],
  ];
  const e2e = node.latency && node.latency.end_to_end;
  if (e2e) info.push(["node p50 / p99", `${ms(e2e.p50_ms)} / ${ms(e2e.p99_ms)}`]);
  if (node.last_error) info.push(["last error", node.last_error]);
  for (const [k, val] of info) {
    if (val === undefined || val === null) continue;
    const tr = el("tr");
    tr.append(el("th", k), el("td", val));
    nt.append(tr);
  }
  if (st.control !== null && node.prompts) renderPrompts(node.prompts, true);
  $("add-button").disabled = st.control === null;
}

function drawSpark(values) {
  const c = $("spark");
  const ctx = c.getContext("2d");
  ctx.clearRect(0, 0, c.width, c.height);
  if (values.length < 2) return;
  const max = Math.max(...values) * 1.1 || 1;
  ctx.strokeStyle = "#5fa8ff";
  ctx.lineWidth = 1.5;
  ctx.beginPath();
  values.forEach((y, i) => {
    const px = (i / (values.length - 1)) * c.width;
    const py = c.height - (y / max) * (c.height - 4) - 2;
    if (i) ctx.lineTo(px, py);
    else ctx.moveTo(px, py);
  });
  ctx.stroke();
  ctx.fillStyle = "#8a939e";
  ctx.font = "10px sans-serif";
  ctx.fillText(`max ${max.toFixed(0)} ms`, 4, 10);
}

let promptKey = "";
function renderPrompts(prompts, editable) {
  const key = JSON.stringify([editable, prompts.map((p) => [p.id, p.text])]);
  if (key === promptKey) return;
  promptKey = key;
  const ul = $("prompts");
  ul.replaceChildren();
  for (const p of prompts) {
    const li = el("li");
    li.dataset.id = p.id;
    const sw = el("span", null, "swatch");
    sw.style.background = css(colorFor(p.id));
    li.append(sw, el("span", p.text, "text"));
    if (p.id !== p.text) li.append(el("span", p.id, "dim"));
    const b = el("button", "remove");
    b.type = "button";
    b.disabled = !editable;
    b.title = `remove ${p.id}`;
    b.addEventListener("click", () => command({ cmd: "remove", ids: [p.id] }));
    li.append(b);
    ul.append(li);
  }
}

// ------------------------------------------------------------------ commands

function command(request) {
  const id = state.nextCommandId++;
  const r = $("reply");
  r.className = "";
  r.textContent = `sending ${request.cmd} …`;
  send({ type: "command", id, request });
}

function onReply(msg) {
  const r = $("reply");
  const reply = msg.reply || {};
  r.replaceChildren();
  r.dataset.replyId = String(msg.id);
  if (!reply.ok) {
    const err = reply.error || {};
    r.className = "error";
    r.append(el("div", `error (${err.code || "unknown"}): ${err.message || "no message"}`));
    return;
  }
  r.className = "ok";
  const req = msg.request || {};
  const ids = (reply.prompts || []).map((p) => p.id).join(", ");
  r.append(el("div", `${req.cmd} ok; active: ${ids || "none"}`));
  for (const h of reply.hints || []) {
    if (!h || !h.far) continue;
    const near = (h.nearest || []).map(([t, s]) => `“${t}” (${Number(s).toFixed(2)})`).join(", ");
    r.append(el("div", `“${h.text}” is far from what the model was trained on; did you mean ${near}? It runs anyway.`, "hint"));
  }
  if (reply.prompts) renderPrompts(reply.prompts, true);
}

function init() {
  $("add-form").addEventListener("submit", (ev) => {
    ev.preventDefault();
    const input = $("prompt-text");
    command({ cmd: "add", prompts: [input.value] });
    input.value = "";
  });
  connect();
}

document.addEventListener("DOMContentLoaded", init);
