// The public API, called with the key kept in this tab's session storage only
// (never localStorage, never a cookie): closing the tab forgets it.

const KEY_ITEM = "loyalty-console-key";
const PAGE_LIMIT = 500;

export const session = {
  key: () => sessionStorage.getItem(KEY_ITEM),
  keep: (key) => sessionStorage.setItem(KEY_ITEM, key),
  forget: () => sessionStorage.removeItem(KEY_ITEM),
};

// An answer that is not 2xx, with the problem+json the server sent (CONTRACT §4).
export class Refusal extends Error {
  constructor(status, problem, retryAfter) {
    super(problem.detail || problem.title || `HTTP ${status}`);
    this.status = status;
    this.problem = problem;
    this.retryAfter = retryAfter;
  }
}

function url(path, query = {}) {
  const target = new URL(path, window.location.origin);
  for (const [name, value] of Object.entries(query)) {
    if (value !== undefined && value !== null && value !== "") target.searchParams.set(name, String(value));
  }
  return target;
}

// GET a path of the API; resolves to the parsed JSON, or throws a Refusal.
export async function get(path, query = {}, { accept = "application/json", onLine = null } = {}) {
  const key = session.key();
  if (!key) throw new Refusal(401, { code: "signed_out", detail: "sign in with an API key first" }, null);
  let response;
  try {
    response = await fetch(url(path, query), {
      headers: { Authorization: `Bearer ${key}`, Accept: accept },
      credentials: "omit",
      cache: "no-store",
    });
  } catch (failure) {
    throw new Refusal(0, { code: "network", title: "The service could not be reached", detail: String(failure) }, null);
  }
  if (!response.ok) {
    let problem = {};
    try { problem = await response.json(); } catch { problem = { title: response.statusText }; }
    throw new Refusal(response.status, problem, response.headers.get("Retry-After"));
  }
  if (onLine && (response.headers.get("Content-Type") || "").startsWith("application/x-ndjson")) {
    return readLines(response, onLine);
  }
  return response.json();
}

// An NDJSON answer line by line (progress reports); resolves to the last line.
async function readLines(response, onLine) {
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffered = "", last = null;
  for (;;) {
    const { value, done } = await reader.read();
    buffered += value || "";
    const lines = buffered.split("\n");
    buffered = done ? "" : lines.pop();
    for (const line of lines.filter((l) => l.trim())) {
      last = JSON.parse(line);
      // A failure after the answer began streaming comes as its last line, a problem (CONTRACT §4).
      if (last.status && last.code) throw new Refusal(last.status, last, null);
      onLine(last);
    }
    if (done) return last;
  }
}

// Every page of a paged read (`after`, `next_after`), handed to `onPage` as it arrives.
// Stops after `maxPages` and resolves to the `next_after` to continue from (null when done).
export async function eachPage(path, query, onPage, { after = null, maxPages = 100 } = {}) {
  for (let pages = 0; pages < maxPages; pages++) {
    const body = await get(path, { ...query, limit: PAGE_LIMIT, after });
    onPage(body);
    if (body.next_after === null || body.next_after === undefined) return null;
    after = body.next_after;
  }
  return after;
}
