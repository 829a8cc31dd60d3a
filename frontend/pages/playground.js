// Chat playground: a key and a model, then a streamed chat through the PUBLIC listener, exactly as a client
// would send it (so it proves the whole path: gate, routing, pool, upstream, metering). The public listener is
// another origin than this page: it must allow this page's origin (CORS), see docs/admin.md.
import { clear, errorBox, field, h, toast } from "../dom.js";
import { createdKeys } from "../session.js";

export const title = "Playground";
const STORE = "bastion-public-url";

/** The public listener's base URL from the `public_listen` setting (a wildcard address: this page's host). */
export function publicBase(listen) {
  const m = String(listen || "").match(/^(?:\[([^\]]*)\]|([^:]*)):(\d+)$/) || [null, null, "", String(listen)];
  let host = m[1] ?? m[2];
  if (!host || host === "0.0.0.0" || host === "::" || host === "*") host = location.hostname;
  if (host.includes(":")) host = `[${host}]`;
  return `${location.protocol === "https:" ? "https" : "http"}://${host}:${m[3]}`;
}

export async function render(ctx) {
  const { api, admin, root } = ctx;
  const [settings, pools] = await Promise.all([api.settings(), api.pools()]);
  let saved = null;
  try { saved = localStorage.getItem(STORE); } catch { /* storage disabled */ }
  const base = h("input", { name: "base", value: saved || publicBase(settings.public_listen), spellcheck: "false" });
  const mine = h("select", { name: "created" }, h("option", { value: "" }, "Paste a key below"),
    [...createdKeys].map(([id, k]) => h("option", { value: id }, `${k.name} (created in this tab)`)));
  const key = h("input", { name: "key", type: "password", autocomplete: "off", placeholder: "bst_...", spellcheck: "false" });
  const allModels = [...new Set(pools.flatMap((p) => (p.models.length ? p.models : p.discovered_models)))].sort();
  const model = h("select", { name: "model" });
  const prompt = h("textarea", { name: "prompt", rows: 3, value: "Say hello." });
  const output = h("div", { class: "chat-log", id: "chat-output", "aria-live": "polite", role: "log" });
  const info = h("div", { id: "chat-info" });
  const send = h("button", { type: "submit", class: "primary" }, "Send");
  const stop = h("button", { type: "button", disabled: true }, "Stop");
  let controller = null;

  // the models the chosen key may use (its globs), when the key is one this tab created
  const showModels = async () => {
    let allowed = allModels;
    if (mine.value) {
      const record = await api.key(mine.value).catch(() => null);
      if (record?.models.length) allowed = allModels.filter((m) => record.models.some((g) => glob(g).test(m)));
    }
    clear(model, allowed.map((m) => h("option", { value: m }, m)));
  };
  mine.addEventListener("change", () => {
    key.value = mine.value ? createdKeys.get(mine.value).secret : "";
    showModels();
  });
  if (createdKeys.size) {
    mine.value = [...createdKeys.keys()].at(-1);
    key.value = createdKeys.get(mine.value).secret;
  }
  await showModels();

  const modes = h("fieldset", { class: "modes" }, h("legend", {}, "Request"),
    [["chat", "Chat (streamed)"], ["embeddings", "Embeddings"]].map(([value, text]) => h("label", { class: "check" },
      h("input", { type: "radio", name: "mode", value, checked: value === "chat" }), text)));
  const form = h("form", { class: "card" },
    modes,
    field("Public listener", base, "Where clients send requests; it must allow this page's origin (CORS)."),
    corsNotice(ctx, settings, admin),
    h("div", { class: "grid2" }, field("Key", mine), field("API key", key, "The page cannot read stored secrets.")),
    field("Model", model), field("Message", prompt), h("div", { class: "actions" }, stop, send));
  clear(root, h("h1", {}, "Chat playground"), form, info, output);
  stop.addEventListener("click", () => controller?.abort());

  form.addEventListener("submit", async (e) => {
    e.preventDefault();
    try { localStorage.setItem(STORE, base.value.trim()); } catch { /* storage disabled */ }
    clear(output);
    clear(info);
    controller = new AbortController();
    send.disabled = true;
    stop.disabled = false;
    const started = performance.now();
    let first = null;
    const url = (path) => `${base.value.trim().replace(/\/$/, "")}${path}`;
    const headers = { "Content-Type": "application/json", Authorization: `Bearer ${key.value.trim()}` };
    try {
      if (form.elements.mode.value === "embeddings") {
        const response = await fetch(url("/v1/embeddings"), { method: "POST", signal: controller.signal,
          credentials: "omit", headers, body: JSON.stringify({ model: model.value, input: prompt.value }) });
        const body = await response.json().catch(() => ({}));
        if (!response.ok) throw new Error(`${response.status}: ${body.error?.message || body.message || response.statusText}`);
        const vector = body.data?.[0]?.embedding || [];
        output.append(`${vector.length} dimensions: [${vector.slice(0, 8).map((x) => Number(x).toFixed(4)).join(", ")}`,
          vector.length > 8 ? ", …]" : "]");
        info.append(h("p", { class: "hint" }, `done after ${Math.round(performance.now() - started)} ms`,
          body.usage ? `, ${body.usage.prompt_tokens} prompt tokens` : ""));
        return;
      }
      const response = await fetch(url("/v1/chat/completions"), {
        method: "POST", signal: controller.signal, credentials: "omit", headers,
        body: JSON.stringify({ model: model.value, stream: true, messages: [{ role: "user", content: prompt.value }] }),
      });
      if (!response.ok) {
        const body = await response.json().catch(() => ({}));
        throw new Error(`${response.status}: ${body.error?.message || body.message || response.statusText}`);
      }
      const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
      let buffer = "";
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        buffer += value;
        const events = buffer.split("\n\n");
        buffer = events.pop();
        for (const event of events) {
          const data = event.split("\n").filter((l) => l.startsWith("data:")).map((l) => l.slice(5).trim()).join("");
          if (!data || data === "[DONE]") continue;
          const chunk = JSON.parse(data);
          const piece = chunk.choices?.[0]?.delta?.content;
          if (piece) {
            first ??= performance.now();
            output.append(piece);
          }
          if (chunk.usage) clear(info, h("p", { class: "hint" }, `tokens: ${chunk.usage.prompt_tokens} prompt, `,
            `${chunk.usage.completion_tokens} completion`));
        }
      }
      info.append(h("p", { class: "hint" }, `first token after ${Math.round((first ?? performance.now()) - started)} ms, `,
        `done after ${Math.round(performance.now() - started)} ms`));
    } catch (error) {
      if (error.name === "AbortError") info.append(h("p", { class: "hint" }, "stopped"));
      else clear(info, errorBox(error instanceof TypeError
        ? new Error(`The public listener could not be reached from this page (${error.message}). Check its URL, and that it allows the origin ${location.origin} (CORS).`)
        : error));
    } finally {
      send.disabled = false;
      stop.disabled = true;
      controller = null;
    }
  });
  return () => controller?.abort();
}

function glob(pattern) {
  const escaped = pattern.replace(/[.+^$(){}|\\]/g, (c) => `\\${c}`);
  return new RegExp(`^${escaped.replaceAll("*", ".*").replaceAll("?", ".")}$`);
}

/** Whether the public listener lets this page's origin read its answers (the `cors_origins` setting). */
function corsNotice(ctx, settings, admin) {
  if (!("cors_origins" in settings)) {
    return h("p", { class: "notice" }, "This Bastion has no cors_origins setting: the browser may refuse to read ",
      "the public listener's answers from this page.");
  }
  const origins = settings.cors_origins || [];
  if (origins.includes("*") || origins.includes(location.origin)) return null;
  const box = h("div", { class: "notice", id: "cors-notice" }, "The public listener does not allow this page's origin ",
    h("code", {}, location.origin), " (setting cors_origins), so the browser will refuse its answers. ");
  if (admin) {
    box.append(h("button", { type: "button", class: "small", onclick: async () => {
      try {
        await ctx.api.updateSettings({ cors_origins: [...origins, location.origin] });
        toast(`${location.origin} added to cors_origins`);
        box.remove();
      } catch (error) { box.append(errorBox(error)); }
    } }, "Allow this origin"));
  }
  return box;
}
