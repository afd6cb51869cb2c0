// The operators' and auditors' pages: liability by month, campaigns and their budgets,
// projection and publication lag, chain verification (the programme's versions: programme.js).
import { eachPage, get } from "./api.js";
import { fieldList, figures, h, page, replace, table } from "./dom.js";
import { points, text, time, yuan } from "./format.js";
import { asOfForm, fill } from "./shell.js";

const LAG_REFRESH_MS = 5000;

// -- liability ------------------------------------------------------------------------

export async function liability() {
  const asOf = new URLSearchParams(window.location.search).get("as_of") || "";
  const slot = h("div");
  replace(page(), h("h1", {}, "Points liability by month"), asOfForm("/console/liability", asOf), slot);
  let drawChart = null;
  await fill(slot, "the liability", async () => {
    const answer = await get("/v1/programme/liability", { as_of: asOf });
    const chart = h("div", { class: "chart", "data-chart": "liability", role: "img",
      "aria-label": "Points issued, redeemed and expired by month, and outstanding at each month's end" });
    const view = h("div", {},
      figures([
        ["outstanding", points(answer.outstanding), "outstanding"],
        ["earned", points(answer.earned), "earned"],
        ["clawed back", points(answer.clawed), "clawed"],
        ["adjusted", points(answer.adjusted), "adjusted"],
        ["redeemed", points(answer.redeemed), "redeemed"],
        ["expired", points(answer.expired), "expired"],
        ["debt", points(answer.debt), "debt"],
        ["as of", time(answer.as_of), "as_of", "small"],
      ]),
      h("h2", {}, "By month (programme timezone)"), chart,
      h("h2", {}, "The figures charted"), monthTable(answer.by_month));
    drawChart = () => drawLiability(chart, answer.by_month);
    return view;
  });
  // Drawn once its element is in the page: Chart.js sizes the canvas to its parent.
  if (drawChart) drawChart();
}

function monthTable(months) {
  return table([
    { label: "month", cell: (m) => m.month },
    { label: "issued (earned)", num: true, cell: (m) => points(m.earned) },
    { label: "clawed back", num: true, cell: (m) => points(m.clawed) },
    { label: "adjusted", num: true, cell: (m) => points(m.adjusted) },
    { label: "redeemed", num: true, cell: (m) => points(m.redeemed) },
    { label: "expired", num: true, cell: (m) => points(m.expired) },
    { label: "outstanding at the end", num: true, cell: (m) => points(m.outstanding) },
  ], months, () => ({ "data-row": "month" }));
}

function drawLiability(element, months) {
  if (!window.Chart) {
    replace(element, h("p", { class: "refusal" }, "The chart library did not load; the table below has the figures."));
    return;
  }
  const canvas = h("canvas");
  replace(element, canvas);
  const bars = (label, key, color) => ({ type: "bar", label, data: months.map((m) => m[key]), backgroundColor: color, order: 2 });
  new window.Chart(canvas, {
    data: {
      labels: months.map((m) => m.month),
      datasets: [
        { type: "line", label: "outstanding", data: months.map((m) => m.outstanding), borderColor: "#1d2433",
          backgroundColor: "#1d2433", order: 1 },
        bars("issued", "earned", "#1f5fbf"),
        bars("redeemed", "redeemed", "#2f9e6b"),
        bars("expired", "expired", "#d98c1f"),
      ],
    },
    options: {
      animation: false,
      responsive: true,
      maintainAspectRatio: false,
      interaction: { mode: "index", intersect: false },
      scales: { y: { beginAtZero: true, title: { display: true, text: "points" } } },
    },
  });
  element.setAttribute("data-rendered", String(months.length));
}

// -- campaigns ------------------------------------------------------------------------

function reward(r) {
  if (!r) return "—";
  if (r.kind === "multiplier") return `×${r.multiplier_pct}%`;
  if (r.kind === "bonus") return `+${points(r.points)} points`;
  if (r.kind === "coupon") {
    return `coupon ${r.template}: ${yuan(r.value_cents)} off ${yuan(r.min_spend_cents)}, ${points(r.valid_days)} days`;
  }
  return JSON.stringify(r);
}

function budgetUse(awarded, budget) {
  if (budget === null || budget === undefined) return `${points(awarded)} (no cap)`;
  return h("span", {}, h("meter", { min: 0, max: budget, value: awarded, title: `${awarded} of ${budget}` }),
    ` ${points(awarded)} of ${points(budget)}`);
}

export async function campaigns() {
  const slot = h("div");
  replace(page(), h("h1", {}, "Campaigns and their budgets"), slot);
  await fill(slot, "the campaigns", async () => {
    const listed = [];
    const next = await eachPage("/v1/campaigns", {}, (answer) => listed.push(...answer.campaigns), { maxPages: 20 });
    if (!listed.length) return h("p", { class: "muted" }, "No campaigns yet.");
    return h("div", {}, next !== null ? h("p", { class: "notice" }, `The first ${listed.length} campaigns.`) : null,
      table([
        { label: "campaign", cell: (c) => h("div", {}, h("span", { class: "mono" }, c.campaign_id),
          h("div", { class: "muted" }, text(c.name))) },
        { label: "status", cell: (c) => c.status },
        { label: "reward", wrap: true, cell: (c) => reward(c.reward) },
        { label: "conditions", wrap: true, cell: (c) => Object.keys(c.conditions).length ? fieldList(c.conditions) : "none" },
        { label: "points granted", cell: (c) => budgetUse(c.awarded_points, c.budget_points) },
        { label: "coupons granted", cell: (c) => budgetUse(c.awarded_coupons, c.budget_coupons) },
        { label: "members rewarded", num: true, cell: (c) => points(c.members_rewarded) },
        { label: "per member", cell: (c) => c.per_member_limit === null ? "no cap" : `${c.per_member_limit} a ${c.per_member_period}` },
        { label: "window", cell: (c) => h("div", {}, `from ${time(c.starts_at)}`, h("br"), `to ${time(c.ends_at)}`,
          c.ended_at ? h("div", { class: "bad" }, `ended ${c.ended_at}`) : null) },
      ], listed, () => ({ "data-row": "campaign" })));
  });
}

// -- projections ----------------------------------------------------------------------

export async function projections() {
  const slot = h("div"), stamp = h("p", { class: "muted", "data-field": "read_at" });
  replace(page(), h("h1", {}, "Projections and publication"), stamp, slot);
  let lastReadAt = null;
  const refresh = async () => {
    const readAt = new Date().toISOString();
    const read = await fill(slot, "the projections", async () => {
      const answer = await get("/v1/projections");
      return table([
        { label: "name", cell: (p) => p.name },
        { label: "state", wrap: true, cell: projectionState },
        { label: "position", num: true, cell: (p) => points(p.position) },
        { label: "head", num: true, cell: (p) => points(p.head) },
        { label: "lag (events)", num: true, cell: (p) => points(p.lag_events) },
        { label: "lag (seconds)", num: true, cell: (p) => text(p.lag_seconds) },
      ], answer.projections, () => ({ "data-row": "projection" }));
    });
    if (read) lastReadAt = readAt;
    stamp.textContent = readStamp(read, readAt, lastReadAt);
    window.setTimeout(refresh, LAG_REFRESH_MS);
  };
  await refresh();
}

// Only a read that succeeded says when the figures were read; a failed one says so and when it was tried.
function readStamp(read, readAt, lastReadAt) {
  const again = `read again every ${LAG_REFRESH_MS / 1000} s.`;
  if (read) return `Read at ${readAt}; ${again}`;
  const last = lastReadAt ? `the last read that succeeded was at ${lastReadAt}` : "no read has succeeded yet";
  return `The read at ${readAt} failed; ${last}; ${again}`;
}

// The state, and for a failed publisher the reason the API gives (CONTRACT §7).
function projectionState(p) {
  return h("div", {}, h("span", { class: p.state === "live" ? "ok" : "bad" }, p.state),
    p.reason ? h("div", { class: "reason", "data-field": "reason" }, p.reason) : null);
}

// -- verification ---------------------------------------------------------------------

const VERIFY = "/v1/audit/verify";

export async function verify(who) {
  const slot = h("div"), control = h("p");
  replace(page(), h("h1", {}, "Chain verification"),
    h("p", { class: "muted" }, "Recomputes every event's SHA-256 from position 1 to the head as it is when it starts; " +
      "the first changed, removed or reordered event is named by its position."),
    control, slot);
  await fill(control, "who may verify", () => verifyButton(who.role, slot));
}

// The button, or, for a role the server does not let verify (/openapi.json's x-roles: the page keeps
// no rule of its own), the button disabled with the reason.
async function verifyButton(role, slot) {
  const roles = (await get("/openapi.json")).paths[VERIFY].get["x-roles"];
  const start = h("button", { type: "button", disabled: !roles.includes(role) }, "Verify the hash chain");
  if (start.disabled) {
    return h("span", {}, start, " ", h("span", { class: "muted", "data-field": "verify_refused" },
      `This key's role (${role}) may not verify the chain: GET ${VERIFY} admits ${roles.join(" and ")}.`));
  }
  start.addEventListener("click", () => runVerification(start, slot));
  return start;
}

// Streams the check's progress into a bar, then shows the report.
async function runVerification(start, slot) {
  start.disabled = true;
  const bar = h("progress", { class: "wide" });
  const said = h("p", { class: "muted" }, "Verifying…");
  const began = Date.now();
  await fill(slot, "the verification", async () => {
    replace(slot, bar, said);
    const report = await get(VERIFY, {}, {
      accept: "application/x-ndjson, application/json",
      onLine: (line) => {
        if (line.ok !== undefined) return;
        bar.max = Math.max(line.head_position, 1);
        bar.value = line.checked;
        said.textContent = `${line.checked} of ${line.head_position} events checked…`;
      },
    });
    return verdict(report, Date.now() - began);
  });
  start.disabled = false;
}

function verdict(report, elapsedMs) {
  return h("section", { class: "card", "data-verdict": report.ok ? "ok" : "bad" },
    report.ok
      ? h("p", { class: "ok" }, "The chain verifies: no event was changed, removed or reordered.")
      : h("p", { class: "bad" }, `The chain is broken at position ${report.first_bad_position}.`),
    figures([
      ["checked", points(report.checked), "checked"],
      ["head position", points(report.head_position), "head_position"],
      ["first bad position", text(report.first_bad_position), "first_bad_position"],
      ["took", `${(elapsedMs / 1000).toFixed(1)} s`, "elapsed"],
    ]),
    h("p", { class: "mono wrap" }, `head hash ${report.head_hash}`));
}
