// Tiny DOM helpers. Text always goes in as text nodes (never innerHTML): prompts, logs and error
// messages are user or server data.

export function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs)) {
    if (value === null || value === undefined || value === false) continue;
    node.setAttribute(name, value === true ? "" : String(value));
  }
  node.append(...children.flat().filter((c) => c !== null && c !== undefined && c !== false));
  return node;
}

export const $ = (selector, root = document) => root.querySelector(selector);

export function show(node, visible = true) {
  node.hidden = !visible;
}

export function formatSeconds(seconds) {
  if (typeof seconds !== "number") return "–";
  return seconds < 10 ? `${seconds.toFixed(2)} s` : `${seconds.toFixed(1)} s`;
}

export function formatCost(cost) {
  if (typeof cost !== "number") return "–";
  const digits = cost !== 0 && Math.abs(cost) < 0.01 ? 4 : 2;
  return `$${cost.toFixed(digits)}`;
}

export function formatTime(iso) {
  const date = new Date(iso);
  return Number.isNaN(date.getTime()) ? iso : date.toLocaleString();
}
