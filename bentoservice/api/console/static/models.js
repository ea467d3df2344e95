// Models: the base, its adapters (load, unload, the default) and the other served models; an adapter's card.

import { get, post } from "./api.js";
import { el, facts, fill } from "./dom.js";

// The LLM this server serves and its adapters, with /v1/models' cards.
export async function servedModels() {
  const [listing, adapters] = await Promise.all([get("models"), get("adapters")]);
  return { cards: listing.data, base: adapters.base, default: adapters.default, adapters: adapters.data };
}

let guard;

export function init(guarded) {
  guard = guarded;
  document.getElementById("base-default").addEventListener("click", guarded(async () => {
    await post("adapters", { adapter_name: null });
    await show();
  }));
  document.getElementById("load-form").addEventListener("submit", guarded(async (event) => {
    event.preventDefault();
    const name = document.getElementById("load-name").value.trim();
    await post("adapters/load", { adapter_id: document.getElementById("load-id").value.trim(),
                                  ...(name ? { adapter_name: name } : {}) });
    event.target.reset();
    await show();
  }));
}

function kind(card, served) {
  if (card.id === served.base) return "base";
  return served.adapters.some((a) => a.name === card.id) ? "adapter" : "encoder";
}

function button(label, action) {
  return el("button", { type: "button", textContent: label, onclick: guard(action) });
}

async function showCard(card, served) {
  const box = document.getElementById("model-card");
  const adapter = served.adapters.find((a) => a.name === card.id) ?? {};
  const full = await get(`models/${encodeURIComponent(card.id)}`);
  box.querySelector("h3").textContent = card.id;
  facts(box.querySelector("dl"), { ...full, ...adapter });
  box.hidden = false;
}

export async function show() {
  const served = await servedModels();
  fill(document.querySelector("#model-list tbody"), served.cards.map((card) => {
    const type = kind(card, served);
    const isDefault = type === "adapter" && card.id === served.default;
    const actions = el("td", {}, button("Card", () => showCard(card, served)));
    if (type === "adapter") {
      if (!isDefault) actions.append(button("Set default", async () => {
        await post("adapters", { adapter_name: card.id });
        await show();
      }));
      actions.append(button("Unload", async () => {
        await post("adapters/unload", { adapter_name: card.id });
        await show();
      }));
    }
    return [card.id, isDefault ? "adapter (default)" : type, card.parent ?? "",
            [card.tier, card.where].filter(Boolean).join(" ") || (type === "encoder" ? "" : "loaded"), actions];
  }));
}
