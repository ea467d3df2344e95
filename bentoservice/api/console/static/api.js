// Calls to the service's public /v1 API. Every call carries the API key, which is asked once and kept in
// sessionStorage; an error comes back as an Error whose message is the service's own (OpenAI's envelope).

const BASE = new URL("../v1/", location.href);
const KEY = "bentoservice.apiKey";

export class APIError extends Error {
  constructor(status, body) {
    const error = body?.error ?? {};
    const where = error.param ? ` (${error.param})` : "";
    super(`${error.message ?? body?.detail ?? "request failed"}${where} [HTTP ${status}]`);
    this.status = status;
    this.code = error.code;
  }
}

export function setKey(key) {
  sessionStorage.setItem(KEY, key);
}

function headers(extra = {}) {
  const key = sessionStorage.getItem(KEY);
  return key ? { ...extra, Authorization: `Bearer ${key}` } : extra;
}

// Shows the key dialog and resolves once a key is entered.
export function askForKey() {
  const dialog = document.getElementById("key-dialog");
  if (!dialog.pending) {
    dialog.pending = new Promise((resolve) => {
      dialog.addEventListener("close", () => {
        const value = document.getElementById("key-input").value.trim();
        if (value) setKey(value);
        dialog.pending = null;
        resolve();
      }, { once: true });
    });
    dialog.showModal();
  }
  return dialog.pending;
}

async function send(path, init) {
  for (;;) {
    const response = await fetch(new URL(path, BASE), { ...init, headers: headers(init.headers) });
    if (response.status === 401) {
      await askForKey();
      continue;
    }
    if (!response.ok) {
      const text = await response.text();
      let body;
      try { body = JSON.parse(text); } catch { body = { error: { message: text || response.statusText } }; }
      throw new APIError(response.status, body);
    }
    return response;
  }
}

export async function get(path) {
  return (await send(path, { method: "GET" })).json();
}

export async function post(path, body) {
  const response = await send(path, { method: "POST", body: JSON.stringify(body ?? {}),
                                      headers: { "Content-Type": "application/json" } });
  const type = response.headers.get("content-type") ?? "";
  return type.includes("json") ? response.json() : response.text();
}

export async function upload(path, form) {
  return (await send(path, { method: "POST", body: form })).json();
}

// POSTs a streaming completion and calls onChoice with each chunk's first choice as it arrives ({delta,
// finish_reason}).
export async function stream(path, body, onChoice) {
  const response = await send(path, { method: "POST", body: JSON.stringify({ ...body, stream: true }),
                                      headers: { "Content-Type": "application/json" } });
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += value;
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const frame = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      for (const line of frame.split("\n")) {
        if (!line.startsWith("data: ")) continue;
        const data = line.slice(6);
        if (data === "[DONE]") return;
        const chunk = JSON.parse(data);
        if (chunk.error) throw new APIError(500, chunk);
        const choice = chunk.choices?.[0];
        if (choice) onChoice(choice);
      }
    }
  }
}

// The paths of the API's OpenAPI schema: what this server supports (pause/resume, for one).
let schemaPaths;
export async function supports(path) {
  schemaPaths ??= get("openapi.json").then((schema) => Object.keys(schema.paths ?? {}), () => []);
  return (await schemaPaths).includes(path);
}
