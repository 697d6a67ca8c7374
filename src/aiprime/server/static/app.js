// aiprime web page: plain DOM, no build step. User data is only ever set via textContent.
"use strict";

const $ = (id) => document.getElementById(id);
const state = { info: null, collection: "default" };

function headers(extra) {
  const h = Object.assign({}, extra || {});
  const key = $("api-key").value.trim();
  if (key) h["Authorization"] = "Bearer " + key;
  return h;
}

function status(msg, isError) {
  $("status").textContent = msg || "";
  $("status").className = isError ? "error" : "";
}

async function api(path, opts) {
  opts = opts || {};
  const res = await fetch(path, Object.assign({}, opts, { headers: headers(opts.headers) }));
  if (!res.ok) {
    let msg = res.status + " " + res.statusText;
    try { const body = await res.json(); msg = (body.error && body.error.message) || msg; } catch (e) { /* not JSON */ }
    const err = new Error(msg);
    err.status = res.status;
    throw err;
  }
  return res;
}

function el(tag, attrs, text) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, v);
  if (text !== undefined && text !== null) e.textContent = text;
  return e;
}

function clear(node) { while (node.firstChild) node.removeChild(node.firstChild); }

function where(item) {
  let s = "chars " + item.start + "–" + item.end;
  if (item.page >= 0) s += " · page " + item.page;
  return s;
}

// -- collections and info -------------------------------------------------------------
async function loadCollections() {
  try {
    state.info = await (await api("/v1/info")).json();
    const all = (await (await api("/v1/collections")).json()).collections;
    const names = all.filter((c) => c.kind !== "images").map((c) => c.name);
    if (!names.includes(state.info.collection)) names.unshift(state.info.collection);
    const sel = $("collection");
    const keep = sel.value || state.info.collection;
    clear(sel);
    for (const n of names) sel.appendChild(el("option", { value: n }, n));
    sel.value = names.includes(keep) ? keep : names[0];
    state.collection = sel.value;
  } catch (e) {
    status(e.status === 401 ? "Enter an API key to use this server." : e.message, true);
  }
}

// -- source viewer ----------------------------------------------------------------------
function showSource(item) {
  $("viewer").hidden = false;
  $("viewer-title").textContent = item.title || item.source;
  $("viewer-where").textContent = item.source + " · " + where(item);
  const pre = $("viewer-text");
  clear(pre);
  pre.textContent = item.text;
  const open = $("viewer-open");
  open.hidden = !item.url || item.modality === "image";
  open.onclick = () => showFile(item);
}

async function showFile(item) {
  try {
    const text = await (await api(item.url)).text();
    const pre = $("viewer-text");
    clear(pre);
    const inRange = item.end > item.start && item.end <= text.length;
    if (inRange && item.page < 0) {
      pre.appendChild(document.createTextNode(text.slice(0, item.start)));
      const mark = el("mark", {}, text.slice(item.start, item.end));
      pre.appendChild(mark);
      pre.appendChild(document.createTextNode(text.slice(item.end)));
      mark.scrollIntoView({ block: "center" });
    } else {
      pre.textContent = text;
    }
  } catch (e) { status(e.message, true); }
}

function sourceButton(item) {
  const b = el("button", { type: "button", class: "source" }, item.source);
  b.addEventListener("click", () => showSource(item));
  return b;
}

// -- results ------------------------------------------------------------------------------
async function imageFigure(hit) {
  const fig = el("figure", { class: "image-hit" });
  const img = el("img", { alt: hit.title || hit.source });
  fig.appendChild(img);
  fig.appendChild(el("figcaption", {}, (hit.title || hit.source) + " · " + hit.score.toFixed(3)));
  if (hit.url) {
    try {
      img.src = URL.createObjectURL(await (await api(hit.url)).blob());
    } catch (e) { /* keep the caption */ }
  }
  return fig;
}

async function showHits(body) {
  const list = $("results"), grid = $("image-grid");
  clear(list); clear(grid);
  for (const hit of body.hits) {
    if (hit.modality === "image") {
      grid.appendChild(await imageFigure(hit));
      continue;
    }
    const li = el("li", { class: "hit" });
    li.appendChild(el("strong", {}, hit.title || hit.doc_id));
    li.appendChild(document.createTextNode(" "));
    li.appendChild(sourceButton(hit));
    li.appendChild(el("span", { class: "muted" }, " · " + where(hit) + " · score " + hit.score.toFixed(3)));
    li.appendChild(el("p", { class: "snippet" }, hit.text.length > 400 ? hit.text.slice(0, 400) + "…" : hit.text));
    list.appendChild(li);
  }
  status(body.hits.length + " result(s)");
}

async function search(ev) {
  ev.preventDefault();
  const q = $("q").value.trim();
  if (!q) return;
  $("answer").hidden = true;
  status("searching…");
  const body = { query: q, collection: $("collection").value, k: 10, modality: $("modality").value };
  if ($("mode").value) body.mode = $("mode").value;
  try {
    const res = await api("/v1/search", { method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body) });
    await showHits(await res.json());
  } catch (e) { status(e.message, true); }
}

async function searchImage() {
  const f = $("image-query").files[0];
  if (!f) return;
  const form = new FormData();
  form.append("image", f);
  form.append("k", "12");
  status("searching by image…");
  try {
    await showHits(await (await api("/v1/search/image", { method: "POST", body: form })).json());
  } catch (e) { status(e.message, true); }
}

// -- ask (server-sent events over fetch: EventSource cannot POST or send a key) ------------
function renderAnswer(answer) {
  const p = $("answer-text"), ol = $("citations");
  clear(p); clear(ol);
  const byN = new Map(answer.citations.map((c) => [c.n, c]));
  for (const part of answer.text.split(/(\[\d+\])/)) {
    const m = part.match(/^\[(\d+)\]$/);
    const c = m && byN.get(Number(m[1]));
    if (c) {
      const a = el("a", { href: "#", class: "cite", "data-n": String(c.n) }, part);
      a.addEventListener("click", (e) => { e.preventDefault(); showSource(c); });
      p.appendChild(a);
    } else {
      p.appendChild(document.createTextNode(part));
    }
  }
  const used = new Set((answer.text.match(/\[(\d+)\]/g) || []).map((s) => Number(s.slice(1, -1))));
  for (const c of answer.citations) {
    if (!used.has(c.n)) continue;
    const li = el("li", { value: String(c.n), class: "citation" });
    li.appendChild(el("strong", {}, (c.title || c.doc_id) + " "));
    li.appendChild(sourceButton(c));
    li.appendChild(el("span", { class: "muted" }, " · " + where(c)));
    ol.appendChild(li);
  }
  status(answer.answered ? "answered with " + used.size + " source(s)" : "no answer in the knowledge base");
}

async function ask() {
  const q = $("q").value.trim();
  if (!q) return;
  $("answer").hidden = false;
  clear($("answer-text")); clear($("citations"));
  status("thinking…");
  try {
    const res = await api("/v1/ask", {
      method: "POST",
      headers: { "Content-Type": "application/json", "Accept": "text/event-stream" },
      body: JSON.stringify({ question: q, collection: $("collection").value, stream: true }),
    });
    const reader = res.body.getReader();
    const dec = new TextDecoder();
    let buf = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buf += dec.decode(value, { stream: true });
      let i;
      while ((i = buf.indexOf("\n\n")) >= 0) {
        const block = buf.slice(0, i); buf = buf.slice(i + 2);
        const ev = (block.match(/^event: (.*)$/m) || [])[1];
        const data = JSON.parse((block.match(/^data: (.*)$/m) || [])[1] || "{}");
        if (ev === "delta") $("answer-text").appendChild(document.createTextNode(data.text));
        else if (ev === "answer") renderAnswer(data);
        else if (ev === "error") status(data.message, true);
      }
    }
  } catch (e) { status(e.message, true); }
}

// -- upload ------------------------------------------------------------------------------
async function upload() {
  const files = $("upload").files;
  if (!files.length) return;
  const form = new FormData();
  for (const f of files) form.append("files", f);
  form.append("collection", $("collection").value);
  status("uploading " + files.length + " file(s)…");
  try {
    let job = await (await api("/v1/ingest", { method: "POST", body: form })).json();
    while (job.status === "queued" || job.status === "running") {
      status("ingesting: " + job.files_done + "/" + job.files_total + " files");
      await new Promise((r) => setTimeout(r, 500));
      job = await (await api("/v1/jobs/" + job.id)).json();
    }
    const errs = job.errors.length ? " · problems: " + job.errors.join("; ") : "";
    status("job " + job.status + ": " + job.files_ingested + " ingested, " + job.files_unchanged + " unchanged" + errs, job.status !== "done");
    $("upload").value = "";
    loadCollections();
  } catch (e) { status(e.message, true); }
}

document.addEventListener("DOMContentLoaded", () => {
  $("api-key").value = localStorage.getItem("aiprime-key") || "";
  $("api-key").addEventListener("change", () => { localStorage.setItem("aiprime-key", $("api-key").value.trim()); status(""); loadCollections(); });
  $("collection").addEventListener("change", () => { state.collection = $("collection").value; });
  $("search-form").addEventListener("submit", search);
  $("ask-btn").addEventListener("click", ask);
  $("image-query").addEventListener("change", searchImage);
  $("upload").addEventListener("change", upload);
  $("viewer-close").addEventListener("click", () => { $("viewer").hidden = true; });
  loadCollections();
});
