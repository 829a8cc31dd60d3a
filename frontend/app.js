// The shell: sign-in state, hash routing (#/keys, #/usage?key=...), theme, navigation. Each page is a module
// in pages/ exporting `title` and `render(ctx)` (which may return a cleanup function); adding a page means
// adding a module and a line to PAGES.
import { api, setUnauthorizedHandler } from "./api.js";
import { clear, h, toast } from "./dom.js";

const PAGES = [
  // [route, label, module, admin only]
  ["dashboard", "Dashboard", "./pages/dashboard.js", false],
  ["keys", "Keys", "./pages/keys.js", false],
  ["pools", "Pools", "./pages/pools.js", false],
  ["config", "nginx config", "./pages/config.js", false],
  ["usage", "Usage", "./pages/usage.js", false],
  ["playground", "Playground", "./pages/playground.js", false],
  ["network", "Network", "./pages/network.js", false],
  ["certificates", "Certificates", "./pages/certificates.js", false],
  ["audit", "Audit log", "./pages/audit.js", false],
  ["settings", "Settings", "./pages/settings.js", false],
  ["users", "Users", "./pages/users.js", true],
];

const state = { user: null, cleanup: null, rendering: 0 };
const main = document.getElementById("main");
const nav = document.getElementById("nav");

function parseHash() {
  const raw = location.hash.replace(/^#\/?/, "");
  const [route, query = ""] = raw.split("?");
  return { route: route || "dashboard", params: new URLSearchParams(query) };
}

export function navigate(route, params) {
  const qs = params ? `?${new URLSearchParams(params)}` : "";
  const hash = `#/${route}${qs}`;
  if (location.hash === hash) renderRoute(); // no hashchange event for the same hash
  else location.hash = hash;
}

const renderRoute = () => route();

function renderNav(active) {
  clear(nav, h("ul", {}, PAGES.filter(([, , , adminOnly]) => !adminOnly || isAdmin()).map(([route, label]) =>
    h("li", {}, h("a", { href: `#/${route}`, "aria-current": route === active ? "page" : null }, label)))));
}

const isAdmin = () => state.user && state.user.role === "admin";

function showChrome(signedIn) {
  nav.hidden = !signedIn;
  document.getElementById("logout").hidden = !signedIn;
  document.getElementById("menu-toggle").hidden = !signedIn;
  const who = document.getElementById("who");
  clear(who, signedIn ? [state.user.username, " ", h("span", { class: "badge" }, state.user.role)] : []);
  document.body.dataset.role = signedIn ? state.user.role : "";
}

async function route() {
  const ticket = ++state.rendering;
  delete document.body.dataset.ready; // set to the route once its page has rendered (tests wait for it)
  if (state.cleanup) { try { state.cleanup(); } catch { /* a page's cleanup must not stop the next one */ } }
  state.cleanup = null;
  let { route: name, params } = parseHash();
  // the session cookie is HttpOnly: the readable csrf_token cookie (same lifetime) says whether to ask
  if (!state.user && name !== "login" && document.cookie.includes("csrf_token=")) {
    try { state.user = await api.me(); } catch { state.user = null; }
    if (ticket !== state.rendering) return;
  }
  if (!state.user) name = "login";
  else if (name === "login") name = "dashboard";
  const page = name === "login" ? ["login", "Sign in", "./pages/login.js", false] : PAGES.find(([r]) => r === name);
  showChrome(Boolean(state.user));
  if (state.user) renderNav(name);
  if (!page || (page[3] && !isAdmin())) {
    clear(main, h("h1", {}, "Not found"), h("p", {}, "No such page: ", name));
    return;
  }
  const module = await import(page[2]);
  if (ticket !== state.rendering) return;
  document.title = `${module.title || page[1]} · Bastion`;
  clear(main);
  const ctx = {
    api, params, user: state.user, admin: isAdmin(), root: main, navigate,
    // after signing in: the page that was asked for (a bookmarked #/usage?key=...), else the dashboard
    signedIn: (user) => {
      state.user = user;
      if (parseHash().route === "login") navigate("dashboard");
      else renderRoute();
    },
  };
  try {
    const cleanup = await module.render(ctx);
    if (ticket === state.rendering) state.cleanup = typeof cleanup === "function" ? cleanup : null;
    else if (typeof cleanup === "function") cleanup();
  } catch (error) {
    if (error.status === 401) return; // the unauthorized handler takes over
    clear(main, h("h1", {}, page[1]), h("div", { class: "error-box", role: "alert" }, error.message));
  }
  document.body.dataset.ready = name;
  nav.classList.remove("open");
  document.getElementById("menu-toggle").setAttribute("aria-expanded", "false");
}

// a session that ended (expired, signed out elsewhere, password changed): sign in again, then back to this page
setUnauthorizedHandler(() => {
  if (!state.user) return;
  state.user = null;
  toast("Your session ended; please sign in again.", "error");
  renderRoute();
});

document.getElementById("logout").addEventListener("click", async () => {
  try { await api.logout(); } catch { /* signed out either way */ }
  state.user = null;
  navigate("login");
});

// theme: follow the system until the button picks light or dark; the button cycles system → light → dark
const THEMES = ["system", "light", "dark"];
function applyTheme(theme) {
  if (theme === "system") delete document.documentElement.dataset.theme;
  else document.documentElement.dataset.theme = theme;
  try {
    if (theme === "system") localStorage.removeItem("bastion-theme");
    else localStorage.setItem("bastion-theme", theme);
  } catch { /* storage disabled */ }
  const button = document.getElementById("theme-toggle");
  button.setAttribute("aria-label", `Theme: ${theme === "system" ? "follow the system" : theme}`);
  button.title = button.getAttribute("aria-label");
  button.textContent = { system: "◐", light: "☀", dark: "☾" }[theme];
  window.dispatchEvent(new Event("themechange"));
}
document.getElementById("theme-toggle").addEventListener("click", () => {
  const now = document.documentElement.dataset.theme || "system";
  applyTheme(THEMES[(THEMES.indexOf(now) + 1) % THEMES.length]);
});
applyTheme(document.documentElement.dataset.theme || "system");
matchMedia("(prefers-color-scheme: dark)").addEventListener("change", () =>
  window.dispatchEvent(new Event("themechange")));

document.getElementById("menu-toggle").addEventListener("click", (e) => {
  const open = nav.classList.toggle("open");
  e.currentTarget.setAttribute("aria-expanded", String(open));
});

// after a navigation, screen readers and keyboard users start at the new page's content
window.addEventListener("hashchange", () => route().then(() => {
  if (!document.querySelector("dialog[open]") && !main.contains(document.activeElement)) main.focus({ preventScroll: true });
}));
route();
