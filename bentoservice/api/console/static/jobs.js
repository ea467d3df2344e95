// Jobs: the launch form, the list with a status filter, and a live job page (status, progress, loss curves from the
// job's events, checkpoints, the evaluation summary, cancel and, where the server has them, pause and resume).

import { get, post, supports } from "./api.js";
import * as data from "./data.js";
import { el, facts, fill, when } from "./dom.js";
import { servedModels } from "./models.js";

const FINAL = ["succeeded", "failed", "cancelled"];
const POLL_MS = 1500;
// Event data carry today's trainer keys (loss, eval_loss) or OpenAI's (train_loss, valid_loss).
const TRAIN_KEYS = ["loss", "train_loss"];
const VALID_KEYS = ["valid_loss", "eval_loss", "validation_loss"];

function first(object, keys) {
  const key = keys.find((k) => typeof object?.[k] === "number");
  return key === undefined ? undefined : object[key];
}

function option(value, text = value) {
  return el("option", { value, textContent: text });
}

// --- the form and the list ------------------------------------------------------------------------------------

async function launch(event) {
  event.preventDefault();
  const body = {};
  for (const [name, value] of new FormData(event.target)) {
    if (value === "") continue;
    body[name] = event.target.elements[name].type === "number" ? Number(value) : value;
  }
  const job = await post("fine_tuning/jobs", body);
  location.hash = `#/jobs/${encodeURIComponent(job.id)}`;
}

async function fillForm() {
  const [served, files] = await Promise.all([servedModels(), data.files()]);
  // The served base and the embedding/rerank models (no parent); adapters are not bases.
  const others = served.cards.filter((c) => c.id !== served.base && !c.parent &&
                                            !served.adapters.some((a) => a.name === c.id));
  const bases = [served.base, ...others.map((c) => c.id)];
  const model = document.getElementById("job-model");
  model.replaceChildren(...bases.map((b) => option(b)));
  const names = files.map((f) => option(f.id, `${f.filename} (${f.format}, ${f.rows} rows) ${f.id}`));
  const train = document.getElementById("job-train");
  train.replaceChildren(...names);
  if (data.lastUpload) train.value = data.lastUpload;
  document.getElementById("job-valid").replaceChildren(option("", "none"), ...names.map((n) => n.cloneNode(true)));
}

let jobRows = [];

function showList() {
  const status = document.getElementById("job-filter").value;
  fill(document.querySelector("#job-list tbody"), jobRows.filter((j) => !status || j.status === status).map((j) => [
    el("a", { href: `#/jobs/${encodeURIComponent(j.id)}`, textContent: j.id }), j.model,
    el("span", { className: `badge ${j.status}`, textContent: j.status }), when(j.created_at),
    j.fine_tuned_model ?? ""]));
}

export function init(guarded) {
  document.getElementById("job-form").addEventListener("submit", guarded(launch));
  document.getElementById("job-filter").addEventListener("change", showList);
  document.getElementById("job-cancel").addEventListener("click", guarded(() => act("cancel")));
  document.getElementById("job-pause").addEventListener("click", guarded(() => act("pause")));
  document.getElementById("job-resume").addEventListener("click", guarded(() => act("resume")));
  guard = guarded;
}

export async function show() {
  await fillForm();
  jobRows = (await get("fine_tuning/jobs?limit=100")).data;
  showList();
}

// --- the live job page -------------------------------------------------------------------------------------------

let guard;
let live = null;  // the open job: { id, timer, lastSeq, events, chart }

export function leave() {
  if (!live) return;
  clearTimeout(live.timer);
  live.chart.destroy();
  live = null;
}

function makeChart() {
  const line = (label, color) => ({ label, data: [], borderColor: color, backgroundColor: color, pointRadius: 2,
                                    tension: 0.2 });
  return new Chart(document.getElementById("loss-chart"), {
    type: "line",
    data: { datasets: [line("train loss", "#2563eb"), line("validation loss", "#dc2626")] },
    options: { animation: false, maintainAspectRatio: false, parsing: false,
               scales: { x: { type: "linear", title: { display: true, text: "step" } },
                         y: { title: { display: true, text: "loss" } } } },
  });
}

export async function open(id) {
  live = { id, timer: null, lastSeq: 0, events: [], chart: makeChart() };
  document.getElementById("job-title").textContent = id;
  document.getElementById("job-events").replaceChildren();
  await poll(live);
}

async function act(action) {
  await post(`fine_tuning/jobs/${encodeURIComponent(live.id)}/${action}`);
  clearTimeout(live.timer);
  await poll(live);
}

// The events after the newest one seen (the API lists newest first and pages towards older ones).
async function newEvents(state) {
  const fresh = [];
  let after = "";
  for (;;) {
    const page = await get(`fine_tuning/jobs/${encodeURIComponent(state.id)}/events?limit=1000${after}`);
    const unseen = page.data.filter((e) => Number(e.id.replace("ftevent-", "")) > state.lastSeq);
    fresh.push(...unseen);
    if (!page.has_more || unseen.length < page.data.length || !page.data.length) break;
    after = `&after=${page.data[page.data.length - 1].id}`;
  }
  if (fresh.length) state.lastSeq = Number(fresh[0].id.replace("ftevent-", ""));
  return fresh.reverse();
}

async function poll(state) {
  const path = `fine_tuning/jobs/${encodeURIComponent(state.id)}`;
  const [job, events, checkpoints, pausable] = await Promise.all([
    get(path), newEvents(state), get(`${path}/checkpoints`), supports("/fine_tuning/jobs/{job_id}/pause")]);
  if (live !== state) return;
  state.events.push(...events);
  render(job, events, checkpoints.data, pausable);
  if (!FINAL.includes(job.status)) {
    state.timer = setTimeout(guard(() => poll(state)), POLL_MS);
  }
}

function render(job, events, checkpoints, pausable) {
  const status = document.getElementById("job-status");
  status.textContent = job.status;
  status.className = `badge ${job.status}`;
  const running = !FINAL.includes(job.status);
  document.getElementById("job-cancel").hidden = !running;
  document.getElementById("job-pause").hidden = !(pausable && ["queued", "running"].includes(job.status));
  document.getElementById("job-resume").hidden = !(pausable && job.status === "paused");
  facts(document.getElementById("job-facts"), {
    model: job.model, "fine-tuned model": job.fine_tuned_model, method: job.method?.type,
    "training file": job.training_file, "validation file": job.validation_file,
    hyperparameters: job.hyperparameters, "trained tokens": job.trained_tokens, created: when(job.created_at),
    finished: when(job.finished_at), error: job.error?.message ?? null,
  });

  const log = document.getElementById("job-events");
  for (const event of events) {
    log.prepend(el("li", { className: event.level, textContent: `${when(event.created_at)}  ${event.message}` }));
  }

  // One point a step and curve: the trainer's closing summary (the run's mean train_loss) repeats the last step.
  const [train, valid] = live.chart.data.datasets;
  for (const { data: d = {} } of events) {
    if (typeof d.step !== "number") continue;
    for (const [curve, keys] of [[train, TRAIN_KEYS], [valid, VALID_KEYS]]) {
      const y = first(d, keys);
      if (y !== undefined && !curve.data.some((p) => p.x === d.step)) curve.data.push({ x: d.step, y });
    }
  }
  live.chart.update("none");

  const metrics = live.events.map((e) => e.data ?? {}).filter((d) => typeof d.step === "number");
  const latest = metrics[metrics.length - 1];
  const total = job.params?.max_steps;
  const progress = document.getElementById("job-progress");
  progress.hidden = !(total && latest);
  if (total && latest) progress.value = job.status === "succeeded" ? 1 : latest.step / total;
  const eta = document.getElementById("job-eta");
  const stepText = latest ? `step ${latest.step}${total ? ` of ${total}` : ""}` : "";
  eta.textContent = running && job.estimated_finish
    ? `${stepText} · ETA ${new Date(job.estimated_finish * 1000).toLocaleTimeString()}`
    : running && latest?.eta_seconds !== undefined ? `${stepText} · about ${Math.ceil(latest.eta_seconds)} s left`
      : stepText;

  fill(document.querySelector("#job-checkpoints tbody"), checkpoints.map((c) => [
    c.step_number, c.fine_tuned_model_checkpoint,
    Object.entries(c.metrics ?? {}).filter(([k]) => k !== "step")
      .map(([k, v]) => `${k}=${typeof v === "number" ? +v.toPrecision(4) : v}`).join(" ")]));

  // The evaluation summary: the final metrics of "Training completed", the last validation numbers, and the
  // job's `evaluation` (the base against the fine-tune: held-out figures and samples side by side, as tables).
  const final = live.events.map((e) => e.data?.metrics).filter(Boolean).pop();
  const lastValid = [...metrics].reverse().find((d) => first(d, VALID_KEYS) !== undefined);
  const { base, adapter, samples, ...evaluation } = job.evaluation ?? {};
  const summary = { ...(lastValid ? Object.fromEntries(Object.entries(lastValid)
    .filter(([k]) => k.startsWith("eval_") || k.startsWith("valid_"))) : {}), ...(final ?? {}), ...evaluation };
  const box = document.getElementById("job-eval");
  box.hidden = !Object.keys(summary).length && !base && !samples;
  facts(box.querySelector("dl"), Object.fromEntries(Object.entries(summary).map(([k, v]) => [k, figure(v)])));
  heldOut(base ?? {}, adapter ?? {});
  sideBySide(samples ?? [], ["rerank", "embedding"].includes(evaluation.method));
}

function figure(value) {
  return typeof value === "number" ? +value.toPrecision(5) : value;
}

function heldOut(base, adapter) {
  const names = [...new Set([...Object.keys(base), ...Object.keys(adapter)])];
  const table = document.getElementById("job-held-out");
  table.hidden = !names.length;
  fill(table.querySelector("tbody"), names.map((name) => {
    const [before, after] = [base[name], adapter[name]];
    const change = typeof before === "number" && typeof after === "number" ? after - before : undefined;
    const signed = change === undefined ? "" : `${change >= 0 ? "+" : ""}${figure(change)}`;
    return [name, figure(before), figure(after), signed];
  }));
}

// An LLM's greedy generations (or a rerank/embedding model's top passage for a query), base and fine-tune.
function sideBySide(samples, ranking) {
  const table = document.getElementById("job-samples");
  table.hidden = !samples.length;
  const heads = ranking ? ["query", "base", "fine-tuned", "positive"] : ["prompt", "base", "fine-tuned", "reference"];
  table.querySelector("thead tr").replaceChildren(...heads.map((h) => el("th", { textContent: h })));
  fill(table.querySelector("tbody"), samples.map((s) => [s.prompt, s.base, s.adapter, s.reference ?? ""]));
}
