// Data: upload a training file; the service checks it at once, and its report (format and rows, or the
// line-numbered error) is shown before any job is launched.

import { get, upload, APIError } from "./api.js";
import { el, fill, when } from "./dom.js";

export let lastUpload = null;  // the job form preselects it

export async function files() {
  return (await get("files")).data;
}

export function init(guarded) {
  document.getElementById("upload-form").addEventListener("submit", guarded(async (event) => {
    event.preventDefault();
    const file = document.getElementById("data-file").files[0];
    const form = new FormData();
    form.append("purpose", document.getElementById("data-purpose").value);
    form.append("file", file, file.name);
    const report = document.getElementById("data-report");
    report.hidden = false;
    try {
      const row = await upload("files", form);
      lastUpload = row.id;
      report.className = "report ok";
      report.replaceChildren(el("strong", { textContent: `${row.filename} is valid` }),
        ` — ${row.format}, ${row.rows} rows, ${row.bytes} bytes, stored as ${row.id}. `,
        el("a", { href: "#/jobs", textContent: "Launch a job with it" }));
    } catch (error) {
      if (!(error instanceof APIError)) throw error;
      report.className = "report error";
      report.replaceChildren(el("strong", { textContent: "Rejected: " }), error.message);
    }
    await show();
  }));
}

export async function show() {
  fill(document.querySelector("#file-list tbody"), (await files()).map((f) => [
    f.id, f.filename, f.format, f.rows, f.purpose, when(f.created_at)]));
}
