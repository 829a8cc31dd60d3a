"""End to end at the edge of the public listener (real nginx, gate, manager): CORS for browsers, OpenAI paths
without /v1 (the official SDK), 405 with Allow, Server-Timing, pass-through routes, the per-address limit."""

from __future__ import annotations

import http.server
import json
import re
import threading
import time
from pathlib import Path

import openai
import pytest
import requests

from tests.conftest import Stack, free_port
from tests.fakes import FakeUpstream

APP = "https://app.example.com"
EVIL = "https://evil.example.net"
CHROMIUM = "/usr/bin/chromium"


@pytest.fixture(scope="module")
def pools(stack: Stack, upstreams: dict[str, FakeUpstream]) -> dict[str, FakeUpstream]:
    stack.cli("settings", "set", "health_interval", "0")
    stack.cli("settings", "set", "bruteforce_max_failures", "0")  # the limit below is tested on its own
    stack.cli("settings", "set", "cors_origins", f"{APP},http://localhost:3000")
    stack.cli("pools", "add", "alpha", "--url", upstreams["alpha"].url, "--passthrough", "/tokenize,/props*")
    dead = f"http://127.0.0.1:{free_port()}"  # tried first now and then: Server-Timing after a retry
    stack.cli("pools", "add", "beta", "--url", dead, "--url", upstreams["beta"].url, "--models", "beta-model")
    return upstreams


@pytest.fixture(scope="module")
def key(stack: Stack, pools) -> str:
    k = stack.key("edge")
    time.sleep(0.5)
    return k


def cors_headers(r: requests.Response) -> dict[str, str]:
    return {k.lower(): x for k, x in r.headers.items() if k.lower().startswith("access-control-")}


def test_preflight_from_an_allowed_origin_needs_no_key(stack: Stack, key: str) -> None:
    r = requests.options(stack.base + "/v1/chat/completions", timeout=10, headers={
        "Origin": APP, "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization,content-type,x-stainless-os"})
    assert r.status_code == 204, r.text
    h = cors_headers(r)
    assert h["access-control-allow-origin"] == APP
    assert h["access-control-allow-methods"] == "GET, POST, DELETE, OPTIONS"
    assert h["access-control-allow-headers"] == "authorization,content-type,x-stainless-os"
    assert h["access-control-max-age"] == "7200"
    assert "access-control-allow-credentials" not in h
    assert r.headers["Vary"] == "Origin"
    time.sleep(0.3)
    log = (stack.data_dir / "logs" / "access.log").read_text()
    assert r.headers["X-Request-ID"] not in log  # not API usage: no access-log line


def test_preflight_from_a_refused_origin_gets_no_cors_headers(stack: Stack, key: str) -> None:
    r = requests.options(stack.base + "/v1/chat/completions", timeout=10,
                         headers={"Origin": EVIL, "Access-Control-Request-Method": "POST"})
    assert r.status_code == 204
    assert cors_headers(r) == {}


def test_streamed_chat_with_origin(stack: Stack, key: str, pools) -> None:
    body = {"model": "alpha-model", "messages": [{"role": "user", "content": "hi"}], "stream": True}
    for origin, allowed in ((APP, True), (EVIL, False)):
        pools["alpha"].stream_finished.clear()
        with requests.post(stack.base + "/v1/chat/completions", json=body, stream=True, timeout=10,
                           headers={"Authorization": f"Bearer {key}", "Origin": origin}) as r:
            assert r.status_code == 200
            chunks = r.iter_content(chunk_size=None)  # each chunk as it arrives
            first = next(chunks)
            arrived = time.monotonic()
            assert b"alpha-0" in first
            rest = b"".join(chunks)
            # the upstream waits 0.2 s between its 5 chunks: the first came long before the end (slow machines
            # shift both, so no absolute time is asserted)
            assert time.monotonic() - arrived > 0.4
        assert b"alpha-4" in rest and rest.rstrip().endswith(b"data: [DONE]")
        h = cors_headers(r)
        if allowed:
            assert h["access-control-allow-origin"] == APP
            exposed = h["access-control-expose-headers"]
            assert "X-Request-ID" in exposed and "x-ratelimit-remaining-requests" in exposed
            assert "access-control-allow-methods" not in h  # preflight only
        else:
            assert h == {}


@pytest.mark.parametrize("case", ["gate 401", "gate 404", "nginx 400", "pool 200"])
def test_every_answer_carries_cors_for_an_allowed_origin(stack: Stack, key: str, case: str) -> None:
    headers = {"Origin": "http://localhost:3000"}
    if case == "gate 401":
        r = requests.get(stack.base + "/v1/models", headers=headers, timeout=10)
    elif case == "gate 404":
        r = requests.post(stack.base + "/v1/chat/completions", json={"model": "nope", "messages": []},
                          headers={**headers, "Authorization": f"Bearer {key}"}, timeout=10)
    elif case == "nginx 400":  # nginx's own error page (headers too large)
        r = requests.get(stack.base + "/v1/models", headers={**headers, "X-Big": "a" * 20000}, timeout=10)
    else:
        r = requests.post(stack.base + "/v1/embeddings", json={"model": "alpha-model", "input": "x"},
                          headers={**headers, "Authorization": f"Bearer {key}"}, timeout=10)
    assert r.status_code == int(case.split()[1]), r.text
    assert r.headers["Access-Control-Allow-Origin"] == "http://localhost:3000"
    assert r.headers["Vary"] == "Origin"
    r2 = requests.get(stack.base + "/v1/models", headers={"Origin": EVIL}, timeout=10)
    assert "Access-Control-Allow-Origin" not in r2.headers


def test_openai_sdk_without_v1(stack: Stack, key: str, pools) -> None:
    client = openai.OpenAI(base_url=stack.base, api_key=key, max_retries=0)
    assert {m.id for m in client.models.list()} == {"alpha-model", "shared:latest", "beta-model"}
    assert client.models.retrieve("beta-model").id == "beta-model"
    n = len(pools["alpha"].requests)
    stream = client.chat.completions.create(model="alpha-model", messages=[{"role": "user", "content": "hi"}],
                                            stream=True)
    assert [c.choices[0].delta.content for c in stream if c.choices] == [f"alpha-{i} " for i in range(5)]
    assert [r["path"] for r in pools["alpha"].requests[n:]] == ["/v1/chat/completions"]
    out = client.embeddings.create(model="beta-model", input="x")
    assert out.data[0].embedding == [0.1, 0.2, 0.3]
    assert pools["beta"].requests[-1]["path"] == "/v1/embeddings"
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="missing", messages=[])
    assert e.value.code == "model_not_found"


def test_an_alias_cannot_bypass_an_endpoint_list(stack: Stack, pools) -> None:
    only_models = stack.key("only-models", "--endpoints", "/v1/models")
    time.sleep(0.5)
    assert stack.get("/models", only_models).status_code == 200
    r = stack.post("/chat/completions", only_models, json={"model": "alpha-model", "messages": []})
    assert r.status_code == 403 and r.json()["error"]["code"] == "endpoint_not_allowed"
    assert "/v1/chat/completions" in r.json()["error"]["message"]


def test_wrong_methods_get_405_with_allow(stack: Stack, key: str) -> None:
    auth = {"Authorization": f"Bearer {key}"}
    for method, path, allow in (("PUT", "/v1/models", "GET, HEAD"), ("GET", "/v1/chat/completions", "POST"),
                                ("GET", "/chat/completions", "POST"), ("POST", "/v1/models/beta-model",
                                                                       "GET, HEAD, DELETE")):
        r = requests.request(method, stack.base + path, headers=auth, timeout=10)
        assert r.status_code == 405, (method, path, r.text)
        assert r.headers["Allow"] == allow
        assert r.json()["error"]["code"] == "method_not_allowed"
        assert r.json()["error"]["type"] == "invalid_request_error"
    r = requests.get(stack.base + "/api/chat", headers=auth, timeout=10)
    assert r.status_code == 405 and r.headers["Allow"] == "POST"
    assert isinstance(r.json()["error"], str)  # Ollama's shape


def test_timing_headers(stack: Stack, key: str) -> None:
    r = stack.post("/v1/chat/completions", key, json={"model": "alpha-model", "messages": []})
    assert r.status_code == 200
    assert re.fullmatch(r"gate;dur=\d+, upstream;dur=\d+", r.headers["Server-Timing"]), r.headers["Server-Timing"]
    assert float(r.headers["X-Process-Time"]) < 5
    for _ in range(4):  # the dead upstream of beta comes first for some: "<gate> : -, <beta>"
        r = stack.post("/v1/embeddings", key, json={"model": "beta-model", "input": "x"})
        assert r.status_code == 200
        assert re.fullmatch(r"gate;dur=\d+, upstream;dur=\d+", r.headers["Server-Timing"]), r.headers["Server-Timing"]
    refused = stack.get("/v1/models", "bst_nope_nope")
    assert re.fullmatch(r"gate;dur=\d+", refused.headers["Server-Timing"])
    assert refused.headers["X-Process-Time"]


def test_pass_through_routes(stack: Stack, key: str, pools) -> None:
    alpha = pools["alpha"]
    # a key without an endpoint list may not use them (docs/decisions.md)
    r = stack.post("/tokenize", key, json={"model": "alpha-model", "prompt": "hi"})
    assert r.status_code == 403 and r.json()["error"]["code"] == "endpoint_not_allowed"
    native = stack.key("native", "--endpoints", "/v1/*,/tokenize,/props*", "--models", "alpha-*", "--rpm", "100")
    v1_only = stack.key("v1-only", "--endpoints", "/v1/*")
    time.sleep(0.5)
    r = stack.post("/tokenize", native, json={"model": "alpha-model", "prompt": "hi"})
    assert r.status_code == 200, r.text
    assert r.json() == {"upstream": "alpha", "path": "/tokenize", "model": "alpha-model"}
    assert r.headers["x-ratelimit-limit-requests"] == "100"
    assert alpha.requests[-1]["headers"].get("Authorization") is None  # the client's key never goes upstream
    r = stack.get("/props/slots?x=1", native)
    assert r.status_code == 200 and r.json()["path"] == "/props/slots?x=1"
    # the model checks of any request: the key's list, and a pool that serves it among those declaring the path
    r = stack.post("/tokenize", native, json={"model": "beta-model", "prompt": "hi"})
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
    assert stack.post("/tokenize", v1_only, json={"model": "alpha-model"}).status_code == 403
    assert stack.post("/detokenize", native, json={"model": "alpha-model"}).status_code == 404
    assert stack.post("/tokenize", "bst_nope_nope", json={}).status_code == 401


def test_bad_passthrough_paths_are_refused_and_change_nothing(stack: Stack, pools) -> None:
    for bad in ("/v1/tokenize", "/api*", "/../etc", "/a/./b", "/x;y", "/chat/x", "/h*", "tokenize", "/a b"):
        out = stack.cli("pools", "update", "alpha", "--passthrough", bad, ok=False)
        assert "passthrough" in out, (bad, out)
    alpha = next(p for p in json.loads(stack.cli("pools", "list", "--json")) if p["name"] == "alpha")
    assert alpha["passthrough"] == ["/tokenize", "/props*"]


def test_unauthenticated_requests_are_limited_per_address(stack: Stack, key: str) -> None:
    stack.cli("settings", "set", "unauthenticated_rpm", "5")
    time.sleep(0.5)
    statuses = [stack.get("/v1/models", "bst_nope_nope").status_code for _ in range(8)]
    assert statuses[:5] == [401] * 5 and statuses[-1] == 429, statuses
    r = stack.get("/v1/models", "bst_nope_nope", headers={"Origin": APP})
    assert r.status_code == 429 and int(r.headers["Retry-After"]) >= 1
    assert r.json()["error"]["code"] == "too_many_unauthenticated_requests"
    assert r.headers["Access-Control-Allow-Origin"] == APP
    assert stack.get("/v1/models", key).status_code == 200  # a valid key from the same address is not limited
    time.sleep(0.3)
    records = [line.split("\t") for line in (stack.data_dir / "logs" / "access.log").read_text().splitlines()]
    assert [r[7] for r in records].count("429") == 1  # one line per run of refusals
    stack.cli("settings", "set", "unauthenticated_rpm", "0")
    time.sleep(0.5)
    assert stack.get("/v1/models", "bst_nope_nope").status_code == 401


BROWSER_FETCH = """async ([url, key]) => {
    try {
        const r = await fetch(url, {method: "POST", headers: {"Authorization": "Bearer " + key,
            "Content-Type": "application/json"}, body: JSON.stringify({model: "alpha-model", stream: true,
            messages: [{role: "user", content: "hi"}]})});
        const reader = r.body.getReader();
        const chunks = [];
        for (;;) {
            const {done, value} = await reader.read();
            if (done) break;
            chunks.push(new TextDecoder().decode(value));
        }
        return {status: r.status, requestId: r.headers.get("x-request-id"), body: chunks.join("")};
    } catch (e) {
        return {error: String(e)};
    }
}"""


class _Page(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        body = b"<!doctype html><title>app</title>"
        self.send_response(200)
        self.send_header("Content-Type", "text/html")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args) -> None:
        pass


def test_a_browser_page_streams_a_chat_from_an_allowed_origin_only(stack: Stack, key: str) -> None:
    """Real Chromium, pages served from loopback like the API (Chromium's local network checks stay on): the
    page's fetch sends a preflight (Authorization is no simple header), then reads the stream."""
    sync_api = pytest.importorskip("playwright.sync_api")
    if not Path(CHROMIUM).exists():
        pytest.skip("chromium is not installed")
    servers = [http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Page) for _ in range(2)]
    for server in servers:
        threading.Thread(target=server.serve_forever, daemon=True).start()
    allowed, refused = (f"http://127.0.0.1:{server.server_address[1]}" for server in servers)
    stack.cli("settings", "set", "cors_origins", f"{APP},http://localhost:3000,{allowed}")
    try:
        with sync_api.sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=[
                "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                "--no-first-run"])
            try:
                page = browser.new_page()
                page.goto(allowed + "/")
                got = page.evaluate(BROWSER_FETCH, [stack.base + "/v1/chat/completions", key])
                assert got.get("status") == 200, got
                assert got["requestId"]  # an exposed header the page may read
                assert "alpha-0" in got["body"] and got["body"].rstrip().endswith("data: [DONE]")
                page.goto(refused + "/")
                denied = page.evaluate(BROWSER_FETCH, [stack.base + "/v1/chat/completions", key])
                assert "Failed to fetch" in denied.get("error", ""), denied
            finally:
                browser.close()
    finally:
        stack.cli("settings", "set", "cors_origins", f"{APP},http://localhost:3000")
        for server in servers:
            server.shutdown()
            server.server_close()


def test_langchain_without_v1(stack: Stack, key: str) -> None:
    """langchain's ChatOpenAI (not a test dependency: run when installed) with a base URL without /v1."""
    chat_models = pytest.importorskip("langchain_openai")
    llm = chat_models.ChatOpenAI(base_url=stack.base, api_key=key, model="alpha-model", max_retries=0)
    assert [c.content for c in llm.stream("hi") if c.content] == [f"alpha-{i} " for i in range(5)]
    assert llm.invoke("hi").content == "hello from alpha"
