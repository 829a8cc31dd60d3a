// Sign in. A locked-out account or address gets 429 with Retry-After: the form says how long to wait and
// counts it down (the button stays disabled until then).
import { clear, errorBox, field, h } from "../dom.js";

export const title = "Sign in";

export function render(ctx) {
  const username = h("input", { name: "username", autocomplete: "username", required: true, autofocus: true });
  const password = h("input", { name: "password", type: "password", autocomplete: "current-password", required: true });
  const submit = h("button", { type: "submit", class: "primary" }, "Sign in");
  const message = h("div", { "aria-live": "assertive" });
  let timer = null;

  const lockedOut = (error) => {
    let left = Math.max(1, Math.ceil(error.retryAfter || 60));
    submit.disabled = true;
    const text = h("span", {});
    // the server says why ("too many failed logins; try again in 60 s"); the wait is counted down here
    const reason = error.message.split(";")[0].replace(/^./, (c) => c.toUpperCase());
    const tick = () => {
      clear(text, `${reason}. Try again in ${left} s.`);
      if (left-- <= 0) {
        clearInterval(timer);
        submit.disabled = false;
        clear(message);
      }
    };
    clear(message, h("div", { class: "error-box lockout", role: "alert" }, text));
    tick();
    timer = setInterval(tick, 1000);
  };

  const form = h("form", { class: "card login", "aria-labelledby": "login-title" },
    h("h1", { id: "login-title" }, "Sign in to Bastion"),
    field("Username", username), field("Password", password), message, h("div", { class: "actions" }, submit));
  form.addEventListener("submit", async (e) => {
    e.preventDefault();
    submit.disabled = true;
    clear(message);
    try {
      const result = await ctx.api.login(username.value, password.value);
      ctx.signedIn({ username: result.username, role: result.role });
    } catch (error) {
      if (error.status === 429) return lockedOut(error);
      clear(message, errorBox(error));
      password.select();
      submit.disabled = false;
    }
  });
  clear(ctx.root, h("div", { class: "center" }, form));
  return () => clearInterval(timer);
}
