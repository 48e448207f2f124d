// The playground's wiring: load the model's schema, build the form, run predictions, show history.
// Everything goes through the public Replicate API (api.js); no endpoint exists for the page alone.

import { api, ApiError, hasToken, MODEL, onUnauthorized, setToken } from "./api.js";
import { $, el, formatSeconds, show } from "./dom.js";
import { buildForm } from "./form.js";
import { renderGallery, renderPreview, renderSummary } from "./gallery.js";
import { historyView } from "./history.js";
import { resultName } from "./images.js";
import { follow, parseCall, parseProgress, TERMINAL } from "./run.js";

const ui = {
  form: $("#prompt-form"), fields: $("#fields"), submit: $("#submit"), reset: $("#reset"),
  formError: $("#form-error"), modelDescription: $("#model-description"),
  run: $("#run"), status: $("#status"), progressRow: $("#progress-row"), progress: $("#progress"),
  progressText: $("#progress-text"), cancel: $("#cancel"), runError: $("#run-error"),
  runTitle: $("#run-title"), summary: $("#summary"), gallery: $("#gallery"),
  logsBox: $("#logs-box"), logs: $("#logs"),
  tokenPanel: $("#token-panel"), tokenForm: $("#token-form"), tokenInput: $("#token-input"),
  tokenError: $("#token-error"), tokenState: $("#token-state"), forgetToken: $("#forget-token"),
  history: { list: $("#history-list"), more: $("#history-more"), empty: $("#history-empty") },
  historyRefresh: $("#history-refresh"),
  modelField: $("[data-field=model]"), modelSelect: $("#f-model"), modelHint: $("#f-model-hint"),
  banner: $("#setup-banner"),
};

let form = null; // built once the schema has loaded
let model = null; // the chosen model (GET v1/models/...): its description, engine, and how many previews it makes
let served = []; // every model this server serves: the default route (openai/gpt-image-2) first
const HEALTH_RETRY_MS = 2000; // while the model loads, look again this often
// Step previews asked of a model that can make them (Atelier's `previews`; docs/api.md). A few are
// enough to watch the picture form; the engine spreads them over the steps and never sends more.
const PREVIEWS = 3;
const run = { prediction: null, follower: null, timer: null, step: null, pass: 1, call: null, began: 0 };

const history = historyView(ui.history, {
  onShow: showPrediction,
  onLoad: loadInputs,
  onDelete: deleted,
  onError: (error) => error.status !== 401 && announce(`Could not load the history: ${error.message}`),
});

onUnauthorized(askForToken);
bindEvents();
start();

async function start() {
  ui.tokenState.hidden = !hasToken();
  checkHealth();
  if (!form) await loadModel();
  if (form) history.reload();
}

async function loadModel() {
  try {
    const main = await api.model();
    served = await servedModels(main);
    form = buildForm(ui.fields, main.latest_version.openapi_schema);
    buildPicker();
    choose(served[0]);
    ui.submit.disabled = false;
    ui.reset.disabled = false;
  } catch (error) {
    ui.fields.textContent = error.status === 401
      ? "Enter an API token above to continue."
      : `Could not load the model's inputs: ${error.message}`;
  }
}

// The default route, then each other model the server serves (the OpenAI door's list names them; each is
// atelier/<name> on this API). A name that is only another name of the default is left out.
async function servedModels(main) {
  const names = ((await api.models().catch(() => null))?.data || []).map((m) => m.id);
  const others = await Promise.all(names
    .filter((name) => name !== main.serves && name !== "gpt-image-2")
    .map((name) => api.model(`atelier/${name}`).then((m) => ({ ...m, address: `atelier/${name}` }), () => null)));
  return [{ ...main, address: MODEL }, ...others.filter(Boolean)];
}

function buildPicker() {
  ui.modelSelect.replaceChildren(...served.map((m, index) => {
    const what = m.engine === "openai" ? "OpenAI" : m.engine;
    const text = index === 0 ? `${m.serves} (${what}, default)` : `${m.serves} (${what})`;
    return el("option", { value: m.address }, text);
  }));
  ui.modelField.hidden = false;
}

// The picked model: the header says what it is, the form's hints and options follow it.
function choose(picked) {
  model = picked;
  ui.modelSelect.value = picked.address;
  ui.modelDescription.textContent = picked.description || "";
  ui.modelHint.textContent = picked.engine === "openai"
    ? "Runs on OpenAI: each image is billed to the key used."
    : `Runs on this server (${picked.engine}).`;
  form.setContext({ engine: picked.engine, model: picked.serves });
}

// Before anyone presses Generate: a model that failed to load is said at once, with its reason.
async function checkHealth() {
  let health;
  try {
    health = await api.health();
  } catch (error) {
    health = error instanceof ApiError ? error.body : null; // a 503 still carries the state
  }
  const status = health?.status;
  if (status === "SETUP_FAILED") {
    const reason = (health.setup?.logs || "").trim();
    banner(`The model could not be loaded, so nothing can be generated until the operator fixes it.${
      reason ? `\nReason: ${reason}` : ""}`);
  } else if (status === "STARTING") {
    banner("The model is still loading; a prediction made now waits for it.", "info");
    setTimeout(checkHealth, HEALTH_RETRY_MS);
  } else {
    banner("");
  }
}

function banner(text, kind = "error") {
  ui.banner.textContent = text;
  ui.banner.dataset.kind = kind;
  ui.banner.hidden = !text;
}

function bindEvents() {
  ui.modelSelect.addEventListener("change", () => {
    choose(served.find((m) => m.address === ui.modelSelect.value) || served[0]);
    announce(`Model: ${ui.modelSelect.selectedOptions[0]?.textContent || ""}.`);
  });
  ui.form.addEventListener("submit", submit);
  ui.form.addEventListener("keydown", (event) => {
    if (event.key === "Enter" && (event.ctrlKey || event.metaKey)) {
      event.preventDefault();
      ui.form.requestSubmit();
    }
  });
  ui.reset.addEventListener("click", () => {
    form.reset();
    form.clearErrors();
    ui.formError.textContent = "";
    announce("The form is back to the model's defaults.");
  });
  ui.cancel.addEventListener("click", cancel);
  ui.tokenForm.addEventListener("submit", useToken);
  ui.forgetToken.addEventListener("click", () => {
    setToken("");
    location.reload(); // nothing shown so far may stay on screen without the token
  });
  ui.historyRefresh.addEventListener("click", () => history.reload());
  // Pasting an image (not text) anywhere on the page adds it to the input images.
  document.addEventListener("paste", (event) => {
    const files = [...(event.clipboardData?.files || [])].filter((f) => f.type.startsWith("image/"));
    if (!form || !files.length) return;
    event.preventDefault();
    form.addFiles(files);
    announce(`Adding ${files.length} pasted image${files.length > 1 ? "s" : ""} to the input images.`);
  });
}

// -- tokens --------------------------------------------------------------------------------------

function askForToken() {
  const wasSet = hasToken();
  show(ui.tokenPanel);
  ui.tokenState.hidden = true;
  ui.tokenError.textContent = wasSet ? "The server did not accept this token; check it and try again." : "";
  ui.tokenInput.toggleAttribute("aria-invalid", wasSet);
  if (document.activeElement !== ui.tokenInput) ui.tokenInput.focus();
}

async function useToken(event) {
  event.preventDefault();
  const value = ui.tokenInput.value.trim();
  if (!value) {
    ui.tokenError.textContent = "is required";
    return;
  }
  setToken(value);
  ui.tokenInput.value = "";
  show(ui.tokenPanel, false);
  await start();
}

// -- creating a prediction -----------------------------------------------------------------------

async function submit(event) {
  event.preventDefault();
  if (!form || ui.submit.disabled) return; // Ctrl+Enter while a create is still on its way
  form.clearErrors();
  ui.formError.textContent = "";
  let input;
  try {
    input = await form.values(); // waits for uploads still in flight
  } catch (error) {
    form.showErrors([{ field: "input.input_images", description: error.message }]);
    return;
  }
  const missing = form.missing(input);
  if (missing.length) {
    form.showErrors(missing);
    announce("Some fields need attention.");
    return;
  }
  ui.submit.disabled = true;
  try {
    track(await api.create(input, { previews: previewsFor(input), model: model.address }));
    // The result, with its progress, is where the eyes go next: below the form on a phone, above the
    // Generate button once the form was scrolled on a desktop. Bring it into view unless it is there.
    const box = ui.run.getBoundingClientRect();
    if (box.top < 0 || box.top > window.innerHeight - 120) {
      const reduce = window.matchMedia("(prefers-reduced-motion: reduce)").matches;
      ui.run.scrollIntoView({ behavior: reduce ? "auto" : "smooth", block: "start" });
    }
  } catch (error) {
    refused(error);
  } finally {
    ui.submit.disabled = false;
  }
}

// None when the run goes to OpenAI (a typed key, or the server's own route): there each preview is a
// partial image that OpenAI bills, and the page does not spend money on a glimpse.
function previewsFor(input) {
  if (input.openai_api_key || model?.engine === "openai") return 0;
  return Math.min(PREVIEWS, model?.previews || 0);
}

// The API said no: its own messages go next to the fields (422) or above the buttons.
function refused(error) {
  if (!(error instanceof ApiError)) {
    ui.formError.textContent = `Could not reach the server: ${error.message}`;
    return;
  }
  if (error.invalidFields.length) {
    const unplaced = form.showErrors(error.invalidFields);
    ui.formError.textContent = unplaced.map((p) => form.labelled(`${p.field}: ${p.description}`)).join(" ");
    const count = error.invalidFields.length;
    announce(`The API refused the input: ${count} problem${count > 1 ? "s" : ""}, shown next to the fields.`);
    return;
  }
  const wait = error.retryAfter ? ` Try again in ${error.retryAfter} s.` : "";
  ui.formError.textContent = `${form.labelled(error.message)}${wait}`;
}

// -- following a prediction ----------------------------------------------------------------------

function track(prediction) {
  run.follower?.stop();
  resetRun(prediction);
  showStatus(prediction.status, prediction);
  const follower = follow(prediction, {
    status: (status) => showStatus(status, prediction),
    log: appendLog,
    error: (detail) => showRunError(detail),
    preview: (preview) => renderPreview(ui.gallery, preview, prediction.input || {}),
  });
  run.follower = follower;
  follower.done.then(
    (final) => final && run.follower === follower && finish(final),
    (error) => run.follower === follower && lost(error),
  );
}

function resetRun(prediction) {
  run.prediction = prediction;
  ui.run.dataset.prediction = prediction.id; // which prediction the panel shows (tests wait on it)
  run.step = null;
  run.pass = 1;
  run.call = null;
  ui.logs.textContent = "";
  ui.gallery.replaceChildren();
  ui.summary.hidden = true;
  showRunError("");
  ui.progress.removeAttribute("value"); // indeterminate until the first progress line
  show(ui.progressRow);
  show(ui.logsBox);
  ui.cancel.hidden = false;
  ui.cancel.disabled = false;
  run.began = Date.now();
  clearInterval(run.timer);
  run.timer = setInterval(() => showProgressText(), 250);
}

function appendLog(line) {
  ui.logs.append(`${line}\n`);
  ui.logs.scrollTop = ui.logs.scrollHeight;
  run.call = parseCall(line) || run.call;
  const progress = parseProgress(line);
  if (!progress) return;
  // Steps counting down again: the engine started another pass (e.g. one more batch of images).
  if (run.step && progress.step < run.step.step) run.pass += 1;
  run.step = progress;
  ui.progress.max = progress.total;
  ui.progress.value = progress.step;
  showProgressText();
}

// "Step 2 of 4 · call 2 of 3 · 3.50 s": steps are counted per model call, as the summary counts them; the
// bar counts all calls. `seconds` defaults to the time since the run was shown.
function showProgressText(seconds = (Date.now() - run.began) / 1000) {
  const parts = [];
  const call = run.call;
  if (run.step && call && call.calls > 1 && run.step.total === call.calls * call.steps) {
    const step = Math.max(0, Math.min(call.steps, run.step.step - (call.index - 1) * call.steps));
    parts.push(`Step ${step} of ${call.steps}`, `call ${call.index} of ${call.calls}`);
  } else if (run.step) {
    parts.push(`Step ${run.step.step} of ${run.step.total}`);
    if (run.pass > 1) parts.push(`pass ${run.pass}`);
  }
  parts.push(formatSeconds(seconds));
  ui.progressText.textContent = parts.join(" · ");
}

function showStatus(status, prediction) {
  const messages = {
    starting: "Queued: waiting for the model…",
    processing: "Generating…",
    succeeded: succeededMessage(prediction),
    failed: "Failed: the reason is below.", // said once, in the error box, not twice
    canceled: prediction.error ? `Canceled: ${prediction.error}` : "Canceled.",
  };
  announce(messages[status] || status);
  ui.status.dataset.state = status; // colours the message
  ui.run.dataset.status = status; // the state of the prediction shown (tests wait on it)
}

function succeededMessage(prediction) {
  if (prediction.data_removed) return "Done; its images have since been deleted (data retention).";
  const count = prediction.output?.length ?? 0;
  const time = prediction.metrics ? ` in ${formatSeconds(prediction.metrics.predict_time)}` : "";
  return `Done: ${count} image${count === 1 ? "" : "s"}${time}.`;
}

// `live`: it just finished while we watched, so the history has a new state to show.
function finish(prediction, { live = true } = {}) {
  clearInterval(run.timer);
  run.prediction = prediction;
  ui.cancel.hidden = true;
  showStatus(prediction.status, prediction);
  if (prediction.status === "succeeded") {
    if (!run.step) ui.progress.max = 1; // an engine without steps (OpenAI upstream): just full
    ui.progress.value = ui.progress.max;
    showProgressText(prediction.metrics?.predict_time ?? null);
  } else {
    show(ui.progressRow, false);
  }
  if (prediction.status === "failed") {
    showRunError(prediction.error || "The prediction failed.");
    if (live) checkHealth(); // a model that failed to load says so above the form as well
  }
  // Seed, time, steps... describe images; a run that made none has nothing to summarize.
  if (prediction.metrics && prediction.status === "succeeded") renderSummary(ui.summary, prediction);
  else ui.summary.hidden = true;
  renderGallery(ui.gallery, prediction, { onUseAsInput: (url, index) => useAsInput(url, index, prediction) });
  if (live) history.reload();
}

function lost(error) {
  clearInterval(run.timer);
  ui.cancel.hidden = true;
  showRunError(`Lost track of the prediction: ${error.message}`);
}

async function cancel() {
  if (!run.prediction) return;
  ui.cancel.disabled = true;
  announce("Canceling…");
  try {
    await api.cancel(run.prediction); // the stream then ends with `done`, and finish() shows "Canceled."
  } catch (error) {
    ui.cancel.disabled = false;
    showRunError(`Could not cancel: ${error.message}`);
  }
}

function showRunError(text) {
  ui.runError.textContent = text;
  ui.runError.hidden = !text;
}

// -- history and iterating -----------------------------------------------------------------------

function showPrediction(prediction) {
  if (TERMINAL.has(prediction.status)) {
    run.follower?.stop();
    run.follower = null;
    resetRun(prediction);
    for (const line of (prediction.logs || "").split("\n")) if (line) appendLog(line);
    finish(prediction, { live: false });
  } else {
    track(prediction);
  }
  ui.runTitle.focus();
  ui.runTitle.scrollIntoView({ block: "start" });
}

function loadInputs(prediction) {
  const picked = served.find((m) => m.address === prediction.model);
  if (picked) choose(picked);
  // The seed it ran with, asked for or not: the inputs loaded make the same image again.
  const seed = prediction.input?.seed ?? prediction.metrics?.seed;
  form.fill({ ...(prediction.input || {}), ...(seed !== undefined && seed !== null ? { seed } : {}) });
  form.clearErrors();
  announce("Loaded that prediction's inputs into the form.");
  form.focus("prompt");
}

function deleted(prediction) {
  if (run.prediction?.id === prediction.id) {
    run.follower?.stop();
    clearInterval(run.timer);
    run.prediction = null;
    delete ui.run.dataset.prediction;
    ui.gallery.replaceChildren();
    ui.summary.hidden = true;
    show(ui.progressRow, false);
    show(ui.logsBox, false);
    showRunError("");
  }
  announce("Deleted the prediction and its images.");
}

function useAsInput(url, index, prediction) {
  form.addImage(url, resultName(index, prediction?.input?.prompt, prediction?.id || ""));
  announce("Added the image to the input images: describe the edit and press Generate.");
  form.focus("prompt");
}

// The live region: screen readers read every change, so only state changes and answers to actions.
function announce(text) {
  ui.status.textContent = text;
  delete ui.status.dataset.state;
}
