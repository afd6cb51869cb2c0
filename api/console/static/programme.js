// The programme page (CONTRACT §6.1): its versions, what each changed against the version before it, and
// the settings in force now.
import { get } from "./api.js";
import { append, fieldList, fieldValue, h, isObject, page, replace, table } from "./dom.js";
import { points, text, time } from "./format.js";
import { fill } from "./shell.js";

export async function programme() {
  const versions = h("div"), current = h("div");
  replace(page(), h("h1", {}, "Programme versions"), versions, h("h2", {}, "The version in force now"), current);
  await Promise.all([
    fill(versions, "the programme versions", async () => versionTable((await get("/v1/programme/versions")).versions)),
    fill(current, "the programme in force", async () => {
      const answer = await get("/v1/programme");
      return h("section", { class: "card" },
        h("p", {}, `Version ${answer.version}, effective from ${answer.effective_from ?? "the beginning"}.`),
        h("h3", {}, "Settings"), fieldList(answer.settings));
    }),
  ]);
}

function versionTable(versions) {
  const byNumber = new Map(versions.map((v) => [v.version, v]));
  const settingsOf = settingsReader(versions);
  return table([
    { label: "version", num: true, cell: (v) => points(v.version) },
    { label: "effective from", cell: (v) => v.effective_from === null ? "the beginning" : v.effective_from },
    { label: "recorded at", cell: (v) => time(v.recorded_at) },
    { label: "actor", cell: (v) => text(v.actor) },
    { label: "what it changed", wrap: true, cell: (v) => changesToggle(v, byNumber.get(v.version - 1), settingsOf) },
  ], versions, () => ({ "data-row": "programme-version" }));
}

// The API has no read of one version's settings, only of the version in force at a time; so a version is read
// at the moment it took effect, once, and only when a row asks for it: tens of versions cost nothing until
// expanded. A failed read is forgotten, so that expanding the row again tries again.
function settingsReader(versions) {
  const reads = new Map();
  return (entry) => {
    if (!reads.has(entry.version)) {
      const read = get("/v1/programme", { as_of: tookEffectAt(entry, versions) });
      reads.set(entry.version, read.catch((refusal) => {
        reads.delete(entry.version);
        throw refusal;
      }));
    }
    return reads.get(entry.version);
  };
}

// Version 1 (effective_from null) is in force for all time before the first dated version: a millisecond
// before it. Dated versions need not be in version order (a file given at start takes effect then, even
// when a version is already scheduled for later): the earliest, not version 2's.
function tookEffectAt(entry, versions) {
  if (entry.effective_from !== null) return entry.effective_from;
  const dated = versions.filter((v) => v.effective_from !== null).map((v) => Date.parse(v.effective_from));
  return new Date(Math.min(...dated) - 1).toISOString();
}

// Collapsed until asked: opening it reads the two versions' settings.
function changesToggle(entry, previous, settingsOf) {
  if (!previous) return "the first version";
  const body = h("div");
  const toggle = h("details", { "data-changes": entry.version },
    h("summary", {}, `changes against version ${previous.version}`), body);
  toggle.addEventListener("toggle", () => {
    if (toggle.open) fill(body, `what version ${entry.version} changed`, () => changes(entry, previous, settingsOf));
  });
  return toggle;
}

async function changes(entry, previous, settingsOf) {
  const [now, before] = await Promise.all([settingsOf(entry), settingsOf(previous)]);
  // A version replaced by a later one effective at the same moment was never in force: no read shows it.
  if (now.version !== entry.version) return neverInForce(entry, now);
  if (before.version !== previous.version) return neverInForce(previous, before);
  const changed = differences(before.settings, now.settings);
  if (!changed.length) return h("p", { class: "muted" }, "No setting changed.");
  return h("ul", { class: "fields changes" }, changed.map(changeLine));
}

function neverInForce(entry, winner) {
  return h("p", { class: "muted" }, `Version ${entry.version} was never in force (version ${winner.version} ` +
    "replaced it from the same moment), so the API has no read of its settings to compare.");
}

// The settings that differ, as [path, before, after]: nested tables (member_day, referral) by their leaves'
// dotted paths, a list (tiers, welcome_pack) as one value, compared and shown whole.
function differences(before, after) {
  const was = new Map(leaves(before)), now = new Map(leaves(after));
  const paths = new Set([...was.keys(), ...now.keys()]);
  return [...paths].filter((path) => !same(was.get(path), now.get(path)))
    .map((path) => [path, was.get(path), now.get(path)]);
}

function leaves(settings, prefix = "") {
  return Object.entries(settings).flatMap(([name, value]) =>
    isObject(value) ? leaves(value, `${prefix}${name}.`) : [[`${prefix}${name}`, value]]);
}

// Equal by value: the items of a list in order, a table's entries in any order.
function same(a, b) {
  if (Array.isArray(a) && Array.isArray(b)) return a.length === b.length && a.every((item, i) => same(item, b[i]));
  if (isObject(a) && isObject(b)) {
    const names = Object.keys(a);
    return names.length === Object.keys(b).length && names.every((name) => same(a[name], b[name]));
  }
  return a === b;
}

// "path: old → new", each value shown as the settings are (by the leaf's own name: value_cents in yuan); a list
// of tables, one line per item, goes below its path as "was" and "now".
function changeLine([path, before, after]) {
  const name = path.slice(path.lastIndexOf(".") + 1);
  const [was, now] = [fieldValue(name, before), fieldValue(name, after)];
  const line = h("li", { "data-change": path }, h("span", { class: "name" }, path), ": ");
  if (was instanceof Node || now instanceof Node) {
    return append(line, [h("div", { class: "was" }, "was", was), h("div", { class: "now" }, "now", now)]);
  }
  return append(line, [was, " → ", now]);
}
