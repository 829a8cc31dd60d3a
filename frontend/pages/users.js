// Admin users (admin only): add, change role or password (signs the user out everywhere), remove.
import { clear, confirmDialog, field, h, modal, table, toast, when } from "../dom.js";

export const title = "Users";

export async function render(ctx) {
  const { api, root, user } = ctx;
  const body = h("div");
  clear(root, h("div", { class: "page-head" }, h("h1", {}, "Users"),
    h("button", { class: "primary", onclick: () => userDialog(null) }, "Add user")), body);

  const roleSelect = (current) => h("select", { name: "role" },
    ["viewer", "admin"].map((r) => h("option", { value: r, selected: r === current }, r)));

  async function load() {
    clear(body, table([
      ["User", (u) => [u.username, u.username === user.username ? " (you)" : ""]], ["Role", (u) => u.role],
      ["Created", (u) => when(u.created_at)],
      ["", (u) => h("div", { class: "row-actions" },
        h("button", { class: "small", onclick: () => userDialog(u) }, "Edit"),
        h("button", { class: "small danger", onclick: () => remove(u) }, "Remove"))],
    ], await api.users()));
  }

  async function userDialog(u) {
    const saved = await modal(u ? `Edit ${u.username}` : "Add user", h("div", {},
      u ? null : field("Username", { name: "username", required: true, autocomplete: "off" }),
      field("Role", roleSelect(u?.role ?? "viewer")),
      field(u ? "New password" : "Password", { name: "password", type: "password", autocomplete: "new-password",
        required: !u }, u ? "Empty: unchanged. A change signs the user out everywhere." : null)), {
      onSubmit: (f) => {
        const body = { role: f.elements.role.value };
        if (f.elements.password.value) body.password = f.elements.password.value;
        return u ? api.updateUser(u.username, body) : api.createUser({ username: f.elements.username.value.trim(), ...body });
      },
    });
    if (saved) { toast("user saved"); await load(); }
  }

  async function remove(u) {
    if (!(await confirmDialog(`Remove ${u.username}?`, "Their sessions end at once.", "Remove"))) return;
    await api.removeUser(u.username).then(() => toast(`${u.username} removed`), (e) => toast(e.message, "error"));
    await load();
  }

  await load();
}
