// A form for some settings (GET/PATCH /api/v1/settings): the control follows the value's type; only changed
// settings are sent, and a refusal names the field (the input gets the focus).
import { clear, errorBox, field, h, list, toast } from "./dom.js";

const NULLABLE = new Set(["server_name", "default_pool", "http_listen", "https_listen", "acme_email", "acme_ca_bundle"]);
const label = (name) => name.replaceAll("_", " ").replace(/^./, (c) => c.toUpperCase());

function control(name, value, readonly) {
  if (typeof value === "boolean") return h("input", { type: "checkbox", name, checked: value, disabled: readonly });
  if (typeof value === "number") return h("input", { type: "number", name, value, readonly, step: "any" });
  if (Array.isArray(value)) return h("input", { name, value: value.join(", "), readonly, dataset: { kind: "list" } });
  if (value && typeof value === "object") {
    return h("textarea", { name, rows: 4, readonly, value: JSON.stringify(value, null, 2), dataset: { kind: "json" } });
  }
  return h("input", { name, value: value ?? "", readonly });
}

function read(input) {
  if (input.type === "checkbox") return input.checked;
  if (input.type === "number") return Number(input.value);
  if (input.dataset.kind === "list") return list(input.value);
  if (input.dataset.kind === "json") {
    try { return JSON.parse(input.value || "{}"); } catch (e) {
      throw Object.assign(new Error(`${input.name}: not valid JSON (${e.message})`), { field: input.name });
    }
  }
  return input.value.trim() === "" && NULLABLE.has(input.name) ? null : input.value.trim();
}

/** `names`: the settings shown; `hints`: name → text. Calls `saved(settings)` after a change. */
export function settingsForm(ctx, settings, names, { hints = {}, saved } = {}) {
  const present = names.filter((n) => n in settings);
  const result = h("div", { "aria-live": "polite" });
  const form = h("form", { class: "settings" },
    present.map((name) => {
      const input = control(name, settings[name], !ctx.admin);
      if (input.type === "checkbox") return h("label", { class: "check" }, input, label(name));
      return field(label(name), input, hints[name]);
    }),
    result,
    ctx.admin ? h("div", { class: "actions" }, h("button", { type: "submit", class: "primary" }, "Save")) : null);
  form.addEventListener("submit", async (e) => {
    e.preventDefault();
    clear(result);
    const changed = {};
    try {
      for (const name of present) {
        const value = read(form.elements[name]);
        if (JSON.stringify(value) !== JSON.stringify(settings[name])) changed[name] = value;
      }
      if (!Object.keys(changed).length) return void toast("Nothing changed");
      const now = await ctx.api.updateSettings(changed);
      Object.assign(settings, now);
      toast(`Saved: ${Object.keys(changed).join(", ")}`);
      saved?.(now);
    } catch (error) {
      clear(result, errorBox(error));
      if (error.field) form.elements[error.field]?.focus();
    }
  });
  return form;
}
