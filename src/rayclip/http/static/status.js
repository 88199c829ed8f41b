// The status page: /api/overview drawn as tiles, an SVG Recall@K chart and tables; /api/status adds the server's memory.
const $ = (id) => document.getElementById(id);
const SVG = "http://www.w3.org/2000/svg";

function bytes(n) {
  if (n == null) return "—";
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i += 1; }
  return `${n.toFixed(i ? 1 : 0)} ${units[i]}`;
}
const count = (n) => Number(n).toLocaleString("en");

function el(tag, attrs = {}, ...children) {
  const node = tag.startsWith("svg:") ? document.createElementNS(SVG, tag.slice(4)) : document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "text") node.textContent = v; else node.setAttribute(k, v);
  }
  node.append(...children);
  return node;
}

function tile(layer, label, value, sub) {
  return el("div", { class: `tile ${layer}` },
    el("div", { class: "label", text: label }), el("div", { class: "value", text: value }),
    el("div", { class: "sub", text: sub || "" }));
}

function table(id, columns, rows, rowClass = () => "") {
  const head = el("tr", {}, ...columns.map(([name, cls]) => el("th", { class: cls || "", text: name })));
  const body = rows.map((row) => el("tr", { class: rowClass(row) },
    ...row.cells.map((cell, i) => {
      const td = el("td", { class: columns[i][1] || "" });
      if (cell instanceof Node) td.append(cell); else td.textContent = cell;
      return td;
    })));
  $(id).replaceChildren(el("thead", {}, head), el("tbody", {}, ...body));
  if (!rows.length) $(id).append(el("tr", {}, el("td", { class: "muted", colspan: columns.length, text: "none yet" })));
}

// Grouped bars per K: text→image, image→text and chance, on a 0–1 axis.
function recallChart(ev) {
  const ks = Object.keys(ev.text_to_image);
  const series = [["t2i", "text→image", ev.text_to_image], ["i2t", "image→text", ev.image_to_text],
    ["chance", "chance (text→image)", ev.chance_text_to_image]];
  const W = 760, H = 250, left = 44, bottom = 34, top = 24, plotH = H - top - bottom;
  const group = (W - left - 10) / ks.length, bar = Math.min(46, (group - 24) / series.length);
  const y = (v) => top + plotH * (1 - v);
  const svg = el("svg:svg", { class: "chart", viewBox: `0 0 ${W} ${H}`, width: "100%", role: "img",
    "aria-label": "Recall at K, text to image and image to text, beside chance" });
  const grid = el("svg:g", { class: "grid" });
  for (const v of [0, 0.25, 0.5, 0.75, 1]) {
    grid.append(el("svg:line", { x1: left, x2: W - 10, y1: y(v), y2: y(v) }),
      el("svg:text", { x: left - 8, y: y(v) + 4, "text-anchor": "end", text: v.toFixed(2) }));
  }
  svg.append(grid);
  ks.forEach((k, gi) => {
    const x0 = left + gi * group + (group - bar * series.length) / 2;
    series.forEach(([cls, name, values], si) => {
      const v = values[k], x = x0 + si * bar;
      svg.append(el("svg:rect", { class: `bar ${cls}`, x: x + 2, y: y(v), width: bar - 4, height: plotH * v, rx: 3 },
        el("svg:title", { text: `${name} R@${k}: ${v.toFixed(3)}` })),
        el("svg:text", { class: "value", x: x + bar / 2, y: y(v) - 4, "text-anchor": "middle", text: v.toFixed(2) }));
    });
    svg.append(el("svg:text", { x: left + gi * group + group / 2, y: H - 12, "text-anchor": "middle", text: `R@${k}` }));
  });
  const legend = el("div", { class: "legend" }, ...series.map(([cls, name]) =>
    el("span", {}, el("i", { style: `background: var(--${cls})` }), name)));
  return el("div", {}, svg, legend);
}

function render(s) {
  const b = s.bronze;
  const silverRows = s.silver.reduce((n, p) => n + p.rows, 0);
  const current = s.gold.filter((g) => g.current);
  const served = current[current.length - 1];
  $("where").textContent = `data dir ${s.data_dir}`;
  $("tiles").replaceChildren(
    tile("bronze", "objects", count(b.objects), bytes(b.object_bytes)),
    tile("bronze", "manifest rows", count(b.manifest_rows), `${count(b.unique_media_ids)} unique · ${b.ingest_runs} ingest runs`),
    tile("silver", "silver rows", count(silverRows), `${s.silver.length} partition${s.silver.length === 1 ? "" : "s"}`),
    tile("gold", "builds", count(s.gold.length), served ? `CURRENT ${served.model_version}` : "no CURRENT yet"),
    tile("gold", "vectors served", served ? count(served.count) : "—", served ? `${served.index_type} · ${bytes(served.index_bytes)}` : ""));

  table("builds", [["model_version"], ["build_id"], ["vectors", "num"], ["index"], ["R@1 t→i", "num"], ["memory", "num"], [""]],
    s.gold.slice().reverse().map((g) => ({ current: g.current, cells: [g.model_version, g.build_id, count(g.count), g.index_type || "—",
      g.eval ? Object.values(g.eval.text_to_image)[0].toFixed(3) : "—", bytes(g.index_bytes),
      g.current ? el("span", { class: "badge current", text: "CURRENT" }) : ""] })),
    (row) => (row.current ? "current" : ""));
  document.querySelectorAll("#builds td:nth-child(2)").forEach((td) => td.classList.add("id"));

  table("silver", [["model_version"], ["dt"], ["files", "num"], ["rows", "num"]],
    s.silver.map((p) => ({ cells: [p.model_version, p.dt, count(p.files), count(p.rows)] })));

  table("runs", [["stage"], ["run_id"], ["rows", "num"], ["seconds", "num"], ["failures by reason"]],
    s.runs.map((r) => {
      const reasons = Object.entries(r.failed);
      const failures = reasons.length
        ? el("span", {}, ...reasons.map(([why, n]) => el("span", { class: "chip", text: `${why} × ${n}` })))
        : el("span", { class: "badge ok", text: "none" });
      return { cells: [r.stage, r.run_id, count(r.rows), r.wall_s.toFixed(1), failures] };
    }));
  document.querySelectorAll("#runs td:nth-child(2)").forEach((td) => td.classList.add("id"));

  const evaluated = s.gold.filter((g) => g.eval).sort((a, b) => (a.current - b.current) || a.build_id.localeCompare(b.build_id));
  const ev = evaluated.length ? evaluated[evaluated.length - 1] : null;
  if (ev) {
    $("recall-of").textContent = `— ${ev.model_version}, build ${ev.build_id}: ${ev.eval.images} images, ${ev.eval.queries ?? ev.eval.captions} captions`;
    $("recall").replaceChildren(recallChart(ev.eval));
  } else {
    $("recall").replaceChildren(el("p", { class: "muted", text: "no evaluation yet: run `rayclip eval`" }));
  }
}

// The server's own memory: the index read into RAM (private) against mapped from disk (file-backed).
function renderServing(st) {
  const m = st.memory || {};
  const held = st.mapped_index_bytes ? `${bytes(st.mapped_index_bytes)} mapped` : "in RAM";
  $("tiles").append(tile("gold", "server memory", bytes(m.resident_private_bytes),
    `private · ${bytes(m.resident_file_bytes)} file-backed · index ${bytes(st.index_bytes)} ${held} (${st.form})`));
}

authedFetch("/api/overview")
  .then(async (response) => {
    const body = await response.json();
    if (!response.ok) throw new Error(body.detail || `HTTP ${response.status}`);
    render(body);
    const served = await authedFetch("/api/status");
    if (served.ok) renderServing(await served.json());
  })
  .catch((error) => { $("message").className = "error"; $("message").textContent = error.message; });
