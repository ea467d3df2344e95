// The console's shell: pages by URL hash (#/models, #/playground, #/data, #/jobs, #/jobs/<id>) and one error banner.

import { askForKey } from "./api.js";
import * as models from "./models.js";
import * as playground from "./playground.js";
import * as data from "./data.js";
import * as jobs from "./jobs.js";

const banner = document.getElementById("error");

export function showError(error) {
  banner.textContent = error instanceof Error ? error.message : String(error);
  banner.hidden = false;
}

// Runs an action of the page; its failure becomes the banner's message.
export function guarded(action) {
  return async (...args) => {
    banner.hidden = true;
    try {
      return await action(...args);
    } catch (error) {
      showError(error);
    }
  };
}

const pages = { models, playground, data, jobs };

async function route() {
  const [tab = "models", id] = location.hash.replace(/^#\/?/, "").split("/").map(decodeURIComponent);
  const name = tab === "jobs" && id ? "job" : (pages[tab] ? tab : "models");
  for (const section of document.querySelectorAll("[data-page]")) section.hidden = section.id !== name;
  for (const link of document.querySelectorAll("nav a")) {
    link.classList.toggle("active", link.dataset.tab === (name === "job" ? "jobs" : name));
  }
  jobs.leave();
  await guarded(() => (name === "job" ? jobs.open(id) : pages[name].show()))();
}

document.getElementById("key-button").addEventListener("click", () => askForKey().then(route));
window.addEventListener("hashchange", route);
for (const page of Object.values(pages)) page.init(guarded);
route();
