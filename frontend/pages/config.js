// nginx config: the live file (highlighted), drift warning, the custom server blocks editor with a diff of the
// pending change, apply (nginx's own error shown when it refuses; nothing changes then), history, rollback.
import { badge, clear, confirmDialog, errorBox, h, modal, table, toast, when } from "../dom.js";

export const title = "nginx config";

export async function render(ctx) {
  const { api, admin, root } = ctx;
  const status = h("div"), editor = h("div"), history = h("div"), live = h("div");
  clear(root, h("div", { class: "page-head" }, h("h1", {}, "nginx configuration"),
    admin ? h("button", { class: "primary", id: "apply-config", onclick: applyNow }, "Render and apply") : null),
  status, editor, h("h2", {}, "History"), history, h("h2", {}, "Live nginx.conf"), live);

  async function applyNow(e) {
    e.currentTarget.disabled = true;
    try {
      const r = await api.configApply();
      toast(r.changed ? `applied: generation ${r.generation}` : `nothing changed (generation ${r.generation})`);
    } catch (error) {
      clear(status, errorBox(error));
      return;
    } finally { e.currentTarget.disabled = false; }
    await load();
  }

  async function load() {
    const [state, text, gens, settings] = await Promise.all([api.configStatus(), api.configLive(), api.configHistory(),
      api.settings()]);
    clear(status, h("p", {}, "Live generation ", h("strong", { id: "live-generation" }, String(state.generation)), " · nginx ",
      state.nginx_running ? badge("running", "ok") : badge("not running", "bad")),
    state.drift ? h("div", { class: "notice", role: "alert" }, h("strong", {}, "Drift: "),
      "the live files were changed by hand since Bastion wrote them. The next apply replaces the changes.",
      state.drift_diff ? diffView(state.drift_diff) : null) : null);
    renderEditor(settings.custom_config || "");
    clear(history, table([
      ["Generation", (g) => [String(g.generation), g.live ? [" ", badge("live", "ok")] : null]],
      ["When", (g) => when(g.time)],
      ["By", (g) => g.author],
      ["", (g) => h("div", { class: "row-actions" },
        h("button", { class: "small", onclick: () => showGeneration(g.generation) }, "Changes"),
        admin && !g.live ? h("button", { class: "small", onclick: () => rollback(g.generation) }, "Roll back") : null)],
    ], gens, { empty: "No generations kept." }));
    clear(live, h("pre", { class: "conf", id: "live-config", tabindex: "0", "aria-label": "live nginx.conf" },
      highlight(text.config)));
  }

  function renderEditor(current) {
    const area = h("textarea", { id: "custom-config", name: "custom_config", rows: 10, spellcheck: "false",
      readonly: !admin, value: current, "aria-describedby": "custom-hint" });
    const result = h("div", { "aria-live": "polite" });
    const preview = () => clear(result, area.value === current ? h("p", { class: "muted" }, "No pending change.")
      : [h("h3", {}, "Pending change"), diffView(unifiedDiff(current, area.value))]);
    const save = async (e) => {
      const button = e.currentTarget;
      button.disabled = true;
      try {
        const r = await api.setCustomConfig(area.value);
        toast(r.message || "applied");
        await load();
      } catch (error) {
        clear(result, h("p", {}, "Nothing was applied; the live configuration is unchanged."), errorBox(error));
      } finally { button.disabled = false; }
    };
    clear(editor, h("section", { class: "card" },
      h("h2", {}, h("label", { for: "custom-config" }, "Custom server blocks")),
      h("p", { class: "hint", id: "custom-hint" }, "Extra server { } blocks added to nginx.conf, checked by Bastion",
        " and by nginx -t before they go live; a refused change leaves the live configuration as it was."),
      area,
      admin ? h("div", { class: "actions" },
        h("button", { type: "button", onclick: preview }, "Show diff"),
        h("button", { type: "button", class: "primary", id: "save-custom", onclick: save }, "Apply change")) : null,
      result));
  }

  async function showGeneration(n) {
    const g = await api.configGeneration(n);
    await modal(`Generation ${n}`, h("div", {}, h("p", {}, `${when(g.time)} by ${g.author}`),
      g.diff ? diffView(g.diff) : h("p", { class: "muted" }, "No changes to the generation before.")),
    { submitLabel: "Close", cancelLabel: null });
  }

  async function rollback(n) {
    if (!(await confirmDialog(`Roll back to generation ${n}?`,
      "Pools, routes, settings and CIDR groups return to that generation's; keys are not touched.", "Roll back"))) return;
    try {
      const r = await api.configRollback(n);
      toast(`rolled back: live generation ${r.generation}`);
    } catch (error) {
      clear(status, errorBox(error));
      return;
    }
    await load();
  }

  await load();
}

/** nginx text as spans: comments, quoted strings, directive names (text nodes only). */
export function highlight(text) {
  const out = [];
  for (const line of text.split("\n")) {
    const m = line.match(/^(\s*)([A-Za-z_][\w.]*)(.*)$/);
    let rest = line;
    if (m && !m[2].startsWith("#")) {
      out.push(m[1], h("span", { class: "k" }, m[2]));
      rest = m[3];
    }
    const parts = rest.split(/("(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*'|#.*$)/);
    for (const part of parts) {
      if (!part) continue;
      if (part.startsWith("#")) out.push(h("span", { class: "c" }, part));
      else if (part.startsWith('"') || part.startsWith("'")) out.push(h("span", { class: "s" }, part));
      else out.push(part);
    }
    out.push("\n");
  }
  return out;
}

/** A unified-style line diff (LCS); large inputs fall back to old/new in full rather than growing quadratically. */
export function unifiedDiff(before, after) {
  const a = before.split("\n"), b = after.split("\n");
  if (a.length * b.length > 4_000_000) return [...a.map((l) => `-${l}`), ...b.map((l) => `+${l}`)].join("\n");
  const n = a.length, m = b.length;
  const lcs = Array.from({ length: n + 1 }, () => new Uint32Array(m + 1));
  for (let i = n - 1; i >= 0; i--) for (let j = m - 1; j >= 0; j--)
    lcs[i][j] = a[i] === b[j] ? lcs[i + 1][j + 1] + 1 : Math.max(lcs[i + 1][j], lcs[i][j + 1]);
  const lines = [];
  let i = 0, j = 0;
  while (i < n || j < m) {
    if (i < n && j < m && a[i] === b[j]) { lines.push(` ${a[i]}`); i++; j++; }
    else if (j < m && (i >= n || lcs[i][j + 1] >= lcs[i + 1][j])) lines.push(`+${b[j++]}`);
    else lines.push(`-${a[i++]}`);
  }
  return lines.join("\n");
}

export function diffView(diff) {
  return h("pre", { class: "diff", tabindex: "0" }, diff.split("\n").map((line) => {
    const kind = line.startsWith("+") && !line.startsWith("+++") ? "add"
      : line.startsWith("-") && !line.startsWith("---") ? "del" : line.startsWith("@@") ? "hunk" : null;
    return kind ? h("span", { class: kind }, line) : `${line}\n`;
  }));
}
