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
