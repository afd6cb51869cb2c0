// The start page: find a member by id or by any identity, and what this key's role may read.
import { get } from "./api.js";
import { h, page, replace } from "./dom.js";
import { fill, refusalBox } from "./shell.js";

const IDENTITY_TYPES = ["phone", "card", "unionid", "openid", "email"];

export async function home() {
  const reads = h("div");
  replace(page(), h("h1", {}, "Members"), findForm(), h("h2", {}, "What this key may read"), reads);
  await fill(reads, "the key's reads", keyReads);
}

function findForm() {
  const message = h("div");
  const kind = h("select", { name: "by", id: "by" },
    h("option", { value: "member_id" }, "member id"), IDENTITY_TYPES.map((t) => h("option", { value: t }, t)));
  const value = h("input", { name: "value", id: "value", required: true, class: "grow", autocomplete: "off",
    placeholder: "m-123, +86138…, card number…" });
  const form = h("form", { class: "card", role: "search", "aria-label": "Find a member" },
    h("label", { for: "value" }, "Find a member by id or by any identity"),
    message,
    h("div", { class: "row" }, kind, h("div", { class: "grow" }, value), h("button", { type: "submit" }, "Find")));
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    let memberId = value.value.trim();
    if (kind.value !== "member_id") {
      try {
        memberId = (await get(`/v1/identities/${encodeURIComponent(kind.value)}/${encodeURIComponent(memberId)}`)).member_id;
      } catch (refusal) {
        replace(message, refusalBox(refusal, `The ${kind.value} ${memberId}`));
        return;
      }
    }
    window.location.assign(`/console/members/${encodeURIComponent(memberId)}`);
  });
  return form;
}

// The reads of /openapi.json, each marked with whether this key's role may call it (its x-roles).
async function keyReads() {
  const [who, openapi] = await Promise.all([get("/v1/api-keys/me"), get("/openapi.json")]);
  const reads = Object.entries(openapi.paths)
    .filter(([path, operations]) => operations.get && path.startsWith("/v1/") && operations.get["x-roles"])
    .map(([path, operations]) => ({ path, summary: operations.get.summary, allowed: operations.get["x-roles"].includes(who.role) }));
  return h("section", { class: "card" },
    h("p", {}, "Signed in as ", h("strong", {}, who.name), " with the role ", h("strong", { "data-field": "role" }, who.role),
      `: it may read ${reads.filter((r) => r.allowed).length} of the ${reads.length} reads of the API.`),
    h("ul", { class: "reads" }, reads.map((r) => h("li", { class: r.allowed ? "yes" : "no", "data-read": r.allowed ? "yes" : "no" },
      h("span", { class: "mono" }, `GET ${r.path}`), " ", h("span", { class: "muted" }, r.summary || "")))));
}
