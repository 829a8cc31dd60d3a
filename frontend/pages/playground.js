// Chat playground: a key and a model, then a streamed chat through the PUBLIC listener, exactly as a client
// would send it (so it proves the whole path: gate, routing, pool, upstream, metering). The public listener is
// another origin than this page: it must allow this page's origin (CORS), see docs/admin.md.
import { clear, errorBox, field, h } from "../dom.js";

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
  const { api, root } = ctx;
  const [settings, pools] = await Promise.all([api.settings(), api.pools()]);
  let saved = null;
  try { saved = localStorage.getItem(STORE); } catch { /* storage disabled */ }
  const base = h("input", { name: "base", value: saved || publicBase(settings.public_listen), spellcheck: "false" });
  const key = h("input", { name: "key", type: "password", autocomplete: "off", placeholder: "bst_...", spellcheck: "false" });
  const models = [...new Set(pools.flatMap((p) => (p.models.length ? p.models : p.discovered_models)))].sort();
  const model = h("select", { name: "model" }, models.map((m) => h("option", { value: m }, m)));
  const prompt = h("textarea", { name: "prompt", rows: 3, value: "Say hello." });
  const output = h("div", { class: "chat-log", id: "chat-output", "aria-live": "polite", role: "log" });
  const info = h("div");
  const send = h("button", { type: "submit", class: "primary" }, "Send");
  const stop = h("button", { type: "button", disabled: true }, "Stop");
  let controller = null;

  const form = h("form", { class: "card" },
    field("Public listener", base, "Where clients send requests; it must allow this page's origin (CORS)."),
    h("div", { class: "grid2" }, field("API key", key, "Paste a key: the page cannot read stored secrets."),
      field("Model", model)),
    field("Message", prompt), h("div", { class: "actions" }, stop, send));
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
    try {
      const response = await fetch(`${base.value.trim().replace(/\/$/, "")}/v1/chat/completions`, {
        method: "POST", signal: controller.signal, credentials: "omit",
        headers: { "Content-Type": "application/json", Authorization: `Bearer ${key.value.trim()}` },
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
