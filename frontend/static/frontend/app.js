// Page wiring: the model pages (draw / type / upload, then watch the job) and "My jobs".
import { errorText, listJobs, submitJob } from "./api.js";
import { DrawingPad } from "./draw.js";
import { JobView } from "./jobs.js";
import { homeTraining, modelPageTraining } from "./training.js";

const $ = (selector) => document.querySelector(selector);

function showError(message) {
  const box = $("#form-error");
  box.textContent = message || "";
  box.hidden = !message;
}

// -- what each model's form sends ------------------------------------------------
function digitsInput(state) {
  return { model: "digits", input: { image: state.pad.toDataURL() } };
}

function textInput() {
  const mode = document.querySelector('input[name="mode"]:checked').value;
  const input = { mode, prompt: $("#prompt").value };
  if (mode === "generate") {
    input.length = Number($("#length").value);
    input.temperature = Number($("#temperature").value);
  }
  return { model: "text", input };
}

function fashionInput() {
  const form = new FormData();
  form.append("model", "fashion");
  const file = $("#photo").files[0];
  if (file) form.append("image", file);
  return form;
}

function genericInput(model) {
  let input;
  try {
    input = JSON.parse($("#raw-input").value || "{}");
  } catch (err) {
    throw new Error(`input is not valid JSON: ${err.message}`);
  }
  return { model, input };
}

// -- per-widget set-up -----------------------------------------------------------
function setUpDigits(state) {
  state.pad = new DrawingPad($("#pad"));
  $("#pad-clear").addEventListener("click", () => state.pad.clear());
}

function setUpText(state) {
  for (const name of ["length", "temperature"]) {
    const input = $(`#${name}`);
    input.addEventListener("input", () => { $(`#${name}-out`).textContent = input.value; });
  }
  const options = $("#generate-options");
  const button = $("#submit");
  for (const radio of document.querySelectorAll('input[name="mode"]')) {
    radio.addEventListener("change", () => {
      const suggest = radio.value === "suggest" && radio.checked;
      options.hidden = suggest;
      button.textContent = suggest ? "Suggest next words" : "Continue the text";
    });
  }
  state.onSuggestion = (word) => {
    const prompt = $("#prompt");
    prompt.value = prompt.value.replace(/\s*$/, "") + " " + word;
    prompt.focus();
  };
}

function setUpFashion() {
  const input = $("#photo");
  const zone = $("#dropzone");
  const preview = $("#photo-preview");
  const showPreview = () => {
    const file = input.files[0];
    preview.hidden = !file;
    $("#dropzone-text").hidden = Boolean(file);
    if (file) preview.src = URL.createObjectURL(file);
  };
  input.addEventListener("change", showPreview);
  zone.addEventListener("dragover", (e) => { e.preventDefault(); zone.classList.add("is-over"); });
  zone.addEventListener("dragleave", () => zone.classList.remove("is-over"));
  zone.addEventListener("drop", (e) => {
    e.preventDefault();
    zone.classList.remove("is-over");
    if (e.dataTransfer.files.length) {
      input.files = e.dataTransfer.files;
      showPreview();
    }
  });
}

// -- pages -------------------------------------------------------------------------
function modelPage() {
  const bench = $(".workbench");
  const model = bench.dataset.model;
  const state = { current: null, onSuggestion: null };
  const builders = { digits: digitsInput, text: textInput, fashion: fashionInput };
  if (model === "digits") setUpDigits(state);
  if (model === "text") setUpText(state);
  if (model === "fashion") setUpFashion(state);

  $("#job-form").addEventListener("submit", async (event) => {
    event.preventDefault();
    showError("");
    let body;
    try {
      body = builders[model] ? builders[model](state) : genericInput(model);
    } catch (err) {
      showError(err.message);
      return;
    }
    const priority = $("#priority").value;
    if (body instanceof FormData) body.append("priority", priority);
    else body.priority = Number(priority);
    const button = $("#submit");
    button.disabled = true;
    const answer = await submitJob(body);
    button.disabled = false;
    if (!answer.ok) {
      showError(errorText(answer));
      return;
    }
    if (state.current) state.current.close();
    state.current = new JobView(answer.data, { onSuggestion: state.onSuggestion }).follow();
    const slot = $("#current-job");
    slot.replaceChildren(state.current.node);
    if (answer.status === 200) {
      const note = document.createElement("p");
      note.className = "hint";
      note.textContent = "You already asked exactly this; here is that job.";
      slot.append(note);
    }
  });
}

async function jobsPage() {
  const list = $("#job-list");
  const more = $("#more-jobs");
  let next = "/api/jobs";
  const load = async () => {
    const answer = await listJobs(next);
    if (!answer.ok) {
      list.append(Object.assign(document.createElement("p"), { className: "form-error", textContent: errorText(answer) }));
      return;
    }
    for (const job of answer.data.jobs) list.append(new JobView(job).follow().node);
    $("#jobs-empty").hidden = answer.data.count > 0;
    next = answer.data.next;
    more.hidden = !next;
  };
  more.addEventListener("click", load);
  await load();
}

const page = document.body.dataset.page;
if (page === "home") homeTraining(JSON.parse($("#models-data").textContent));
if (page === "model") {
  modelPage();
  modelPageTraining(JSON.parse($("#model-data").textContent));
}
if (page === "jobs") jobsPage();
