// Building the page from data: text always goes in as text (never as HTML).
import { field } from "./format.js";

export function h(tag, attributes = {}, ...children) {
  const element = document.createElement(tag);
  for (const [name, value] of Object.entries(attributes)) {
    if (value === false || value === null || value === undefined) continue;
    if (name.startsWith("on")) element.addEventListener(name.slice(2), value);
    else element.setAttribute(name, value === true ? "" : String(value));
  }
  append(element, children);
  return element;
}

export function append(element, children) {
  for (const child of children.flat()) {
    if (child === null || child === undefined || child === false) continue;
    element.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return element;
}

export function page() {
  return document.getElementById("page");
}

export function replace(element, ...children) {
  element.replaceChildren();
  return append(element, children);
}

// A table: `columns` is [{label, cell: (row) => content, num?, wrap?}]; `rowAttributes(row)` adds hooks.
// It scrolls sideways in its own box when wider than the page; the note says so while it does (console.css).
export function table(columns, rows, rowAttributes = () => ({})) {
  const body = h("tbody", {}, rows.map((row) => tableRow(columns, row, rowAttributes)));
  return h("div", { class: "scroll" },
    h("p", { class: "scroll-note" }, "Scroll sideways for more columns"),
    h("table", {},
      h("thead", {}, h("tr", {}, columns.map((c) => h("th", { class: c.num ? "num" : null, scope: "col" }, c.label)))),
      body));
}

export function tableRow(columns, row, rowAttributes = () => ({})) {
  return h("tr", rowAttributes(row),
    columns.map((c) => h("td", { class: c.num ? "num" : c.wrap ? "wrap" : null }, c.cell(row))));
}

// Figures as a definition list of [label, value, field, size?]; `field` is the hook (CONTRACT §8 data-field).
export function figures(items) {
  return h("dl", { class: "figures" },
    items.map(([label, value, field, size]) => h("div", {}, h("dt", {}, label),
      h("dd", { "data-field": field, class: size || null }, value))));
}

// An object the API answered (programme settings, campaign conditions) as "name: value" lines, money
// in yuan: a nested object is indented below its name, a list of objects has one line per item.
export function fieldList(object) {
  return h("ul", { class: "fields" }, Object.entries(object).map(([name, value]) =>
    h("li", { "data-name": name }, h("span", { class: "name" }, name), ": ", fieldValue(name, value))));
}

// A value as fieldList shows it: an object indented, a list of objects one line per item, the rest by field().
export function fieldValue(name, value) {
  if (isObject(value)) return fieldList(value);
  if (Array.isArray(value) && value.some(isObject)) {
    return h("ol", { class: "fields" }, value.map((item) => h("li", {}, isObject(item) ? oneLine(item) : field(name, item))));
  }
  return field(name, value);
}

function oneLine(object) {
  return Object.entries(object).map(([name, value]) => `${name}: ${field(name, value)}`).join(" · ");
}

export function isObject(value) {
  return value !== null && typeof value === "object" && !Array.isArray(value);
}
