// The public Replicate API, exactly as any other client uses it: nothing here is private to the page.
//
// Paths are relative ("v1/..."), so the page also works behind a proxy that serves Atelier under a
// prefix. URLs the server hands out (urls.get, urls.cancel, next, ...) are used as given.

export const MODEL = "openai/gpt-image-2";

// The API token lives in sessionStorage: it survives a reload (you come back to your results) but not
// the tab, and is never shared with other tabs or written to long-lived storage like localStorage.
// The OpenAI key is different: it is the user's own billing credential, so it stays in the form only.
const TOKEN_KEY = "atelier.apiToken";

let token = sessionStorage.getItem(TOKEN_KEY) || "";
let unauthorized = () => {};

export class ApiError extends Error {
  constructor(status, body) {
    super(describe(status, body));
    this.status = status;
    this.body = body || {};
    this.invalidFields = Array.isArray(this.body.invalid_fields) ? this.body.invalid_fields : [];
  }
}

// Replicate's problem JSON has title/detail; anything else (a proxy's HTML page) gets a plain message.
function describe(status, body) {
  if (body && typeof body.detail === "string" && body.detail) return body.detail.trim();
  if (body && typeof body.title === "string") return body.title;
  return `The server answered HTTP ${status}`;
}

export function hasToken() {
  return token !== "";
}

export function setToken(value) {
  token = value.trim();
  if (token) sessionStorage.setItem(TOKEN_KEY, token);
  else sessionStorage.removeItem(TOKEN_KEY);
}

// The app decides what a 401 looks like (a token field); this module only reports it.
export function onUnauthorized(handler) {
  unauthorized = handler;
}

export async function request(url, { method = "GET", json, form } = {}) {
  const headers = { Accept: "application/json" };
  if (token) headers.Authorization = `Bearer ${token}`;
  let body;
  if (json !== undefined) {
    headers["Content-Type"] = "application/json";
    body = JSON.stringify(json);
  } else if (form !== undefined) {
    body = form; // the browser sets the multipart boundary itself
  }
  const response = await fetch(url, { method, headers, body });
  const data = await readJSON(response);
  if (response.ok) return data;
  const error = new ApiError(response.status, data);
  if (response.status === 401) unauthorized(error);
  if (response.status === 429) error.retryAfter = Number(response.headers.get("Retry-After")) || null;
  throw error;
}

async function readJSON(response) {
  if (response.status === 204) return null;
  try {
    return await response.json();
  } catch {
    return null;
  }
}

export const api = {
  model: (address = MODEL) => request(`v1/models/${address}`),
  // The served models' names: the OpenAI door's model list (each is also `atelier/<name>` here).
  models: () => request("v1/models"),
  // Cog's health check (no token needed): READY, STARTING, or SETUP_FAILED with the reason in setup.logs.
  health: () => request("health-check"),
  // `previews`: step previews to ask for (Atelier's extension of the create body; 0 leaves it out).
  create: (input, { previews = 0, model = MODEL } = {}) =>
    request(`v1/models/${model}/predictions`, { method: "POST", json: previews ? { input, previews } : { input } }),
  get: (prediction) => request(prediction.urls.get),
  cancel: (prediction) => request(prediction.urls.cancel, { method: "POST" }),
  // Atelier's extension: forget a finished prediction and delete its images.
  remove: (prediction) => request(prediction.urls.get, { method: "DELETE" }),
  // An uploaded or output file's description (its name says where it came from).
  fileInfo: (id) => request(`v1/files/${id}`),
  list: (pageURL) => request(pageURL || "v1/predictions"),
  upload(file) {
    const form = new FormData();
    form.append("content", file, file.name || "image");
    form.append("filename", file.name || "image");
    if (file.type) form.append("type", file.type);
    return request("v1/files", { method: "POST", form });
  },
  // An uploaded file's urls.get names its metadata; its bytes need the token (or a signed URL).
  async fileBlob(fileURL) {
    const headers = token ? { Authorization: `Bearer ${token}` } : {};
    const response = await fetch(`${fileURL}/download`, { headers });
    if (!response.ok) throw new ApiError(response.status, await readJSON(response));
    return response.blob();
  },
};
