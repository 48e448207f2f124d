// The input_images control: upload (file picker, drag and drop, paste) or URLs, as thumbnails.
//
// Files go through POST /v1/files first and their urls.get goes into input_images, as the official
// clients do; the server reads its own files from disk. A URL is sent as typed: the API (not the page)
// decides what it accepts, and says so next to the field.

import { api } from "./api.js";
import { el } from "./dom.js";

const OWN_FILE = /\/v1\/files\/[a-z0-9]+$/; // an uploaded file's urls.get (metadata, not bytes)
const FILE_ID = /\/v1\/files\/([a-z2-7]{26})(?:\/download)?(?:\?|$)/; // an upload or an output of this server
const OUTPUT_NAME = /^([a-z2-7]{26})-(\d+)\.\w+$/; // an output's file name: <prediction id>-<index>.<format>

export function imagesControl(id, describedBy) {
  const items = []; // { url, preview, name, pending: Promise|null, error: string|null, node }
  const list = el("ul", { class: "thumbs", "aria-label": "Input images" });
  const picker = el("input", {
    id, type: "file", accept: "image/*", multiple: "", "aria-describedby": describedBy,
  });
  const urlInput = el("input", {
    id: `${id}-url`, type: "url", placeholder: "https://…/image.png", inputmode: "url", spellcheck: "false",
  });
  const addURL = el("button", { type: "button", class: "quiet" }, "Add URL");
  const zone = el("div", { class: "dropzone", "data-dropzone": "" },
    el("p", { class: "small muted" }, "Drop or paste images here, or choose files."),
    el("div", { class: "row" }, el("label", { for: id }, "Upload"), picker),
    el("div", { class: "row" }, el("label", { for: `${id}-url` }, "URL"), urlInput, addURL),
  );
  const node = el("div", { class: "images" }, zone, list);

  picker.addEventListener("change", () => {
    addFiles(picker.files);
    picker.value = ""; // choosing the same file again should add it again
  });
  addURL.addEventListener("click", addTypedURL);
  urlInput.addEventListener("keydown", (event) => {
    if (event.key === "Enter") {
      event.preventDefault(); // Enter here adds the URL; it must not submit the whole form
      addTypedURL();
    }
  });
  wireDrop(zone, addFiles);

  function addTypedURL() {
    const url = urlInput.value.trim();
    if (!url) return;
    add({ url });
    urlInput.value = "";
  }

  function addFiles(files) {
    for (const file of files || []) {
      if (!file.type.startsWith("image/")) continue;
      const item = add({ name: file.name, preview: URL.createObjectURL(file) });
      item.pending = api.upload(file).then(
        (uploaded) => { item.url = uploaded.urls.get; },
        (error) => { item.error = `${file.name}: ${error.message}`; },
      ).finally(() => { item.pending = null; render(item); });
      render(item);
    }
  }

  function add({ url = null, preview = null, name = null }) {
    const item = { url, preview, name, pending: null, error: null, node: null };
    items.push(item);
    render(item);
    if (!preview && url) loadPreview(item);
    if (!name && url) nameFrom(item);
    return item;
  }

  // A file of this server is named by where it came from: "Result 2 of “a red apple…”", "photo.png
  // (uploaded)"; its id means nothing to a person. Asked of the API, which knows each file's name.
  async function nameFrom(item) {
    const id = FILE_ID.exec(item.url)?.[1];
    if (!id) return;
    try {
      const file = await api.fileInfo(id);
      const output = OUTPUT_NAME.exec(file.name);
      if (!output) {
        item.name = `${file.name} (uploaded)`;
      } else {
        const prediction = await api.get({ urls: { get: `v1/predictions/${output[1]}` } }).catch(() => null);
        const prompt = prediction?.input?.prompt;
        item.name = resultName(Number(output[2]), prompt, output[1]);
      }
    } catch {
      return; // not ours to describe (another caller's, or deleted): the short URL stays
    }
    if (items.includes(item)) render(item);
  }

  // Our own uploads need the token to show; everything else is shown straight from its URL.
  async function loadPreview(item) {
    if (OWN_FILE.test(item.url)) {
      try {
        item.preview = URL.createObjectURL(await api.fileBlob(item.url));
      } catch {
        item.preview = null;
      }
    } else {
      item.preview = item.url;
    }
    render(item);
  }

  function remove(item) {
    items.splice(items.indexOf(item), 1);
    item.node.remove();
    if (item.preview && item.preview.startsWith("blob:")) URL.revokeObjectURL(item.preview);
    (list.querySelector("button") || picker).focus(); // keep keyboard focus inside the control
  }

  function render(item) {
    const index = items.indexOf(item) + 1;
    const label = item.name || shortName(item.url);
    const state = item.error ? "failed" : item.pending ? "uploading…" : "";
    const thumb = el("li", { class: `thumb${item.error ? " failed" : ""}`, "data-url": item.url || "" },
      item.preview ? el("img", { src: item.preview, alt: `Input image ${index}: ${label}` })
        : el("span", { class: "placeholder", "aria-hidden": "true" }, "…"),
      el("span", { class: "thumb-name small" }, state || label),
      el("button", { type: "button", class: "remove", "aria-label": `Remove input image ${index} (${label})` }, "×"),
    );
    thumb.querySelector(".remove").addEventListener("click", () => remove(item));
    if (item.node) item.node.replaceWith(thumb);
    else list.append(thumb);
    item.node = thumb;
  }

  return {
    node,
    focus: () => picker.focus(),
    addFiles,
    add: (url, name = null) => add({ url, name }),
    // The URLs to send, once every upload is done; a failed upload stops the submit (no silent drop).
    async value() {
      await Promise.all(items.map((item) => item.pending).filter(Boolean));
      const failed = items.find((item) => item.error);
      if (failed) throw new Error(`${failed.error} — remove it or add it again`);
      return items.map((item) => item.url);
    },
    set(urls) {
      for (const item of [...items]) remove(item);
      for (const url of urls || []) add({ url });
    },
  };
}

// "Result 1 of “a red apple on a table”": an output reused as an input.
export function resultName(index, prompt, predictionId = "") {
  const what = prompt ? `“${prompt.length > 40 ? `${prompt.slice(0, 39)}…` : prompt}”` : `prediction ${predictionId.slice(0, 8)}`;
  return `Result ${index + 1} of ${what}`;
}

// What to call an image in labels until its name is known: a short form of its URL (data: URIs are long).
function shortName(url) {
  if (!url) return "image";
  if (url.startsWith("data:")) return `${url.slice(5, url.indexOf(";") > 0 ? url.indexOf(";") : 20)} data URI`;
  const path = url.split("?")[0];
  const own = /\/v1\/files\/(\w+)/.exec(path); // an upload or an output of this server
  if (own) return `file ${own[1].slice(0, 8)}`;
  return path.length > 48 ? `…${path.slice(-47)}` : path;
}

// Drag and drop onto the zone; the page-wide paste handler lives in app.js.
function wireDrop(zone, addFiles) {
  const over = (event) => {
    if (!event.dataTransfer || !Array.from(event.dataTransfer.types).includes("Files")) return;
    event.preventDefault(); // without this the browser opens the dropped file instead
    zone.classList.add("dragging");
  };
  zone.addEventListener("dragenter", over);
  zone.addEventListener("dragover", over);
  zone.addEventListener("dragleave", () => zone.classList.remove("dragging"));
  zone.addEventListener("drop", (event) => {
    event.preventDefault();
    zone.classList.remove("dragging");
    addFiles(event.dataTransfer?.files);
  });
}
