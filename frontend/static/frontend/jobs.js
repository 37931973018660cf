// One job on screen: status, place in line, progress, result; kept live by its event stream.
import { cancelJob, errorText } from "./api.js";

export const FINAL = new Set(["succeeded", "failed", "cancelled"]);
// Metrics that are fractions, shown as percentages (ml/progress.py PERCENT_METRICS).
const PERCENT_METRICS = new Set(["accuracy", "val_accuracy", "test_accuracy", "drawn_accuracy", "drawn_ece",
                                 "drawn_ece_unscaled"]);
// What a model card calls a metric (others: the key with spaces).
const METRIC_NAMES = {
  drawn_accuracy: "accuracy on drawn digits",
  drawn_ece: "calibration error on drawn digits (ECE)",
  drawn_ece_unscaled: "ECE before temperature scaling",
};
const isStaff = document.body.dataset.staff === "1";
const models = JSON.parse(document.getElementById("models-data")?.textContent || "[]");
const titles = Object.fromEntries(models.map((m) => [m.name, m.title]));

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (key === "class") node.className = value;
    else if (key === "text") node.textContent = value;
    else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else if (value !== null && value !== undefined) node.setAttribute(key, value);
  }
  for (const child of children) if (child) node.append(child);
  return node;
}

function ago(iso) {
  if (!iso) return "";
  const seconds = Math.max(0, Math.round((Date.now() - Date.parse(iso)) / 1000));
  if (seconds < 60) return `${seconds} s ago`;
  if (seconds < 3600) return `${Math.round(seconds / 60)} min ago`;
  return new Date(iso).toLocaleString();
}

function aheadText(ahead) {
  if (ahead === 0) return "Next in line";
  if (ahead === 1) return "1 job ahead of yours";
  return `${ahead} jobs ahead of yours`;
}

export function duration(seconds) {
  if (seconds == null) return "?";
  const s = Math.max(0, Math.round(seconds));
  if (s < 90) return `${s} s`;
  const minutes = Math.round(s / 60);
  return minutes < 60 ? `${minutes} min` : `${Math.floor(minutes / 60)} h ${minutes % 60} min`;
}

function metricText(key, value) {
  return PERCENT_METRICS.has(key) ? `${key} ${(100 * value).toFixed(1)}%` : `${key} ${Number(value).toFixed(4)}`;
}

// One line of training progress, as ml/progress.py describe() words it for the terminal.
export function trainingText(partial) {
  const p = partial || {};
  if (p.stage === "waiting") return `waiting for ${p.behind || "another model"} to finish training`;
  if (p.epoch == null) return "starting: loading the data and building the network";
  const parts = [`epoch ${p.epoch} of ${p.epochs ?? "?"}`];
  for (const [key, value] of Object.entries(p.metrics || {})) parts.push(metricText(key, value));
  if (p.eta_seconds != null) parts.push(`about ${duration(p.eta_seconds)} left`);
  return parts.join(" · ");
}

// A model card (ml/artifacts.py make_card) as a definition list: held-out numbers, time, data.
export function renderCard(card, list = el("dl", { class: "facts" })) {
  const facts = [];
  for (const [key, value] of Object.entries(card.metrics || {}))
    facts.push([METRIC_NAMES[key] || key.replaceAll("_", " "),
                PERCENT_METRICS.has(key) ? `${(100 * value).toFixed(1)}%` : String(value)]);
  if (card.test_examples) facts.push(["held out", `${card.test_examples} examples never seen in training`]);
  if (card.drawn_examples)
    facts.push(["drawn digits", `${card.drawn_examples} digits drawn in pen strokes on the page's pad (varied size, ` +
                "place, slant, pen width, stroke order), sent as the page sends them; training never uses their templates"]);
  if (card.validation_chars) facts.push(["held out", `${card.validation_chars} characters never seen in training`]);
  facts.push(["training time", `${duration(card.train_seconds)} (${card.epochs} epochs)`]);
  if (card.trained_at) facts.push(["trained", new Date(card.trained_at).toLocaleString()]);
  facts.push(["data", card.data_source || ""]);
  if (card.sample?.text) facts.push(["sample", `${card.sample.prompt}${card.sample.text}`]);
  list.replaceChildren(...facts.flatMap(([term, value]) => [el("dt", { text: term }), el("dd", { text: value })]));
  return list;
}

function renderBars(top) {
  const list = el("ul", { class: "bars" });
  for (const item of top) {
    const pct = Math.round(item.probability * 1000) / 10;
    list.append(el("li", { "data-label": item.label },
      el("span", { class: "label", text: item.label }),
      el("span", { class: "track" }, el("span", { class: "fill", style: `width:${Math.max(pct, 0.5)}%` })),
      el("span", { class: "pct", text: `${pct.toFixed(1)}%` })));
  }
  return list;
}

function renderText(prompt, text, live) {
  return el("div", { class: `generated${live ? " is-live" : ""}` },
    el("span", { class: "prompt", text: prompt || "" }),
    el("span", { class: "cont", text: text || "" }));
}

function renderSeen(seen) {
  // The grid the model actually looked at (8x8 digits, 28x28 clothing), drawn as pixels.
  const rows = seen.length;
  const cols = rows ? seen[0].length : 0;
  const canvas = el("canvas", { class: "seen", width: cols, height: rows, title: `what the model saw: ${cols}x${rows}` });
  const ctx = canvas.getContext("2d");
  const image = ctx.createImageData(cols, rows);
  seen.flat().forEach((value, i) => {
    const shade = 255 - Math.round(Math.max(0, Math.min(1, value)) * 255);
    image.data.set([shade, shade, shade, 255], i * 4);
  });
  ctx.putImageData(image, 0, 0);
  return el("figure", { class: "seen-box" }, canvas, el("figcaption", { text: `what the model saw (${cols}×${rows})` }));
}

export function renderResult(job, onSuggestion) {
  const result = job.result || {};
  if (Array.isArray(result.top)) {
    const box = el("div", { class: "classified" }, renderBars(result.top));
    if (Array.isArray(result.seen) && result.seen.length) box.append(renderSeen(result.seen));
    return box;
  }
  if (Array.isArray(result.suggestions)) {
    const chips = el("div", { class: "chips" });
    for (const word of result.suggestions) {
      const label = typeof word === "string" ? word : word.word || word.label;
      const pct = typeof word === "object" && word.probability != null ? ` ${Math.round(word.probability * 100)}%` : "";
      chips.append(el("button", { type: "button", class: "chip", text: label, title: `likelihood${pct}`,
        onclick: () => onSuggestion && onSuggestion(label) }));
    }
    return chips;
  }
  if (typeof result.text === "string") return renderText(result.prompt ?? job.input?.prompt, result.text, false);
  if (job.kind === "train" && result.metrics) return renderCard(result);
  return el("pre", { class: "schema", text: JSON.stringify(result, null, 2) });
}

export class JobView {
  // compact: no buttons (inside a link on the home page); onChange(job) after every update.
  constructor(job, { onSuggestion, compact = false, onChange } = {}) {
    this.job = job;
    this.onSuggestion = onSuggestion;
    this.compact = compact;
    this.onChange = onChange;
    this.node = el("article", { class: "job", "data-job": job.id });
    this.source = null;
    this.render();
  }

  render() {
    const job = this.job;
    this.node.dataset.status = job.status;
    this.node.replaceChildren(this.thumb(), this.main(), this.actions());
  }

  thumb() {
    if (job_has_image(this.job)) return el("div", { class: "job-thumb" }, el("img", { src: this.job.input_url, alt: "input" }));
    if (this.job.kind === "train") return el("div", { class: "job-thumb", text: "⚙", title: "training" });
    return el("div", { class: "job-thumb", text: this.job.model === "text" ? "¶" : "" });
  }

  main() {
    const job = this.job;
    const head = el("div", { class: "job-head" },
      el("span", { class: "job-title", text: (job.kind === "train" ? "Training: " : "") + (titles[job.model] || job.model) }),
      el("span", { class: `status status-${job.status}`, text: this.statusText() }),
      el("span", { class: "job-id", text: job.id.slice(0, 8) }),
      el("span", { class: "job-time", text: ago(job.created_at) }));
    const body = el("div", { class: "job-main" }, head);
    if (job.input?.prompt !== undefined && job.status !== "running" && !job.result)
      body.append(el("p", { class: "job-input", text: `“${job.input.prompt}”` }));
    const line = this.lineText();
    if (line) body.append(el("div", { class: `job-line${job.jobs_ahead != null ? " ahead" : ""}`, text: line }));
    if (!FINAL.has(job.status))
      body.append(el("div", { class: "progress" }, el("div", { class: "progress-bar", style: `width:${job.progress || 0}%` })));
    if (job.status === "running" && job.partial && typeof job.partial.text === "string")
      body.append(renderText(job.input?.prompt, job.partial.text, true));
    if (job.status === "succeeded") body.append(renderResult(job, this.onSuggestion));
    if (job.error && job.status !== "succeeded") body.append(el("div", { class: "job-error", text: job.error }));
    return body;
  }

  statusText() {
    if (this.job.cancel_requested && !FINAL.has(this.job.status)) return "cancelling";
    return this.job.status;
  }

  lineText() {
    const job = this.job;
    // A queued training job from /api/models carries the estimate of when its model is ready.
    const readyIn = job.kind === "train" && job.ready_in_seconds != null ? ` · ready in about ${duration(job.ready_in_seconds)}` : "";
    if (job.status === "queued" && job.jobs_ahead != null) return aheadText(job.jobs_ahead) + readyIn;
    if (job.status === "queued") return "Waiting for a worker" + readyIn;
    if (job.status === "running" && job.kind === "train") return trainingText(job.partial);
    if (job.status === "running") return `Running on ${job.worker || "a worker"} · ${job.progress || 0}%`;
    return "";
  }

  actions() {
    const box = el("div", { class: "job-actions" });
    if (this.compact || (this.job.kind === "train" && !isStaff)) return box;
    if (!FINAL.has(this.job.status) && !this.job.cancel_requested)
      box.append(el("button", { type: "button", class: "btn btn-small btn-danger", text: "Cancel",
        "data-action": "cancel", onclick: () => this.cancel() }));
    return box;
  }

  async cancel() {
    const answer = await cancelJob(this.job);
    if (answer.ok) this.update(answer.data);
    else this.update({ error: errorText(answer) });
  }

  update(fields) {
    // An answer that left the server before the job finished (e.g. the DELETE's) must not undo
    // a final state the event stream has delivered meanwhile.
    if (FINAL.has(this.job.status) && fields.status && !FINAL.has(fields.status)) {
      fields = { ...fields, status: this.job.status, progress: this.job.progress, result: this.job.result,
                 error: this.job.error || fields.error };
    }
    Object.assign(this.job, fields);
    if (FINAL.has(this.job.status)) this.job.jobs_ahead = null;
    this.render();
    if (this.onChange) this.onChange(this.job);
  }

  follow() {
    if (FINAL.has(this.job.status) || this.source) return this;
    const source = new EventSource(this.job.events_url);
    this.source = source;
    source.addEventListener("position", (event) => this.update({ jobs_ahead: JSON.parse(event.data).jobs_ahead }));
    source.addEventListener("state", (event) => {
      const data = JSON.parse(event.data);
      const fields = { status: data.status, progress: data.progress ?? this.job.progress };
      if (data.status !== "queued") fields.jobs_ahead = null;
      if (data.partial) fields.partial = data.partial;
      if (data.result !== undefined) fields.result = data.result;
      if (data.error) fields.error = data.error;
      if (data.worker) fields.worker = data.worker;
      this.update(fields);
      if (FINAL.has(data.status)) this.close();
    });
    return this;
  }

  close() {
    if (this.source) this.source.close();
    this.source = null;
  }
}

function job_has_image(job) {
  return Boolean(job.input_url);
}
