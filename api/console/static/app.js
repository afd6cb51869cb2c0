// The console's entry: one shell for every /console path; this module reads the path and
// draws the page. Every figure comes from the public API (CONTRACT §4, §6), called with the
// key kept in this tab's session storage.
import { get, session } from "./api.js";
import { h, page, replace } from "./dom.js";
import { refusalBox, signInForm } from "./shell.js";

const PAGES = [
  [/^\/console\/?$/, () => import("./home.js").then((m) => m.home())],
  [/^\/console\/members\/([^/]+)\/?$/, (match) => import("./member.js").then((m) => m.member(decodeURIComponent(match[1])))],
  [/^\/console\/liability\/?$/, () => import("./ops.js").then((m) => m.liability())],
  [/^\/console\/campaigns\/?$/, () => import("./ops.js").then((m) => m.campaigns())],
  [/^\/console\/programme\/?$/, () => import("./programme.js").then((m) => m.programme())],
  [/^\/console\/projections\/?$/, () => import("./ops.js").then((m) => m.projections())],
  [/^\/console\/verify\/?$/, (match, who) => import("./ops.js").then((m) => m.verify(who))],
];

function markCurrentLink() {
  for (const link of document.querySelectorAll(".bar nav a")) {
    const here = link.getAttribute("href") === window.location.pathname.replace(/\/$/, "") ||
      (link.getAttribute("href") === "/console" && window.location.pathname.startsWith("/console/members/"));
    if (here) link.setAttribute("aria-current", "page");
  }
}

async function showWho() {
  const who = await get("/v1/api-keys/me");
  document.getElementById("who-name").textContent = `${who.name} · ${who.role}`;
  document.getElementById("who").hidden = false;
  return who;
}

async function show() {
  const found = PAGES.map(([pattern, draw]) => [window.location.pathname.match(pattern), draw]).find(([m]) => m);
  if (!found) {
    replace(page(), h("h1", {}, "No such page"), h("p", {}, h("a", { href: "/console" }, "Back to the console")));
    return;
  }
  if (!session.key()) {
    replace(page(), signInForm(show));
    return;
  }
  let who;
  try {
    who = await showWho();
  } catch (refusal) {
    if (refusal.status === 401) session.forget();
    replace(page(), refusalBox(refusal), session.key() ? null : signInForm(show));
    return;
  }
  const [match, draw] = found;
  await draw(match, who);
  document.body.dataset.ready = "true"; // every read of the page has answered (a hook for tests)
}

markCurrentLink();
document.getElementById("sign-out").addEventListener("click", () => {
  session.forget();
  window.location.assign("/console");
});
show();
