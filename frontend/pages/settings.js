// Every other setting (listeners, limits, timeouts, retention, brute-force protection, ACME, prices), edited
// through PATCH /api/v1/settings; network settings and the custom config have their own pages.
import { clear, h } from "../dom.js";
import { settingsForm } from "../settings-form.js";

export const title = "Settings";
// on the Network page (and the custom config on the nginx config page)
const ELSEWHERE = new Set(["custom_config", "public_cidr_groups", "admin_cidr_groups", "metrics_cidr_groups",
  "trusted_proxies", "cors_origins", "cors_methods", "cors_headers", "cors_credentials",
  "bruteforce_exempt_cidr_groups", "unauthenticated_rpm"]);
const SECTIONS = [
  ["Certificates (ACME)", /^acme_|^dns_/],
  ["Listeners", /_listen$|^server_name$|^hsts$|port$/],
  ["Models and routing", /^default_pool$|^auto_models$|^openai_paths_without_v1$|^discovery_interval$/],
  ["Upstreams and limits", /timeout|fails|body_limit|interval|ca_bundle|^max_/],
  ["Usage and logs", /retention|log_max|model_prices/],
  ["Brute-force protection", /^bruteforce_/],
];
const ORDER = ["Listeners", "Models and routing", "Upstreams and limits", "Usage and logs", "Brute-force protection",
  "Certificates (ACME)"];
const HINTS = {
  model_prices: 'JSON: {"model": {"input": USD per 1M prompt tokens, "output": ...}}',
  max_streams: "Streams in flight nginx makes room for (worker connections and open files follow).",
  auto_models: 'What "model": "auto" stands for, in order: the first with a live pool (keys with allow_auto).',
  openai_paths_without_v1: "Also answer /chat/completions, /models... as the /v1 paths.",
  default_pool: "The pool for requests without a model (or a model no pool lists); empty: none.",
  https_public_port: "The port clients reach HTTPS on, when it differs (containers, port forwards); empty: the listener's.",
};

export async function render(ctx) {
  const settings = await ctx.api.settings();
  const names = Object.keys(settings).filter((n) => !ELSEWHERE.has(n));
  const placed = new Set();
  const sections = SECTIONS.map(([heading, re]) => {
    const mine = names.filter((n) => !placed.has(n) && re.test(n));
    mine.forEach((n) => placed.add(n));
    return [heading, mine];
  });
  sections.sort((a, b) => ORDER.indexOf(a[0]) - ORDER.indexOf(b[0]));
  sections.push(["Other", names.filter((n) => !placed.has(n))]);
  clear(ctx.root, h("h1", {}, "Settings"),
    h("p", { class: "hint" }, "Changes are validated, rendered and checked by nginx before they go live; see ",
      "docs/configuration.md for each setting."),
    sections.filter(([, mine]) => mine.length).map(([heading, mine]) =>
      h("section", { class: "card" }, h("h2", {}, heading), settingsForm(ctx, settings, mine, { hints: HINTS }))));
}
