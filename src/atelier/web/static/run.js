// Following one prediction live: its SSE stream (urls.stream), with polling as the fallback.
//
// Replicate's stream has only four events — logs, output, error, done — so the page derives the rest:
// * status: "starting" (queued) until the first log line, then "processing"; the final status,
//   metrics and outputs come from GET urls.get once `done` arrives.
// * progress: parsed from the tqdm-style progress lines in the logs (" 50%|█████     | 2/4 [00:01<…").
// * step previews: Replicate's stream has none; Atelier adds `preview` events when the stream URL is
//   opened with ?previews=1 (docs/api.md), for predictions created with `previews`. The official clients
//   never ask, so their streams stay Replicate's.

import { api } from "./api.js";

const PROGRESS_LINE = /(\d+)\/(\d+)\s*\[/;
const POLL_MS = 1000;
export const TERMINAL = new Set(["succeeded", "failed", "canceled"]);

// "rendering 1 at 1024x1024 (call 2 of 3, 4 steps)": which model call of how many, and its steps.
const CALL_LINE = /^rendering .*\((?:call (\d+) of (\d+), )?(\d+) steps\)/;

export function parseCall(line) {
  const match = CALL_LINE.exec(line);
  if (!match) return null;
  return { index: Number(match[1] || 1), calls: Number(match[2] || 1), steps: Number(match[3]) };
}

export function parseProgress(line) {
  const match = PROGRESS_LINE.exec(line);
  if (!match) return null;
  const step = Number(match[1]);
  const total = Number(match[2]);
  return total > 0 && step <= total ? { step, total } : null;
}

// on: { status(name), log(line), error(detail), preview?({step, total, image}) }. Returns
// { done: Promise<prediction|null>, stop() }; `done` resolves with the finished prediction, or null when
// stop() was called first. With on.preview the stream is opened with ?previews=1.
export function follow(prediction, on) {
  let stopped = false;
  let source = null;
  const close = () => {
    source?.close();
    source = null;
  };
  const done = new Promise((resolve, reject) => {
    const settle = (promise) => promise.then(resolve, reject);
    if (!prediction.urls.stream || typeof EventSource === "undefined") {
      settle(poll(prediction, on, () => stopped));
      return;
    }
    source = new EventSource(on.preview ? withPreviews(prediction.urls.stream) : prediction.urls.stream);
    let started = false;
    source.addEventListener("preview", (event) => {
      const preview = parsed(event.data);
      if (preview?.image) on.preview(preview);
    });
    source.addEventListener("logs", (event) => {
      if (!started) {
        started = true;
        on.status("processing");
      }
      on.log(event.data);
    });
    source.addEventListener("error", (event) => {
      // A server-sent `error` event (the prediction failed) and a broken connection share this name.
      if (event instanceof MessageEvent) {
        on.error(detailOf(event.data));
        return;
      }
      // EventSource would reconnect and replay every log line from the start: poll instead.
      close();
      settle(poll(prediction, on, () => stopped, started));
    });
    source.addEventListener("done", () => {
      close();
      settle(stopped ? Promise.resolve(null) : poll(prediction, on, () => stopped, true, true));
    });
  });
  return {
    done,
    stop() {
      stopped = true;
      close();
    },
  };
}

function withPreviews(streamURL) {
  const url = new URL(streamURL, location.href);
  url.searchParams.set("previews", "1");
  return url.href;
}

function parsed(data) {
  try {
    return JSON.parse(data);
  } catch {
    return null;
  }
}

function detailOf(data) {
  return parsed(data)?.detail || data;
}

// GET the prediction until it is over. `quiet`: the logs were already shown (by the stream), so only
// the final state is wanted; otherwise new log lines are passed on as they appear.
async function poll(prediction, on, stopped, started = false, quiet = false) {
  let shown = quiet ? Infinity : 0;
  for (;;) {
    if (stopped()) return null;
    const current = await api.get(prediction);
    const lines = (current.logs || "").split("\n").filter((line) => line !== "");
    for (const line of lines.slice(shown)) on.log(line);
    shown = Math.max(shown, lines.length);
    if (!started && current.status !== "starting") {
      started = true;
      on.status(current.status);
    }
    if (TERMINAL.has(current.status)) return current;
    await new Promise((wake) => setTimeout(wake, POLL_MS));
  }
}
