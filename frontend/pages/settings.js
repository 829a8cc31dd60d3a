// Every other setting (listeners, limits, timeouts, retention, brute-force protection, ACME, prices), edited
// through PATCH /api/v1/settings; network settings and the custom config have their own pages.
import { clear, h } from "../dom.js";
import { settingsForm } from "../settings-form.js";

export const title = "Settings";
const ELSEWHERE = new Set(["custom_config", "public_cidr_groups", "admin_cidr_groups", "metrics_cidr_groups",
  "trusted_proxies", "cors_origins", "bruteforce_exempt_cidr_groups"]);
const SECTIONS = [
  ["Certificates (ACME)", /^acme_|^dns_/],
  ["Listeners", /_listen$|^server_name$|^hsts$|port$/],
  ["Upstreams and limits", /timeout|fails|body_limit|interval|default_pool|ca_bundle|^max_|cors_/],
  ["Usage and logs", /retention|log_max|model_prices/],
  ["Brute-force protection", /^bruteforce_/],
];
const ORDER = ["Listeners", "Upstreams and limits", "Usage and logs", "Brute-force protection", "Certificates (ACME)"];

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
      h("section", { class: "card" }, h("h2", {}, heading), settingsForm(ctx, settings, mine, {
        hints: { model_prices: 'JSON: {"model": {"input": USD per 1M prompt tokens, "output": ...}}' } }))));
}
