// Past predictions from GET /v1/predictions (newest first), page by page through the `next` cursor
// URL, each with "Show" (its result, or its live progress if it is still running), "Load inputs" and, once
// it is finished, "Delete" (asked twice: it removes the prediction and its images for good).

import { api } from "./api.js";
import { el, formatTime } from "./dom.js";
import { shorten } from "./gallery.js";
import { TERMINAL } from "./run.js";

export function historyView({ list, more, empty }, { onShow, onLoad, onDelete, onError }) {
  let next = null;
  let loading = false;

  async function load(pageURL) {
    if (loading) return;
    loading = true;
    more.disabled = true;
    try {
      const page = await api.list(pageURL);
      if (!pageURL) list.replaceChildren();
      list.append(...page.results.map((prediction) => item(prediction, { onShow, onLoad, onDelete: remove })));
      next = page.next;
      more.hidden = !next;
      empty.hidden = list.children.length > 0;
    } catch (error) {
      onError(error);
    } finally {
      loading = false;
      more.disabled = false;
    }
  }

  async function remove(prediction, node) {
    try {
      await api.remove(prediction);
    } catch (error) {
      onError(error);
      return;
    }
    node.remove();
    empty.hidden = list.children.length > 0;
    onDelete(prediction);
  }

  more.addEventListener("click", () => next && load(next));
  return { reload: () => load(null) };
}

function item(prediction, { onShow, onLoad, onDelete }) {
  const input = prediction.input || {};
  const promptId = `history-${prediction.id}`;
  const first = (prediction.output || [])[0];
  const thumb = first
    ? el("img", { src: first, alt: "", loading: "lazy", decoding: "async" }) // the prompt next to it says it all
    : el("span", { class: "placeholder", "aria-hidden": "true" }, prediction.data_removed ? "removed" : "–");
  const show = el("button", { type: "button", class: "quiet", "aria-describedby": promptId }, "Show");
  const load = el("button", { type: "button", class: "quiet", "aria-describedby": promptId }, "Load inputs");
  show.addEventListener("click", () => onShow(prediction));
  load.addEventListener("click", () => onLoad(prediction));
  const buttons = [show, load];
  if (TERMINAL.has(prediction.status)) {
    const remove = el("button", { type: "button", class: "quiet", "aria-describedby": promptId }, "Delete");
    remove.addEventListener("click", () => {
      if (remove.dataset.confirm) {
        remove.disabled = true;
        onDelete(prediction, node);
        return;
      }
      remove.dataset.confirm = "1"; // a second press deletes: nothing is removed by one slip of the finger
      remove.textContent = "Delete for good";
      remove.classList.add("confirm");
    });
    remove.addEventListener("blur", () => {
      delete remove.dataset.confirm;
      remove.textContent = "Delete";
      remove.classList.remove("confirm");
    });
    buttons.push(remove);
  }
  const images = input.input_images?.length ? `edit of ${input.input_images.length} · ` : "";
  const node = el("li", { class: "history-item", "data-id": prediction.id, "data-status": prediction.status },
    el("div", { class: "thumb-frame" }, thumb),
    el("div", { class: "history-text" },
      el("p", { id: promptId, class: "history-prompt" }, shorten(input.prompt || "(no prompt)", 160)),
      el("p", { class: "small muted" },
        el("span", { class: `badge ${prediction.status}` }, prediction.status), " ",
        `${images}${input.number_of_images ?? 1} × ${input.aspect_ratio ?? ""} · ${input.output_format ?? ""} · `,
        el("time", { datetime: prediction.created_at }, formatTime(prediction.created_at))),
    ),
    el("div", { class: "buttons" }, ...buttons),
  );
  return node;
}
