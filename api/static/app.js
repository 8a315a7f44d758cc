// The patchdiff page: plain JavaScript over the public API (GET /models, POST /generate,
// GET /jobs/{id}/events, DELETE /jobs/{id}, result PNGs). No build step, nothing from elsewhere.
"use strict";

const $ = (id) => document.getElementById(id);
const RECENT_KEY = "patchdiff.recentJobs";
const RECENT_MAX = 20;
const TERMINAL = ["finished", "failed", "cancelled"];
const state = { models: [], jobId: null, follow: null, objectUrls: [] };

// -- API -------------------------------------------------------------------------------------
function authHeaders(extra = {}) {
  const key = $("api-key").value.trim();
  return key ? { ...extra, "X-API-Key": key } : extra;
}

function describeError(status, detail) {
  if (Array.isArray(detail)) {  // FastAPI field errors: name the fields
    return detail.map((d) => `${(d.loc || []).slice(1).join(".") || "request"}: ${d.msg}`).join("; ");
  }
  return `${status}: ${detail}`;
}

async function api(path, options = {}) {
  const response = await fetch(path, { ...options, headers: authHeaders(options.headers || {}) });
  if (!response.ok) {
    let detail = response.statusText;
    try { detail = (await response.json()).detail; } catch (_) { /* not JSON */ }
    const error = new Error(describeError(response.status, detail));
    error.status = response.status;
    throw error;
  }
  return response;
}

// Result PNGs need the API key when the server asks for one, so they are fetched, not linked.
async function objectUrl(url) {
  const blob = await (await api(url)).blob();
  const made = URL.createObjectURL(blob);
  state.objectUrls.push(made);
  return made;
}

// -- The form ------------------------------------------------------------------------------
function currentModel() {
  return state.models.find((m) => m.name === $("model").value);
}

async function loadModels() {
  try {
    const models = await (await api("/models")).json();
    state.models = models.filter((m) => m.served);
    const select = $("model");
    select.replaceChildren(...state.models.map((m) => new Option(`${m.name} (${m.resolution}×${m.resolution})`, m.name)));
    if (!state.models.length) showFormError("No model is served right now (no live worker).");
    onModelChange();
  } catch (error) {
    showFormError(`Could not load models: ${error.message}`);
  }
}

function onModelChange() {
  const model = currentModel();
  if (!model) return;
  const classes = $("class");
  const conditional = model.num_classes > 1;
  const options = [new Option("random", "")];
  if (conditional) {
    model.classes.forEach((name, index) => options.push(new Option(name === String(index) ? name : `${index}: ${name}`, String(index))));
  }
  classes.replaceChildren(...options);
  classes.disabled = !conditional;
  $("guidance").disabled = !conditional;
  $("guidance").value = model.defaults.guidance;
  $("sampler").value = model.defaults.sampler;
  $("steps").value = model.defaults.timesteps;  // any spec: "50", "karras10", a tuned "t:..." list
}

function showFormError(message) {
  $("form-error").textContent = message;
}

function requestBody() {
  const body = {
    model: $("model").value,
    num_images: Number($("num-images").value),
    timesteps: $("steps").value.trim(),
    sampler: $("sampler").value,
  };
  if ($("class").value !== "" && !$("class").disabled) body.class_label = Number($("class").value);
  if (!$("guidance").disabled) body.guidance = Number($("guidance").value);
  if ($("seed").value !== "") body.seed = Number($("seed").value);
  return body;
}

async function onSubmit(event) {
  event.preventDefault();
  showFormError("");
  const button = $("submit");
  button.disabled = true;
  try {
    const body = requestBody();
    const job = await (await api("/generate", {
      method: "POST", headers: { "content-type": "application/json" }, body: JSON.stringify(body),
    })).json();
    remember({ id: job.id, at: Date.now(), model: body.model, images: body.num_images,
               label: $("class").selectedOptions[0]?.text || "random", status: job.status });
    watch(job.id);
  } catch (error) {
    showFormError(error.message);
  } finally {
    button.disabled = false;
  }
}

// -- Following a job -------------------------------------------------------------------------
function resetJobView(jobId) {
  state.objectUrls.forEach((u) => URL.revokeObjectURL(u));
  state.objectUrls = [];
  $("job").hidden = false;
  $("job-id").textContent = jobId;
  $("status").textContent = "connecting…";
  $("queue-position").textContent = "";
  $("progress").value = 0;
  $("progress").max = 1;
  $("progress-text").textContent = "0 %";
  $("preview-figure").hidden = true;
  $("preview").removeAttribute("src");
  $("grid-figure").hidden = true;
  $("grid").removeAttribute("src");
  $("images").replaceChildren();
  $("cancel").hidden = false;
  $("cancel").disabled = false;
}

function watch(jobId) {
  if (state.follow) state.follow.abort();
  state.jobId = jobId;
  resetJobView(jobId);
  state.follow = new AbortController();
  follow(jobId, state.follow.signal);
}

// Server-Sent Events read with fetch (EventSource cannot send an API key header); reconnects
// with Last-Event-ID, so no event is lost.
async function follow(jobId, signal) {
  let lastId = null;
  let failures = 0;
  while (!signal.aborted) {
    try {
      const headers = { Accept: "text/event-stream" };
      if (lastId) headers["Last-Event-ID"] = lastId;
      const response = await api(`/jobs/${jobId}/events`, { headers, signal });
      const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
      let buffer = "";
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        buffer += value.replace(/\r\n?/g, "\n");
        let end;
        while ((end = buffer.indexOf("\n\n")) >= 0) {
          const message = parseEvent(buffer.slice(0, end));
          buffer = buffer.slice(end + 2);
          if (!message) continue;
          failures = 0;
          if (message.id) lastId = message.id;
          if (onEvent(jobId, message.event, JSON.parse(message.data))) return;
        }
      }
    } catch (error) {
      if (signal.aborted) return;
      if (error.status === 404 || error.status === 401) {
        $("status").textContent = error.message;
        return;
      }
    }
    failures += 1;
    if (failures > 10) {
      $("status").textContent = "lost the connection to the server";
      return;
    }
    await new Promise((resolve) => setTimeout(resolve, Math.min(500 * failures, 5000)));
  }
}

function parseEvent(block) {
  const message = { event: "message", data: "", id: null };
  let hasData = false;
  for (const line of block.split("\n")) {
    if (!line || line.startsWith(":")) continue;  // comments are keep-alives
    const colon = line.indexOf(":");
    const field = colon < 0 ? line : line.slice(0, colon);
    const value = colon < 0 ? "" : line.slice(colon + 1).replace(/^ /, "");
    if (field === "event") message.event = value;
    else if (field === "id") message.id = value;
    else if (field === "data") { message.data += (hasData ? "\n" : "") + value; hasData = true; }
  }
  return hasData ? message : null;
}

function setStatus(text) {
  $("status").textContent = text;
}

function onEvent(jobId, event, data) {
  if (jobId !== state.jobId) return true;
  switch (event) {
    case "queued":
      setStatus(data.reason && data.reason.startsWith("requeued") ? `queued again (${data.reason})` : "queued");
      if (data.queue_position !== undefined && data.queue_position !== null) {
        $("queue-position").textContent = data.queue_position === 0 ? "Next in the queue"
          : `${data.queue_position} job${data.queue_position === 1 ? "" : "s"} ahead in the queue`;
      }
      return false;
    case "started":
      setStatus("running");
      $("queue-position").textContent = "";
      return false;
    case "progress":
      setStatus("running");
      $("queue-position").textContent = "";
      $("progress").max = data.total;
      $("progress").value = data.step;
      $("progress-text").textContent = `${Math.round(100 * data.fraction)} % (step ${data.step} of ${data.total})`;
      if (data.preview) showPreview(data.preview);
      return false;
    case "finished":
      setStatus("finished");
      $("progress").max = 1;
      $("progress").value = 1;
      $("progress-text").textContent = "100 %";
      $("cancel").hidden = true;
      updateRecent(jobId, "finished");
      showResults(data.links).catch((error) => setStatus(`finished, but the results could not be loaded: ${error.message}`));
      return true;
    case "failed":
    case "cancelled":
      setStatus(`${event}: ${data.reason || ""}`);
      $("queue-position").textContent = "";
      $("cancel").hidden = true;
      updateRecent(jobId, event);
      return true;
    default:
      return false;
  }
}

async function showPreview(preview) {
  const src = preview.png_base64 ? `data:image/png;base64,${preview.png_base64}` : await objectUrl(preview.url);
  $("preview").src = src;
  $("preview-figure").hidden = false;
}

async function showResults(links) {
  const grid = await objectUrl(links.grid);
  $("grid").src = grid;
  $("grid-download").href = grid;
  $("grid-download").download = `${state.jobId}-grid.png`;
  $("grid-figure").hidden = false;
  const items = await Promise.all(links.images.map(async (link, index) => {
    const url = await objectUrl(link);
    const item = document.createElement("li");
    const image = document.createElement("img");
    image.src = url;
    image.alt = `image ${index}`;
    const download = document.createElement("a");
    download.href = url;
    download.download = `${state.jobId}-${index}.png`;
    download.textContent = `download ${index}`;
    item.append(image, download);
    return item;
  }));
  $("images").replaceChildren(...items);
}

async function onCancel() {
  const button = $("cancel");
  button.disabled = true;
  try {
    await api(`/jobs/${state.jobId}`, { method: "DELETE" });
    setStatus("cancelling…");  // the cancelled event follows on the stream
  } catch (error) {
    setStatus(`could not cancel: ${error.message}`);
    button.disabled = false;
  }
}

// -- Recent jobs of this browser -------------------------------------------------------------
function recentJobs() {
  try { return JSON.parse(localStorage.getItem(RECENT_KEY)) || []; } catch (_) { return []; }
}

function remember(job) {
  const jobs = [job, ...recentJobs().filter((j) => j.id !== job.id)].slice(0, RECENT_MAX);
  localStorage.setItem(RECENT_KEY, JSON.stringify(jobs));
  renderRecent();
}

function updateRecent(jobId, status) {
  const jobs = recentJobs().map((j) => (j.id === jobId ? { ...j, status } : j));
  localStorage.setItem(RECENT_KEY, JSON.stringify(jobs));
  renderRecent();
}

function renderRecent() {
  const items = recentJobs().map((job) => {
    const item = document.createElement("li");
    const when = new Date(job.at).toLocaleString();
    item.textContent = `${when} · ${job.model} · ${job.images} image${job.images === 1 ? "" : "s"} · class ${job.label} · ${job.status || "?"} `;
    const show = document.createElement("button");
    show.type = "button";
    show.className = "secondary";
    show.textContent = "Show";
    show.setAttribute("aria-label", `show job ${job.id}`);
    show.addEventListener("click", () => watch(job.id));
    item.append(show);
    return item;
  });
  $("recent").replaceChildren(...items);
  if (!items.length) $("recent").textContent = "None yet.";
}

// -- Start -----------------------------------------------------------------------------------
$("api-key").value = sessionStorage.getItem("patchdiff.apiKey") || "";
$("api-key").addEventListener("change", () => {
  sessionStorage.setItem("patchdiff.apiKey", $("api-key").value.trim());
  loadModels();
});
$("model").addEventListener("change", onModelChange);
$("generate-form").addEventListener("submit", onSubmit);
$("cancel").addEventListener("click", onCancel);
renderRecent();
loadModels();
