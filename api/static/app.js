// The patchdiff page: plain JavaScript over the public API (GET /limits, GET /models, POST /generate,
// GET /jobs/{id}, GET /jobs/{id}/events, DELETE /jobs/{id}, result PNGs). No build step, nothing
// from elsewhere.
"use strict";

const $ = (id) => document.getElementById(id);
const RECENT_KEY = "patchdiff.recentJobs";
const RECENT_MAX = 20;
const RECENT_POLL_MS = 4000;
const TERMINAL = ["finished", "failed", "cancelled"];
// Request fields -> the form control that sets them (a server error is shown next to it).
const FIELD_INPUTS = {
  model: "model", num_images: "num-images", class_label: "class", class_labels: "class", timesteps: "steps",
  sampler: "sampler", guidance: "guidance", seed: "seed",
};
const state = {
  models: [], limits: null, jobId: null, job: null, follow: null, objectUrls: [], progressStart: null, finished: false,
};

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
    error.detail = detail;
    throw error;
  }
  return response;
}

// A job view. Seeds go up to 2^63 - 1, past what a JavaScript number holds exactly, so the seed's
// digits are also taken from the JSON text (there is one "seed" key in a job view).
async function readJob(response) {
  const text = await response.text();
  const job = JSON.parse(text);
  const match = /"seed":\s*(\d+)/.exec(text);
  job.seedText = match ? match[1] : String(job.request.seed);
  return job;
}

// Result PNGs need the API key when the server asks for one, so they are fetched, not linked.
async function objectUrl(url) {
  const blob = await (await api(url)).blob();
  const made = URL.createObjectURL(blob);
  state.objectUrls.push(made);
  return made;
}

// -- Limits and models -------------------------------------------------------------------------
async function loadLimits() {
  try {
    state.limits = await (await api("/limits")).json();
  } catch (_) {
    return;  // the server checks every request anyway; the form then has no upper bounds
  }
  const limits = state.limits;
  $("num-images").max = limits.max_images_per_job;
  $("num-images-hint").textContent = `1 to ${limits.max_images_per_job}`;
  $("guidance").min = limits.min_guidance;
  $("guidance").max = limits.max_guidance;
  $("guidance-hint").textContent = `${limits.min_guidance} (none) to ${limits.max_guidance}`;
  $("steps").maxLength = limits.timesteps_max_length;
  $("seed").max = limits.max_seed;
  for (const option of $("sampler").options) option.disabled = !limits.allowed_samplers.includes(option.value);
}

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
    model.classes.forEach((name, index) => options.push(new Option(className(model, index), String(index))));
  }
  classes.replaceChildren(...options);
  classes.disabled = !conditional;
  $("guidance").disabled = !conditional;
  $("guidance").value = model.defaults.guidance;
  $("sampler").value = model.defaults.sampler;
  setSteps(model.defaults.timesteps);
}

function className(model, index) {
  const name = model.classes[index];
  return name === undefined || name === String(index) ? String(index) : `${index}: ${name}`;
}

// -- Steps: a model's tuned default ("t:183,424,568,709,999") reads as "5 (tuned)" ----------------
function stepsLabel(spec, model = currentModel()) {
  if (model && spec === model.defaults.timesteps && spec.startsWith("t:")) {
    return `${spec.slice(2).split(",").length} (tuned)`;
  }
  return spec;
}

// The spec the form asks for: the label of the model's default stands for the default itself.
function stepsSpec() {
  const value = $("steps").value.trim();
  const model = currentModel();
  return model && value === stepsLabel(model.defaults.timesteps, model) ? model.defaults.timesteps : value;
}

function setSteps(spec) {
  $("steps").value = stepsLabel(spec);
  updateStepsRaw();
}

function updateStepsRaw() {
  $("steps-raw").hidden = stepsSpec() === $("steps").value.trim();
}

function showRawSteps() {
  $("steps").value = stepsSpec();
  updateStepsRaw();
  $("steps").focus();
}

// How a spec reads in a job's settings: "5 (tuned): t:183,…" or the spec itself.
function describeSteps(spec, perImage) {
  const label = stepsLabel(spec, state.models.find((m) => m.name === state.job?.request.model));
  if (label !== spec) return `${label}: ${spec}`;
  return perImage && String(perImage) !== spec ? `${spec} (${perImage} steps)` : spec;
}

// -- The form ------------------------------------------------------------------------------
function showFormError(message) {
  $("form-error").textContent = message;
}

function clearErrors() {
  showFormError("");
  for (const id of new Set(Object.values(FIELD_INPUTS))) {
    $(`${id}-error`).textContent = "";
    $(id).removeAttribute("aria-invalid");
  }
}

function showFieldError(id, message) {
  const box = $(`${id}-error`);
  box.textContent = box.textContent ? `${box.textContent}; ${message}` : message;
  $(id).setAttribute("aria-invalid", "true");
}

// Field errors from the server (422: [{loc: ["body", field], msg}]) go next to their control.
function showServerError(error) {
  if (!Array.isArray(error.detail)) {
    showFormError(error.message);
    return;
  }
  const elsewhere = [];
  for (const item of error.detail) {
    const id = FIELD_INPUTS[(item.loc || [])[1]];
    if (id) showFieldError(id, item.msg);
    else elsewhere.push(`${(item.loc || []).slice(1).join(".") || "request"}: ${item.msg}`);
  }
  showFormError(elsewhere.join("; "));
  const first = Object.values(FIELD_INPUTS).find((id) => $(id).getAttribute("aria-invalid"));
  if (first) $(first).focus();
}

// The limits the page knows (GET /limits); the server checks them again, with the ones it alone
// can (a job's cost, a spec's step count).
function checkForm() {
  const limits = state.limits;
  let ok = true;
  const fail = (id, message) => { showFieldError(id, message); ok = false; };
  const images = $("num-images").value.trim();
  if (!/^\d+$/.test(images) || Number(images) < 1) fail("num-images", "a whole number, at least 1");
  else if (limits && Number(images) > limits.max_images_per_job) fail("num-images", `at most ${limits.max_images_per_job} images per job on this server`);
  if (!stepsSpec()) fail("steps", "give a number of steps, e.g. 50");
  if (!$("guidance").disabled) {
    const guidance = Number($("guidance").value);
    if ($("guidance").value.trim() === "" || !Number.isFinite(guidance)) fail("guidance", "a number, e.g. 1.5");
    else if (limits && (guidance < limits.min_guidance || guidance > limits.max_guidance)) {
      fail("guidance", `between ${limits.min_guidance} and ${limits.max_guidance} on this server`);
    }
  }
  const seed = $("seed").value.trim();
  if (seed && !/^\d+$/.test(seed)) fail("seed", "a whole number, or empty for a random one");
  else if (seed && limits && BigInt(seed) > BigInt(limits.max_seed)) fail("seed", `at most ${limits.max_seed}`);
  if (!ok) {
    const first = Object.values(FIELD_INPUTS).find((id) => $(id).getAttribute("aria-invalid"));
    if (first) $(first).focus();
  }
  return ok;
}

// The request as JSON text: the seed's digits are written as they are (exact past 2^53).
function requestJson() {
  const body = {
    model: $("model").value,
    num_images: Number($("num-images").value),
    timesteps: stepsSpec(),
    sampler: $("sampler").value,
  };
  if ($("class").value !== "" && !$("class").disabled) body.class_label = Number($("class").value);
  if (!$("guidance").disabled) body.guidance = Number($("guidance").value);
  const text = JSON.stringify(body);
  const seed = $("seed").value.trim().replace(/^0+(?=\d)/, "");  // JSON numbers have no leading zeros
  return { body, text: seed ? `${text.slice(0, -1)},"seed":${seed}}` : text };
}

async function onSubmit(event) {
  event.preventDefault();
  clearErrors();
  if (!checkForm()) return;
  const button = $("submit");
  button.disabled = true;
  try {
    const { body, text } = requestJson();
    const job = await readJob(await api("/generate", {
      method: "POST", headers: { "content-type": "application/json" }, body: text,
    }));
    remember({ id: job.id, at: Date.now(), model: body.model, images: body.num_images,
               label: $("class").selectedOptions[0]?.text || "random", classChoice: $("class").value,
               status: job.status });
    watch(job.id, job);
  } catch (error) {
    showServerError(error);
  } finally {
    button.disabled = false;
  }
}

// Fill the form with a job's settings: its own seed ("reuse") or a fresh one ("new seed").
function fillForm(job, newSeed) {
  clearErrors();
  const request = job.request;
  if (!state.models.some((m) => m.name === request.model)) {
    showFormError(`model ${request.model} is not served right now`);
    return;
  }
  $("model").value = request.model;
  onModelChange();
  $("num-images").value = request.num_images;
  $("class").value = classChoice(job);
  $("sampler").value = request.sampler;
  if (!$("guidance").disabled) $("guidance").value = request.guidance;
  setSteps(request.timesteps);
  $("seed").value = newSeed ? String(crypto.getRandomValues(new Uint32Array(1))[0] >>> 1) : job.seedText;
  $("submit").focus();
  $("generate-form").scrollIntoView({ behavior: "smooth", block: "start" });
}

// The class the form had: remembered for jobs from this browser; otherwise one class if every image
// has it, else random (random labels come from the seed, so the same seed gives them again).
function classChoice(job) {
  const remembered = recentJobs().find((j) => j.id === job.id);
  if (remembered && remembered.classChoice !== undefined) return remembered.classChoice;
  const labels = job.request.class_labels || [];
  return labels.length > 1 && labels.every((l) => l === labels[0]) ? String(labels[0]) : "";
}

// -- Following a job -------------------------------------------------------------------------
function resetJobView(jobId) {
  state.objectUrls.forEach((u) => URL.revokeObjectURL(u));
  state.objectUrls = [];
  state.job = null;
  state.progressStart = null;
  state.finished = false;
  $("job").hidden = false;
  $("job-id").textContent = jobId;
  $("status").textContent = "connecting…";
  $("queue-position").textContent = "";
  $("progress").value = 0;
  $("progress").max = 1;
  delete $("progress").dataset.total;
  $("progress-text").textContent = "0 %";
  $("preview-figure").hidden = true;
  $("preview").removeAttribute("src");
  $("grid-figure").hidden = true;
  $("grid").removeAttribute("src");
  $("images").replaceChildren();
  $("settings-box").hidden = true;
  $("cancel").hidden = false;
  $("cancel").disabled = false;
}

function watch(jobId, job = null) {
  if (state.follow) state.follow.abort();
  state.jobId = jobId;
  resetJobView(jobId);
  if (job) showJob(job);
  else loadJob(jobId);
  state.follow = new AbortController();
  follow(jobId, state.follow.signal);
}

async function loadJob(jobId) {
  try {
    const job = await readJob(await api(`/jobs/${jobId}`));
    if (jobId === state.jobId) showJob(job);
  } catch (_) { /* the event stream reports what matters (404, 401) */ }
}

function showJob(job) {
  state.job = job;
  const request = job.request;
  const model = state.models.find((m) => m.name === request.model);
  const perImage = job.progress.total && request.num_images ? Math.round(job.progress.total / request.num_images) : null;
  const rows = [
    ["Model", request.model],
    ["Images", String(request.num_images)],
    ["Class", describeLabels(request.class_labels, model)],
    ["Steps", describeSteps(request.timesteps, perImage)],
    ["Sampler", request.sampler],
    ["Guidance", String(request.guidance)],
    ["Seed", job.seedText],
  ];
  if (job.status === "finished" && job.timings.run_s !== null) rows.push(["Took", formatSeconds(job.timings.run_s)]);
  $("settings").replaceChildren(...rows.flatMap(([name, value]) => {
    const term = document.createElement("dt");
    term.textContent = name;
    const detail = document.createElement("dd");
    detail.textContent = value;
    if (name === "Seed") detail.id = "settings-seed";
    return [term, detail];
  }));
  $("settings-box").hidden = false;
}

function describeLabels(labels, model) {
  if (!labels || !labels.length) return "none (unconditional model)";
  const name = (label) => (model ? className(model, label) : String(label));
  if (labels.length > 1 && labels.every((l) => l === labels[0])) return `${name(labels[0])} for every image`;
  const shown = labels.slice(0, 16).map(name).join(", ");
  return labels.length > 16 ? `${shown}, … (one per image)` : `${shown} (one per image)`;
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
      updateRecent(jobId, { status: "queued" });
      return false;
    case "started":
      setStatus("running");
      $("queue-position").textContent = "";
      updateRecent(jobId, { status: "running" });
      return false;
    case "progress":
      setStatus("running");
      $("queue-position").textContent = "";
      showProgress(data);
      if (data.preview) showPreview(jobId, data.preview);
      return false;
    case "finished":
      state.finished = true;
      setStatus("finished");
      $("progress").max = 1;
      $("progress").value = 1;
      $("progress-text").textContent = finishedText();
      $("cancel").hidden = true;
      updateRecent(jobId, { status: "finished" });
      showResults(jobId, data.links).catch((error) => setStatus(`finished, but the results could not be loaded: ${error.message}`));
      loadJob(jobId);  // the settings with the run's timings
      return true;
    case "failed":
    case "cancelled":
      state.finished = true;
      setStatus(`${event}: ${data.reason || ""}`);
      $("queue-position").textContent = "";
      $("cancel").hidden = true;
      updateRecent(jobId, { status: event });
      return true;
    default:
      return false;
  }
}

// Progress in the job's own units: `step` and `total` count network evaluations image by image
// (images × steps), so a step of the job is step / images; `images_done` counts finished images.
function showProgress(data) {
  const fraction = data.fraction ?? (data.total ? data.step / data.total : 0);
  $("progress").max = data.total || 1;
  $("progress").value = data.step || 0;
  $("progress").dataset.total = data.total || 0;
  const parts = [`${Math.floor(100 * fraction)} %`];
  const images = state.job?.request.num_images;
  if (images && data.total) {
    const perImage = Math.round(data.total / images);
    const step = Math.min(perImage, Math.floor(data.step / images));
    const done = data.images_done ?? null;
    if (images === 1) parts.push(`step ${step} of ${perImage}`);
    else if (done === null) parts.push(`step ${step} of ${perImage} per image, ${images} images`);
    else parts.push(`step ${step} of ${perImage} per image`, `${done} of ${images} images done`);
  }
  const left = timeLeft(fraction);
  if (left) parts.push(left);
  $("progress-text").textContent = parts.join(" · ");
  updateRecent(state.jobId, { status: "running", percent: Math.floor(100 * fraction) });
}

function finishedText() {
  const images = state.job?.request.num_images;
  const total = Number($("progress").dataset.total || 0);
  if (!images || !total) return "100 %";
  return `100 % · ${images} image${images === 1 ? "" : "s"} × ${Math.round(total / images)} steps`;
}

// The rate since the first progress this page saw, so a queue wait does not count.
function timeLeft(fraction) {
  const now = performance.now();
  const start = state.progressStart;
  if (!start || fraction < start.fraction) {
    state.progressStart = { at: now, fraction };
    return "";
  }
  const seconds = (now - start.at) / 1000;
  if (seconds < 1 || fraction <= start.fraction) return "";
  return `about ${formatSeconds((1 - fraction) * seconds / (fraction - start.fraction))} left`;
}

function formatSeconds(seconds) {
  if (seconds < 10) return `${Math.max(0, seconds).toFixed(1)} s`;
  if (seconds < 90) return `${Math.round(seconds)} s`;
  if (seconds < 5400) return `${Math.round(seconds / 60)} min`;
  return `${(seconds / 3600).toFixed(1)} h`;
}

async function showPreview(jobId, preview) {
  const src = preview.png_base64 ? `data:image/png;base64,${preview.png_base64}` : await objectUrl(preview.url);
  if (jobId !== state.jobId || state.finished) return;  // the result has replaced the preview
  $("preview").src = src;
  $("preview-figure").hidden = false;
}

// The result takes the preview's place once it is decoded (never both, never neither).
async function showResults(jobId, links) {
  const grid = await objectUrl(links.grid);
  $("grid").src = grid;
  await $("grid").decode().catch(() => {});
  if (jobId !== state.jobId) return;
  $("grid-download").href = grid;
  $("grid-download").download = `${jobId}-grid.png`;
  $("preview-figure").hidden = true;
  $("grid-figure").hidden = false;
  const items = await Promise.all(links.images.map(async (link, index) => {
    const url = await objectUrl(link);
    const item = document.createElement("li");
    const enlarge = document.createElement("button");
    enlarge.type = "button";
    enlarge.className = "enlarge";
    enlarge.setAttribute("aria-label", `enlarge image ${index}`);
    const image = document.createElement("img");
    image.src = url;
    image.alt = `image ${index}`;
    image.dataset.maxWidth = "128";
    enlarge.append(image);
    const download = document.createElement("a");
    download.href = url;
    download.download = `${jobId}-${index}.png`;
    download.textContent = `PNG ${index}`;
    download.setAttribute("aria-label", `download image ${index}`);
    item.append(enlarge, download);
    return item;
  }));
  if (jobId === state.jobId) $("images").replaceChildren(...items);
}

async function onCancel() {
  const button = $("cancel");
  button.disabled = true;
  try {
    const jobId = state.jobId;
    await api(`/jobs/${jobId}`, { method: "DELETE" });
    // The cancelled event follows on the stream, or came already (a queued job ends at once).
    if (jobId === state.jobId && !state.finished) setStatus("cancelling…");
  } catch (error) {
    setStatus(`could not cancel: ${error.message}`);
    button.disabled = false;
  }
}

// -- Pictures: pixel-exact (whole-number) upscaling, click to enlarge -----------------------------
// A 32-px image drawn 4.4 times as wide smears its pixels unevenly; a whole factor with
// `image-rendering: pixelated` shows each pixel as an exact square. Larger images shrink to fit.
function fitPixels(image, room) {
  const natural = image.naturalWidth;
  if (!natural) return;
  const scale = Math.floor(room / natural);
  image.style.width = `${scale >= 1 ? natural * scale : room}px`;
  image.classList.toggle("pixelated", scale >= 2);
}

function roomFor(image) {
  if (image.id === "viewer-image") return Math.floor(Math.min(window.innerWidth, window.innerHeight) * 0.85);
  const wanted = Number(image.dataset.maxWidth || 480);
  const box = image.closest("section") || document.body;
  return Math.max(16, Math.min(wanted, box.clientWidth - 4));
}

function fitAll() {
  document.querySelectorAll("#preview, #grid, #images img, #viewer-image").forEach((img) => fitPixels(img, roomFor(img)));
}

function enlarge(image) {
  if (!image.src) return;
  $("viewer-image").src = image.src;
  $("viewer-image").alt = image.alt;
  $("viewer").showModal();
  if ($("viewer-image").complete) fitPixels($("viewer-image"), roomFor($("viewer-image")));
}

// -- Recent jobs of this browser, kept up to date --------------------------------------------
function recentJobs() {
  try { return JSON.parse(localStorage.getItem(RECENT_KEY)) || []; } catch (_) { return []; }
}

function remember(job) {
  const jobs = [job, ...recentJobs().filter((j) => j.id !== job.id)].slice(0, RECENT_MAX);
  localStorage.setItem(RECENT_KEY, JSON.stringify(jobs));
  renderRecent();
}

function updateRecent(jobId, changes) {
  let changed = false;
  const jobs = recentJobs().map((j) => {
    if (j.id !== jobId) return j;
    const next = { ...j, ...changes };
    if (!("percent" in changes)) delete next.percent;
    changed = changed || JSON.stringify(next) !== JSON.stringify(j);
    return next;
  });
  if (!changed) return;
  localStorage.setItem(RECENT_KEY, JSON.stringify(jobs));
  renderRecent();
}

function describeRecentStatus(job) {
  if (job.status === "running" && job.percent !== undefined) return `running ${job.percent} %`;
  return job.status || "?";
}

function renderRecent() {
  const items = recentJobs().map((job) => {
    const item = document.createElement("li");
    const when = new Date(job.at).toLocaleString();
    const text = document.createElement("span");
    text.textContent = `${when} · ${job.model} · ${job.images} image${job.images === 1 ? "" : "s"} · class ${job.label} · `;
    const status = document.createElement("span");
    status.className = `job-status ${job.status || ""}`;
    status.textContent = describeRecentStatus(job);
    const show = document.createElement("button");
    show.type = "button";
    show.className = "secondary";
    show.textContent = "Show";
    show.setAttribute("aria-label", `show job ${job.id}`);
    show.addEventListener("click", () => watch(job.id));
    item.append(text, status, " ", show);
    return item;
  });
  $("recent").replaceChildren(...items);
  if (!items.length) $("recent").textContent = "None yet.";
}

// Jobs of this browser that are not over (and not followed on this page) are polled, so the list
// shows what each one is doing, whichever tab submitted it.
async function pollRecent() {
  const open = recentJobs().filter((j) => !TERMINAL.includes(j.status) && j.status !== "gone" && j.id !== state.jobId);
  for (const job of open) {
    try {
      const view = await (await api(`/jobs/${job.id}`)).json();
      const changes = { status: view.status };
      if (view.status === "running") changes.percent = Math.floor(100 * view.progress.fraction);
      updateRecent(job.id, changes);
    } catch (error) {
      if (error.status === 404) updateRecent(job.id, { status: "gone" });  // expired, or another key's
    }
  }
}

// -- Start -----------------------------------------------------------------------------------
$("api-key").value = sessionStorage.getItem("patchdiff.apiKey") || "";
$("api-key").addEventListener("change", () => {
  sessionStorage.setItem("patchdiff.apiKey", $("api-key").value.trim());
  loadLimits();
  loadModels();
});
$("model").addEventListener("change", onModelChange);
$("steps").addEventListener("input", updateStepsRaw);
$("steps-raw").addEventListener("click", showRawSteps);
$("generate-form").addEventListener("submit", onSubmit);
$("generate-form").addEventListener("keydown", (event) => {
  // Enter submits from every control, selects included (inputs do it natively).
  if (event.key === "Enter" && event.target.tagName === "SELECT") {
    event.preventDefault();
    $("generate-form").requestSubmit();
  }
});
$("cancel").addEventListener("click", onCancel);
$("reuse").addEventListener("click", () => state.job && fillForm(state.job, false));
$("new-seed").addEventListener("click", () => state.job && fillForm(state.job, true));
document.querySelector("main").addEventListener("click", (event) => {
  const button = event.target.closest("button.enlarge");
  if (button) enlarge(button.querySelector("img"));
});
$("viewer").addEventListener("click", (event) => { if (event.target === $("viewer")) $("viewer").close(); });
document.addEventListener("load", (event) => {
  if (event.target.tagName === "IMG") fitPixels(event.target, roomFor(event.target));
}, true);
window.addEventListener("resize", fitAll);
renderRecent();
loadLimits().then(loadModels);
setInterval(pollRecent, RECENT_POLL_MS);
