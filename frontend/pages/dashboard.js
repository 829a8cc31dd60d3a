// Dashboard: traffic charts over a chosen range (from /api/v1/usage/summary rollups), requests in flight,
// top keys and models, upstream health, certificates expiring soon, blocked addresses.
import { chartCard } from "../charts.js";
import { ago, badge, clear, h, num, table, when } from "../dom.js";
import { rangePicker } from "../range.js";

export const title = "Dashboard";
const BUCKET_SECONDS = { minute: 60, hour: 3600, day: 86400 };

export async function render(ctx) {
  const { api, root } = ctx;
  const stats = h("div", { class: "cards" }), charts = h("div", { class: "charts" }), tops = h("div", { class: "grid2" });
  const health = h("div"), certs = h("div"), blocks = h("div");
  const range = rangePicker(() => load());
  let cards = [];
  clear(root, h("div", { class: "page-head" }, h("h1", {}, "Dashboard")), range.element, stats, charts, tops,
    h("h2", {}, "Upstreams"), health, h("div", { class: "grid2" },
      h("section", {}, h("h2", {}, "Certificates expiring soon"), certs),
      h("section", {}, h("h2", {}, "Blocked addresses"), blocks)));

  let busy = 0; // loads in flight (a range change starts one while another runs): aria-busy until all are done
  async function load() {
    busy++;
    root.setAttribute("aria-busy", "true");
    try {
      await loadRange();
    } finally {
      if (--busy === 0) root.removeAttribute("aria-busy");
    }
  }

  async function loadRange() {
    const r = range.value();
    const query = { since: r.since, until: r.until };
    const [series, byKey, byModel, pools, keys] = await Promise.all([
      api.usageSummary({ ...query, group_by: "none", bucket: r.bucket }),
      api.usageSummary({ ...query, group_by: "key", bucket: "none", fields: "requests,errors,total_tokens" }),
      api.usageSummary({ ...query, group_by: "model", bucket: "none", fields: "requests,errors,total_tokens" }),
      api.pools(), api.keys(true)]);
    const inFlight = await api.metricsText().then((text) => {
      const m = text.match(/^bastion_requests_in_flight(?:\{\})? (\d+)/m);
      return m ? Number(m[1]) : null;
    }).catch(() => null);
    const rows = series.rows;
    const total = (f) => rows.reduce((a, row) => a + (row[f] || 0), 0);
    const requests = total("requests");
    clear(stats,
      stat("Requests", num(requests)), stat("Error rate", requests ? `${num((100 * total("errors")) / requests, 1)} %` : "—"),
      stat("Tokens", num(total("total_tokens"))), stat("In flight now", inFlight === null ? "—" : num(inFlight)),
      stat("Upstreams up", `${pools.flatMap((p) => p.upstreams).filter((u) => u.health === "up").length} / ${pools.flatMap((p) => p.upstreams).length}`));
    const step = BUCKET_SECONDS[r.bucket];
    const line = (label, f, scale = 1) => ({ label, points: rows.map((row) => [row.bucket, (row[f] ?? 0) * scale]) });
    cards.forEach((c) => c.dispose());
    const from = r.since, to = r.until ?? Math.floor(Date.now() / 1000);
    cards = [
      chartCard("Requests per minute", [line("requests", "requests", 60 / step)], { kind: "bar", from, to, step }),
      chartCard("Error rate", [{ label: "errors", points: rows.map((row) => [row.bucket, row.requests ? (100 * row.errors) / row.requests : 0]) }], { unit: "%", from, to }),
      chartCard("Latency", [line("p50", "p50_duration"), line("p95", "p95_duration")], { unit: "s", from, to }),
      chartCard("Time to first byte", [line("p50", "p50_ttfb"), line("p95", "p95_ttfb")], { unit: "s", from, to }),
      chartCard("Tokens", [line("prompt", "prompt_tokens"), line("completion", "completion_tokens")], { kind: "bar", from, to, step }),
    ];
    clear(charts, cards);
    const names = new Map(keys.map((k) => [k.id, k.name]));
    const top = (rows, label, cell) => table([[label, cell], ["Requests", (x) => num(x.requests)],
      ["Errors", (x) => num(x.errors)], ["Tokens", (x) => num(x.total_tokens)]],
    [...rows].sort((a, b) => b.requests - a.requests).slice(0, 10), { empty: "No requests in this range." });
    clear(tops,
      h("section", {}, h("h2", {}, "Top keys"), top(byKey.rows, "Key", (x) => names.get(x.key) ?? x.key ?? "(no key)")),
      h("section", {}, h("h2", {}, "Top models"), top(byModel.rows, "Model", (x) => x.model ?? "(none)")));
    clear(health, table([
      ["Pool", (u) => u.pool], ["Upstream", (u) => h("code", {}, u.url)],
      ["Health", (u) => badge(u.health || "unknown", { up: "ok", down: "bad" }[u.health])],
      ["Last error", (u) => u.error ?? "—"], ["Since", (u) => (u.error_since ? ago(u.error_since) : "—")],
    ], pools.flatMap((p) => p.upstreams.map((u) => ({ ...u, pool: p.name }))), { empty: "No pools yet." }));
    const [certList, blockList] = await Promise.all([api.certificates().catch(() => []), api.blocks().catch(() => [])]);
    clear(certs, table([["Certificate", (c) => c.name], ["Domains", (c) => c.domains.join(", ")],
      ["Days left", (c) => badge(String(c.days_left ?? "?"), c.days_left !== null && c.days_left < 14 ? "bad" : "warn")]],
    certList.filter((c) => c.days_left === null || c.days_left < 30), { empty: "None within 30 days." }));
    clear(blocks, table([["Address", (b) => h("code", {}, b.address)], ["Until", (b) => when(b.until)],
      ["Failures", (b) => num(b.failures)]], blockList, { empty: "No address is blocked." }));
  }

  await load();
  const timer = setInterval(() => load().catch(() => {}), 30000);
  return () => { clearInterval(timer); cards.forEach((c) => c.dispose()); };
}

function stat(label, value) {
  return h("div", { class: "stat" }, h("div", { class: "label" }, label), h("div", { class: "value" }, value));
}
