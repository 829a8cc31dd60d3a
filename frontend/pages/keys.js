// API keys: create (the secret is shown once, with a copy button), list (masked, last 24 h sparkline),
// enable/disable, edit rules, revoke. A viewer sees the list only.
import { sparkline } from "../charts.js";
import { createdKeys } from "../session.js";
import { badge, clear, confirmDialog, copyText, field, h, list, modal, num, table, toast, when } from "../dom.js";

export const title = "Keys";
const QUOTAS = [["tpm", "Tokens per minute"], ["tokens_per_day", "Tokens per day"],
  ["tokens_per_month", "Tokens per month"], ["requests_per_day", "Requests per day"]];
const PAGE = 100;
const STATUS_KIND = { active: "ok", disabled: "warn", expired: "warn", revoked: "bad" };

export async function render(ctx) {
  const { api, admin, root } = ctx;
  const body = h("div");
  const showRevoked = h("input", { type: "checkbox", id: "show-revoked" });
  const search = h("input", { type: "search", name: "search", placeholder: "name or id" });
  let keys = [], hours = new Map(), shown = PAGE;
  const head = h("div", { class: "page-head" }, h("h1", {}, "API keys"),
    h("label", { class: "check", for: "show-revoked" }, showRevoked, "Show revoked"),
    admin ? h("button", { class: "primary", onclick: () => createKey(ctx, load) }, "Create key") : null);
  clear(root, head, h("div", { class: "filters" }, field("Find a key", search)), body);

  async function load() {
    const since = Math.floor(Date.now() / 1000) - 86400;
    const [fetched, summary] = await Promise.all([
      api.keys(showRevoked.checked),
      api.usageSummary({ group_by: "key", bucket: "hour", since, fields: "requests" }).catch(() => ({ rows: [] })),
    ]);
    keys = fetched;
    hours = new Map(); // key id → requests per hour over the last day (24 points)
    const first = Math.floor(since / 3600) * 3600;
    for (const row of summary.rows) {
      if (!hours.has(row.key)) hours.set(row.key, new Array(25).fill(0));
      const i = Math.round((row.bucket - first) / 3600);
      if (i >= 0 && i < 25) hours.get(row.key)[i] += row.requests || 0;
    }
    show();
  }

  // thousands of keys: a filter, and rows rendered a page at a time
  function show() {
    const needle = search.value.trim().toLowerCase();
    const matching = needle ? keys.filter((k) => k.name.toLowerCase().includes(needle) || k.id.includes(needle)) : keys;
    clear(body, table([
      ["Name", (k) => h("span", { class: "key-name" }, k.name)],
      ["Key", (k) => h("code", {}, k.key)],
      ["Status", (k) => badge(k.status, STATUS_KIND[k.status])],
      ["Models", (k) => (k.models.length ? k.models.join(", ") : h("span", { class: "muted" }, "all"))],
      ["Limits", (k) => limits(k)],
      ["Expires", (k) => (k.expires ? when(k.expires) : "never")],
      ["Last used", (k) => when(k.last_used)],
      ["24 h", (k) => sparkline(hours.get(k.id) || new Array(25).fill(0), `${k.name} requests in the last 24 hours`)],
      ["", (k) => h("div", { class: "row-actions" },
        h("a", { class: "button small", href: `#/usage?key=${encodeURIComponent(k.id)}` }, "Usage"),
        admin && k.status !== "revoked" ? [
          h("button", { class: "small", onclick: () => editKey(ctx, k, load) }, "Edit"),
          h("button", { class: "small", onclick: () => toggle(k) }, k.enabled ? "Disable" : "Enable"),
          h("button", { class: "small danger", onclick: () => revoke(k) }, "Revoke"),
        ] : null)],
    ], matching.slice(0, shown), { empty: needle ? "No key matches." : admin ? "No keys yet: create one." : "No keys yet." }),
    matching.length > shown ? h("div", { class: "actions" }, h("span", { class: "hint" }, `${shown} of ${matching.length}`),
      h("button", { onclick: () => { shown += PAGE; show(); } }, `Show ${Math.min(PAGE, matching.length - shown)} more`)) : null);
  }
  search.addEventListener("input", () => { shown = PAGE; show(); });

  async function toggle(k) {
    try {
      await api.updateKey(k.id, { enabled: !k.enabled });
      toast(`${k.name}: ${k.enabled ? "disabled" : "enabled"}`);
    } catch (error) { toast(error.message, "error"); }
    await load();
  }

  async function revoke(k) {
    if (!(await confirmDialog(`Revoke ${k.name}?`, "Clients using this key are refused at once. This cannot be undone.",
      "Revoke"))) return;
    try {
      await api.revokeKey(k.id);
      toast(`${k.name} revoked`);
    } catch (error) { toast(error.message, "error"); }
    await load();
  }

  showRevoked.addEventListener("change", load);
  await load();
}

function limits(k) {
  const parts = [];
  if (k.rpm) parts.push(`${num(k.rpm)} rpm`);
  for (const [name, label] of QUOTAS) if (k[name]) parts.push(`${num(k[name])} ${label.toLowerCase().replace("tokens per ", "tok/").replace("requests per ", "req/")}`);
  if (k.cidrs.length || k.cidr_groups.length) parts.push(`from ${[...k.cidr_groups, ...k.cidrs].join(", ")}`);
  return parts.length ? parts.join(" · ") : h("span", { class: "muted" }, "none");
}

function isoDate(epoch) {
  return epoch ? new Date(epoch * 1000).toISOString().slice(0, 19) + "Z" : "";
}

/** The key form: the same fields for create and edit (blank = no limit). */
async function keyForm(ctx, key) {
  const groups = await ctx.api.cidrGroups().catch(() => []);
  const input = (name, attrs = {}) => h("input", { name, ...attrs });
  const groupBoxes = groups.map((g) => h("label", { class: "check" },
    h("input", { type: "checkbox", name: "cidr_groups", value: g.name, checked: key?.cidr_groups.includes(g.name) }),
    g.name));
  return h("div", {},
    field("Name", input("name", { required: true, value: key?.name ?? "", maxlength: 200 })),
    field("Allowed models", input("models", { value: key?.models.join(", ") ?? "", placeholder: "all" }),
      "Comma-separated; globs such as llama* allowed; empty: every model."),
    field("Allowed endpoints", input("endpoints", { value: key?.endpoints.join(", ") ?? "", placeholder: "all" }),
      "e.g. /v1/chat/completions; empty: every endpoint."),
    h("div", { class: "grid2" },
      field("Requests per minute", input("rpm", { type: "number", min: 0, value: key?.rpm || "" }), "Empty or 0: no limit."),
      QUOTAS.map(([name, label]) => field(label, input(name, { type: "number", min: 1, value: key?.[name] ?? "" })))),
    field("Expires", input("expires", { value: isoDate(key?.expires), placeholder: "never",
      dataset: { original: isoDate(key?.expires) } }),
      "A duration such as 30d or 12h, or a date such as 2027-01-31; empty: never."),
    field("Client networks (CIDR)", input("cidrs", { value: key?.cidrs.join(", ") ?? "", placeholder: "any" })),
    groups.length ? h("fieldset", {}, h("legend", {}, "CIDR groups"), groupBoxes) : null,
    h("label", { class: "check" }, h("input", { type: "checkbox", name: "enabled", checked: key ? key.enabled : true }),
      "Enabled"));
}

function readForm(form, creating) {
  const get = (name) => form.elements[name].value.trim();
  const out = {
    name: get("name"), models: list(get("models")), endpoints: list(get("endpoints")), rpm: Number(get("rpm") || 0),
    expires: get("expires") || null, cidrs: list(get("cidrs")), enabled: form.elements.enabled.checked,
    cidr_groups: [...form.querySelectorAll("input[name=cidr_groups]:checked")].map((b) => b.value),
  };
  for (const [name] of QUOTAS) out[name] = get(name) ? Number(get(name)) : null;
  if (!creating && get("expires") === form.elements.expires.dataset.original) delete out.expires; // unchanged
  if (creating) for (const [k, v] of Object.entries(out)) if (v === null || (Array.isArray(v) && !v.length)) delete out[k];
  return out;
}

async function createKey(ctx, reload) {
  const created = await modal("Create key", await keyForm(ctx, null), {
    submitLabel: "Create", onSubmit: (form) => ctx.api.createKey(readForm(form, true)),
  });
  if (!created) return;
  createdKeys.set(created.id, { name: created.name, secret: created.secret });
  await reload();
  const secret = h("code", { class: "secret-value" }, created.secret);
  const copy = h("button", { type: "button", class: "primary", onclick: async () => {
    toast((await copyText(created.secret)) ? "Key copied" : "Copy failed: select the key and copy it", "ok");
  } }, "Copy");
  await modal(`Key ${created.name} created`, h("div", {},
    h("p", { class: "notice" }, "This is the only time the key is shown. Copy it now and store it safely.",
      " (This tab keeps it in memory for the playground until you reload.)"),
    h("div", { class: "secret" }, secret, copy)), { submitLabel: "Done", cancelLabel: null });
}

async function editKey(ctx, key, reload) {
  const saved = await modal(`Edit ${key.name}`, await keyForm(ctx, key), {
    onSubmit: (form) => ctx.api.updateKey(key.id, readForm(form, false)),
  });
  if (saved) {
    toast(`${key.name} saved`);
    await reload();
  }
}
