// Small DOM helpers: elements built from data, never from HTML strings (no markup injection from model output).

export function el(tag, props = {}, ...children) {
  const node = Object.assign(document.createElement(tag), props);
  node.append(...children.filter((c) => c !== null && c !== undefined));
  return node;
}

// Table rows from arrays of cells: a <td> as it is, anything else (text or a node) wrapped in one.
export function fill(tbody, rows) {
  const cell = (c) => (c instanceof Node && c.tagName === "TD" ? c : el("td", {}, c ?? ""));
  tbody.replaceChildren(...rows.map((cells) => el("tr", {}, ...cells.map(cell))));
}

// A definition list from an object: nested values as JSON.
export function facts(dl, object) {
  dl.replaceChildren(...Object.entries(object).filter(([, v]) => v !== null && v !== undefined && v !== "")
    .flatMap(([k, v]) => [el("dt", {}, k), el("dd", {}, typeof v === "object" ? JSON.stringify(v) : String(v))]));
}

export function when(seconds) {
  return seconds ? new Date(seconds * 1000).toLocaleString() : "";
}
