// Playground: a streamed chat with one model, or the same prompt sent to two models at once, side by side.

import { stream } from "./api.js";
import { el } from "./dom.js";
import { servedModels } from "./models.js";

const panes = { a: document.getElementById("pane-a"), b: document.getElementById("pane-b") };
const pickers = { a: document.getElementById("chat-model"), b: document.getElementById("chat-model-b") };
const history = { a: [], b: [] };
// The last answer's tool calls, each with the box for its result, which goes back with the next message.
const pending = { a: [], b: [] };
const compare = document.getElementById("compare");
const format = document.getElementById("response-format");
const schemaBox = document.getElementById("json-schema");
const toolsBox = document.getElementById("tools");
const toolChoice = document.getElementById("tool-choice");

function options(served) {
  const label = served.default ? `${served.base} (default: ${served.default})` : `${served.base} (default)`;
  return [[served.base, label], [`${served.base}:base`, `${served.base}:base (bare base)`],
          ...served.adapters.map((a) => [a.name, a.name])];
}

function clear() {
  for (const side of ["a", "b"]) {
    history[side] = [];
    pending[side] = [];
    panes[side].querySelector(".messages").replaceChildren();
  }
}

function label() {
  for (const side of ["a", "b"]) panes[side].querySelector("h3").textContent = pickers[side].value;
  panes.b.hidden = !compare.checked;
  pickers.b.disabled = !compare.checked;
}

// A textarea's JSON, or an Error that says what is wrong with it (the box is marked until it is edited).
function parsed(box, what, shape, fits) {
  const fail = (message) => {
    box.setAttribute("aria-invalid", "true");
    return new Error(`${what}: ${message}`);
  };
  let value;
  try {
    value = JSON.parse(box.value);
  } catch (error) {
    throw fail(`not valid JSON (${error.message})`);
  }
  if (!fits(value)) throw fail(`must be ${shape}`);
  return value;
}

const isObject = (value) => value !== null && typeof value === "object" && !Array.isArray(value);

// The request's response_format, tools and tool_choice, from the page's controls.
function extras() {
  const body = {};
  if (format.value === "json_object") body.response_format = { type: "json_object" };
  if (format.value === "json_schema") {
    const schema = parsed(schemaBox, "JSON schema", "a JSON object", isObject);
    const strict = document.getElementById("schema-strict").checked;
    body.response_format = { type: "json_schema", json_schema: { name: "playground", schema, strict } };
  }
  if (toolsBox.value.trim()) {
    body.tools = parsed(toolsBox, "tools", "a JSON array of tool objects ({\"type\": \"function\", ...})",
                        (value) => Array.isArray(value) && value.every(isObject));
    const [choice, name] = toolChoice.value.split(":");
    body.tool_choice = name ? { type: "function", function: { name } } : choice;
  }
  return body;
}

// tool_choice's options: auto, none, required, and each function the tools box names (while it parses).
function choices() {
  let names = [];
  try {
    names = JSON.parse(toolsBox.value).map((tool) => tool?.function?.name).filter((n) => typeof n === "string");
  } catch {
    // not (yet) a list of tools: no named choices
  }
  const kept = toolChoice.value;
  toolChoice.replaceChildren(...["auto", "none", "required"].map((c) => el("option", { value: c, textContent: c })),
    ...names.map((n) => el("option", { value: `function:${n}`, textContent: `function ${n}` })));
  if ([...toolChoice.options].some((o) => o.value === kept)) toolChoice.value = kept;
}

// One streamed tool call: the call as the history sends it back; in the transcript its name, its arguments and a box
// for the tool's result.
function toolCall(answer) {
  const view = { name: el("span", { className: "name" }), args: el("pre"),
                 result: el("input", { className: "tool-result", placeholder: "the result, sent with the next message" }) };
  answer.append(el("div", { className: "tool-call" }, view.name, view.args, view.result));
  return { call: { id: undefined, type: "function", function: { name: "", arguments: "" } }, view };
}

// Tool-call deltas as OpenAI streams them: each call's index, id and name first, then pieces of its arguments.
function addCalls(calls, answer, deltas) {
  for (const delta of deltas) {
    const { call, view } = (calls[delta.index ?? 0] ??= toolCall(answer));
    if (delta.id) call.id = delta.id;
    if (delta.function?.name) view.name.textContent = call.function.name = delta.function.name;
    call.function.arguments += delta.function?.arguments ?? "";
    view.args.textContent = call.function.arguments;
  }
}

// The arguments indented once they are whole (JSON); as they came when they are not.
function settle(calls) {
  for (const { call, view } of calls) {
    try {
      view.args.textContent = JSON.stringify(JSON.parse(call.function.arguments), null, 2);
    } catch {
      // left as streamed
    }
  }
}

async function ask(side, prompt, options) {
  const messages = panes[side].querySelector(".messages");
  const answered = pending[side];
  const turn = answered.map(({ call, view }) => {
    view.result.disabled = true;
    return { role: "tool", tool_call_id: call.id, content: view.result.value };
  });
  if (prompt) turn.push({ role: "user", content: prompt });
  if (!turn.length) return;
  const text = document.createTextNode("");
  const answer = el("div", { className: "message assistant streaming" }, text);
  if (prompt) messages.append(el("div", { className: "message user", textContent: prompt }));
  messages.append(answer);
  const calls = [];
  try {
    let finish;
    await stream("chat/completions", {
      model: pickers[side].value, messages: [...history[side], ...turn], ...options,
      temperature: Number(document.getElementById("temperature").value),
      max_tokens: Number(document.getElementById("max-tokens").value),
    }, (choice) => {
      if (choice.delta?.content) text.data += choice.delta.content;
      if (choice.delta?.tool_calls) addCalls(calls, answer, choice.delta.tool_calls);
      finish = choice.finish_reason ?? finish;
    });
    settle(calls);
    if (finish) answer.dataset.finish = finish;
    const message = { role: "assistant", content: text.data || (calls.length ? null : "") };
    if (calls.length) message.tool_calls = calls.map(({ call }) => call);
    history[side].push(...turn, message);
    pending[side] = calls;
  } catch (error) {
    for (const { view } of answered) view.result.disabled = false;
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
  const showSchema = () => {
    for (const node of document.querySelectorAll(".schema-only")) node.hidden = format.value !== "json_schema";
  };
  format.addEventListener("change", showSchema);
  showSchema();
  for (const box of [schemaBox, toolsBox]) box.addEventListener("input", () => box.removeAttribute("aria-invalid"));
  toolsBox.addEventListener("input", choices);
  document.getElementById("chat-form").addEventListener("submit", guarded(async (event) => {
    event.preventDefault();
    const box = document.getElementById("prompt");
    const prompt = box.value.trim();
    const sides = compare.checked ? ["a", "b"] : ["a"];
    if (!prompt && !sides.some((side) => pending[side].length)) return;
    const options = extras();
    box.value = "";
    const send = document.getElementById("send");
    send.disabled = true;
    try {
      await Promise.all(sides.map((side) => ask(side, prompt, options)));
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
