// Network: CIDR groups (named allow/deny lists), which groups guard the listeners, trusted proxies, CORS
// origins, and the addresses blocked for sending invalid keys.
import { clear, confirmDialog, field, h, list, modal, num, table, toast, when } from "../dom.js";
import { settingsForm } from "../settings-form.js";

export const title = "Network";
const NAMES = ["public_cidr_groups", "admin_cidr_groups", "metrics_cidr_groups", "trusted_proxies", "cors_origins",
  "bruteforce_exempt_cidr_groups"];
const HINTS = {
  public_cidr_groups: "Who may reach the public listener (empty: everyone).",
  admin_cidr_groups: "Who may reach this page and the management API. Bastion refuses a change that locks you out.",
  trusted_proxies: "Addresses whose X-Forwarded-For is believed (the client address is taken from it).",
  cors_origins: "Web pages (origins) allowed to call the public API from a browser; * for any.",
};

export async function render(ctx) {
  const { api, admin, root } = ctx;
  const groups = h("div"), access = h("div"), blocks = h("div");
  clear(root, h("div", { class: "page-head" }, h("h1", {}, "Network"),
    admin ? h("button", { class: "primary", onclick: () => groupDialog(null) }, "Add CIDR group") : null),
  h("h2", {}, "CIDR groups"), groups, h("h2", {}, "Listeners and proxies"), access,
  h("div", { class: "page-head" }, h("h2", {}, "Blocked addresses"),
    admin ? h("button", { class: "small", onclick: clearAll }, "Lift every block") : null), blocks);

  async function load() {
    const [groupList, settings, blockList] = await Promise.all([api.cidrGroups(), api.settings(), api.blocks()]);
    clear(groups, table([
      ["Name", (g) => [g.name, g.builtin ? [" ", h("span", { class: "badge" }, "built in")] : null]],
      ["Allow", (g) => g.allow.join(", ") || "—"], ["Deny", (g) => g.deny.join(", ") || "—"],
      ["", (g) => admin && !g.builtin ? h("div", { class: "row-actions" },
        h("button", { class: "small", onclick: () => groupDialog(g) }, "Edit"),
        h("button", { class: "small danger", onclick: () => removeGroup(g) }, "Remove")) : null],
    ], groupList));
    clear(access, h("section", { class: "card" }, settingsForm(ctx, settings, NAMES, { hints: HINTS, saved: load })));
    clear(blocks, table([
      ["Address", (b) => h("code", {}, b.address)], ["Since", (b) => when(b.since)], ["Until", (b) => when(b.until)],
      ["Failures", (b) => num(b.failures)], ["Refused", (b) => num(b.refused)],
      ["", (b) => admin ? h("button", { class: "small", onclick: async () => {
        await api.clearBlock(b.address).then(() => toast(`${b.address} unblocked`), (e) => toast(e.message, "error"));
        await load();
      } }, "Lift") : null],
    ], blockList, { empty: "No address is blocked." }));
  }

  async function groupDialog(group) {
    const saved = await modal(group ? `Edit ${group.name}` : "Add CIDR group", h("div", {},
      group ? null : field("Name", { name: "name", required: true }),
      field("Allow", h("textarea", { name: "allow", rows: 3, value: group?.allow.join("\n") ?? "" }),
        "Networks such as 10.0.0.0/8 or 2001:db8::/32, one per line or comma-separated."),
      field("Deny", h("textarea", { name: "deny", rows: 2, value: group?.deny.join("\n") ?? "" }),
        "Checked before allow.")), {
      onSubmit: (f) => {
        const body = { allow: list(f.elements.allow.value), deny: list(f.elements.deny.value) };
        return group ? api.updateCidrGroup(group.name, body) : api.createCidrGroup({ name: f.elements.name.value.trim(), ...body });
      },
    });
    if (saved) { toast("CIDR group saved"); await load(); }
  }

  async function removeGroup(g) {
    if (!(await confirmDialog(`Remove ${g.name}?`, "Refused while a listener or a key uses it.", "Remove"))) return;
    await api.removeCidrGroup(g.name).then(() => toast(`${g.name} removed`), (e) => toast(e.message, "error"));
    await load();
  }

  async function clearAll() {
    if (!(await confirmDialog("Lift every block?", "Every blocked address may try keys again.", "Lift all"))) return;
    await api.clearBlocks().then(() => toast("blocks lifted"), (e) => toast(e.message, "error"));
    await load();
  }

  await load();
}
