"""End to end: real nginx + gate + manager (`bastion up`), fake upstreams, the official OpenAI SDK."""

from __future__ import annotations

import http.client
import json
import time

import openai
import pytest
import requests

from tests.conftest import Stack, free_port
from tests.fakes import FakeUpstream


@pytest.fixture(scope="module")
def pools(stack: Stack, upstreams: dict[str, FakeUpstream]) -> dict[str, FakeUpstream]:
    """alpha: one slow-streaming upstream with its own API key; beta: a dead upstream then two live ones.
    Active health checks are off here so the failover test exercises nginx's own retry."""
    stack.cli("settings", "set", "health_interval", "0")
    stack.cli("pools", "add", "alpha", "--url", upstreams["alpha"].url, "--api-key", "sk-upstream-alpha")
    dead = f"http://127.0.0.1:{free_port()}"
    stack.cli("pools", "add", "beta", "--url", dead, "--url", upstreams["beta"].url, "--url", upstreams["beta2"].url,
              "--models", "beta-model")
    return upstreams


@pytest.fixture(scope="module")
def key(stack: Stack, pools) -> str:
    k = stack.key("e2e")
    time.sleep(0.5)  # the gate picks up new snapshots within 0.25 s
    return k


def client(stack: Stack, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=stack.base + "/v1", api_key=key, max_retries=0)


def test_models_discovered_and_listed(stack: Stack, key: str) -> None:
    ids = {m.id for m in client(stack, key).models.list()}
    assert ids == {"alpha-model", "shared:latest", "beta-model"}


def test_streamed_chat_arrives_chunk_by_chunk(stack: Stack, key: str, pools) -> None:
    alpha = pools["alpha"]
    alpha.stream_finished.clear()
    stream = client(stack, key).chat.completions.create(
        model="alpha-model", messages=[{"role": "user", "content": "hi"}], stream=True)
    chunks = iter(stream)
    first = next(chunks)
    # the upstream sleeps 0.2 s between its 5 chunks: the first one must be here long before it finishes
    assert not alpha.stream_finished.is_set()
    assert first.choices[0].delta.content == "alpha-0 "
    rest = [c.choices[0].delta.content for c in chunks]
    assert rest == [f"alpha-{i} " for i in range(1, 5)]
    assert alpha.stream_finished.wait(2)


def test_non_streamed_chat_completions_and_embeddings(stack: Stack, key: str) -> None:
    c = client(stack, key)
    chat = c.chat.completions.create(model="alpha-model", messages=[{"role": "user", "content": "hi"}])
    assert chat.choices[0].message.content == "hello from alpha"
    text = c.completions.create(model="beta-model", prompt="hi")
    assert text.choices[0].text.startswith("text from beta")
    emb = c.embeddings.create(model="alpha-model", input="hi")
    assert emb.data[0].embedding == [0.1, 0.2, 0.3]


def test_upstream_gets_pool_key_never_client_key(stack: Stack, key: str, pools) -> None:
    alpha = pools["alpha"]
    client(stack, key).chat.completions.create(model="alpha-model", messages=[])
    headers = alpha.requests[-1]["headers"]
    assert headers["Authorization"] == "Bearer sk-upstream-alpha"
    assert key not in json.dumps(alpha.requests[-1]["headers"])
    # a pool without an upstream key receives no Authorization at all
    client(stack, key).chat.completions.create(model="beta-model", messages=[])
    beta_seen = [r for up in ("beta", "beta2") for r in pools[up].requests if r["method"] == "POST"]
    assert beta_seen and all("Authorization" not in r["headers"] for r in beta_seen)


def test_two_pools_route_by_model(stack: Stack, key: str, pools) -> None:
    before = {name: len(up.requests) for name, up in pools.items()}
    for _ in range(4):
        r = stack.post("/v1/chat/completions", key, json={"model": "beta-model", "messages": []})
        assert r.status_code == 200, r.text
        assert "beta" in r.json()["choices"][0]["message"]["content"]
    r = stack.post("/v1/chat/completions", key, json={"model": "alpha-model", "messages": []})
    assert r.json()["choices"][0]["message"]["content"] == "hello from alpha"
    assert len(pools["alpha"].requests) == before["alpha"] + 1
    assert len(pools["beta"].requests) + len(pools["beta2"].requests) == before["beta"] + before["beta2"] + 4


def test_dead_upstream_fails_over_before_first_byte(stack: Stack, key: str) -> None:
    # pool beta lists a dead upstream first: every request must still succeed
    for _ in range(6):
        r = stack.post("/v1/chat/completions", key, json={"model": "beta-model", "messages": []})
        assert r.status_code == 200, r.text


def test_ollama_chat_streams_ndjson(stack: Stack, key: str, pools) -> None:
    pools["alpha"].stream_finished.clear()
    r = stack.post("/api/chat", key, json={"model": "alpha-model", "messages": []}, stream=True)
    assert r.status_code == 200
    lines = r.iter_lines()
    first = json.loads(next(lines))
    assert first["message"]["content"] == "alpha-0" and not pools["alpha"].stream_finished.is_set()
    rest = [json.loads(line) for line in lines if line]
    assert rest[-1]["done"] is True and len(rest) == 5


def test_ollama_tags_and_errors_are_ollama_shaped(stack: Stack, key: str) -> None:
    tags = stack.get("/api/tags", key).json()
    assert {m["name"] for m in tags["models"]} == {"alpha-model", "shared:latest", "beta-model"}
    r = stack.post("/api/chat", "bst_000000000000_" + "x" * 40, json={"model": "alpha-model"})
    assert r.status_code == 401 and isinstance(r.json()["error"], str)
    # Ollama's short names: "shared" means "shared:latest"
    r = stack.post("/api/generate", key, json={"model": "shared", "prompt": "hi", "stream": False})
    assert r.status_code == 200 and r.json()["response"].startswith("alpha-0")


def test_ollama_model_management_blocked_by_default(stack: Stack, key: str) -> None:
    r = stack.post("/api/pull", key, json={"model": "alpha-model"})
    assert r.status_code == 403
    assert "may not use /api/pull" in r.json()["error"]
    admin_key = stack.key("puller", "--endpoints", "/api/*")
    time.sleep(0.5)
    assert stack.post("/api/pull", admin_key, json={"model": "alpha-model"}).status_code == 200


def test_bad_key_is_authentication_error(stack: Stack, pools) -> None:
    with pytest.raises(openai.AuthenticationError) as e:
        client(stack, "bst_000000000000_" + "x" * 40).chat.completions.create(model="alpha-model", messages=[])
    assert e.value.code == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        client(stack, "sk-not-even-our-format").models.list()


def test_model_outside_allow_list_is_not_found(stack: Stack, pools) -> None:
    limited = stack.key("limited", "--models", "beta-*")
    time.sleep(0.5)
    c = client(stack, limited)
    with pytest.raises(openai.NotFoundError) as e:
        c.chat.completions.create(model="alpha-model", messages=[])
    assert e.value.code == "model_not_found"
    assert {m.id for m in c.models.list()} == {"beta-model"}
    assert c.chat.completions.create(model="beta-model", messages=[]).choices[0].message.content
    with pytest.raises(openai.NotFoundError):
        client(stack, limited).chat.completions.create(model="no-such-model", messages=[])


def test_rate_limit(stack: Stack, pools) -> None:
    limited = stack.key("slow", "--rpm", "3")
    time.sleep(0.5)
    c = client(stack, limited)
    first = c.chat.completions.with_raw_response.create(model="beta-model", messages=[])
    assert first.headers["x-ratelimit-limit-requests"] == "3"
    assert first.headers["x-ratelimit-remaining-requests"] == "2"
    for _ in range(2):
        c.chat.completions.create(model="beta-model", messages=[])
    with pytest.raises(openai.RateLimitError) as e:
        c.chat.completions.create(model="beta-model", messages=[])
    headers = e.value.response.headers
    assert int(headers["retry-after"]) >= 1
    assert headers["x-ratelimit-limit-requests"] == "3"
    assert headers["x-ratelimit-remaining-requests"] == "0"


def test_revoked_and_disabled_keys_refused_within_one_second(stack: Stack, pools) -> None:
    k = stack.key("short-lived")
    key_id = k.split("_")[1]
    time.sleep(0.5)
    assert stack.get("/v1/models", k).status_code == 200
    for action, back in (("disable", "enable"), ("revoke", None)):
        stack.cli("keys", action, key_id)
        t0 = time.monotonic()
        while stack.get("/v1/models", k).status_code == 200:
            assert time.monotonic() - t0 < 1.0, f"{action} took longer than 1 s"
            time.sleep(0.02)
        assert stack.get("/v1/models", k).status_code == 401
        if back:
            stack.cli("keys", back, key_id)
            time.sleep(0.5)
            assert stack.get("/v1/models", k).status_code == 200


def test_large_body_passes_intact(stack: Stack, key: str, pools) -> None:
    content = "x" * (2 * 1024 * 1024)
    body = json.dumps({"model": "alpha-model", "messages": [{"role": "user", "content": content}]})
    r = stack.post("/v1/chat/completions", key, data=body, headers={"Content-Type": "application/json"})
    assert r.status_code == 200, r.text
    assert r.json()["received_bytes"] == len(body)
    assert pools["alpha"].requests[-1]["body"] == body.encode()


def test_bad_requests(stack: Stack, key: str) -> None:
    r = stack.post("/v1/chat/completions", key, data="{not json", headers={"Content-Type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json"
    r = stack.post("/v1/chat/completions", key, json={"messages": []})
    assert r.status_code == 400 and r.json()["error"]["param"] == "model"
    r = stack.post("/v1/chat/completions", key)
    assert r.status_code == 400 and r.json()["error"]["code"] == "missing_model"
    too_big = b"x" * (17 * 1024 * 1024)
    r = stack.post("/v1/chat/completions", key, data=too_big, headers={"Content-Type": "application/json"})
    assert r.status_code == 413 and "larger than" in r.json()["error"]["message"]
    assert r.headers["X-Request-ID"]
    r = stack.post("/api/chat", key, data=too_big)
    assert r.status_code == 413 and isinstance(r.json()["error"], str)


def test_every_response_has_a_request_id(stack: Stack, key: str) -> None:
    responses = [
        stack.get("/healthz"),
        stack.get("/v1/models", key),
        stack.get("/v1/models"),
        stack.post("/v1/chat/completions", key, json={"model": "alpha-model", "messages": []}),
        stack.get("/nowhere", key),
    ]
    for r in responses:
        assert len(r.headers.get("X-Request-ID", "")) >= 16, (r.url, r.status_code)
    mine = stack.get("/v1/models", key, headers={"X-Request-ID": "client-chosen-123"})
    assert mine.headers["X-Request-ID"] == "client-chosen-123"


def test_usage_records_requests(stack: Stack, key: str) -> None:
    key_id = key.split("_")[1]
    r = stack.post("/v1/chat/completions", key, json={"model": "alpha-model", "messages": []},
                   headers={"X-Request-ID": "usage-probe-1"})
    assert r.status_code == 200
    time.sleep(0.2)
    rows = json.loads(stack.cli("usage", "--key", key_id, "--records", "--json"))
    probe = next(row for row in rows if row["request_id"] == "usage-probe-1")
    assert probe["model"] == "alpha-model" and probe["pool"] == "alpha" and probe["status"] == 200
    assert probe["upstream"] == f"127.0.0.1:{stack_upstream_port(stack)}"
    assert probe["ttfb"] is not None and probe["end"] >= probe["start"]
    summary = json.loads(stack.cli("usage", "--key", key_id, "--json"))
    assert sum(s["requests"] for s in summary) >= 1
    listing = json.loads(stack.cli("keys", "list", "--json"))
    assert next(k for k in listing if k["id"] == key_id)["last_used"] is not None


def stack_upstream_port(stack: Stack) -> int:
    pools = json.loads(stack.cli("pools", "list", "--json"))
    url = next(p for p in pools if p["name"] == "alpha")["upstreams"][0]["url"]
    return int(url.rsplit(":", 1)[1])


def test_admin_listener_reaches_manager(stack: Stack) -> None:
    r = requests.get(stack.admin + "/api/v1/health", timeout=5)
    assert r.status_code == 200 and r.json()["nginx_running"] is True


def test_admin_page_is_served(stack: Stack) -> None:
    r = requests.get(stack.admin + "/", timeout=5)
    assert r.status_code == 200 and "<title>Bastion</title>" in r.text


def test_upstream_cannot_redirect_into_another_pool(stack: Stack, key: str, pools) -> None:
    before = sum(len(pools[n].requests) for n in ("beta", "beta2"))
    r = stack.post("/v1/evil", key, json={"model": "alpha-model"})
    assert r.status_code == 200 and r.json() == {}
    assert sum(len(pools[n].requests) for n in ("beta", "beta2")) == before


def test_x_api_key_is_never_forwarded(stack: Stack, key: str, pools) -> None:
    r = stack.post("/v1/chat/completions", json={"model": "alpha-model"}, headers={"X-Api-Key": key,
                                                                                   "X-Real-IP": "6.6.6.6"})
    assert r.status_code == 200
    seen = pools["alpha"].requests[-1]["headers"]
    assert key not in json.dumps(seen) and seen["X-Real-IP"] == "127.0.0.1"


def test_non_canonical_paths_refused(stack: Stack, key: str) -> None:
    for path in ("/api//pull", "/api/./pull", "/v1/../api/pull", "/v1//chat/completions"):
        conn = http.client.HTTPConnection("127.0.0.1", stack.public_port, timeout=10)  # sends the path as is
        conn.request("POST", path, body=json.dumps({"model": "alpha-model"}),
                     headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"})
        status = conn.getresponse().status
        conn.close()
        assert status == 400, path


def test_no_rate_limit_headers_without_a_limit(stack: Stack, key: str) -> None:
    r = stack.post("/v1/chat/completions", key, json={"model": "alpha-model"})
    assert r.status_code == 200 and "x-ratelimit-limit-requests" not in r.headers
