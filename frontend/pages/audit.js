// The audit log: who changed what, newest first.
import { clear, field, h, table, when } from "../dom.js";

export const title = "Audit log";

export async function render(ctx) {
  const { api, root } = ctx;
  const entries = await api.audit(1000);
  const filter = h("input", { name: "filter", type: "search", placeholder: "user or action" });
  const body = h("div");
  const show = () => {
    const needle = filter.value.trim().toLowerCase();
    const rows = needle ? entries.filter((e) => `${e.author} ${e.action}`.toLowerCase().includes(needle)) : entries;
    clear(body, table([["When", (e) => when(e.time)], ["Who", (e) => e.author], ["What", (e) => e.action]], rows,
      { empty: needle ? "No entry matches." : "No changes yet." }));
  };
  filter.addEventListener("input", show);
  clear(root, h("h1", {}, "Audit log"), h("div", { class: "filters" }, field("Filter", filter)), body);
  show();
}
