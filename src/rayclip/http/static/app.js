// The query lives in the URL (?q=… or ?like=<media_id>), so a result page can be shared.
const $ = (id) => document.getElementById(id);

async function api(url, options) {
  const response = await authedFetch(url, options);  // auth.js: adds the API key when there is one
  const body = await response.json().catch(() => ({}));
  if (!response.ok) {
    const detail = Array.isArray(body.detail) ? body.detail.map((d) => d.msg).join("; ") : body.detail;
    throw new Error(detail || `HTTP ${response.status}`);
  }
  return body;
}

function render(payload, label) {
  $("message").className = "muted";
  const notes = payload.notes.length ? ` — ${payload.notes.join("; ")}` : "";
  $("message").textContent = `${payload.results.length} results for ${label}${notes}`;
  $("results").replaceChildren(...payload.results.map((r) => {
    const card = document.createElement("figure");
    card.className = "card";
    card.title = "find images like this one";
    card.dataset.mediaId = r.media_id;
    const img = document.createElement("img");
    img.src = `/api/images/${r.media_id}`;
    img.alt = r.caption || r.media_id;
    img.loading = "lazy";
    const meta = document.createElement("figcaption");
    meta.className = "meta";
    meta.innerHTML = `<div class="score">#${r.rank} · cosine ${r.score.toFixed(3)}</div><div class="caption"></div>`;
    meta.querySelector(".caption").textContent = r.caption || r.url || r.path;
    if (r.duplicates) {
      const folded = document.createElement("div");
      folded.className = "duplicates";
      folded.textContent = `+${r.duplicates} near-duplicate${r.duplicates > 1 ? "s" : ""} hidden`;
      meta.append(folded);
    }
    card.append(img, meta);
    card.addEventListener("click", () => navigate({ like: r.media_id }));
    return card;
  }));
}

function fail(error) {
  $("message").className = "error";
  $("message").textContent = error.message;
  $("results").replaceChildren();
}

function k() { return $("k").value; }

// The server's defaults (SearchOptions: k, the collapse cosine, the largest k), asked for once.
const defaults = api("/api/defaults");

// Duplicate hiding (on by default) and the filter travel with every query, in the URL too.
let collapseAt = null;
function options() {
  const chosen = {};
  if ($("collapse").checked) chosen.collapse = collapseAt;
  if ($("where").value.trim()) chosen.where = $("where").value.trim();
  return chosen;
}

async function runFromUrl() {
  const params = new URLSearchParams(location.search);
  try {
    const given = await defaults;
    collapseAt = given.collapse;
    $("k").max = given.max_k;
    $("k").value = params.get("k") || given.k;
  } catch (error) { return fail(error); }
  $("collapse").checked = params.get("collapse") !== "off";
  $("where").value = params.get("where") || "";
  try {
    if (params.get("q")) {
      $("q").value = params.get("q");
      render(await api(`/api/search?${new URLSearchParams({ q: params.get("q"), k: k(), ...options() })}`), `“${params.get("q")}”`);
    } else if (params.get("like")) {
      $("q").value = "";
      render(await api(`/api/search/similar?${new URLSearchParams({ media_id: params.get("like"), k: k(), ...options() })}`), "images like the one clicked");
    }
  } catch (error) { fail(error); }
}

function navigate(query) {
  const shown = { ...query, k: k() };
  if (!$("collapse").checked) shown.collapse = "off";
  if ($("where").value.trim()) shown.where = $("where").value.trim();
  history.pushState(null, "", `/?${new URLSearchParams(shown)}`);
  runFromUrl();
}

async function searchByFile(file) {
  const form = new FormData();
  form.append("file", file);
  try {
    render(await api(`/api/search/image?${new URLSearchParams({ k: k(), ...options() })}`, { method: "POST", body: form }), `the image ${file.name}`);
  } catch (error) { fail(error); }
}

$("search-form").addEventListener("submit", (event) => {
  event.preventDefault();
  if ($("q").value.trim()) navigate({ q: $("q").value.trim() });
});
$("collapse").addEventListener("change", () => {
  const current = new URLSearchParams(location.search);
  if (current.get("q")) navigate({ q: current.get("q") });
  else if (current.get("like")) navigate({ like: current.get("like") });
});
$("upload").addEventListener("change", () => $("upload").files[0] && searchByFile($("upload").files[0]));
window.addEventListener("popstate", runFromUrl);
window.addEventListener("dragover", (event) => { event.preventDefault(); $("drop").hidden = false; });
$("drop").addEventListener("dragleave", () => { $("drop").hidden = true; });
window.addEventListener("drop", (event) => {
  event.preventDefault();
  $("drop").hidden = true;
  if (event.dataTransfer.files[0]) searchByFile(event.dataTransfer.files[0]);
});

api("/api/status")
  .then((s) => { $("info").textContent = `${s.count} images · ${s.model_version} · build ${s.build_id}`; })
  .catch((error) => { $("info").textContent = error.message; });
runFromUrl();
