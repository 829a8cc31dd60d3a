// Small DOM helpers. Data only ever reaches the page as text nodes or attributes (never innerHTML), so a key
// name or a model name such as <img src=x onerror=...> shows as text.

export function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs || {})) {
    if (value === undefined || value === null || value === false) continue;
    if (name.startsWith("on") && typeof value === "function") el.addEventListener(name.slice(2), value);
    else if (name === "class") el.className = value;
    else if (name === "dataset") Object.assign(el.dataset, value);
    else if (name === "value" || name === "checked" || name === "selected") el[name] = value;
    else el.setAttribute(name, value === true ? "" : String(value));
  }
  append(el, children);
  return el;
}

function append(el, children) {
  for (const child of children.flat(Infinity)) {
    if (child === undefined || child === null || child === false) continue;
    el.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
}

export function clear(el, ...children) {
  el.replaceChildren();
  append(el, children);
  return el;
}

let fieldCount = 0;
/** A labelled form field; `input` is an element or attributes for an <input>. */
export function field(label, input, hint) {
  const control = input instanceof Node ? input : h("input", input);
  if (!control.id) control.id = `f${++fieldCount}`;
  const hintEl = hint ? h("small", { class: "hint", id: `${control.id}-hint` }, hint) : null;
  if (hintEl) control.setAttribute("aria-describedby", hintEl.id);
  return h("div", { class: "field" }, h("label", { for: control.id }, label), control, hintEl);
}

export function toast(message, kind = "ok") {
  const box = document.getElementById("toasts");
  const el = h("div", { class: `toast ${kind}`, role: kind === "error" ? "alert" : "status" }, message);
  box.append(el);
  setTimeout(() => el.remove(), kind === "error" ? 8000 : 3500);
}

/** An error box for a form or page: the server's message, and nginx's output when it refused. */
export function errorBox(error) {
  return h("div", { class: "error-box", role: "alert" },
    h("strong", {}, error.message || String(error)),
    error.nginx ? h("pre", { class: "nginx-output" }, error.nginx) : null);
}

/** A modal <dialog> (focus trapped by the browser, Escape closes it); resolves with the submit value. */
export function modal(title, body, { submitLabel = "Save", cancelLabel = "Cancel", onSubmit, danger = false } = {}) {
  return new Promise((resolve) => {
    const errors = h("div", { class: "modal-errors" });
    const form = h("form", { method: "dialog", class: "modal-form" },
      h("h2", {}, title), body, errors,
      h("div", { class: "actions" },
        cancelLabel ? h("button", { type: "button", class: "secondary", onclick: () => close(null) }, cancelLabel) : null,
        submitLabel ? h("button", { type: "submit", class: danger ? "danger" : "primary" }, submitLabel) : null));
    const dialog = h("dialog", { "aria-label": title }, form);
    let done = false;
    const close = (value) => {
      if (done) return;
      done = true;
      dialog.close();
      dialog.remove();
      resolve(value);
    };
    dialog.addEventListener("cancel", (e) => { e.preventDefault(); close(null); });
    form.addEventListener("submit", async (e) => {
      e.preventDefault();
      if (!onSubmit) return close(true);
      const button = form.querySelector("button[type=submit]");
      button.disabled = true;
      try {
        close((await onSubmit(form)) ?? true);
      } catch (error) {
        clear(errors, errorBox(error));
        if (error.field) form.querySelector(`[name="${CSS.escape(error.field)}"]`)?.focus();
      } finally {
        button.disabled = false;
      }
    });
    document.body.append(dialog);
    dialog.showModal();
    // the first field gets the focus, else Cancel (a confirmation is never one Enter away), else the first button
    (form.querySelector("input:not([type=hidden]), select, textarea") || form.querySelector("button.secondary")
      || form.querySelector("button"))?.focus();
  });
}

export const confirmDialog = (title, text, label = "Confirm") =>
  modal(title, h("p", {}, text), { submitLabel: label, danger: true });

export async function copyText(text) {
  try {
    await navigator.clipboard.writeText(text);
    return true;
  } catch {
    const area = h("textarea", { "aria-hidden": "true", class: "offscreen" });
    area.value = text;
    document.body.append(area);
    area.select();
    const ok = document.execCommand("copy");
    area.remove();
    return ok;
  }
}

export function when(epochSeconds) {
  if (!epochSeconds) return "—";
  return new Date(epochSeconds * 1000).toLocaleString(undefined, { dateStyle: "medium", timeStyle: "short" });
}

export function ago(epochSeconds) {
  if (!epochSeconds) return "never";
  const s = Math.round(Date.now() / 1000 - epochSeconds);
  if (s < 60) return `${s}s ago`;
  if (s < 3600) return `${Math.round(s / 60)} min ago`;
  if (s < 86400) return `${Math.round(s / 3600)} h ago`;
  return `${Math.round(s / 86400)} d ago`;
}

export const num = (n, digits = 0) =>
  n === null || n === undefined ? "—" : Number(n).toLocaleString(undefined, { maximumFractionDigits: digits });

export const list = (text) => text.split(/[\s,]+/).map((s) => s.trim()).filter(Boolean);

/** A table from rows: columns are [header, row => cell content]. */
export function table(columns, rows, { empty = "Nothing yet.", caption } = {}) {
  if (!rows.length) return h("p", { class: "empty" }, empty);
  return h("div", { class: "table-wrap" }, h("table", {},
    caption ? h("caption", {}, caption) : null,
    h("thead", {}, h("tr", {}, columns.map(([name]) => h("th", { scope: "col" }, name)))),
    h("tbody", {}, rows.map((row) => h("tr", {}, columns.map(([, cell]) => h("td", {}, cell(row))))))));
}

export function badge(text, kind = "") {
  return h("span", { class: `badge ${kind}` }, text);
}
