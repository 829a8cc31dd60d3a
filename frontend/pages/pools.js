// Pools and their upstreams (health, last error, discovered models), and routes (model → pools). The upstream
// API key is write-only: the page only learns whether one is set.
import { ago, badge, clear, confirmDialog, field, h, list, modal, table, toast } from "../dom.js";

export const title = "Pools";
const METHODS = ["round_robin", "least_conn", "hash", "random_two"];
const RETRY_STATUSES = [429, 500, 502, 503, 504];
const HEALTH_KIND = { up: "ok", down: "bad", unknown: "" };

export async function render(ctx) {
  const { api, admin, root } = ctx;
  const body = h("div");
  clear(root, h("div", { class: "page-head" }, h("h1", {}, "Pools and upstreams"),
    admin ? h("button", { class: "primary", onclick: () => poolDialog(ctx, null, load) }, "Add pool") : null), body);

  async function load() {
    const [pools, routes] = await Promise.all([api.pools(), api.routes()]);
    clear(body,
      pools.length ? pools.map((pool) => poolCard(ctx, pool, load)) : h("p", { class: "empty" },
        admin ? "No pools yet: add one with the URL of an OpenAI-compatible or Ollama server." : "No pools yet."),
      h("div", { class: "page-head" }, h("h2", {}, "Routes"),
        admin && pools.length ? h("button", { onclick: () => routeDialog(ctx, pools, load) }, "Add route") : null),
      h("p", { class: "hint" }, "A route sends a model name (or a glob such as llama*) to pools; models without one go to",
        " the pool that serves them."),
      table([
        ["Model", (r) => h("code", {}, r.model)],
        ["Pools", (r) => r.pools.join(r.mode === "balance" ? " + " : " → ")],
        ["Mode", (r) => r.mode ?? "fallback"],
        ["", (r) => admin ? h("button", { class: "small danger", onclick: async () => {
          if (!(await confirmDialog(`Remove the route for ${r.model}?`, "Requests fall back to discovery."))) return;
          await act(() => api.removeRoute(r.model), `route ${r.model} removed`);
          await load();
        } }, "Remove") : null],
      ], routes, { empty: "No routes." }));
  }
  await load();
}

async function act(fn, message) {
  try {
    const result = await fn();
    toast(message);
    return result;
  } catch (error) {
    toast(error.message, "error");
    return null;
  }
}

function poolCard(ctx, pool, reload) {
  const { api, admin } = ctx;
  const models = pool.models.length ? pool.models : pool.discovered_models;
  return h("section", { class: "card pool", "aria-labelledby": `pool-${pool.name}` },
    h("div", { class: "page-head" },
      h("h2", { id: `pool-${pool.name}` }, pool.name),
      badge(pool.method), pool.api_key_set ? badge("API key set", "ok") : badge("no API key"),
      pool.tls_verify ? null : badge("TLS not verified", "warn"),
      pool.retries !== undefined ? badge(`${pool.retries} retries`) : null,
      pool.websocket ? badge("WebSocket") : null,
      pool.model_aware ? badge("model-aware") : null,
      admin ? h("div", { class: "row-actions" },
        h("button", { class: "small", onclick: () => poolDialog(ctx, pool, reload) }, "Edit"),
        h("button", { class: "small", onclick: () => upstreamDialog(ctx, pool, reload) }, "Add upstream"),
        h("button", { class: "small", onclick: async () => {
          await act(() => api.refreshPool(pool.name), `${pool.name}: models refreshed`);
          await reload();
        } }, "Refresh models"),
        h("button", { class: "small danger", onclick: async () => {
          if (!(await confirmDialog(`Remove pool ${pool.name}?`, "Its models stop being served.", "Remove"))) return;
          await act(() => api.removePool(pool.name), `${pool.name} removed`);
          await reload();
        } }, "Remove")) : null),
    table([
      ["Upstream", (u) => h("code", {}, u.url)],
      ["Health", (u) => badge(u.health || "unknown", HEALTH_KIND[u.health])],
      ["Weight", (u) => String(u.weight ?? 1)],
      ["Role", (u) => [u.backup ? "backup" : "primary", u.down ? " (down)" : ""]],
      ["Last error", (u) => (u.error ? [u.error, h("div", { class: "hint" }, "since ", ago(u.error_since))] : "—")],
      ["", (u) => admin && pool.upstreams.length > 1 ? h("button", { class: "small danger", onclick: async () => {
        if (!(await confirmDialog(`Remove ${u.url}?`, `It stops serving pool ${pool.name}.`, "Remove"))) return;
        await act(() => api.removeUpstream(pool.name, u.url), "upstream removed");
        await reload();
      } }, "Remove") : null],
    ], pool.upstreams),
    h("p", {}, h("strong", {}, pool.models.length ? "Models: " : "Discovered models: "),
      models.length ? models.map((m, i) => [i ? ", " : "", h("code", { class: "model" }, m)]) : h("span", { class: "muted" }, "none"),
      pool.discovered_at ? h("span", { class: "hint" }, ` (asked ${ago(pool.discovered_at)})`) : null),
    pool.discovery_error ? h("div", { class: "error-box" }, `Discovery failed: ${pool.discovery_error}`) : null);
}

/** "url [weight=N] [backup] [down]" per line ⇄ upstream objects. */
const upstreamLine = (u) => [u.url, u.weight && u.weight !== 1 ? `weight=${u.weight}` : "", u.backup ? "backup" : "",
  u.down ? "down" : ""].filter(Boolean).join(" ");

function parseUpstreams(text) {
  return text.split("\n").map((l) => l.trim()).filter(Boolean).map((line) => {
    const [url, ...flags] = line.split(/\s+/);
    const u = { url };
    for (const flag of flags) {
      if (flag === "backup" || flag === "down") u[flag] = true;
      else if (/^weight=\d+$/.test(flag)) u.weight = Number(flag.slice(7));
      else throw Object.assign(new Error(`upstreams: unknown option "${flag}" (weight=N, backup, down)`), { field: "upstreams" });
    }
    return u;
  });
}

async function poolDialog(ctx, pool, reload) {
  const creating = !pool;
  const method = h("select", { name: "method" }, METHODS.map((m) => h("option", { value: m, selected: pool?.method === m }, m)));
  const form = h("div", {},
    creating ? field("Name", { name: "name", required: true }) : null,
    field("Upstreams", h("textarea", { name: "upstreams", required: true, rows: 3,
      value: pool ? pool.upstreams.map(upstreamLine).join("\n") : "", placeholder: "http://10.0.0.5:8000" }),
    "One URL per line, optionally followed by weight=N, backup, down."),
    field("Balancing", method),
    field("Models", { name: "models", value: pool?.models.join(", ") ?? "", placeholder: "discovered" },
      "Comma-separated; empty: ask the upstreams (/v1/models or /api/tags)."),
    field("Upstream API key", { name: "api_key", type: "password", autocomplete: "new-password",
      placeholder: pool?.api_key_set ? "set (unchanged when empty)" : "none" }, "Write-only: it is never shown again."),
    pool?.api_key_set ? h("label", { class: "check" }, h("input", { type: "checkbox", name: "remove_key" }), "Remove the API key") : null,
    h("label", { class: "check" }, h("input", { type: "checkbox", name: "tls_verify", checked: pool ? pool.tls_verify : true }),
      "Verify the upstreams' TLS certificates"),
    h("label", { class: "check" }, h("input", { type: "checkbox", name: "include_usage", checked: pool ? pool.include_usage : true }),
      "Ask streams for token usage (stream_options.include_usage)"),
    h("fieldset", {}, h("legend", {}, "Traffic"),
      h("div", { class: "grid2" },
        field("Retries", { name: "retries", type: "number", min: 0, max: 10, value: pool?.retries ?? 2 },
          "Other upstreams of the pool tried before the first byte."),
        field("Retry time limit (s)", { name: "retry_timeout", type: "number", min: 0, value: pool?.retry_timeout ?? 30 }),
        field("Connect timeout (s)", { name: "connect_timeout", type: "number", min: 1, value: pool?.connect_timeout ?? "",
          placeholder: "global setting" }),
        field("Read timeout (s)", { name: "read_timeout", type: "number", min: 1, value: pool?.read_timeout ?? "",
          placeholder: "global setting" })),
      h("div", { class: "modes" }, h("span", {}, "Retry on"), RETRY_STATUSES.map((code) => h("label", { class: "check" },
        h("input", { type: "checkbox", name: "retry_statuses", value: code,
          checked: (pool?.retry_statuses ?? [502, 503, 504]).includes(code) }), String(code)))),
      h("label", { class: "check" }, h("input", { type: "checkbox", name: "websocket", checked: pool?.websocket ?? false }),
        "WebSocket pass-through"),
      h("label", { class: "check" }, h("input", { type: "checkbox", name: "model_aware", checked: pool?.model_aware ?? false }),
        "Model-aware: send each request to the upstream that has its model loaded, else the shortest queue")));
  const saved = await modal(creating ? "Add pool" : `Edit pool ${pool.name}`, form, {
    submitLabel: creating ? "Add" : "Save",
    onSubmit: (f) => {
      const e = f.elements;
      const number = (input) => (input.value === "" ? null : Number(input.value));
      const fields = { upstreams: parseUpstreams(e.upstreams.value), method: e.method.value,
        models: list(e.models.value), tls_verify: e.tls_verify.checked, include_usage: e.include_usage.checked,
        retries: number(e.retries) ?? 0, retry_timeout: number(e.retry_timeout) ?? 0,
        connect_timeout: number(e.connect_timeout), read_timeout: number(e.read_timeout), websocket: e.websocket.checked,
        model_aware: e.model_aware.checked,
        retry_statuses: [...f.querySelectorAll("input[name=retry_statuses]:checked")].map((b) => Number(b.value)) };
      if (e.api_key.value) fields.api_key = e.api_key.value;
      else if (e.remove_key?.checked) fields.api_key = null;
      if (creating) return ctx.api.createPool({ name: e.name.value.trim(), ...fields });
      return ctx.api.updatePool(pool.name, fields);
    },
  });
  if (saved) {
    toast(creating ? `pool ${saved.name} added` : `pool ${pool.name} saved`);
    await reload();
  }
}

async function upstreamDialog(ctx, pool, reload) {
  const saved = await modal(`Add an upstream to ${pool.name}`, h("div", {},
    field("URL", { name: "url", required: true, placeholder: "http://10.0.0.6:8000" }),
    field("Weight", { name: "weight", type: "number", min: 1, value: 1 }),
    h("label", { class: "check" }, h("input", { type: "checkbox", name: "backup" }), "Backup (used when the others are down)")), {
    submitLabel: "Add",
    onSubmit: (f) => ctx.api.addUpstream(pool.name, { url: f.elements.url.value.trim(),
      weight: Number(f.elements.weight.value || 1), backup: f.elements.backup.checked }),
  });
  if (saved) {
    toast("upstream added");
    await reload();
  }
}

async function routeDialog(ctx, pools, reload) {
  const boxes = pools.map((p) => h("label", { class: "check" }, h("input", { type: "checkbox", name: "pools", value: p.name }), p.name));
  const saved = await modal("Add route", h("div", {},
    field("Model", { name: "model", required: true, placeholder: "llama3* or gpt-4o" }),
    h("fieldset", {}, h("legend", {}, "Pools (in order)"), boxes),
    field("Mode", h("select", { name: "mode" }, h("option", { value: "fallback" }, "fallback: the next pool when one fails"),
      h("option", { value: "balance" }, "balance: spread requests across the pools")))), {
    submitLabel: "Save",
    onSubmit: (f) => ctx.api.setRoute(f.elements.model.value.trim(),
      [...f.querySelectorAll("input[name=pools]:checked")].map((b) => b.value), f.elements.mode.value),
  });
  if (saved) {
    toast("route saved");
    await reload();
  }
}
