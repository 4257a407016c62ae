// The page of `edgecl serve` (docs/SERVE.md): it polls /api/status, shows the MJPEG stream, and
// calls the same /api/ the scripts use. Untrusted text (class labels) only ever goes in as
// textContent. The token (when the board needs one) comes from the address's #token=... or the
// box, is kept in sessionStorage and sent as a header, never as a cookie.
"use strict";

const $ = (id) => document.getElementById(id);
const state = { generation: null, status: null, busy: false, tokenRequired: false, polling: false, down: false };

function token() { return sessionStorage.getItem("edgecl-token") || ""; }

(function takeTokenFromAddress() {
  const m = /(?:^|[#&])token=([^&]+)/.exec(location.hash);
  if (m) {
    sessionStorage.setItem("edgecl-token", decodeURIComponent(m[1]));
    history.replaceState(null, "", location.pathname + location.search);
  }
})();

function el(tag, props, ...children) {
  const e = document.createElement(tag);
  Object.assign(e, props || {});
  for (const c of children) e.append(c);
  return e;
}

function say(text, error) {
  const m = $("message");
  m.textContent = text;
  m.className = error ? "message error" : "message";
  m.hidden = !text;
}

async function api(path, options) {
  options = options || {};
  const headers = Object.assign({}, options.headers || {});
  if (token()) headers["Authorization"] = "Bearer " + token();
  const res = await fetch(path, Object.assign({}, options, { headers, cache: "no-store" }));
  if (!res.ok) {
    let msg = res.status + " " + res.statusText;
    try { msg = (await res.json()).error || msg; } catch (e) { /* not JSON */ }
    if (res.status === 401) $("token-box").hidden = false;
    const err = new Error(msg);
    err.status = res.status;
    throw err;
  }
  return res;
}

async function post(path, body) {
  const res = await api(path, { method: "POST", headers: { "Content-Type": "application/json" },
                                body: JSON.stringify(body) });
  return res.json();
}

// ---------------------------------------------------------------- live view
function showPrediction(cam) {
  const p = cam.prediction;
  $("fps").textContent = cam.fps.toFixed(1);
  $("frame-seq").textContent = cam.frames;
  $("engine-ms").textContent = cam.latency.engine_ms_median === null ? "-" : cam.latency.engine_ms_median.toFixed(2);
  $("host-ms").textContent = cam.latency.host_ms_median === null ? "-" : cam.latency.host_ms_median.toFixed(2);
  const top = $("top");
  top.replaceChildren();
  if (!p) return;
  const [label, score] = p.top.length ? p.top[0] : ["-", 0];
  $("top1").textContent = label;
  $("top1").className = p.unknown ? "label unknown" : "label";
  // calibrated confidence when the engine judges unknowns, else the raw top score
  $("top1-score").textContent = !p.top.length ? "" : p.unknown && p.score !== null
    ? "score " + p.score.toFixed(3) + " < " + p.threshold.toFixed(3)
    : p.confidence !== null && p.confidence !== undefined ? Math.round(100 * p.confidence) + "%" : score.toFixed(3);
  for (const [name, s] of p.top) {
    const bar = el("span");
    bar.style.width = Math.max(0, Math.min(1, s)) * 100 + "%";
    top.append(el("li", {}, el("span", { className: "name", textContent: name, title: name }),
                  el("span", { className: "bar" }, bar), el("span", { className: "score", textContent: s.toFixed(3) })));
  }
  const w = $("weights");
  if (p.weights) {
    w.textContent = "aggregation weights: " + Object.entries(p.weights).map(([k, v]) => k + " " + v.toFixed(2)).join(", ");
    w.hidden = false;
  } else {
    w.hidden = true;
  }
}

function showCamera(cam) {
  const badge = $("camera-state");
  badge.textContent = "camera " + cam.state;
  badge.className = "badge " + cam.state;
  const banner = $("camera-banner");
  banner.hidden = cam.state !== "lost";
  banner.textContent = cam.state === "lost" ? "Camera lost: " + (cam.message || "reconnecting") +
    " (the server keeps serving; the view comes back with the camera)" : "";
  const cap = cam.capture;
  if (cap) $("enroll-status").textContent = "capturing " + cap.have + "/" + cap.want + " frames for '" + cap.name + "'";
}

// ---------------------------------------------------------------- classes
function showClasses(classes) {
  const body = $("classes").querySelector("tbody");
  body.replaceChildren();
  $("class-count").textContent = "(" + classes.length + ")";
  for (const c of classes) {
    const row = el("tr", { className: c.kind });
    row.dataset.name = c.name;
    const nameCell = el("td", { className: "name", textContent: c.name });
    const rename = el("button", { type: "button", className: "rename", textContent: "rename" });
    const remove = el("button", { type: "button", className: "remove", textContent: "remove" });
    rename.onclick = () => startRename(row, nameCell, c.name);
    remove.onclick = () => removeClass(c.name);
    row.append(nameCell, el("td", { className: "kind", textContent: c.kind }),
               el("td", { className: "samples", textContent: c.samples === null ? "-" : String(c.samples) }),
               el("td", { className: "actions" }, rename, " ", remove));
    body.append(row);
  }
}

function startRename(row, cell, old) {
  const input = el("input", { type: "text", className: "rename-input", value: old, maxLength: 128 });
  const ok = el("button", { type: "button", className: "rename-ok", textContent: "OK" });
  const cancel = el("button", { type: "button", className: "rename-cancel", textContent: "cancel" });
  cell.replaceChildren(input, ok, cancel);
  input.focus();
  input.select();
  cancel.onclick = () => { cell.replaceChildren(old); };
  const go = () => change("rename", "/api/rename", { old: old, new: input.value },
                          (r) => "renamed '" + r.old + "' to '" + r.new + "' (generation " + r.generation + ")");
  ok.onclick = go;
  input.onkeydown = (ev) => { if (ev.key === "Enter") go(); if (ev.key === "Escape") cancel.onclick(); };
}

// one change of the classes: POST it, say what it did (or why not), show the new state
async function change(what, path, body, done) {
  try {
    say(done(await post(path, body)));
    await refresh(true);
  } catch (e) { say(what + ": " + e.message, true); }
}

async function removeClass(name) {
  if (!confirm("Remove the class '" + name + "'? (a rollback can bring it back)")) return;
  await change("remove", "/api/remove", { name: name },
               (r) => "removed '" + r.removed + "' (generation " + r.generation + ")");
}

// ---------------------------------------------------------------- history
function summary(op) {
  switch (op.op) {
    case "enroll": return "enrolled '" + op.name + "' (" + op.rows + " frames)";
    case "rename": return "renamed '" + op.old + "' to '" + op.new + "'";
    case "remove": return "removed '" + op.name + "'";
    case "rollback": return "rolled back to generation " + op.to;
    case "merge": return "merged " + (op.stores || []).join(" + ");
    case "engine": return "the engine directory as exported";
    default: return op.op;
  }
}

function when(item) {
  return item.created ? item.created.replace("T", " ").replace("Z", " UTC") : "";
}

function showHistory(h) {
  const list = $("history");
  list.replaceChildren();
  for (const item of h.generations) {
    const ops = item.ops && item.ops.length ? item.ops.map(summary).join("; ") : "solved the heads (no change of classes)";
    const li = el("li", { className: item.current ? "current" : "" },
                  el("span", { className: "gen", textContent: String(item.generation) }),
                  el("span", { className: "summary", textContent: ops + (item.classes !== null ? " — " + item.classes + " classes" : "") }),
                  el("span", { className: "when", textContent: when(item) }));
    li.dataset.generation = item.generation;
    if (item.current) {
      li.append(el("span", { className: "muted", textContent: "current" }));
    } else if (item.available) {
      const b = el("button", { type: "button", className: "rollback", textContent: "roll back" });
      b.onclick = () => rollback(item.generation);
      li.append(b);
    } else {
      li.append(el("span", { className: "muted", textContent: "not on disk", title: item.reason || "" }));
    }
    list.append(li);
  }
}

async function rollback(g) {
  if (!confirm("Roll back to generation " + g + "? (committed as a new generation; nothing is lost)")) return;
  await change("rollback", "/api/rollback", { to: g },
               (r) => "rolled back to generation " + r.to + " (committed as generation " + r.generation + ")");
}

// ---------------------------------------------------------------- enroll
function busy(on) {
  state.busy = on;
  for (const id of ["enroll-live", "enroll-upload", "merge"]) $(id).disabled = on;
}

function showPreview(r, what) {
  $("enroll-status").textContent = "enrolled '" + r.name + "' from " + r.frames + " " + what + " (generation " +
    r.generation + ", update " + r.update_ms.toFixed(1) + " ms)";
  $("preview").replaceChildren(...r.preview.map((src) => el("img", { src: src, alt: "captured frame" })));
}

async function enrollLive() {
  const name = $("enroll-name").value;
  const n = parseInt($("enroll-frames").value, 10);
  busy(true);
  $("preview").replaceChildren();
  $("enroll-status").textContent = "waiting for the camera...";
  try {
    const r = await post("/api/enroll", { name: name, frames: n });
    showPreview(r, "camera frames");
    say("enrolled '" + r.name + "' (generation " + r.generation + ")");
    await refresh(true);
  } catch (e) {
    $("enroll-status").textContent = "";
    say("enroll: " + e.message, true);
  } finally { busy(false); }
}

async function enrollUpload() {
  const files = $("enroll-files").files;
  const form = new FormData();
  form.append("name", $("enroll-name").value);
  for (const f of files) form.append("images", f, f.name);
  busy(true);
  $("enroll-status").textContent = "uploading " + files.length + " images...";
  try {
    const r = await (await api("/api/enroll/images", { method: "POST", body: form })).json();
    showPreview(r, "images");
    say("enrolled '" + r.name + "' (generation " + r.generation + ")");
    await refresh(true);
  } catch (e) {
    $("enroll-status").textContent = "";
    say("enroll: " + e.message, true);
  } finally { busy(false); }
}

// ---------------------------------------------------------------- store
async function download() {
  try {
    const res = await api("/api/store");
    const name = (/filename="([^"]+)"/.exec(res.headers.get("Content-Disposition") || "") || [])[1] || "store.tar";
    const url = URL.createObjectURL(await res.blob());
    const a = el("a", { href: url, download: name });
    document.body.append(a);
    a.click();
    a.remove();
    setTimeout(() => URL.revokeObjectURL(url), 10000);
    say("downloaded " + name + " (tar -xf " + name + ", then edgecl merge THAT_FOLDER ...)");
  } catch (e) { say("download: " + e.message, true); }
}

async function merge() {
  const f = $("merge-file").files[0];
  if (!f) { say("merge: choose a store tar first", true); return; }
  busy(true);
  try {
    const r = await (await api("/api/merge", { method: "POST", headers: { "Content-Type": "application/x-tar" },
                                               body: f })).json();
    const report = $("merge-report");
    report.textContent = r.report.join("\n");
    report.hidden = false;
    say(r.changed ? "merged (generation " + r.generation + ")" : "the upload held nothing new");
    await refresh(true);
  } catch (e) { say("merge: " + e.message, true); } finally { busy(false); }
}

// ---------------------------------------------------------------- polling
async function refresh(force) {
  if (state.polling && !force) return;
  state.polling = true;
  try { await poll(force); } finally { state.polling = false; }
}

async function poll(force) {
  let s;
  try {
    s = await (await api("/api/status")).json();
  } catch (e) {
    $("camera-state").textContent = "server unreachable";
    $("camera-state").className = "badge lost";
    state.down = true;
    return;
  }
  if (state.down) {  // the server came back: open the stream again
    state.down = false;
    $("stream").src = "/api/stream.mjpg?t=" + Date.now();
  }
  state.status = s;
  state.tokenRequired = s.auth.token_required;
  $("token-box").hidden = !(s.auth.token_required && !token());
  $("engine").textContent = (s.engine.method || "engine") + " · " + s.engine.dir + " · " + (s.engine.backend || "");
  $("generation").textContent = s.store.generation;
  $("enroll-frames").max = s.limits.max_images;
  showCamera(s.camera);
  showPrediction(s.camera);
  if (force || s.store.generation !== state.generation) {
    state.generation = s.store.generation;
    showClasses(s.classes);
    try { showHistory(await (await api("/api/history?limit=200")).json()); } catch (e) { say("history: " + e.message, true); }
  }
}

function keepStreaming() {
  const img = $("stream");
  img.onerror = () => setTimeout(() => { img.src = "/api/stream.mjpg?t=" + Date.now(); }, 2000);
}

document.addEventListener("DOMContentLoaded", () => {
  $("enroll-live").onclick = enrollLive;
  $("enroll-upload").onclick = enrollUpload;
  $("download").onclick = download;
  $("merge").onclick = merge;
  $("token-save").onclick = () => {
    sessionStorage.setItem("edgecl-token", $("token-input").value.trim());
    $("token-box").hidden = true;
    say("token set for this tab");
  };
  keepStreaming();
  refresh(true);
  setInterval(refresh, 500);
});
