// Pools and their upstreams (health, last error), the APIs they speak, their models with the details the
// upstreams report, aliases and pass-through paths; routes (model → pools); for Ollama upstreams the models on
// one upstream: list, pull (a job polled for its progress) and delete. The upstream API key is write-only: the
// page only learns whether one is set.
import { ago, badge, clear, confirmDialog, errorBox, field, h, list, modal, num, table, toast, when } from "../dom.js";

export const title = "Pools";
const METHODS = ["round_robin", "least_conn", "hash", "random_two"];
const RETRY_STATUSES = [429, 500, 502, 503, 504];
const HEALTH_KIND = { up: "ok", down: "bad", unknown: "" };
const KINDS = ["openai", "ollama"];
const PULL_KIND = { running: "", done: "ok", failed: "bad", interrupted: "warn" };

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

/** The APIs the pool speaks: set by the operator, else detected (never detected: both, so nothing is cut off). */
function kindBadges(pool) {
  const set = pool.api_kinds?.length;
  const detected = pool.detected_api_kinds;
  const how = set ? "set" : detected ? "detected" : "not detected yet";
  return h("span", { class: "kinds", title: `API kinds ${how}` }, (pool.effective_api_kinds || KINDS).map((k) =>
    badge(k === "openai" ? "OpenAI API" : "Ollama API", set || detected ? "ok" : "")),
    h("span", { class: "hint" }, ` ${how}`),
    pool.ollama_version ? badge(`Ollama ${pool.ollama_version}`) : null);
}

const speaksOllama = (pool) => (pool.effective_api_kinds || KINDS).includes("ollama");

function size(bytes) {
  if (bytes === null || bytes === undefined) return "—";
  const units = ["B", "KB", "MB", "GB", "TB"];
  let n = bytes, i = 0;
  while (n >= 1000 && i < units.length - 1) { n /= 1000; i += 1; }
  return `${num(n, i ? 1 : 0)} ${units[i]}`;
}

// a model named e.g. "constructor" must not find Object.prototype's
const own = (obj, key) => (obj && Object.hasOwn(obj, key) ? obj[key] : undefined);

/** One model's details, merged over the kinds that reported it (Ollama's /api/tags says the most). */
function details(pool, model) {
  const all = pool.model_details || {};
  const o = own(all.ollama, model), a = own(all.openai, model);
  const parts = [];
  if (o?.details) {
    const d = o.details;
    for (const x of [d.family, d.parameter_size, d.quantization_level, d.format]) if (x) parts.push(x);
  }
  if (o?.size) parts.push(size(o.size));
  if (a?.owned_by) parts.push(`owned by ${a.owned_by}`);
  if (a?.created) parts.push(`created ${when(a.created)}`);
  return parts;
}

function modelTable(pool) {
  const configured = pool.models.length > 0;
  const names = configured ? pool.models : pool.discovered_models;
  const all = pool.model_details || {};
  const kinds = (m) => KINDS.filter((k) => own(all[k], m)).map((k) => (k === "openai" ? "OpenAI" : "Ollama")).join(", ");
  return h("div", { class: "models" },
    h("h3", {}, configured ? "Models (configured)" : "Discovered models",
      pool.discovered_at && !configured ? h("span", { class: "hint" }, ` asked ${ago(pool.discovered_at)}`) : null),
    table([
      ["Model", (m) => h("code", { class: "model" }, m)],
      ["Listed by", (m) => kinds(m) || "—"],
      ["Details", (m) => details(pool, m).join(" · ") || h("span", { class: "muted" }, "—")],
    ], names, { empty: "None." }));
}

function poolCard(ctx, pool, reload) {
  const { api, admin } = ctx;
  const aliases = Object.entries(pool.aliases || {});
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
        speaksOllama(pool) ? h("button", { class: "small", onclick: () => ollamaDialog(ctx, pool, reload) },
          "Ollama models") : null,
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
    h("p", { class: "pool-facts" }, h("strong", {}, "APIs: "), kindBadges(pool)),
    aliases.length ? h("p", { class: "pool-facts" }, h("strong", {}, "Aliases: "), aliases.map(([from, to], i) =>
      [i ? ", " : "", h("code", {}, from), " → ", h("code", {}, to)])) : null,
    pool.passthrough?.length ? h("p", { class: "pool-facts" }, h("strong", {}, "Pass-through paths: "),
      pool.passthrough.map((p, i) => [i ? ", " : "", h("code", {}, p)])) : null,
    modelTable(pool),
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

/** "public = upstream" per line → {public: upstream}. */
function parseAliases(text) {
  const out = {};
  for (const line of text.split("\n").map((l) => l.trim()).filter(Boolean)) {
    const m = line.match(/^(\S+)\s*(?:=|→|->)\s*(\S+)$/);
    if (!m) throw Object.assign(new Error(`aliases: "${line}" is not "public name = upstream model"`), { field: "aliases" });
    out[m[1]] = m[2];
  }
  return out;
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
    h("fieldset", {}, h("legend", {}, "APIs it speaks (none ticked: detect)"),
      KINDS.map((k) => h("label", { class: "check" }, h("input", { type: "checkbox", name: "api_kinds", value: k,
        checked: pool?.api_kinds?.includes(k) }), k === "openai" ? "OpenAI (/v1/*)" : "Ollama (/api/*)")),
      pool?.detected_api_kinds ? h("small", { class: "hint" }, `Detected: ${pool.detected_api_kinds.join(", ") || "none"}`) : null),
    field("Aliases", h("textarea", { name: "aliases", rows: 2, placeholder: "gpt-4o = llama3.1:70b",
      value: Object.entries(pool?.aliases || {}).map(([a, b]) => `${a} = ${b}`).join("\n") }),
    "One per line: the public name = the upstream's model name."),
    field("Pass-through paths", { name: "passthrough", value: pool?.passthrough?.join(", ") ?? "",
      placeholder: "none" }, "Other upstream paths served through Bastion, e.g. /v1/rerank (comma-separated)."),
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
      fields.api_kinds = [...f.querySelectorAll("input[name=api_kinds]:checked")].map((b) => b.value);
      fields.aliases = parseAliases(e.aliases.value);
      fields.passthrough = list(e.passthrough.value);
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

/** The models on one Ollama upstream of the pool: list, delete, pull (a job the manager runs; polled here). */
async function ollamaDialog(ctx, pool, reload) {
  const { api } = ctx;
  const upstream = h("select", { name: "upstream" }, pool.upstreams.map((u) => h("option", { value: u.url }, u.url)));
  const models = h("div", { "aria-live": "polite" });
  const jobs = h("div", { class: "pulls", "aria-live": "polite" });
  const name = h("input", { name: "model", placeholder: "qwen2.5:0.5b", autocomplete: "off" });
  const problem = h("div");
  let timer = null, open = true, changed = false, lastRunning = 0;

  async function loadModels() {
    clear(models, h("p", { class: "hint" }, "Asking the upstream…"));
    try {
      const list = await api.ollamaModels(pool.name, upstream.value);
      clear(models, table([
        ["Model", (m) => h("code", { class: "model" }, m.name)],
        ["Size", (m) => size(m.size)],
        ["Details", (m) => [m.details?.family, m.details?.parameter_size, m.details?.quantization_level]
          .filter(Boolean).join(" · ") || "—"],
        ["Modified", (m) => (m.modified_at ? when(Date.parse(m.modified_at) / 1000) : "—")],
        ["", (m) => h("button", { type: "button", class: "small danger", onclick: () => remove(m.name) }, "Delete")],
      ], list, { empty: "No models on this upstream." }));
    } catch (error) {
      clear(models, errorBox(error));
    }
  }

  async function remove(model) {
    if (!(await confirmDialog(`Delete ${model}?`, `It is deleted from ${upstream.value}; pulling it again downloads it again.`,
      "Delete"))) return;
    try {
      await api.deleteOllamaModel(pool.name, upstream.value, model);
      toast(`${model} deleted`);
      changed = true;
    } catch (error) { toast(error.message, "error"); }
    await loadModels();
  }

  function progress(job) {
    const share = job.total ? job.completed / job.total : null;
    return h("div", { class: "pull" },
      h("div", {}, h("code", {}, job.model), " ", badge(job.state, PULL_KIND[job.state]), " ",
        h("span", { class: "hint" }, job.upstream)),
      job.state === "running" ? h("progress", { max: 1, value: share ?? undefined,
        "aria-label": `Pulling ${job.model}` }) : null,
      h("div", { class: "hint pull-status" }, job.error || job.status,
        share !== null && job.state === "running" ? ` — ${size(job.completed)} of ${size(job.total)} (${Math.floor(share * 100)} %)` : ""));
  }

  async function poll() {
    timer = null;
    if (!open) return;
    let list = [];
    try { list = await api.ollamaPulls(pool.name); } catch (error) { clear(jobs, errorBox(error)); return; }
    if (!open) return;
    clear(jobs, list.length ? list.map(progress) : h("p", { class: "empty" }, "No pulls in the last hour."));
    const running = list.filter((j) => j.state === "running").length;
    if (running < lastRunning) { changed = true; await loadModels(); } // a pull ended: the list changed
    lastRunning = running;
    if (running && open) timer = setTimeout(poll, 1000);
  }

  async function pull() {
    clear(problem);
    try {
      await api.pullOllamaModel(pool.name, upstream.value, name.value.trim());
      toast(`pulling ${name.value.trim()}`);
      name.value = "";
      lastRunning += 1; // a pull that ends before the first poll still reloads the models
      if (timer) clearTimeout(timer);
      await poll();
    } catch (error) {
      clear(problem, errorBox(error));
      name.focus();
    }
  }

  upstream.addEventListener("change", loadModels);
  name.addEventListener("keydown", (e) => { if (e.key === "Enter") { e.preventDefault(); pull(); } });
  const body = h("div", { class: "ollama" },
    field("Upstream", upstream),
    h("h3", {}, "Models on the upstream"), models,
    h("h3", {}, "Pull a model"),
    h("div", { class: "inline-form" }, field("Model to pull", name, "A name from the Ollama library, e.g. llama3.2:1b."),
      h("button", { type: "button", class: "primary", onclick: pull }, "Pull")),
    problem, h("h3", {}, "Pulls"), jobs);
  const done = modal(`Ollama models of ${pool.name}`, body, { submitLabel: null, cancelLabel: "Close" });
  await Promise.all([loadModels(), poll()]);
  await done;
  open = false;
  if (timer) clearTimeout(timer);
  if (changed) await reload();
}
