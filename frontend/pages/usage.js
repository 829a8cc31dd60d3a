// Usage: the requests of a key (or all) in a date range (start, end, success or failure, elapsed), their
// aggregates and time buckets; CSV export of both, the chart as PNG. Reads /api/v1/usage and /usage/summary.
import { chartCard, downloadPng } from "../charts.js";
import { badge, clear, field, h, num, table, when } from "../dom.js";
import { rangePicker } from "../range.js";

export const title = "Usage";
const PAGE = 100;

export async function render(ctx) {
  const { api, root, params } = ctx;
  const keys = await api.keys(true);
  const names = new Map(keys.map((k) => [k.id, k.name]));
  const keySelect = h("select", { name: "key" }, h("option", { value: "" }, "All keys"),
    keys.map((k) => h("option", { value: k.id, selected: params.get("key") === k.id }, `${k.name} (${k.key})`)));
  const model = h("input", { name: "model", placeholder: "any", value: params.get("model") || "" });
  const range = rangePicker(() => load(), params.get("range") || "day");
  const totals = h("div", { class: "cards" }), chart = h("div"), aggregates = h("div"), records = h("div");
  const exports = h("div", { class: "row-actions" });
  let card = null;
  clear(root, h("div", { class: "page-head" }, h("h1", {}, "Usage"), exports),
    h("div", { class: "filters" }, field("Key", keySelect), field("Model", model)), range.element,
    totals, chart, h("h2", {}, "By key and model"), aggregates, h("h2", {}, "Requests"), records);
  keySelect.addEventListener("change", () => load());
  model.addEventListener("change", () => load());

  function filters() {
    const r = range.value();
    return { r, query: { key: keySelect.value, model: model.value.trim(), since: r.since, until: r.until ?? "" } };
  }

  async function load() {
    const { r, query } = filters();
    const [buckets, groups] = await Promise.all([
      api.usageSummary({ ...query, group_by: "none", bucket: r.bucket }),
      api.usageSummary({ ...query, group_by: "key,model", bucket: "none" })]);
    const sum = (f) => groups.rows.reduce((a, row) => a + (row[f] || 0), 0);
    clear(totals, [["Requests", num(sum("requests"))], ["Errors", num(sum("errors"))],
      ["Tokens", num(sum("total_tokens"))], ["Cost", `$${num(sum("cost"), 4)}`]].map(([label, value]) =>
      h("div", { class: "stat" }, h("div", { class: "label" }, label), h("div", { class: "value" }, value))));
    card?.dispose();
    card = chartCard(`Requests per ${r.bucket}`, [{ label: "requests", points: buckets.rows.map((x) => [x.bucket, x.requests]) },
      { label: "errors", points: buckets.rows.map((x) => [x.bucket, x.errors]) }],
    { kind: "bar", from: r.since, to: r.until ?? Math.floor(Date.now() / 1000),
      step: { minute: 60, hour: 3600, day: 86400 }[r.bucket] });
    clear(chart, card);
    clear(exports,
      h("a", { class: "button", href: api.usageCsvUrl("/api/v1/usage", { ...query, limit: 10000 }), download: "usage-records.csv" }, "Requests CSV"),
      h("a", { class: "button", href: api.usageCsvUrl("/api/v1/usage/summary", { ...query, group_by: "key,model", bucket: r.bucket }),
        download: "usage-summary.csv" }, "Summary CSV"),
      h("button", { type: "button", onclick: () => downloadPng(card.chartCanvas, "usage-chart") }, "Chart PNG"));
    clear(aggregates, table([
      ["Key", (x) => names.get(x.key) ?? x.key ?? "(none)"], ["Model", (x) => x.model ?? "(none)"],
      ["Requests", (x) => num(x.requests)], ["Errors", (x) => num(x.errors)],
      ["Prompt tokens", (x) => num(x.prompt_tokens)], ["Completion tokens", (x) => num(x.completion_tokens)],
      ["p50 latency", (x) => seconds(x.p50_duration)], ["p95 latency", (x) => seconds(x.p95_duration)],
      ["Cost", (x) => (x.cost ? `$${num(x.cost, 4)}` : "—")],
    ], groups.rows, { empty: "No requests in this range." }));
    await loadRecords(query);
  }

  async function loadRecords(query, cursor, rows = []) {
    const page = await api.usageRecords({ ...query, limit: PAGE, cursor });
    const all = [...rows, ...page.records];
    clear(records, table([
      ["Start", (x) => when(x.start)], ["End", (x) => (x.outcome && x.outcome !== "completed" ? "—" : when(x.end))],
      ["Key", (x) => names.get(x.key) ?? x.key ?? "—"], ["Model", (x) => x.model ?? "—"],
      ["Result", (x) => badge(x.status < 400 && (!x.outcome || x.outcome === "completed") ? "success" : "failure",
        x.status < 400 && (!x.outcome || x.outcome === "completed") ? "ok" : "bad")],
      ["Status", (x) => String(x.status)], ["Elapsed", (x) => seconds(x.duration)],
      ["Tokens", (x) => num(x.total_tokens)], ["Upstream", (x) => x.upstream ?? "—"],
    ], all, { empty: "No requests in this range." }),
    page.next_cursor ? h("div", { class: "actions" }, h("button", { onclick: () => loadRecords(query, page.next_cursor, all) },
      "Load more")) : null);
  }

  await load();
  return () => card?.dispose();
}

const seconds = (s) => (s === null || s === undefined ? "—" : s < 1 ? `${Math.round(s * 1000)} ms` : `${num(s, 2)} s`);
