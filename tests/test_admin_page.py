"""The admin web page in real headless Chromium (Debian's), driving the real stack: nginx, manager, gate and a
fake upstream. One browser per module; each test gets its own context (cookies) and fails on console errors or
failed requests it did not expect. Screenshots of every page (light and dark) go to artifacts/admin-page/."""

from __future__ import annotations

import os
import re
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from tests.conftest import ADMIN_PASSWORD, Stack, free_port
from tests.fakes import FakeUpstream

CHROMIUM = Path(os.environ.get("BASTION_CHROMIUM", "/usr/bin/chromium"))
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
        "--no-first-run"]
ARTIFACTS = Path(__file__).resolve().parent.parent / "artifacts" / "admin-page"
VIEWER_PASSWORD = "viewer-password-1"
XSS = "<img src=x onerror=alert(1)>"
PAGES = ["dashboard", "keys", "pools", "config", "usage", "playground", "network", "certificates", "audit", "settings",
         "users"]


def _missing() -> str | None:
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "playwright is not installed (pip install -e '.[test]')"
    if not CHROMIUM.exists():
        return f"{CHROMIUM} is missing (apt-get install chromium)"
    return None


@pytest.fixture(scope="module")
def browser() -> Iterator:
    if reason := _missing():
        if os.environ.get("CI") == "true":
            pytest.fail(f"browser tests cannot run under CI: {reason}")
        pytest.skip(reason)
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), args=ARGS)
        yield b
        b.close()


@pytest.fixture(scope="module")
def xss_upstream() -> Iterator[FakeUpstream]:
    up = FakeUpstream("xss", ["safe-model", XSS], chunk_delay=0.15, chunks=6)
    yield up
    up.close()


@pytest.fixture(scope="module")
def site(stack: Stack) -> Stack:
    stack.cli("users", "add", "viewer", "--role", "viewer", "--password", VIEWER_PASSWORD)
    stack.key("demo key", "--rpm", "60")  # so the viewer has rows whose edit buttons must be missing
    return stack


class Watched:
    """A page plus what went wrong in it: console errors, failed requests, HTTP errors, dialogs (alert)."""

    def __init__(self, context, base: str):
        self.context = context
        self.page = context.new_page()
        self.base = base
        self.problems: list[str] = []
        self.allowed: list[str] = []  # substrings of expected failures (e.g. a refused config change)
        self.page.on("console", lambda m: m.type == "error"
                     and self._problem(f"console: {m.text} ({m.location.get('url')})"))
        self.page.on("pageerror", lambda e: self.problems.append(f"page error: {e}"))
        self.page.on("requestfailed", lambda r: self._problem(f"request failed: {r.method} {r.url} {r.failure}"))
        self.page.on("response", lambda r: r.status >= 400 and self._problem(f"HTTP {r.status}: {r.url}"))
        self.page.on("dialog", lambda d: (self.problems.append(f"dialog: {d.message}"), d.dismiss()))

    def _problem(self, text: str) -> None:
        if not any(a in text for a in self.allowed):
            self.problems.append(text)

    def go(self, route: str) -> None:
        """Open a page and wait until it has rendered its data (a hash change alone loads nothing)."""
        self.page.goto(f"{self.base}/#/{route}")
        self.page.locator(f'body[data-ready="{route.split("?")[0]}"]').wait_for(state="attached")

    def login(self, username: str, password: str) -> None:
        self.page.goto(self.base + "/admin")
        self.page.get_by_label("Username").fill(username)
        self.page.get_by_label("Password").fill(password)
        self.page.get_by_role("button", name="Sign in").click()
        # the dashboard has loaded all its data (a load state would be the sign-in page's, reached long ago)
        self.page.locator('body[data-ready="dashboard"]').wait_for(state="attached")

    def check(self) -> None:
        assert not self.problems, "\n".join(self.problems)


@pytest.fixture
def web(browser, site: Stack) -> Iterator[Watched]:
    context = browser.new_context(viewport={"width": 1280, "height": 860})
    context.grant_permissions(["clipboard-read", "clipboard-write"], origin=site.admin)
    context.set_default_timeout(10_000)
    w = Watched(context, site.admin)
    yield w
    context.close()


def chat(stack: Stack, key: str, model: str) -> requests.Response:
    return stack.post("/v1/chat/completions", key,
                      json={"model": model, "messages": [{"role": "user", "content": "hi"}]})


def refused_soon(stack: Stack, key: str) -> bool:
    """Key changes reach the gate within a second: wait up to 5 s for a 401."""
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        if chat(stack, key, "safe-model").status_code == 401:
            return True
        time.sleep(0.1)
    return False


def live_generation(stack: Stack) -> int:
    token = stack.admin_token()
    return requests.get(stack.admin + "/api/v1/config", headers={"Authorization": f"Bearer {token}"},
                        timeout=10).json()["generation"]


def test_admin_runs_bastion_from_the_browser(web: Watched, site: Stack, xss_upstream: FakeUpstream) -> None:
    page = web.page
    web.login("admin", ADMIN_PASSWORD)

    # a pool: its models are discovered from the fake upstream; a hostile model name never becomes markup
    web.go("pools")
    page.get_by_role("button", name="Add pool").click()
    dialog = page.get_by_role("dialog")
    dialog.get_by_label("Name", exact=True).fill("web")
    dialog.get_by_label("Upstreams", exact=True).fill(xss_upstream.url)
    dialog.get_by_label("Upstream API key").fill("upstream-secret-1")
    dialog.get_by_role("button", name="Add").click()
    card = page.locator("section.pool", has=page.get_by_role("heading", name="web"))
    card.get_by_text("safe-model").wait_for()
    card.get_by_text("API key set").wait_for()
    assert "upstream-secret-1" not in page.content()
    assert page.locator("img[src=x]").count() == 0
    card.get_by_role("button", name="Edit").click()  # traffic settings: retries, WebSocket, model-aware
    dialog = page.get_by_role("dialog")
    dialog.get_by_label("Retries").fill("1")
    dialog.get_by_label("WebSocket pass-through").check()
    dialog.get_by_label("Model-aware", exact=False).check()
    dialog.get_by_role("button", name="Save").click()
    card.get_by_text("1 retries").wait_for()
    card.get_by_text("WebSocket", exact=True).wait_for()
    card.get_by_text("model-aware", exact=True).wait_for()
    page.get_by_role("button", name="Add route").click()
    dialog = page.get_by_role("dialog")
    dialog.get_by_label("Model", exact=True).fill("safe-*")
    dialog.get_by_label("web").check()
    dialog.get_by_label("Mode", exact=True).select_option("balance")
    dialog.get_by_role("button", name="Save").click()
    page.locator("tr", has_text="safe-*").get_by_text("balance").wait_for()

    # a key: the secret is shown once; the copy button puts exactly it on the clipboard
    web.go("keys")
    page.get_by_role("button", name="Create key").click()
    dialog = page.get_by_role("dialog")
    dialog.get_by_label("Name", exact=True).fill("browser key")
    dialog.get_by_label("Allowed models").fill("safe-model")
    dialog.get_by_role("button", name="Create").click()
    secret = page.locator("code.secret-value").inner_text()
    assert secret.startswith("bst_"), secret
    page.get_by_role("button", name="Copy").click()
    page.get_by_text("Key copied").wait_for()
    assert page.evaluate("navigator.clipboard.readText()") == secret
    page.get_by_role("button", name="Done").click()
    row = page.locator("tr", has_text="browser key")
    row.get_by_text("active", exact=True).wait_for()
    assert secret not in page.content()  # the list shows it masked
    assert chat(site, secret, "safe-model").status_code == 200

    # edit the key's rules, disable and enable it again
    row.get_by_role("button", name="Edit").click()
    dialog = page.get_by_role("dialog")
    dialog.get_by_label("Requests per minute").fill("120")
    dialog.get_by_label("Tokens per day").fill("50000")
    dialog.get_by_label("Expires").fill("30d")
    dialog.get_by_label("Requests at once").fill("3")
    dialog.get_by_label("Default model").fill("safe-model")
    dialog.get_by_label('Allow "model": "auto"', exact=False).check()
    dialog.get_by_role("button", name="Save").click()
    row.get_by_text("120 rpm").wait_for()
    row.get_by_text("50,000 tok/day").wait_for()
    row.get_by_text("3 at once").wait_for()
    row.get_by_text("default safe-model").wait_for()
    row.get_by_text("auto allowed").wait_for()
    stored = next(k for k in requests.get(site.admin + "/api/v1/keys", timeout=10, headers={
        "Authorization": f"Bearer {site.admin_token()}"}).json() if k["name"] == "browser key")
    assert (stored["max_parallel"], stored["default_model"], stored["allow_auto"]) == (3, "safe-model", True)
    row.get_by_role("button", name="Disable").click()
    row.get_by_text("disabled", exact=True).wait_for()
    assert refused_soon(site, secret), "a disabled key still works"
    row.get_by_role("button", name="Enable").click()
    row.get_by_text("active", exact=True).wait_for()

    # the request shows in the key's usage
    row.get_by_role("link", name="Usage").click()
    page.get_by_role("heading", name="Usage").wait_for()
    usage_row = page.locator("tr", has_text="safe-model").filter(has_text="success").first
    usage_row.wait_for()
    assert "browser key" in usage_row.inner_text()
    csv = page.evaluate("""fetch(document.querySelector('a[download="usage-records.csv"]').href)
        .then(async r => [r.status, r.headers.get('content-type'), await r.text()])""")
    assert csv[0] == 200 and csv[1].startswith("text/csv"), csv
    assert "safe-model" in csv[2] and csv[2].splitlines()[0].startswith("id,"), csv[2][:300]

    # a config change: the pending diff, then applied as a new generation
    web.go("config")
    before = int(page.locator("#live-generation").inner_text())
    server = f"server {{\n    listen 127.0.0.1:{free_port()};\n    server_name admin-page-test.example;\n" \
             f"    # {XSS}\n    location = /hello {{ return 200 'hello'; }}\n}}"
    page.locator("#custom-config").fill(server)
    page.get_by_role("button", name="Show diff").click()
    page.locator(".diff .add", has_text="admin-page-test.example").wait_for()
    page.get_by_role("button", name="Apply change").click()
    page.locator("#live-generation", has_text=str(before + 1)).wait_for()
    assert live_generation(site) == before + 1
    page.locator("#live-config", has_text=XSS).wait_for()  # the comment, shown as text in the live config
    assert page.locator("img[src=x]").count() == 0

    # an invalid change: nginx's own error is shown and nothing is applied
    web.allowed.append("/nginx/config/update")
    bad = server.replace("}\n}", "}\n    location = /hello { return 200 'again'; }\n}")
    page.locator("#custom-config").fill(bad)
    page.get_by_role("button", name="Apply change").click()
    error = page.locator(".error-box .nginx-output")
    error.wait_for()
    assert "duplicate location" in error.inner_text()
    page.get_by_text("Nothing was applied").wait_for()
    assert live_generation(site) == before + 1
    web.allowed.clear()

    # rollback to the generation before the change
    page.locator("tr", has=page.locator("td", has_text=re.compile(rf"^{before}$"))).get_by_role(
        "button", name="Roll back").click()
    page.get_by_role("dialog").get_by_role("button", name="Roll back").click()
    page.locator("#live-generation", has_text=str(before + 2)).wait_for()
    assert "admin-page-test.example" not in page.locator("#custom-config").input_value()

    # revoke: the key stops working at once
    web.go("keys")
    page.locator("tr", has_text="browser key").get_by_role("button", name="Revoke").click()
    page.get_by_role("dialog").get_by_role("button", name="Revoke").click()
    page.get_by_text("browser key revoked").wait_for()
    assert refused_soon(site, secret), "a revoked key still works"

    # logout: the session stops working and the sign-in form is back
    page.get_by_role("button", name="Sign out").click()
    page.get_by_role("heading", name="Sign in to Bastion").wait_for()
    status = page.evaluate("fetch('/auth/me').then(r => r.status)")
    assert status == 401
    web.problems = [p for p in web.problems if "/auth/me" not in p]  # the check above, on purpose
    web.check()


def test_playground_streams_through_the_public_listener(web: Watched, site: Stack) -> None:
    """Needs the public listener's CORS (setting cors_origins); skipped on a Bastion without it."""
    token = site.admin_token()
    auth = {"Authorization": f"Bearer {token}"}
    if "cors_origins" not in requests.get(site.admin + "/api/v1/settings", headers=auth, timeout=10).json():
        pytest.skip("this Bastion has no cors_origins setting (public CORS): the playground cannot read answers")
    slow = FakeUpstream("slow", ["play-model"], chunk_delay=0.25, chunks=8)
    try:
        r = requests.post(site.admin + "/api/v1/pools", headers=auth, json={"name": "play", "upstreams": [slow.url]},
                          timeout=30)
        assert r.status_code == 201, r.text
        page = web.page
        web.login("admin", ADMIN_PASSWORD)
        page.locator("nav a", has_text="Keys").click()
        page.get_by_role("button", name="Create key").click()
        page.get_by_role("dialog").get_by_label("Name", exact=True).fill("playground key")
        page.get_by_role("dialog").get_by_label("Allowed models").fill("play-*")
        page.get_by_role("dialog").get_by_role("button", name="Create").click()
        page.get_by_role("button", name="Done").click()
        page.locator("nav a", has_text="Playground").click()  # same document: the tab still knows the secret
        page.get_by_role("heading", name="Chat playground").wait_for()
        if page.locator("#cors-notice").count():
            page.get_by_role("button", name="Allow this origin").click()
            page.locator("#cors-notice").wait_for(state="detached")
        assert page.get_by_label("Model").input_value() == "play-model"
        page.get_by_role("button", name="Send").click()
        output = page.locator("#chat-output")
        seen: list[str] = []
        deadline = time.monotonic() + 15
        while "done after" not in page.locator("#chat-info").inner_text() and time.monotonic() < deadline:
            text = output.inner_text()
            if text and (not seen or text != seen[-1]):
                seen.append(text)
            time.sleep(0.05)
        assert "done after" in page.locator("#chat-info").inner_text(), page.locator("#chat-info").inner_text()
        assert len(seen) >= 3, seen  # the tokens appeared one after another, not at the end
        assert all(seen[i + 1].startswith(seen[i]) for i in range(len(seen) - 1)), seen

        page.get_by_label("Embeddings").check()
        page.get_by_role("button", name="Send").click()
        page.locator("#chat-output", has_text="3 dimensions").wait_for()
        page.get_by_label("Chat (streamed)").check()

        # revoked: the playground is refused
        requests.delete(site.admin + f"/api/v1/keys/{key_id(site, 'playground key')}", headers=auth, timeout=10)
        web.allowed.append("/v1/chat/completions")
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            page.get_by_role("button", name="Send").click()
            page.locator("#chat-info .error-box, #chat-info .hint").first.wait_for()
            if page.locator("#chat-info .error-box").count():
                break
            time.sleep(0.2)
        assert "401" in page.locator("#chat-info .error-box").inner_text()
        web.check()
    finally:
        slow.close()


def test_pools_page_shows_what_a_pool_speaks_and_manages_ollama_models(web: Watched, site: Stack) -> None:
    up = FakeUpstream("ollama-page", ["llama3:latest", XSS])
    up.pull_delay = 0.4
    try:
        page = web.page
        web.login("admin", ADMIN_PASSWORD)
        web.go("pools")
        page.get_by_role("button", name="Add pool").click()
        dialog = page.get_by_role("dialog")
        dialog.get_by_label("Name", exact=True).fill("olla")
        dialog.get_by_label("Upstreams", exact=True).fill(up.url)
        dialog.get_by_label("Ollama (/api/*)").check()
        dialog.get_by_label("Aliases").fill("chat-small = llama3:latest")
        dialog.get_by_label("Pass-through paths").fill("/tokenize")
        dialog.get_by_role("button", name="Add").click()
        card = page.locator("section.pool", has=page.get_by_role("heading", name="olla", exact=True))
        card.get_by_text("Ollama API").wait_for()
        assert card.get_by_text("OpenAI API").count() == 0  # set to Ollama only
        card.get_by_text("Ollama 0.6.5").wait_for()
        card.locator(".pool-facts", has_text="Aliases").get_by_text("chat-small").wait_for()
        card.locator(".pool-facts", has_text="Pass-through paths").get_by_text("/tokenize").wait_for()
        details = card.locator("tr", has_text="llama3:latest")
        assert "Q4_K_M" in details.inner_text() and "8.0B" in details.inner_text(), details.inner_text()
        assert page.locator("img[src=x]").count() == 0  # the hostile name is no markup (nor routable: not listed)
        pool = requests.get(site.admin + "/api/v1/pools/olla", timeout=10,
                            headers={"Authorization": f"Bearer {site.admin_token()}"}).json()
        assert pool["api_kinds"] == ["ollama"] and pool["aliases"] == {"chat-small": "llama3:latest"}
        assert pool["passthrough"] == ["/tokenize"]

        # the models on the upstream: pull one (progress shown while it runs), delete one
        card.get_by_role("button", name="Ollama models").click()
        dialog = page.get_by_role("dialog")
        dialog.locator("tr", has_text="llama3:latest").wait_for()
        dialog.get_by_label("Model to pull").fill("qwen2.5:0.5b")
        dialog.get_by_role("button", name="Pull", exact=True).click()
        dialog.get_by_role("progressbar", name="Pulling qwen2.5:0.5b").wait_for()
        dialog.locator(".pull", has_text="qwen2.5:0.5b").get_by_text(re.compile(r"of 4\.7 GB \(\d+ %\)")).wait_for()
        dialog.locator(".pull", has_text="qwen2.5:0.5b").get_by_text("done", exact=True).wait_for(timeout=20_000)
        dialog.locator("tr", has_text="qwen2.5:0.5b").wait_for()  # the list was asked again
        web.allowed.append("/api/v1/pools/olla/ollama/pulls")
        dialog.get_by_label("Model to pull").fill("bad name;")
        dialog.get_by_role("button", name="Pull", exact=True).click()
        dialog.locator(".error-box", has_text="model").wait_for()
        web.allowed.clear()
        dialog.get_by_label("Model to pull").fill("missing-model")
        dialog.get_by_role("button", name="Pull", exact=True).click()
        dialog.locator(".pull", has_text="missing-model").get_by_text(
            "pull model manifest: file does not exist").wait_for()
        dialog.locator("tr", has_text="llama3:latest").get_by_role("button", name="Delete").click()
        page.get_by_role("dialog", name="Delete llama3:latest?").get_by_role("button", name="Delete").click()
        page.get_by_text("llama3:latest deleted").wait_for()
        dialog.locator("tr", has_text="llama3:latest").wait_for(state="detached")
        assert "llama3:latest" not in up.models and "qwen2.5:0.5b" in up.models
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / "pools-ollama-models.png"))
        dialog.get_by_role("button", name="Close").click()
        card.locator("code.model", has_text="qwen2.5:0.5b").wait_for()  # discovered again after the changes
        web.check()
    finally:
        requests.delete(site.admin + "/api/v1/pools/olla", timeout=30,
                        headers={"Authorization": f"Bearer {site.admin_token()}"})
        up.close()


def key_id(stack: Stack, name: str) -> str:
    token = stack.admin_token()
    keys = requests.get(stack.admin + "/api/v1/keys", headers={"Authorization": f"Bearer {token}"}, timeout=10).json()
    return next(k["id"] for k in keys if k["name"] == name)


def test_settings_and_network_name_the_refused_field(web: Watched, site: Stack) -> None:
    page = web.page
    web.login("admin", ADMIN_PASSWORD)
    web.go("network")
    page.get_by_role("button", name="Add CIDR group").click()
    dialog = page.get_by_role("dialog")
    dialog.get_by_label("Name", exact=True).fill("office")
    dialog.get_by_label("Allow").fill("10.1.0.0/16, 192.0.2.0/24")
    dialog.get_by_role("button", name="Save").click()
    page.locator("tr", has_text="office").get_by_text("10.1.0.0/16, 192.0.2.0/24").wait_for()

    web.go("settings")
    web.allowed.append("/api/v1/settings")
    timeout = page.get_by_label("Read timeout")
    before = timeout.input_value()
    timeout.fill("-5")
    page.locator("section", has=timeout).get_by_role("button", name="Save").click()
    error = page.locator(".error-box").first
    error.wait_for()
    assert "read_timeout" in error.inner_text()
    assert page.evaluate("document.activeElement.name") == "read_timeout"
    page.reload()
    assert page.get_by_label("Read timeout").input_value() == before  # nothing was changed

    # an unset setting (null) is set and unset again from its empty field (a number for a port)
    port = page.get_by_label("Https public port")
    port.fill("8443")
    page.locator("section", has=port).get_by_role("button", name="Save").click()
    page.get_by_text("Saved: https_public_port").wait_for()
    token = site.admin_token()
    settings = lambda: requests.get(site.admin + "/api/v1/settings", timeout=10,  # noqa: E731
                                    headers={"Authorization": f"Bearer {token}"}).json()
    assert settings()["https_public_port"] == 8443
    port.fill("")
    page.locator("section", has=port).get_by_role("button", name="Save").click()
    page.locator(".toast", has_text="Saved: https_public_port").nth(1).wait_for()
    assert settings()["https_public_port"] is None

    # every setting has a control, on the settings page or the network page (the custom config has its own page)
    from manager.settings import DEFAULTS

    web.go("settings")
    on_settings = set(page.eval_on_selector_all("main [name]", "els => els.map(e => e.name)"))
    web.go("network")
    on_network = set(page.eval_on_selector_all("main [name]", "els => els.map(e => e.name)"))
    missing = set(DEFAULTS) - on_settings - on_network - {"custom_config"}
    assert not missing, missing
    assert {"cors_origins", "cors_credentials", "trusted_proxies", "unauthenticated_rpm"} <= on_network
    # network settings are saved from their page
    page.get_by_label("Trusted proxies").fill("10.9.0.0/16")
    page.get_by_label("Unauthenticated rpm").fill("90")
    page.locator("section", has=page.get_by_label("Trusted proxies")).get_by_role("button", name="Save").click()
    page.get_by_text("Saved: trusted_proxies, unauthenticated_rpm").wait_for()
    page.get_by_label("Cors origins").fill("https://app.example.test")
    page.get_by_label("Cors credentials").check()
    page.locator("section", has=page.get_by_label("Cors origins")).get_by_role("button", name="Save").click()
    page.get_by_text("Saved: cors_origins, cors_credentials").wait_for()
    token = site.admin_token()
    auth = {"Authorization": f"Bearer {token}"}
    now = requests.get(site.admin + "/api/v1/settings", headers=auth, timeout=10).json()
    assert now["trusted_proxies"] == ["10.9.0.0/16"] and now["unauthenticated_rpm"] == 90
    assert now["cors_origins"] == ["https://app.example.test"] and now["cors_credentials"] is True
    r = requests.patch(site.admin + "/api/v1/settings", headers=auth, timeout=30, json={
        "trusted_proxies": [], "unauthenticated_rpm": DEFAULTS["unauthenticated_rpm"], "cors_origins": [],
        "cors_credentials": False})
    assert r.status_code == 200, r.text
    web.check()


def test_keys_page_pages_and_filters_many_keys(web: Watched, site: Stack) -> None:
    token = site.admin_token()
    for i in range(105):
        r = requests.post(site.admin + "/api/v1/keys", headers={"Authorization": f"Bearer {token}"},
                          json={"name": f"bulk {i:03d}"}, timeout=10)
        assert r.status_code == 201
    page = web.page
    web.login("admin", ADMIN_PASSWORD)
    web.go("keys")
    assert page.locator("tbody tr").count() == 100
    page.get_by_role("button", name=re.compile(r"^Show \d+ more$")).click()
    assert page.locator("tbody tr").count() > 100
    page.get_by_label("Find a key").fill("bulk 10")
    assert page.locator("tbody tr").count() == 5  # bulk 100 ... bulk 104
    web.check()


def test_certificates_and_users_pages(web: Watched, site: Stack) -> None:
    from tests.acme import make_cert, pem

    root = make_cert("Page Root", ca=True, days=365)
    leaf, key = make_cert("page.example.test", root, names=["page.example.test"], days=20)
    page = web.page
    web.login("admin", ADMIN_PASSWORD)
    web.go("certificates")
    page.get_by_role("button", name="Upload").click()
    dialog = page.get_by_role("dialog")
    dialog.get_by_label("Domains").fill("page.example.test")
    dialog.get_by_label("Certificate chain (PEM)").fill(pem(leaf, root[0]))
    dialog.get_by_label("Private key (PEM)").fill(pem(key))
    dialog.get_by_role("button", name="Upload").click()
    row = page.locator("tr", has_text="page.example.test")
    row.get_by_text("upload", exact=True).wait_for()
    assert re.fullmatch(r"1[89]", row.locator(".badge").first.inner_text()), row.inner_text()  # days left
    web.go("dashboard")  # less than 30 days left: listed as expiring soon
    page.locator("tr", has_text="page.example.test").wait_for()
    web.go("certificates")
    page.locator("tr", has_text="page.example.test").get_by_role("button", name="Remove").click()
    page.get_by_role("dialog").get_by_role("button", name="Remove").click()
    page.locator("tr", has_text="page.example.test").wait_for(state="detached")

    web.go("users")
    page.get_by_role("button", name="Add user").click()
    dialog = page.get_by_role("dialog")
    dialog.get_by_label("Username").fill("ops")
    dialog.get_by_label("Password").fill("ops-password-1")
    dialog.get_by_role("button", name="Save").click()
    row = page.locator("tr", has_text="ops")
    row.get_by_text("viewer", exact=True).wait_for()
    row.get_by_role("button", name="Edit").click()
    page.get_by_role("dialog").get_by_label("Role").select_option("admin")
    page.get_by_role("dialog").get_by_role("button", name="Save").click()
    row.get_by_text("admin", exact=True).wait_for()
    row.get_by_role("button", name="Remove").click()
    page.get_by_role("dialog").get_by_role("button", name="Remove").click()
    row.wait_for(state="detached")
    web.check()


@pytest.fixture(scope="module")
def acme_site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Stack, object]]:
    """A stack whose HTTP listener answers a local Pebble's HTTP-01 challenges (as in test_tls.py)."""
    from tests.acme import HAVE_PEBBLE, Pebble

    if not HAVE_PEBBLE:
        pytest.skip("pebble is not installed (apt-get install pebble; .ci/run does)")
    root = tmp_path_factory.mktemp("acme-site")
    pebble = Pebble(root / "pebble", webroot_server=False)
    stack = Stack(root / "data")
    try:
        stack.start("--http", f"127.0.0.1:{pebble.http_port}")
        for name, value in (("acme_server", pebble.directory), ("acme_ca_bundle", str(pebble.ca_bundle)),
                            ("acme_email", "ops@example.test")):
            stack.cli("settings", "set", name, value)
        yield stack, pebble
    finally:
        stack.stop()
        pebble.close()


def watch_job(page) -> list[tuple[str, int]]:
    """(state badge, steps listed) of the page's certificate job, sampled until the job ends."""
    job = page.get_by_role("region", name="Certificate job")
    job.wait_for()
    seen: list[tuple[str, int]] = []
    end = time.monotonic() + 60
    while time.monotonic() < end:
        state = job.locator(".badge").inner_text()
        seen.append((state, job.locator("li").count()))
        if state != "running":
            return seen
        time.sleep(0.05)
    raise AssertionError(f"the job did not end: {seen[-5:]}")


def test_certificate_obtain_and_renew_show_each_step_live(browser, acme_site: tuple[Stack, object]) -> None:
    stack, pebble = acme_site
    context = browser.new_context(viewport={"width": 1280, "height": 860})
    context.set_default_timeout(10_000)
    web = Watched(context, stack.admin)
    page = web.page
    web.login("admin", ADMIN_PASSWORD)
    web.go("certificates")
    page.get_by_role("button", name="Obtain").click()
    dialog = page.get_by_role("dialog")
    dialog.get_by_label("Domains").fill("live.example.test")
    dialog.get_by_role("button", name="Obtain").click()
    seen = watch_job(page)
    assert seen[-1][0] == "done" and any(state == "running" and steps >= 2 for state, steps in seen), seen
    job = page.get_by_role("region", name="Certificate job")
    assert job.get_by_text("requesting the certificate live.example.test (http-01)").count() == 1
    job.get_by_text("Successfully received certificate.").wait_for()
    row = page.locator("tr", has_text="live.example.test")
    row.get_by_text("acme", exact=True).wait_for()  # listed once the job ended
    page.screenshot(path=str(ARTIFACTS / "certificates-obtained.png"), full_page=True)

    row.get_by_role("button", name="Renew").click()
    job.get_by_text("asking certbot to renew live.example.test if it is due").wait_for()
    assert watch_job(page)[-1][0] == "done"
    job.get_by_text("not due for renewal", exact=False).first.wait_for()

    # the domain points elsewhere: the job fails with certbot's reason, nothing is listed
    requests.post(f"{pebble.challtestsrv}/add-a", json={"host": "gone.example.test.", "addresses": ["127.0.0.2"]},
                  timeout=5).raise_for_status()
    page.get_by_role("button", name="Obtain").click()
    dialog.get_by_label("Domains").fill("gone.example.test")
    dialog.get_by_role("button", name="Obtain").click()
    time.sleep(0.3)  # the previous job's view is replaced by the new one
    job.get_by_text("Obtaining gone.example.test").wait_for()
    assert watch_job(page)[-1][0] == "failed"
    assert "Certbot failed to authenticate some domains" in job.get_by_role("alert").inner_text()
    assert page.locator("tr", has_text="gone.example.test").count() == 0
    web.check()
    context.close()


def test_session_cookie_is_http_only_and_csrf_is_enforced(web: Watched, site: Stack) -> None:
    web.login("admin", ADMIN_PASSWORD)
    cookies = {c["name"]: c for c in web.context.cookies()}
    assert cookies["auth_token"]["httpOnly"] and not cookies["csrf_token"]["httpOnly"]
    assert "auth_token" not in web.page.evaluate("document.cookie")
    web.allowed.append("/api/v1/keys")
    status = web.page.evaluate("""fetch('/api/v1/keys', {method: 'POST', headers: {'Content-Type': 'application/json'},
        body: JSON.stringify({name: 'no csrf'})}).then(r => r.status)""")
    assert status == 403
    web.check()


def test_viewer_sees_no_edit_controls_and_gets_403(web: Watched, site: Stack) -> None:
    page = web.page
    web.login("viewer", VIEWER_PASSWORD)
    for route, controls in [("keys", ["Create key", "Edit", "Revoke", "Disable"]),
                            ("pools", ["Add pool", "Edit", "Remove", "Add upstream", "Add route", "Ollama models",
                                       "Refresh models"]),
                            ("config", ["Render and apply", "Apply change", "Roll back", "Show diff"]),
                            ("network", ["Add CIDR group", "Edit", "Remove", "Save", "Lift every block"]),
                            ("certificates", ["Obtain", "Upload", "Cloudflare token"]),
                            ("settings", ["Save"])]:
        web.go(route)
        for name in controls:
            assert page.get_by_role("button", name=name, exact=True).count() == 0, (route, name)
    assert page.locator("nav a", has_text="Users").count() == 0
    web.go("config")
    assert page.locator("#custom-config").get_attribute("readonly") is not None
    web.allowed.append("/api/v1/keys")
    status = page.evaluate("""fetch('/api/v1/keys', {method: 'POST', headers: {'Content-Type': 'application/json',
        'X-CSRF-Token': document.cookie.match(/csrf_token=([^;]+)/)[1]}, body: JSON.stringify({name: 'viewer key'})})
        .then(r => r.status)""")
    assert status == 403
    web.check()


@pytest.mark.parametrize("scheme", ["light", "dark"])
def test_every_page_loads_cleanly_with_screenshots(web: Watched, site: Stack, scheme: str) -> None:
    web.page.emulate_media(color_scheme=scheme)
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    web.page.goto(site.admin + "/")
    web.page.get_by_label("Username").wait_for()
    web.page.screenshot(path=str(ARTIFACTS / f"login-{scheme}.png"))
    web.login("admin", ADMIN_PASSWORD)
    for route in PAGES:
        web.go(route)
        web.page.locator("main h1").first.wait_for()
        assert web.page.locator(".error-box").count() == 0, (route, web.page.locator(".error-box").first.inner_text())
        background = web.page.evaluate("getComputedStyle(document.body).backgroundColor")
        dark = sum(int(x) for x in re.findall(r"\d+", background)[:3]) < 200
        assert dark == (scheme == "dark"), (route, background)
        web.page.screenshot(path=str(ARTIFACTS / f"{route}-{scheme}.png"), full_page=True)
    web.check()


def test_theme_toggle_and_keyboard(web: Watched, site: Stack) -> None:
    page = web.page
    page.emulate_media(color_scheme="light")
    web.login("admin", ADMIN_PASSWORD)
    toggle = page.locator("#theme-toggle")
    toggle.click()  # system → light
    toggle.click()  # light → dark
    assert page.evaluate("document.documentElement.dataset.theme") == "dark"
    page.reload()
    page.get_by_role("heading", name="Dashboard").wait_for()
    assert page.evaluate("document.documentElement.dataset.theme") == "dark"  # remembered
    # the dashboard's range: custom dates appear only for "Custom"; every range loads without an error
    page.locator("#main").get_by_label("Range").select_option("custom")
    page.get_by_label("From").fill("2026-01-01T00:00")
    page.get_by_label("From").dispatch_event("change")
    page.locator("#main").get_by_label("Range").select_option("week")
    assert page.get_by_label("From").is_hidden()
    page.locator("#main:not([aria-busy])").wait_for(state="attached")  # every range's data came
    assert page.locator(".error-box").count() == 0
    # keyboard: the navigation is reachable with Tab and Enter opens a page
    page.locator("nav a", has_text="Keys").focus()
    page.keyboard.press("Enter")
    page.get_by_role("heading", name="API keys").wait_for()
    page.get_by_role("button", name="Create key").focus()
    page.keyboard.press("Enter")
    page.get_by_role("dialog").wait_for()
    assert page.evaluate("document.activeElement.name") == "name"  # the dialog's first field has the focus
    page.keyboard.press("Escape")
    page.get_by_role("dialog").wait_for(state="detached")
    page.set_viewport_size({"width": 420, "height": 800})  # narrow: the menu button shows the navigation
    page.get_by_role("button", name="Menu").click()
    page.locator("nav a", has_text="Pools").click()
    page.get_by_role("heading", name="Pools and upstreams").wait_for()
    web.check()


def test_sign_in_returns_to_the_page_asked_for(web: Watched, site: Stack) -> None:
    page = web.page
    page.goto(site.admin + "/#/audit")  # a bookmark, signed out: the sign-in form first
    page.get_by_label("Username").fill("admin")
    page.get_by_label("Password").fill(ADMIN_PASSWORD)
    page.get_by_role("button", name="Sign in").click()
    page.get_by_role("heading", name="Audit log").wait_for()
    page.locator("tr", has_text="create key").first.wait_for()  # the entries came
    page.goto(site.admin + "/#/login")  # signed in: the dashboard, the hash still says login
    page.locator('body[data-ready="dashboard"]').wait_for(state="attached")
    page.get_by_role("button", name="Sign out").click()
    page.get_by_role("heading", name="Sign in to Bastion").wait_for()
    assert page.locator("nav").is_hidden()
    web.check()


def test_an_ended_session_asks_to_sign_in_and_returns(web: Watched, site: Stack) -> None:
    page = web.page
    web.login("viewer", VIEWER_PASSWORD)
    site.cli("users", "passwd", "viewer", "--password", VIEWER_PASSWORD)  # signs the viewer out everywhere
    web.allowed += ["401", "/auth/me", "/api/v1/"]  # the calls that find the session ended
    page.locator("nav a", has_text="Pools").click()
    page.get_by_text("Your session ended").wait_for()
    page.get_by_label("Username").fill("viewer")
    page.get_by_label("Password").fill(VIEWER_PASSWORD)
    page.get_by_role("button", name="Sign in").click()
    page.get_by_role("heading", name="Pools and upstreams").wait_for()
    web.check()


def test_lockout_message_counts_down(web: Watched, site: Stack) -> None:
    page = web.page
    web.allowed.append("/auth/login")
    page.goto(site.admin + "/")
    try:
        for _ in range(6):
            page.get_by_label("Username").fill("admin")
            page.get_by_label("Password").fill("wrong password")
            page.get_by_role("button", name="Sign in").click()
            page.locator("[role=alert]").first.wait_for()
            if page.locator(".lockout").count():
                break
        lockout = page.locator(".lockout")
        lockout.wait_for()
        assert re.search(r"Try again in \d+ s", lockout.inner_text()), lockout.inner_text()
        assert page.get_by_role("button", name="Sign in").is_disabled()
    finally:
        site.cli("auth", "unlock")
    web.check()


def test_page_files_are_served_with_a_strict_policy(site: Stack) -> None:
    """No browser needed: what the manager serves through nginx for the page."""
    for path in ("/", "/admin", "/admin/"):
        r = requests.get(site.admin + path, timeout=10)
        assert r.status_code == 200 and r.headers["Content-Type"].startswith("text/html"), path
        assert '<script type="module" src="/ui/app.js">' in r.text
        policy = r.headers["Content-Security-Policy"]
        assert "script-src 'self'" in policy and "unsafe-inline" not in policy and "frame-ancestors 'none'" in policy
    r = requests.get(site.admin + "/ui/pages/keys.js", timeout=10)
    assert r.status_code == 200 and "javascript" in r.headers["Content-Type"]
    for path in ("/ui/__init__.py", "/ui/../manager/app.py", "/ui/%2e%2e/manager/app.py", "/ui/nope.js"):
        assert requests.get(site.admin + path, timeout=10).status_code == 404, path


def test_auth_me_says_who_is_signed_in(site: Stack) -> None:
    assert requests.get(site.admin + "/auth/me", timeout=10).status_code == 401
    session = requests.Session()
    r = session.post(site.admin + "/auth/login", json={"username": "viewer", "password": VIEWER_PASSWORD}, timeout=10)
    assert r.status_code == 200
    me = session.get(site.admin + "/auth/me", timeout=10).json()
    assert me["username"] == "viewer" and me["role"] == "viewer" and me["via_cookie"] is True
    assert me["expiresAt"] > time.time()
    token = site.admin_token()
    me = requests.get(site.admin + "/auth/me", headers={"Authorization": f"Bearer {token}"}, timeout=10).json()
    assert me["role"] == "admin" and me["via_cookie"] is False
