"""Outbound requests of the manager (discovery, health checks) against real local servers, and upstream
credential failures end to end (real nginx, gate and manager; the OpenAI SDK as the client)."""

from __future__ import annotations

import contextlib
import resource
import ssl
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import openai
import pytest
import requests

from manager import discovery, health
from tests.conftest import Stack, free_port
from tests.fakes import FakeUpstream

MB = 1024 * 1024
KEY_REJECTED = "upstream rejected the pool's API key"


class LocalServer:
    """A real HTTP server on a free loopback port; `respond(handler)` writes each GET's answer by hand.
    `sent` counts the bytes the answers managed to write."""

    def __init__(self, respond: Callable[[BaseHTTPRequestHandler], None]):
        self.sent = 0
        self.paths: list[str] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                server.paths.append(self.path)
                with contextlib.suppress(OSError):  # the client hung up: what the caps are for
                    respond(self)

            do_POST = do_GET
            do_DELETE = do_GET

            def write(self, data: bytes) -> None:
                self.wfile.write(data)
                self.wfile.flush()
                server.sent += len(data)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def serve() -> Iterator[Callable[..., LocalServer]]:
    servers: list[LocalServer] = []

    def start(respond: Callable[[BaseHTTPRequestHandler], None]) -> LocalServer:
        servers.append(LocalServer(respond))
        return servers[-1]
    yield start
    for s in servers:
        s.close()


def pool_of(url: str, api_key: str | None = None) -> dict[str, Any]:
    return {"name": "p", "upstreams": [{"url": url}], "api_key": api_key}


def answer(h: Any, status: int, body: bytes = b"", **headers: str) -> None:
    h.send_response(status)
    for name, value in {"Content-Length": str(len(body)), **headers}.items():
        h.send_header(name.replace("_", "-"), value)
    h.end_headers()
    h.write(body)


def test_redirect_to_another_local_server_is_not_followed(serve) -> None:
    secret = FakeUpstream("secret", ["secret-model"])  # e.g. a loopback-only service
    try:
        redirector = serve(lambda h: answer(h, 302, Location=secret.url + h.path))
        found = discovery.discover_pool_models(pool_of(redirector.url))
        assert secret.requests == []
        assert found.models is None
        assert (f"the upstream answered with a redirect to {secret.url}/v1/models; Bastion does not follow "
                "redirects") in found.error
        assert health.probe(redirector.url, None, True) == (
            True, f"the upstream answered with a redirect to {secret.url}/v1/models; Bastion does not follow "
                  "redirects")
        assert secret.requests == []
    finally:
        secret.close()


@pytest.mark.parametrize("declared", [False, True], ids=["until-close", "content-length"])
def test_huge_answer_is_cut_at_the_cap_with_bounded_memory(serve, declared: bool) -> None:
    total = 150 * MB

    def huge(h: Any) -> None:
        if h.path != "/v1/models":
            return answer(h, 404)
        h.send_response(200)
        h.send_header("Content-Type", "application/json")
        h.send_header(*(("Content-Length", str(total)) if declared else ("Connection", "close")))
        h.end_headers()
        h.write(b'{"object":"list","data":[{"id":"')
        block = b"a" * (64 * 1024)
        for _ in range(total // len(block)):  # made lazily: never 150 MB in memory on this side either
            h.write(block)

    server = serve(huge)
    peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB
    started = time.monotonic()
    found = discovery.discover_pool_models(pool_of(server.url))
    grown = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak_before) / 1024
    assert server.sent < 32 * MB, f"{server.sent / MB:.0f} MB were sent: the answer was not cut"
    assert grown < 40, f"the peak RSS grew by {grown:.0f} MB"
    assert found.models is None
    assert found.error == f"{server.url}: the answer is larger than 4 MB"
    assert time.monotonic() - started < 5


@pytest.mark.parametrize("phase", ["headers", "body"])
def test_slow_drip_is_cut_at_the_total_deadline(serve, phase: str) -> None:
    def drip(h: Any) -> None:
        if phase == "headers":
            h.write(b"HTTP/1.1 200 OK\r\nX-Drip: ")
        else:
            h.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 1000000\r\n\r\n[")
        for _ in range(200):  # a byte every 0.1 s: each read is quick, the whole never ends (20 s here)
            time.sleep(0.1)
            h.write(b"1" if phase == "headers" else b"1,")

    server, second = serve(drip), serve(drip)
    started = time.monotonic()
    found = discovery.discover_pool_models({"name": "p", "upstreams": [{"url": server.url}, {"url": second.url}]})
    took = time.monotonic() - started
    assert took < 6.5, f"discovery took {took:.1f} s"  # one deadline: the upstreams are asked in parallel
    assert found.error == (f"{server.url}: no complete answer within 5 s; "
                           f"{second.url}: no complete answer within 5 s")
    if phase == "headers":
        started = time.monotonic()
        assert health.probe(server.url, None, True) == (False, "no complete answer within 3 s")
        assert time.monotonic() - started < 4.5


def test_streamed_lines_come_as_sent_and_an_upstream_gone_silent_fails(serve) -> None:
    """Ollama's pull progress: each line as it comes; silence past `idle` and an endless line are failures."""
    from manager import outbound

    def silent_after_one(h: BaseHTTPRequestHandler) -> None:
        h.send_response(200)
        h.send_header("Content-Type", "application/x-ndjson")
        h.end_headers()
        h.write(b'{"status": "pulling manifest"}\n')
        time.sleep(3)

    lines, started = [], time.monotonic()
    with pytest.raises(outbound.OutboundError, match=r"nothing from the upstream for 0.5 s"):
        for line in outbound.stream_lines("POST", serve(silent_after_one).url + "/api/pull", json_body={"model": "m"},
                                          idle=0.5):
            lines.append(line)
    assert lines == [b'{"status": "pulling manifest"}\n'] and time.monotonic() - started < 2.5

    def endless_line(h: BaseHTTPRequestHandler) -> None:
        h.send_response(200)
        h.end_headers()
        for _ in range(100):
            h.write(b"x" * 8192)

    with pytest.raises(outbound.OutboundError, match="a line of the answer is longer than 64 KB"):
        list(outbound.stream_lines("POST", serve(endless_line).url + "/api/pull", idle=2))


def test_a_refusal_keeps_the_upstreams_own_words(serve) -> None:
    from manager import outbound

    def not_found(h: BaseHTTPRequestHandler) -> None:
        body = b'{"error": "model \'x\' not found"}'
        h.send_response(404)
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        h.write(body)

    with pytest.raises(outbound.OutboundError, match="HTTP 404: model 'x' not found") as e:
        outbound.send("DELETE", serve(not_found).url + "/api/delete", json_body={"model": "x"})
    assert e.value.status == 404


def test_refused_key_is_named_and_never_retried_elsewhere() -> None:
    up = FakeUpstream("locked", ["m1"], api_key="sk-right")
    try:
        found = discovery.discover_pool_models(pool_of(up.url, "sk-wrong"))
        assert (found.models, found.error) == (None, f"{up.url}: {KEY_REJECTED}")
        assert [r["path"] for r in up.requests] == ["/v1/models"]  # a refused key is not an Ollama server
        found = discovery.discover_pool_models(pool_of(up.url))
        assert (found.models, found.error) == (None, f"{up.url}: upstream needs an API key")
        found = discovery.discover_pool_models(pool_of(up.url, "sk-right"))
        assert (found.models, found.error) == (["m1"], None)
        # alive (it answered), but the problem is recorded
        assert health.probe(up.url, "sk-wrong", True) == (True, KEY_REJECTED)
        assert health.probe(up.url, "sk-right", True) == (True, None)
    finally:
        up.close()


def test_failures_are_short_sentences(serve) -> None:
    closed = f"http://127.0.0.1:{free_port()}"
    found = discovery.discover_pool_models(pool_of(closed))
    assert found.error == f"{closed}: connection refused by 127.0.0.1:{closed.rsplit(':', 1)[1]}"
    assert health.probe(closed, None, True) == (False, found.error.split(": ", 1)[1])

    deep = serve(lambda h: answer(h, 200, b"[" * 100_000, Content_Type="application/json"))
    assert discovery.discover_pool_models(pool_of(deep.url)).error == f"{deep.url}: the answer is not JSON"

    html = serve(lambda h: answer(h, 200, b"<html>hello</html>") if h.path == "/v1/models" else answer(h, 404))
    assert discovery.discover_pool_models(pool_of(html.url)).error == f"{html.url}: the answer is not JSON"
    assert html.paths == ["/v1/models", "/api/tags"]  # an answer that is no list may be an Ollama: asked too

    plain = serve(lambda h: answer(h, 200, b"{}"))
    tls_url = plain.url.replace("http://", "https://")
    assert discovery.discover_pool_models(pool_of(tls_url)).error.startswith(f"{tls_url}: TLS failed")


def test_tls_verification(serve, tmp_path: Path) -> None:
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=DNS:localhost", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True)
    server = serve(lambda h: answer(h, 200, b'{"data": [{"id": "tls-model"}]}'))
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    server.httpd.socket = context.wrap_socket(server.httpd.socket, server_side=True)
    url = server.url.replace("http://127.0.0.1", "https://localhost")
    found = discovery.discover_pool_models(pool_of(url))
    assert found.error == f"{url}: TLS verification failed: self-signed certificate"
    assert discovery.discover_pool_models(pool_of(url), str(cert)) == discovery.Discovery(["tls-model"], None)
    assert discovery.discover_pool_models({**pool_of(url), "tls_verify": False}).models == ["tls-model"]
    found = discovery.discover_pool_models(pool_of(url), str(tmp_path / "missing.pem"))
    assert found.error.startswith(f"{url}: cannot read the CA bundle")


# ---- end to end: a pool whose upstream refuses the pool's own key ----------------------------------------

@pytest.fixture(scope="module")
def locked() -> Iterator[FakeUpstream]:
    up = FakeUpstream("locked", ["locked-model"], api_key="sk-right")
    yield up
    up.close()


def pool_status(stack: Stack, name: str) -> dict[str, Any]:
    r = requests.get(f"{stack.admin}/api/v1/pools/{name}", timeout=10,
                     headers={"Authorization": f"Bearer {stack.admin_token()}"})
    assert r.status_code == 200, r.text
    return r.json()


def test_upstream_auth_failure_is_the_gateways_problem(stack: Stack, locked: FakeUpstream) -> None:
    stack.cli("settings", "set", "health_interval", "0")
    out = stack.cli("pools", "add", "wrongkey", "--url", locked.url, "--api-key", "sk-wrong")
    assert f"no models found: {locked.url}: {KEY_REJECTED}" in out
    assert pool_status(stack, "wrongkey")["discovery_error"] == f"{locked.url}: {KEY_REJECTED}"
    stack.cli("routes", "set", "locked-model", "--pool", "wrongkey")
    # the same upstream behind a pool without a key of its own: its answer is the client's business
    stack.cli("pools", "add", "nokey", "--url", locked.url, "--models", "open-model")
    # a pool with a key whose upstream is dead: nginx's own 502 stays JSON in the intercepting location
    stack.cli("pools", "add", "deadkey", "--url", f"http://127.0.0.1:{free_port()}", "--api-key", "sk-x",
              "--models", "dead-model")
    key = stack.key("outbound")
    time.sleep(0.5)
    client = openai.OpenAI(base_url=stack.base + "/v1", api_key=key, max_retries=0)

    with pytest.raises(openai.APIStatusError) as caught:
        client.chat.completions.create(model="locked-model", messages=[{"role": "user", "content": "hi"}])
    assert not isinstance(caught.value, openai.AuthenticationError)
    assert isinstance(caught.value, openai.InternalServerError)
    assert caught.value.status_code == 502
    assert caught.value.code == "upstream_auth_failed"
    assert caught.value.body["type"] == "server_error"
    assert caught.value.response.headers["X-Request-ID"]
    assert locked.requests[-1]["headers"]["Authorization"] == "Bearer sk-wrong"

    r = stack.post("/api/chat", key, json={"model": "locked-model", "messages": []})
    assert r.status_code == 502 and r.headers["X-Request-ID"]
    assert isinstance(r.json()["error"], str) and "upstream_auth_failed" in r.json()["error"]

    r = stack.post("/v1/chat/completions", key, json={"model": "open-model", "messages": []})
    assert r.status_code == 401 and r.headers["X-Request-ID"]
    assert r.json()["error"]["code"] == "invalid_api_key"  # the upstream's own answer, as before

    r = stack.post("/v1/chat/completions", key, json={"model": "dead-model", "messages": []})
    assert r.status_code == 502 and r.headers["X-Request-ID"]
    assert r.json()["error"]["type"] == "server_error" and r.json()["error"]["code"] is None

    # the health checks show the refused key on a live upstream
    stack.cli("settings", "set", "health_interval", "1")
    deadline = time.monotonic() + 15
    while (up := pool_status(stack, "wrongkey")["upstreams"][0])["error"] is None:
        assert time.monotonic() < deadline, "the health checks never recorded the refused key"
        time.sleep(0.3)
    assert (up["health"], up["down"], up["error"]) == ("up", False, KEY_REJECTED)
    assert up["error_since"] <= up["checked_at"] <= time.time()
    # the same server behind the pool without a key: its own problem, kept apart
    assert pool_status(stack, "nokey")["upstreams"][0]["error"] == "upstream needs an API key"
    assert KEY_REJECTED in stack.cli("pools", "list")

    # the operator fixes the key: traffic flows, the problems clear
    stack.cli("pools", "update", "wrongkey", "--api-key", "sk-right")
    assert client.chat.completions.create(model="locked-model", messages=[]).choices
    stack.cli("pools", "refresh")
    deadline = time.monotonic() + 15
    while (status := pool_status(stack, "wrongkey"))["upstreams"][0]["error"] is not None:
        assert time.monotonic() < deadline, "the health checks never cleared the problem"
        time.sleep(0.3)
    assert status["discovery_error"] is None and status["discovered_models"] == ["locked-model"]
    stack.cli("settings", "set", "health_interval", "0")


def test_other_upstream_errors_with_an_injected_key(stack: Stack, locked: FakeUpstream) -> None:
    """With interception on, the upstream's own errors pass through except 502/504 (see docs/security.md)."""
    stack.cli("pools", "add", "rightkey", "--url", locked.url, "--api-key", "sk-right", "--models", "right-model")
    key = stack.key("errors")
    time.sleep(0.5)
    for status in (400, 404, 429, 500, 503):
        r = stack.post(f"/v1/fail/{status}", key, json={"model": "right-model"})
        assert r.status_code == status
        assert r.json()["error"]["code"] == "upstream_said_so"
    r = stack.post("/v1/fail/502", key, json={"model": "right-model"})
    assert r.status_code == 502 and r.json()["error"]["message"] == "No upstream server could answer the request."
