// The painter: the label map is an Int32Array of class ids (the truth); the canvas only shows it,
// enlarged, one colour per id, so a stroke can never antialias into a colour of no class.
"use strict";
const app = { ids: null, size: 0, info: null, current: 0, tool: "brush", undo: [], redo: [], job: null };
window.app = app;
const $ = (id) => document.getElementById(id);
const MAX_UNDO = 100;

async function api(path, options = {}) {
  const res = await fetch(path, options);
  const body = await res.json().catch(() => ({ error: `HTTP ${res.status}` }));
  if (!res.ok) throw new Error(body.error || `HTTP ${res.status}`);
  return body;
}

function rgbOf(hex) { return [1, 3, 5].map((i) => parseInt(hex.slice(i, i + 2), 16)); }

async function init() {
  const info = await api("/api/info");
  app.info = info; app.size = info.image_size;
  app.colors = info.classes.map((c) => rgbOf(c.color));
  app.maskRgb = rgbOf(info.mask_color);
  app.fill = info.unlabeled_id !== null ? info.unlabeled_id : (info.mask_id !== null ? info.mask_id : 0);
  app.ids = new Int32Array(app.size * app.size).fill(app.fill);
  $("model").textContent = `${info.model.path} · ${app.size}×${app.size} · ${info.num_classes} classes` +
    (info.is_scdm ? " · SCDM" : "");
  const scale = Math.max(1, Math.floor(416 / app.size));
  const canvas = $("canvas");
  canvas.width = app.size; canvas.height = app.size;
  canvas.style.width = canvas.style.height = `${app.size * scale}px`;
  app.ctx = canvas.getContext("2d");
  app.image = app.ctx.createImageData(app.size, app.size);
  if (info.unlabeled_id === null) $("tool-eraser").style.display = "none";
  if (!info.is_scdm) { $("tool-mask").style.display = "none"; $("utz").parentElement.style.display = "none"; }
  $("utz").checked = info.defaults.unlabeled_to_zero;
  $("steps").value = info.defaults.steps; $("steps").max = info.limits.steps;
  $("guidance").value = info.defaults.guidance_scale; $("num-samples").max = info.limits.num_samples;
  buildPalette(); buildExamples(info.examples);
  select(info.classes.findIndex((c) => c.id !== info.unlabeled_id));
  bindEvents(); render();
}

function buildPalette() {
  const list = $("palette");
  for (const c of app.info.classes) {
    const li = document.createElement("li");
    li.dataset.id = c.id; li.dataset.name = c.name.toLowerCase();
    li.innerHTML = `<span class="swatch" style="background:${c.color}"></span><span>${c.id} ${c.name}</span>`;
    li.title = `${c.name} (id ${c.id}, ${c.color})`;
    li.addEventListener("click", () => { select(c.id); setTool("brush"); });
    list.appendChild(li);
  }
  $("search").addEventListener("input", (e) => {
    const q = e.target.value.trim().toLowerCase();
    for (const li of list.children) li.style.display = !q || li.dataset.name.includes(q) || li.dataset.id === q ? "" : "none";
  });
}

function buildExamples(names) {
  const sel = $("examples");
  sel.innerHTML = `<option value="">—</option>` + names.map((n) => `<option>${n}</option>`).join("");
  sel.addEventListener("change", async () => {
    if (!sel.value) return;
    try { const r = await api(`/api/examples/${encodeURIComponent(sel.value)}`); setMap(r.ids.flat()); note(""); }
    catch (e) { note(e.message, true); }
  });
}

function select(id) {
  app.current = id;
  for (const li of $("palette").children) li.classList.toggle("selected", Number(li.dataset.id) === id);
  const c = app.info.classes[id];
  $("current").innerHTML = `<span class="swatch" style="background:${c.color}"></span>${c.name}`;
}

function setTool(tool) {
  app.tool = tool;
  for (const b of document.querySelectorAll("button.tool")) b.classList.toggle("active", b.dataset.tool === tool);
}

function render() {
  const d = app.image.data;
  for (let i = 0; i < app.ids.length; i++) {
    const id = app.ids[i];
    const c = id < 0 ? app.maskRgb : app.colors[id];
    d[4 * i] = c[0]; d[4 * i + 1] = c[1]; d[4 * i + 2] = c[2]; d[4 * i + 3] = 255;
  }
  app.ctx.putImageData(app.image, 0, 0);
}

function snapshot() {
  app.undo.push(app.ids.slice()); if (app.undo.length > MAX_UNDO) app.undo.shift();
  app.redo = [];
}
function undo() { if (app.undo.length) { app.redo.push(app.ids); app.ids = app.undo.pop(); render(); } }
function redo() { if (app.redo.length) { app.undo.push(app.ids); app.ids = app.redo.pop(); render(); } }
function setMap(flat) { snapshot(); app.ids = Int32Array.from(flat); render(); }

function paintValue() {
  if (app.tool === "eraser") return app.info.unlabeled_id;
  if (app.tool === "mask") return app.info.mask_id;
  return app.current;
}

function dab(x, y, value) {  // a disc of the brush size, whole pixels only
  const r = Number($("brush-size").value) / 2, s = app.size;
  for (let yy = Math.floor(y - r); yy <= Math.ceil(y + r); yy++) {
    for (let xx = Math.floor(x - r); xx <= Math.ceil(x + r); xx++) {
      if (xx < 0 || yy < 0 || xx >= s || yy >= s) continue;
      const dx = xx + 0.5 - x, dy = yy + 0.5 - y;
      if (dx * dx + dy * dy <= Math.max(r * r, 0.25)) app.ids[yy * s + xx] = value;
    }
  }
}

function line(a, b, value) {
  const n = Math.max(1, Math.ceil(Math.hypot(b[0] - a[0], b[1] - a[1]) * 2));
  for (let i = 0; i <= n; i++) dab(a[0] + (b[0] - a[0]) * i / n, a[1] + (b[1] - a[1]) * i / n, value);
}

function floodFill(x, y, value) {
  const s = app.size, start = y * s + x, old = app.ids[start];
  if (old === value) return;
  const stack = [start];
  while (stack.length) {
    const i = stack.pop();
    if (app.ids[i] !== old) continue;
    app.ids[i] = value;
    const px = i % s, py = (i - px) / s;
    if (px > 0) stack.push(i - 1); if (px < s - 1) stack.push(i + 1);
    if (py > 0) stack.push(i - s); if (py < s - 1) stack.push(i + s);
  }
}

function mapPoint(e) {
  const r = $("canvas").getBoundingClientRect();
  return [(e.clientX - r.left) / r.width * app.size, (e.clientY - r.top) / r.height * app.size];
}

function note(text, error) { $("notes").textContent = text; $("notes").className = error ? "error" : ""; }

function bindEvents() {
  const canvas = $("canvas");
  let last = null;
  canvas.addEventListener("pointerdown", (e) => {
    const p = mapPoint(e), value = paintValue();
    if (value === null || value === undefined) return;
    snapshot();
    if (app.tool === "fill") {
      floodFill(Math.min(app.size - 1, Math.floor(p[0])), Math.min(app.size - 1, Math.floor(p[1])), value);
    } else {
      dab(p[0], p[1], value); last = p; canvas.setPointerCapture(e.pointerId);
    }
    render();
  });
  canvas.addEventListener("pointermove", (e) => {
    const p = mapPoint(e);
    const x = Math.floor(p[0]), y = Math.floor(p[1]);
    if (x >= 0 && y >= 0 && x < app.size && y < app.size) {
      const id = app.ids[y * app.size + x];
      $("cursor").textContent = `(${x}, ${y}) ${id < 0 ? "[MASK]" : app.info.classes[id].name}`;
    }
    if (last) { line(last, p, paintValue()); last = p; render(); }
  });
  const stop = () => { last = null; };
  canvas.addEventListener("pointerup", stop); canvas.addEventListener("pointercancel", stop);
  for (const b of document.querySelectorAll("button.tool")) b.addEventListener("click", () => setTool(b.dataset.tool));
  $("undo").addEventListener("click", undo); $("redo").addEventListener("click", redo);
  $("clear").addEventListener("click", () => setMap(new Int32Array(app.ids.length).fill(app.fill)));
  document.addEventListener("keydown", (e) => {
    if (e.target.tagName === "INPUT") return;
    if ((e.ctrlKey || e.metaKey) && e.key === "z") { e.preventDefault(); undo(); }
    else if ((e.ctrlKey || e.metaKey) && e.key === "y") { e.preventDefault(); redo(); }
    else if (!e.ctrlKey && !e.metaKey) {
      const t = { b: "brush", f: "fill", e: "eraser", m: "mask" }[e.key];
      if (t) setTool(t);
    }
  });
  $("upload").addEventListener("change", async (e) => {
    const file = e.target.files[0]; if (!file) return;
    try {
      const r = await api(`/api/decode?raw_ids=${$("raw-ids").checked ? 1 : 0}`, { method: "POST", body: file });
      setMap(r.ids.flat()); note(r.notes.join("; "));
    } catch (err) { note(err.message, true); }
    e.target.value = "";
  });
  for (const b of document.querySelectorAll("button.noise")) {
    b.addEventListener("click", async () => {
      try {
        const r = await api("/api/noise", { method: "POST", headers: { "Content-Type": "application/json" },
          body: JSON.stringify({ ids: Array.from(app.ids), noise: b.dataset.noise, seed: Number($("seed").value) || 0 }) });
        setMap(r.ids.flat()); note(`${b.textContent} noise applied (Undo takes it back)`);
      } catch (err) { note(err.message, true); }
    });
  }
  $("generate").addEventListener("click", generate);
  $("cancel").addEventListener("click", async () => {
    if (app.job) { try { await api(`/api/jobs/${app.job}/cancel`, { method: "POST" }); } catch (e) { note(e.message, true); } }
  });
}

async function generate() {
  const body = { ids: Array.from(app.ids), num_samples: Number($("num-samples").value), steps: Number($("steps").value),
    guidance_scale: Number($("guidance").value), seed: Number($("seed").value) };
  if (app.info.is_scdm) body.unlabeled_to_zero = $("utz").checked;
  let job;
  try {
    job = await api("/api/jobs", { method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body) });
  } catch (e) { status(e.message, true); return; }
  app.job = job.id; $("generate").disabled = true; $("cancel").disabled = false;
  while (true) {
    job = await api(`/api/jobs/${app.job}`).catch((e) => ({ status: "failed", error: e.message, progress: { done: 0, total: 1 } }));
    $("progress").value = job.progress.done / Math.max(1, job.progress.total);
    if (job.status === "queued") status(`waiting in the queue (position ${job.position})`);
    else if (job.status === "running") status(`sampling: step ${job.progress.done} of ${job.progress.total}`);
    else break;
    await new Promise((r) => setTimeout(r, 300));
  }
  $("generate").disabled = false; $("cancel").disabled = true; app.job = null;
  if (job.status === "done") { status(`done in ${job.seconds} s`); showResults(job); }
  else status(job.status === "cancelled" ? "cancelled" : `failed: ${job.error}`, job.status !== "cancelled");
}

function status(text, error) { $("job-status").textContent = text; $("job-status").className = error ? "error" : ""; }

function showResults(job) {
  const box = $("results"); box.innerHTML = "";
  const figure = (src, caption, cls, file) => {
    const f = document.createElement("figure");
    f.innerHTML = `<img class="${cls}" src="${src}" alt="${caption}"><figcaption>${caption} · <a href="${src}" download="${file}">download</a></figcaption>`;
    box.appendChild(f);
  };
  figure(job.label, "label map", "map", `label_${job.id}.png`);
  job.images.forEach((src, k) => figure(src, `sample ${k}`, "sample", `sample_${job.id}_${k}.png`));
}

init().catch((e) => status(`cannot start: ${e.message}`, true));
