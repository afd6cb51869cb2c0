// How figures are shown (CONTRACT §8): points as plain integers, *_cents as yuan with two decimals.
// Only presentation: every number shown is one the API answered.

export function points(value) {
  return value === null || value === undefined ? "—" : String(value);
}

export function yuan(cents) {
  if (cents === null || cents === undefined) return "—";
  const sign = cents < 0 ? "-" : "";
  const whole = Math.abs(cents);
  return `${sign}¥${Math.trunc(whole / 100)}.${String(whole % 100).padStart(2, "0")}`;
}

export function time(value) {
  return value === null || value === undefined ? "—" : value;
}

export function text(value) {
  return value === null || value === undefined || value === "" ? "—" : String(value);
}

// A setting's or a condition's value, shown by its name: *_cents in yuan, *_cents_per_X in yuan per X,
// a list of plain values joined, the rest as answered.
export function field(name, value) {
  if (Array.isArray(value)) return value.map((item) => field(name, item)).join(", ") || "none";
  const rate = /_cents_per_(\w+)$/.exec(name);
  if (rate) return `${yuan(value)} per ${rate[1]}`;
  if (name.endsWith("_cents")) return yuan(value);
  if (typeof value === "boolean") return value ? "yes" : "no";
  return text(value);
}
