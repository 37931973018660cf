// Models still training: their job's live progress on the home and model pages, and the switch
// to the ready model (no reload) when the training job succeeds.
import { listModels } from "./api.js";
import { FINAL, JobView, renderCard } from "./jobs.js";

// How often a page asks /api/models about a model that is not trained and has no training job yet
// (`make run` queues training a few seconds after the site is up).
const POLL_MS = 3000;

// Calls onTraining(job) for a model whose training job appears, onReady(card) once it is trained.
function waitForTraining(name, { onTraining, onReady }) {
  const timer = setInterval(async () => {
    const answer = await listModels();
    const model = answer.ok ? answer.data.models.find((m) => m.name === name) : null;
    if (!model || model.state === "untrained") return;
    clearInterval(timer);
    if (model.state === "ready") onReady(model.card);
    else if (model.state === "training") onTraining(model.training);
  }, POLL_MS);
}

// Follow one training job in `slot`; call onReady(card) when it succeeds.
function followTraining(job, slot, { compact, onReady, onEnded }) {
  let ended = false;
  const view = new JobView(job, {
    compact,
    onChange: (current) => {
      if (!FINAL.has(current.status) || ended) return;
      ended = true;
      if (current.status === "succeeded") onReady(current.result);
      else if (onEnded) onEnded(current);
    },
  });
  slot.replaceChildren(view.node);
  view.follow();
  return view;
}

export function showCard(card) {
  const section = document.getElementById("model-card");
  if (!section || !card) return;
  renderCard(card, document.getElementById("model-card-facts"));
  section.hidden = false;
}

export function modelPageTraining(model) {
  const bench = document.querySelector(".workbench");
  const banner = document.getElementById("training");
  const ready = (card) => {
    banner.hidden = true;
    document.getElementById("untrained")?.remove();
    bench.dataset.state = "ready";
    document.getElementById("submit").disabled = false;
    showCard(card);
  };
  const training = (job) => {
    document.getElementById("untrained")?.remove();
    banner.hidden = false;
    bench.dataset.state = "training";
    // A failed or cancelled training stays on screen with its error until another one is queued.
    const onEnded = () => waitForTraining(model.name, { onTraining: training, onReady: ready });
    followTraining(job, document.getElementById("training-job"), { compact: false, onReady: ready, onEnded });
  };
  if (model.state === "ready") showCard(model.card);
  if (model.state === "training") training(model.training);
  if (model.state === "untrained") waitForTraining(model.name, { onTraining: training, onReady: ready });
}

export function homeTraining(models) {
  for (const model of models) {
    const card = document.querySelector(`.model-card[data-model="${model.name}"]`);
    const slot = card?.querySelector("[data-model-state]");
    if (!slot) continue;
    const ready = () => {
      card.dataset.state = "ready";
      slot.replaceChildren(Object.assign(document.createElement("span"), { className: "card-cta", textContent: "Try it →" }));
    };
    const training = (job) => {
      card.dataset.state = "training";
      const onEnded = () => waitForTraining(model.name, { onTraining: training, onReady: ready });
      followTraining(job, slot, { compact: true, onReady: ready, onEnded });
    };
    if (model.state === "training") training(model.training);
    if (model.state === "untrained") waitForTraining(model.name, { onTraining: training, onReady: ready });
  }
}
