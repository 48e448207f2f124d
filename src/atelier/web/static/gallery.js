// A finished prediction as a gallery: its images with size and format, download and "use as input",
// and the prediction's seed, timing and cost. Output URLs are signed capability URLs, so <img> and
// download links work without the token.

import { el, formatCost, formatSeconds } from "./dom.js";

export function renderSummary(node, prediction) {
  const metrics = prediction.metrics || {};
  const rows = [
    ["Seed", metrics.seed ?? "–"],
    ["Predict time", formatSeconds(metrics.predict_time)],
    ["Cost", formatCost(metrics.estimated_cost)],
    ["Rendered", rendered(metrics)],
    ["Steps", metrics.steps ?? "–"],
    ["Model", [metrics.engine, metrics.model].filter(Boolean).join(" · ") || "–"],
  ];
  node.replaceChildren(...rows.map(([name, value]) =>
    el("div", { "data-metric": name.toLowerCase().replace(" ", "_") }, el("dt", {}, name), el("dd", {}, String(value)))));
  node.hidden = false;
}

// The size the model drew at, and whether it was upscaled to the size asked for (PRODUCT: "Size").
function rendered(metrics) {
  if (!metrics.rendered_size) return "–";
  return metrics.upscaled ? `${metrics.rendered_size}, upscaled to ${metrics.size}` : metrics.rendered_size;
}

export function renderGallery(node, prediction, { onUseAsInput }) {
  const outputs = prediction.output || [];
  const format = (prediction.input?.output_format || "").toLowerCase();
  // The resolved background: "auto" may have become transparent.
  const background = prediction.metrics?.background || prediction.input?.background;
  const prompt = shorten(prediction.input?.prompt || "", 80);
  node.replaceChildren(...outputs.map((url, index) => {
    const alt = `Result ${index + 1} of ${outputs.length}: ${prompt}`;
    return figure({ url, alt, format, transparent: background === "transparent", onUseAsInput, index });
  }));
}

function figure({ url, alt, format, transparent, onUseAsInput, index }) {
  const image = el("img", { src: url, alt, decoding: "async" });
  const size = el("span", { class: "image-size" }, "…");
  image.addEventListener("load", () => {
    size.textContent = `${image.naturalWidth}×${image.naturalHeight}`;
  });
  image.addEventListener("error", () => {
    size.textContent = "could not load";
  });
  // Names say which image: "Download" alone is ambiguous when there are several.
  const use = el("button", { type: "button", class: "quiet", "aria-label": `Use as input: result ${index + 1}` },
    "Use as input");
  use.addEventListener("click", () => onUseAsInput(url, index));
  return el("figure", { class: "result" },
    el("a", { href: url, target: "_blank", rel: "noopener", class: `frame${transparent ? " checker" : ""}`,
      title: "Open full size" }, image),
    el("figcaption", {},
      el("p", { class: "small" }, size, " · ", el("span", { class: "image-format" }, format.toUpperCase())),
      el("div", { class: "buttons" },
        // The file's own name comes from the server (Content-Disposition wins over a name given here).
        el("a", { href: url, download: "", class: "button", "aria-label": `Download result ${index + 1}` },
          "Download"),
        use),
    ),
  );
}

// A step preview while the prediction runs (engines preview the first image of a batch): one figure,
// updated in place, until renderGallery replaces it with the results. Not a live region: a screen reader
// hears the status and the result, not each step.
export function renderPreview(node, { step, total, image }, input) {
  let figure = node.querySelector(".preview");
  if (!figure) {
    figure = el("figure", { class: "result preview" },
      el("div", { class: "frame" }, el("img", { alt: "", decoding: "async" })),
      el("figcaption", { class: "small muted" }));
    node.replaceChildren(figure);
  }
  const what = (input.number_of_images || 1) > 1 ? "Preview of image 1" : "Preview";
  const where = total ? `step ${step} of ${total}` : "in progress";
  const img = figure.querySelector("img");
  img.src = image;
  img.alt = `${what} at ${where}: ${shorten(input.prompt || "", 80)}`;
  figure.querySelector("figcaption").textContent = `${what} at ${where} (smaller than the result)`;
}

export function shorten(text, length) {
  return text.length > length ? `${text.slice(0, length - 1)}…` : text;
}
