// The form, built from the model's own schema (latest_version.openapi_schema, components.schemas.Input).
//
// Fields, order (x-order), defaults, enums and bounds all come from the API, so the page can never
// drift from what the server validates. PRESENTATION only chooses widgets and friendlier labels.
// Validation is the API's: the page checks nothing but required fields (with the API's own words,
// "is required") and shows every 422 invalid_fields description next to its field.

import { el } from "./dom.js";
import { imagesControl } from "./images.js";

// describe(ctx): the hint, in place of the schema's description where that is the seed model's own text
// and would not be true of what serves here (ctx.engine: "diffusers", "openai"...; ctx.model: its name).
const PRESENTATION = {
  prompt: { label: "Prompt", widget: "textarea", group: "main",
    placeholder: "A lighthouse on a basalt cliff at dusk, watercolor" },
  input_images: { label: "Input images", widget: "images", group: "main",
    note: "Give images to edit or combine them; leave empty to create from the prompt." },
  aspect_ratio: { label: "Aspect ratio or size", widget: "select",
    describe: (ctx) => (isOpenAI(ctx)
      ? "The size of the image; 'auto' lets the model pick. On OpenAI, sizes above 2560×1440 are experimental."
      : "The size of the image; 'auto' lets the model pick. A size larger than the model draws is drawn "
        + "smaller and upscaled, and the result says so.") },
  number_of_images: { label: "Number of images" },
  seed: { label: "Seed", widget: "number",
    describe: (ctx) => (isOpenAI(ctx)
      ? "OpenAI cannot reproduce an image from a seed, so this model takes none."
      : "Empty: a random one. The same seed and settings give the same image.") },
  quality: { quietHint: true, label: "Quality" },
  background: { quietHint: true, label: "Background" },
  output_format: { quietHint: true, label: "Output format" },
  output_compression: { label: "Compression", widget: "range",
    note: "jpeg and webp: encoder quality (100 = best, largest). png: zlib effort only." },
  moderation: { quietHint: true, label: "Moderation" },
  openai_api_key: { label: "OpenAI API key", group: "advanced",
    describe: (ctx) => (isOpenAI(ctx)
      ? "Optional: your own OpenAI key, billed to you; without one the server's own key is used."
      : `Optional: with your own OpenAI key the request runs on OpenAI's gpt-image-2, billed to you, `
        + `instead of ${ctx.model || "this server's model"}.`),
    note: "Kept in this page's memory only: never stored, and gone when you reload." },
  user_id: { label: "User id", group: "advanced",
    describe: () => "Optional: who the image is for. Recorded with the prediction (per-user limits count it); "
      + "passed on to OpenAI only when the request runs there." },
};

// Atelier's extensions of the input: accepted by the API, not in the published schema (docs/api.md).
const EXTENSIONS = {
  seed: { type: "integer", title: "Seed", minimum: 0, maximum: 4294967295, "x-after": "number_of_images" },
};

const isOpenAI = (ctx) => ctx?.engine === "openai";

// quietHint: the schema's description only repeats the label, so screen readers get it, eyes do not.

// Readable names for the ratio choices; the values themselves are the schema's.
const RATIO_NAMES = {
  "1:1": "square", "3:2": "landscape", "2:3": "portrait", "16:9": "wide", "9:16": "tall", auto: "model picks",
};
const EXPERIMENTAL_PIXELS = 2560 * 1440; // OpenAI's own limit: larger sizes are experimental there
const RADIO_LIMIT = 4; // small enums read best as a row of buttons; longer ones as a select

export function buildForm(container, schema, ctx = {}) {
  const components = schema.components.schemas;
  const input = components.Input;
  const required = new Set(input.required || []);
  const ordered = Object.entries(input.properties).sort(([, a], [, b]) => (a["x-order"] ?? 0) - (b["x-order"] ?? 0));
  for (const [name, prop] of Object.entries(EXTENSIONS)) {
    if (name in input.properties) continue; // published after all: the schema's own wins
    const after = ordered.findIndex(([other]) => other === prop["x-after"]);
    ordered.splice(after < 0 ? ordered.length : after + 1, 0, [name, prop]);
  }
  const fields = ordered.map(([name, prop]) => makeField(name, resolve(prop, components), required.has(name)));

  const advanced = el("details", { class: "advanced" }, el("summary", {}, "Key and user id"));
  const settings = el("div", { class: "settings" });
  container.replaceChildren();
  for (const field of fields) {
    const group = PRESENTATION[field.name]?.group;
    if (group === "main") container.append(field.node);
    else if (group === "advanced") advanced.append(field.node);
    else settings.append(field.node);
  }
  container.append(settings, advanced);
  container.removeAttribute("aria-busy");
  const byName = new Map(fields.map((f) => [f.name, f]));
  const api = formAPI(byName, advanced);
  api.setContext(ctx);
  return api;
}

// An enum property is `allOf: [{$ref}]` to a string enum schema (Cog's shape): fold it in.
function resolve(prop, components) {
  const ref = prop.allOf?.[0]?.$ref;
  if (!ref) return prop;
  const target = components[ref.split("/").pop()] || {};
  return { ...target, ...prop, enum: target.enum };
}

function makeField(name, prop, isRequired) {
  const look = PRESENTATION[name] || {};
  const id = `f-${name}`;
  const hintId = `${id}-hint`;
  const errorId = `${id}-error`;
  const label = look.label || prop.title || name;
  const widget = look.widget || defaultWidget(prop);
  const control = WIDGETS[widget](id, prop, look, `${hintId} ${errorId}`);
  const hintText = (ctx) => [look.describe ? look.describe(ctx) : prop.description, look.note]
    .filter(Boolean).map(sentence).join(" ");
  const hint = hintText({});
  const caption = isRequired ? [label, el("span", { class: "required", "aria-hidden": "true" }, " *")] : label;
  const heading = control.group ? el("legend", {}, caption) : el("label", { for: id }, caption);
  const node = el(control.group ? "fieldset" : "div", { class: `field field-${widget}`, "data-field": name },
    heading, control.node,
    el("p", { id: hintId, class: look.quietHint ? "sr-only" : "hint small muted" }, hint),
    el("p", { id: errorId, class: "field-error" }),
  );
  if (control.group) node.setAttribute("aria-describedby", `${hintId} ${errorId}`);
  const field = { name, prop, node, control, isRequired, label, error: node.querySelector(".field-error"),
    hint: node.querySelector(`#${hintId}`), hintText };
  field.reset = () => control.set(prop.default ?? null);
  field.reset();
  return field;
}

function sentence(text) {
  return /[.!?]$/.test(text) ? text : `${text}.`;
}

function defaultWidget(prop) {
  if (prop.enum) return prop.enum.length <= RADIO_LIMIT ? "radios" : "select";
  if (prop.type === "integer" || prop.type === "number") return "number";
  if (prop.format === "password") return "password";
  return "text";
}

// Each widget: { node, get(), set(value), focus(), group? }. get() returns what goes on the wire.
const WIDGETS = {
  textarea(id, prop, look, describedBy) {
    const node = el("textarea", { id, rows: 4, placeholder: look.placeholder, "aria-describedby": describedBy,
      spellcheck: "true" });
    return textual(node);
  },
  text(id, prop, look, describedBy) {
    return textual(el("input", { id, type: "text", autocomplete: "off", "aria-describedby": describedBy }));
  },
  password(id, prop, look, describedBy) {
    return textual(el("input", { id, type: "password", autocomplete: "off", spellcheck: "false",
      "aria-describedby": describedBy }));
  },
  number(id, prop, look, describedBy) {
    const node = el("input", { id, type: "number", inputmode: "numeric", step: 1, min: prop.minimum,
      max: prop.maximum, "aria-describedby": describedBy });
    return { node, get: () => integer(node.value), set: (v) => { node.value = v ?? ""; }, focus: () => node.focus() };
  },
  range(id, prop, look, describedBy) {
    const input = el("input", { id, type: "range", step: 1, min: prop.minimum, max: prop.maximum,
      "aria-describedby": describedBy });
    const shown = el("output", { for: id, class: "range-value" });
    const sync = () => { shown.value = input.value; };
    input.addEventListener("input", sync);
    return {
      node: el("div", { class: "range" }, input, shown),
      get: () => integer(input.value),
      set: (v) => { input.value = v ?? prop.minimum ?? 0; sync(); },
      focus: () => input.focus(),
    };
  },
  select(id, prop, look, describedBy) {
    const node = el("select", { id, "aria-describedby": describedBy }, ...optionGroups(prop.enum));
    return { node, get: () => node.value, set: (v) => { node.value = v ?? prop.enum[0]; }, focus: () => node.focus(),
      // Option labels depend on the model: "(experimental)" is OpenAI's word for its largest sizes.
      setContext: (ctx) => { for (const o of node.querySelectorAll("option")) o.textContent = optionLabel(o.value, ctx); } };
  },
  radios(id, prop) {
    const radios = prop.enum.map((value) => el("input", { type: "radio", name: id, id: `${id}-${value}`, value }));
    const node = el("div", { class: "segmented" },
      ...radios.map((radio) => el("label", { for: radio.id }, radio, el("span", {}, radio.value))));
    const checked = () => radios.find((r) => r.checked);
    return {
      node, group: true,
      get: () => checked()?.value,
      set: (v) => { for (const r of radios) r.checked = r.value === v; },
      focus: () => (checked() || radios[0]).focus(),
    };
  },
  images(id, prop, look, describedBy) {
    const control = imagesControl(id, describedBy);
    return { node: control.node, images: control, group: true, get: () => control.value(),
      set: (v) => control.set(v), focus: () => control.focus() };
  },
};

function textual(node) {
  return { node, get: () => node.value, set: (v) => { node.value = v ?? ""; }, focus: () => node.focus() };
}

// A valid whole number goes as a number; anything else goes as typed, so the API names the problem.
function integer(text) {
  return /^-?\d+$/.test(text.trim()) ? Number(text) : text;
}

// Ratios first, then explicit sizes (the schema lists both in one enum).
function optionGroups(values) {
  const ratios = values.filter((v) => !/^\d+x\d+$/.test(v));
  const sizes = values.filter((v) => /^\d+x\d+$/.test(v));
  const option = (v) => el("option", { value: v }, optionLabel(v));
  if (!sizes.length || !ratios.length) return values.map(option);
  return [el("optgroup", { label: "Aspect ratios" }, ratios.map(option)),
    el("optgroup", { label: "Exact sizes" }, sizes.map(option))];
}

function optionLabel(value, ctx = {}) {
  const size = /^(\d+)x(\d+)$/.exec(value);
  if (!size) return RATIO_NAMES[value] ? `${value} (${RATIO_NAMES[value]})` : value;
  const experimental = isOpenAI(ctx) && Number(size[1]) * Number(size[2]) > EXPERIMENTAL_PIXELS;
  return `${size[1]}×${size[2]}${experimental ? " (experimental)" : ""}`;
}

function formAPI(byName, advanced) {
  let context = {};
  return {
    // What serves the request (the model picker's choice): hints and what the model can take follow it.
    setContext(ctx) {
      context = ctx || {};
      for (const field of byName.values()) {
        field.hint.textContent = field.hintText(context);
        field.control.setContext?.(context);
      }
      const seed = byName.get("seed");
      seed?.node.querySelector("input")?.toggleAttribute("disabled", isOpenAI(context));
    },
    // "output_format" → "Output format": what the page calls a field, for messages that name fields.
    label: (name) => byName.get(name)?.label || name,
    // The API's words with its field names replaced by the labels on screen: "input.output_format: set
    // output_format to 'png'" → "Output format: set Output format to 'png'". Bare one-word names (prompt,
    // quality...) are ordinary words too, so only a leading "name:" and names with "_" are replaced.
    labelled(text) {
      let out = String(text || "").replace(/(^|\n|- )input\./g, "$1");
      out = out.replace(/(^|\n|- )([a-z][a-z_]*)(\[\d+\])?:/g,
        (all, start, name, index) => (byName.has(name) ? `${start}${byName.get(name).label}${index || ""}:` : all));
      return out.replace(/\b[a-z]+(?:_[a-z]+)+\b/g, (name) => (byName.has(name) ? byName.get(name).label : name));
    },
    // The request's input: every field the schema has; empty optional text and lists are left out.
    async values() {
      const input = {};
      for (const field of byName.values()) {
        if (field.node.querySelector("input:disabled")) continue; // the model takes none (seed on OpenAI)
        const value = await field.control.get();
        const empty = value === "" || value === undefined || (Array.isArray(value) && value.length === 0);
        // Fields without a default are optional: empty means "not given". An emptied field that has
        // a default is sent as it is, so the API says what is wrong instead of the default being used.
        if (empty && !field.isRequired && (field.prop.default === undefined || value === undefined)) continue;
        input[field.name] = value;
      }
      return input;
    },
    // The one client-side check: required fields left empty, in the API's words for a missing field.
    missing(input) {
      return [...byName.values()]
        .filter((f) => f.isRequired && (input[f.name] === undefined || String(input[f.name]).trim() === ""))
        .map((f) => ({ type: "required", field: `input.${f.name}`, description: "is required" }));
    },
    // A past prediction's input back into the form; a redacted key is left as it is in the form.
    fill(input) {
      for (const field of byName.values()) {
        if (field.name === "openai_api_key") continue;
        if (field.name in input && input[field.name] !== null) field.control.set(input[field.name]);
        else field.reset();
      }
    },
    reset() {
      for (const field of byName.values()) if (field.name !== "openai_api_key") field.reset();
    },
    addImage: (url, name) => byName.get("input_images")?.control.images.add(url, name),
    addFiles: (files) => byName.get("input_images")?.control.images.addFiles(files),
    focus: (name) => byName.get(name)?.control.focus(),
    clearErrors() {
      for (const field of byName.values()) setError(field, "");
    },
    // Shows each problem next to its field; returns those that belong to no field (shown by the caller).
    showErrors(problems) {
      const messages = new Map();
      const unplaced = [];
      for (const problem of problems) {
        const [name, rest] = splitField(problem.field);
        if (!byName.has(name)) {
          unplaced.push(problem);
          continue;
        }
        const description = this.labelled(problem.description);
        const text = rest ? `${rest}: ${description}` : description;
        messages.set(name, [...(messages.get(name) || []), text]);
      }
      for (const [name, texts] of messages) setError(byName.get(name), texts.join(" "));
      const first = [...byName.values()].find((f) => messages.has(f.name));
      if (first && first.node.closest("details") === advanced) advanced.open = true;
      first?.control.focus();
      return unplaced;
    },
  };
}

// "input.input_images[0]" -> ["input_images", "[0]"]; "input.quality" -> ["quality", ""].
function splitField(field) {
  const bare = String(field || "").replace(/^input\./, "");
  const match = /^([A-Za-z_]\w*)(.*)$/.exec(bare);
  return match ? [match[1], match[2].replace(/^\./, "")] : [bare, ""];
}

function setError(field, text) {
  field.error.textContent = text;
  field.node.classList.toggle("invalid", Boolean(text));
  const targets = field.node.querySelectorAll("input, select, textarea");
  for (const node of targets) {
    if (text) node.setAttribute("aria-invalid", "true");
    else node.removeAttribute("aria-invalid");
  }
}
