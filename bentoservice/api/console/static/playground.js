// Playground: a streamed chat with one model, or the same prompt sent to two models at once, side by side.

import { stream } from "./api.js";
import { el } from "./dom.js";
import { servedModels } from "./models.js";

const panes = { a: document.getElementById("pane-a"), b: document.getElementById("pane-b") };
const pickers = { a: document.getElementById("chat-model"), b: document.getElementById("chat-model-b") };
const history = { a: [], b: [] };
const compare = document.getElementById("compare");

function options(served) {
  const label = served.default ? `${served.base} (default: ${served.default})` : `${served.base} (default)`;
  return [[served.base, label], [`${served.base}:base`, `${served.base}:base (bare base)`],
          ...served.adapters.map((a) => [a.name, a.name])];
}

function clear() {
  for (const side of ["a", "b"]) {
    history[side] = [];
    panes[side].querySelector(".messages").replaceChildren();
  }
}

function label() {
  for (const side of ["a", "b"]) panes[side].querySelector("h3").textContent = pickers[side].value;
  panes.b.hidden = !compare.checked;
  pickers.b.disabled = !compare.checked;
}

async function ask(side, prompt) {
  const messages = panes[side].querySelector(".messages");
  history[side].push({ role: "user", content: prompt });
  const answer = el("div", { className: "message assistant streaming" });
  messages.append(el("div", { className: "message user", textContent: prompt }), answer);
  try {
    await stream("chat/completions", {
      model: pickers[side].value, messages: history[side],
      temperature: Number(document.getElementById("temperature").value),
      max_tokens: Number(document.getElementById("max-tokens").value),
    }, (text) => { answer.textContent += text; });
    history[side].push({ role: "assistant", content: answer.textContent });
  } catch (error) {
    history[side].pop();
    answer.classList.add("failed");
    answer.textContent = error.message;
  } finally {
    answer.classList.remove("streaming");
    answer.classList.add("done");
  }
}

export function init(guarded) {
  compare.addEventListener("change", label);
  for (const picker of Object.values(pickers)) picker.addEventListener("change", () => { clear(); label(); });
  document.getElementById("chat-clear").addEventListener("click", clear);
  document.getElementById("chat-form").addEventListener("submit", guarded(async (event) => {
    event.preventDefault();
    const box = document.getElementById("prompt");
    const prompt = box.value.trim();
    if (!prompt) return;
    box.value = "";
    const send = document.getElementById("send");
    send.disabled = true;
    try {
      await Promise.all((compare.checked ? ["a", "b"] : ["a"]).map((side) => ask(side, prompt)));
    } finally {
      send.disabled = false;
    }
  }));
}

export async function show() {
  const choices = options(await servedModels());
  for (const [side, picker] of Object.entries(pickers)) {
    const kept = picker.value;
    picker.replaceChildren(...choices.map(([value, text]) => el("option", { value, textContent: text })));
    if (choices.some(([value]) => value === kept)) picker.value = kept;
    else if (side === "b") picker.value = choices[1][0];
  }
  label();
}
