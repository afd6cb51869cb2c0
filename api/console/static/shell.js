// What every page shares: the sign-in form and the way a refusal is told.
import { get, session } from "./api.js";
import { h, replace } from "./dom.js";

const STATUS_TEXT = {
  0: "The service could not be reached",
  401: "The API refused the key (401 Unauthorized): it is unknown or revoked",
  403: "This key's role may not read this (403 Forbidden)",
  404: "Not found (404)",
  408: "The request took too long (408)",
  422: "The API refused the request (422)",
  429: "Too many requests for this key (429)",
  503: "The service is unavailable for now (503)",
};

// A refusal of the API, said plainly: status, the problem's code and detail, when to retry.
export function refusalBox(refusal, what = null) {
  const problem = refusal.problem || {};
  let headline = STATUS_TEXT[refusal.status] || `The API answered ${refusal.status} ${problem.title || ""}`;
  if (refusal.status === 404 && problem.code === "not_found") {
    headline = "The server does not offer this (404): it has no such route";
  }
  return h("div", { class: "refusal", role: "alert", "data-status": refusal.status },
    h("strong", {}, what ? `${what[0].toUpperCase()}${what.slice(1)}: ${headline}` : headline),
    problem.detail ? h("span", {}, problem.detail) : null,
    problem.code ? h("span", { class: "mono" }, ` (${problem.code})`) : null,
    refusal.retryAfter ? h("div", {}, `Retry after ${refusal.retryAfter} s.`) : null);
}

// Runs `load` and puts what it returns into `slot`, or the refusal when the API refuses;
// resolves to whether it loaded.
export async function fill(slot, what, load) {
  replace(slot, h("p", { class: "muted" }, `Loading ${what}…`));
  try {
    replace(slot, await load());
    return true;
  } catch (failure) {
    if (failure.status === undefined) throw failure;
    replace(slot, refusalBox(failure, what));
    return false;
  }
}

export function signInForm(then) {
  const message = h("div");
  const input = h("input", { name: "key", type: "password", autocomplete: "off", required: true, class: "grow",
    id: "key", spellcheck: "false", placeholder: "lk_…" });
  const form = h("form", { class: "card", "aria-label": "Sign in" },
    h("h1", {}, "Sign in"),
    h("p", { class: "muted" }, "An API key of the ledger. It stays in this tab only (session storage) and is sent " +
      "to this service's API alone; closing the tab forgets it."),
    message,
    h("label", { for: "key" }, "API key"),
    h("div", { class: "row" }, input, h("button", { type: "submit" }, "Sign in")));
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    session.keep(input.value.trim());
    try {
      await get("/v1/api-keys/me");
    } catch (refusal) {
      session.forget();
      replace(message, refusalBox(refusal, "Sign-in"));
      return;
    }
    then();
  });
  return form;
}

// A date to read the page as of (RFC 3339), sent as ?as_of= to the page itself.
export function asOfForm(path, asOf) {
  const input = h("input", { name: "as_of", id: "as_of", value: asOf, class: "grow", placeholder: "2025-01-31T16:00:00Z" });
  return h("form", { class: "card", method: "get", action: path },
    h("label", { for: "as_of" }, "As of (RFC 3339; empty for now)"),
    h("div", { class: "row" }, h("div", { class: "grow" }, input), h("button", { type: "submit" }, "Show"),
      asOf ? h("a", { href: path }, "now") : null));
}
