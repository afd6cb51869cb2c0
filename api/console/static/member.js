// A member's page: balance and tier now or as of a date, the whole ledger trail with running
// balance and the events behind each line, coupons, and the raw event stream.
import { eachPage, get } from "./api.js";
import { figures, h, page, replace, table, tableRow } from "./dom.js";
import { points, text, time, yuan } from "./format.js";
import { asOfForm, fill, refusalBox } from "./shell.js";

// 40 pages of 500 (20,000 rows) at once, then a button loads further ones. The browser tests lower it
// (window.consolePagesAtOnce, set before the page loads) to reach the button without 20,000 events.
const PAGES_AT_ONCE = window.consolePagesAtOnce || 40;

export async function member(memberId) {
  const asOf = new URLSearchParams(window.location.search).get("as_of") || "";
  const base = `/v1/members/${encodeURIComponent(memberId)}`;
  const slots = { figures: h("div"), ledger: h("div"), coupons: h("div"), events: h("div") };
  const header = h("div");
  replace(page(),
    header,
    asOfForm(`/console/members/${encodeURIComponent(memberId)}`, asOf),
    h("h2", {}, asOf ? `Balance and tier as of ${asOf}` : "Balance and tier now"), slots.figures,
    h("h2", {}, "Ledger trail"), slots.ledger,
    h("h2", {}, "Coupons (their state now)"), slots.coupons,
    h("h2", {}, "Events (the member's stream, with hashes)"), slots.events);
  let profile;
  try {
    profile = await get(base);
  } catch (refusal) {
    replace(header, h("h1", {}, `Member ${memberId}`), refusalBox(refusal, `Member ${memberId}`));
    for (const slot of Object.values(slots)) replace(slot);
    return;
  }
  replace(header, heading(profile));
  const atTime = balanceAndTierAt(base, profile, asOf);
  await Promise.all([
    fill(slots.figures, "the balance and tier", async () => balanceAndTier(...await atTime)),
    fill(slots.ledger, "the ledger trail", async () => ledger(base, await greyAfter(atTime, asOf))),
    fill(slots.coupons, "the coupons", () => coupons(base)),
    fill(slots.events, "the events", () => events(base)),
  ]);
}

function heading(profile) {
  return h("section", { class: "card" },
    h("h1", {}, `Member ${profile.member_id}`),
    h("p", {}, `${profile.status} · ${text(profile.lifecycle)} · enrolled ${time(profile.enrolled_at)}`,
      profile.birthday ? ` · birthday ${profile.birthday}` : ""),
    h("p", { class: "muted" }, "Identities: ",
      profile.identities.map((i) => `${i.type} ${i.value}`).join(", ") || "none",
      profile.recency_days !== undefined
        ? ` · last purchase ${text(profile.recency_days)} days ago, ${points(profile.orders_365d)} orders and ` +
          `${yuan(profile.spend_365d_cents)} in 365 days`
        : ""));
}

// Now: the profile's own balance and tier; as of a date: the balance and tier reads at that date.
function balanceAndTierAt(base, profile, asOf) {
  return asOf
    ? Promise.all([get(`${base}/balance`, { as_of: asOf }), get(`${base}/tier`, { as_of: asOf })])
    : Promise.resolve([profile.balance, profile.tier]);
}

// The time after which ledger lines are greyed: the as_of the API accepted and answered with (it, not
// the page, decides which times are valid); null when none was asked for or the API refused it.
async function greyAfter(atTime, asOf) {
  if (!asOf) return null;
  try {
    const [balance] = await atTime;
    return balance.as_of;
  } catch (refusal) {
    if (refusal.status === undefined) throw refusal;
    return null;
  }
}

function balanceAndTier(balance, tier) {
  return h("div", {},
    figures([
      ["available", points(balance.available), "available"],
      ["pending", points(balance.pending), "pending"],
      ["debt", points(balance.debt), "debt"],
      ["expiring in 30 days", points(balance.expiring_30d), "expiring_30d"],
      ["tier", tier.tier, "tier"],
      ["growth in window", points(tier.growth_window), "growth_window"],
      ["next tier", text(tier.next_tier), "next_tier"],
      ["growth needed", points(tier.growth_needed), "growth_needed"],
      ["tier held until", time(tier.hold_until), "hold_until", "small"],
    ]),
    h("h2", {}, "Lifetime"),
    figures([
      ["earned", points(balance.lifetime_earned), "lifetime_earned"],
      ["clawed back", points(balance.lifetime_clawed), "lifetime_clawed"],
      ["adjusted", points(balance.lifetime_adjusted), "lifetime_adjusted"],
      ["redeemed", points(balance.lifetime_redeemed), "lifetime_redeemed"],
      ["expired", points(balance.lifetime_expired), "lifetime_expired"],
      ["as of", time(balance.as_of), "as_of", "small"],
    ]));
}

const LEDGER_COLUMNS = [
  { label: "line", num: true, cell: (l) => points(l.line) },
  { label: "occurred at", cell: (l) => l.occurred_at },
  { label: "kind", cell: (l) => l.kind },
  { label: "points", num: true, cell: (l) => h("span", { class: l.points < 0 ? "neg" : null }, points(l.points)) },
  { label: "running balance", num: true, cell: (l) => points(l.running_balance) },
  { label: "reason", wrap: true, cell: (l) => text(l.reason) },
  { label: "ref", cell: (l) => text(l.ref) },
  { label: "bucket", cell: (l) => h("span", { class: "mono" }, text(l.bucket_id)) },
  { label: "event", num: true, cell: (l) => h("a", { href: `#event-${l.position}`, title: "the event behind this line" }, `#${l.position}`) },
];

// The whole trail; with an accepted as_of, the lines dated after it greyed (not hidden: a running
// balance is a sum in log order and cannot be cut by business time).
async function ledger(base, greyAfterTime) {
  const greyAfterMs = greyAfterTime === null ? null : Date.parse(greyAfterTime);
  const rowAttributes = (line) => ({
    "data-row": "ledger",
    class: greyAfterMs !== null && Date.parse(line.occurred_at) > greyAfterMs ? "later" : null,
  });
  const rows = await pagedRows(`${base}/ledger`, (answer) => answer.lines, "lines", LEDGER_COLUMNS, rowAttributes);
  const greying = greyAfterTime === null ? null
    : h("p", { class: "muted" }, `Lines dated after ${greyAfterTime} are greyed (the trail is the log as recorded now).`);
  return h("div", {}, greying, rows);
}

// Every row of a paged read, PAGES_AT_ONCE pages at a time; a button then loads the next ones.
// `rowsOf(answer)` picks the rows out of a page; `noun` names them ("lines", "events").
async function pagedRows(path, rowsOf, noun, columns, rowAttributes) {
  const wrapper = table(columns, [], rowAttributes);
  const body = wrapper.querySelector("tbody");
  const status = h("p", { class: "muted", "data-count": noun });
  const more = h("div");
  let count = 0;
  const showFailure = (refusal) => replace(more, refusalBox(refusal, `Further ${noun}`));
  const load = async (after) => {
    replace(more);
    const next = await eachPage(path, {}, (answer) => {
      for (const row of rowsOf(answer)) body.append(tableRow(columns, row, rowAttributes));
      count += rowsOf(answer).length;
      status.textContent = `${count} ${noun} so far…`;
    }, { after, maxPages: PAGES_AT_ONCE });
    if (next === null) {
      status.textContent = `${count} ${noun}.`;
      return;
    }
    status.textContent = `${count} ${noun} so far; load further ${noun} below.`;
    replace(more, h("button", { type: "button", class: "quiet", onclick: () => load(next).catch(showFailure) },
      `Load further ${noun}`));
  };
  await load(null);
  return h("div", {}, status, wrapper, more);
}

const COUPON_COLUMNS = [
  { label: "coupon", cell: (c) => h("span", { class: "mono" }, c.coupon_id) },
  { label: "template", cell: (c) => text(c.template) },
  { label: "value", num: true, cell: (c) => yuan(c.value_cents) },
  { label: "min spend", num: true, cell: (c) => yuan(c.min_spend_cents) },
  { label: "status", cell: (c) => c.status },
  { label: "valid from", cell: (c) => time(c.valid_from) },
  { label: "expires at", cell: (c) => time(c.expires_at) },
  { label: "source", cell: (c) => text(c.source) },
  { label: "points cost", num: true, cell: (c) => points(c.points_cost) },
  { label: "order", cell: (c) => text(c.order_ref) },
];

async function coupons(base) {
  const wallet = await get(`${base}/coupons`);
  if (!wallet.coupons.length) return h("p", { class: "muted" }, "No coupons.");
  return table(COUPON_COLUMNS, wallet.coupons, () => ({ "data-row": "coupon" }));
}

const EVENT_COLUMNS = [
  { label: "position", num: true, cell: (e) => points(e.position) },
  { label: "version", num: true, cell: (e) => points(e.stream_version) },
  { label: "type", cell: (e) => e.type },
  { label: "occurred at", cell: (e) => e.occurred_at },
  { label: "recorded at", cell: (e) => e.recorded_at },
  { label: "programme", num: true, cell: (e) => points(e.programme_version) },
  { label: "actor", cell: (e) => text(e.actor) },
  { label: "hash (SHA-256)", cell: (e) => h("span", { class: "mono hash" }, e.hash) },
  { label: "data", wrap: true, cell: (e) => h("details", {}, h("summary", {}, "data"), h("pre", { class: "mono" }, JSON.stringify(e.data, null, 2))) },
];

// Each event is the anchor a ledger line links to (#event-{position}).
function events(base) {
  return pagedRows(`${base}/events`, (answer) => answer.events, "events", EVENT_COLUMNS,
    (e) => ({ id: `event-${e.position}`, "data-row": "event" }));
}
