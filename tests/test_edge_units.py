"""The edge's pure parts: the route table, pass-through paths, the per-address limit, CORS origins."""

from __future__ import annotations

import pytest

from authsvc import anonymous, routes
from authsvc.anonymous import AnonymousLimiter
from manager import cors
from manager import validation as v


def test_route_table() -> None:
    assert routes.wrong_method("/v1/models", "PUT") == "GET, HEAD"
    assert routes.wrong_method("/v1/models", "HEAD") is None
    assert routes.wrong_method("/v1/chat/completions", "GET") == "POST"
    assert routes.wrong_method("/v1/models/org/model", "DELETE") is None
    assert routes.wrong_method("/v1/models/", "POST") is None  # not a model: the upstream decides
    assert routes.wrong_method("/v1/fine_tuning/jobs", "PATCH") is None  # unknown: passes through
    assert routes.wrong_method("/api/delete", "POST") == "DELETE"


@pytest.mark.parametrize("path", ["/tokenize", "/detokenize", "/completion", "/infill", "/health", "/metrics",
                                  "/props*", "/props/*", "/slots/x-1_2~"])
def test_good_passthrough_paths(path: str) -> None:
    assert routes.passthrough_path(path) == path


@pytest.mark.parametrize("path", ["/", "/*", "tokenize", "/a*b", "/a//b", "/a/../b", "/..", "/.env", "/a/.x",
                                  "/x;y", "/x{y}", "/x$y", "/a b", "/x\n", "/é", "/" + "a" * 100, "/v1",
                                  "/v1/tokenize", "/v*", "/api/x", "/healthz", "/h*", "/chat/completions",
                                  "/models/x", "/embeddings", "/_bastion/x", "/.well-known/acme"])
def test_bad_passthrough_paths(path: str) -> None:
    with pytest.raises(ValueError):
        routes.passthrough_path(path)


def test_passthrough_lookup_prefers_exact_then_longest_prefix() -> None:
    table = routes.PassThrough([("a", ["/props*", "/tokenize"]), ("b", ["/props/slots*", "/tokenize"])])
    assert table.pools("/tokenize") == ("a", "b")
    assert table.pools("/props/slots/1") == ("b",)
    assert table.pools("/props") == ("a",)
    assert table.pools("/detokenize") == ()
    assert not routes.PassThrough()


def test_unauthenticated_limit_per_client_with_bounded_memory(monkeypatch: pytest.MonkeyPatch) -> None:
    now = [0.0]
    limiter = AnonymousLimiter(clock=lambda: now[0])
    assert [limiter.hit("10.0.0.1", 3) for _ in range(3)] == [(0.0, 0)] * 3
    wait, refused = limiter.hit("10.0.0.1", 3)
    assert wait == pytest.approx(20.0) and refused == 1  # 3 a minute: one every 20 s
    assert limiter.hit("10.0.0.1", 3)[1] == 2  # refusals in a row: only the first is logged
    assert limiter.hit("10.0.0.2", 3) == (0.0, 0)  # another address has its own bucket
    for _ in range(3):  # one IPv6 /64 is one client
        limiter.hit("2001:db8::1", 3)
    assert limiter.hit("2001:db8::ffff", 3)[0] > 0
    now[0] = 40.0
    assert limiter.hit("10.0.0.1", 3) == (0.0, 0)
    assert limiter.hit("10.0.0.1", 0) == (0.0, 0)  # 0: no limit
    monkeypatch.setattr(anonymous, "MAX_CLIENTS", 100)
    for i in range(1000):
        limiter.hit(f"192.0.2.{i % 250}.{i}"[:15], 3)
        limiter.hit(f"198.51.{i // 250}.{i % 250}", 3)
    assert len(limiter) == 100


@pytest.mark.parametrize(("value", "expected"), [
    ("https://App.Example.com", "https://app.example.com"), ("https://app.example.com:443", "https://app.example.com"),
    ("http://localhost:3000", "http://localhost:3000"), ("http://[::1]:8080", "http://[::1]:8080"),
    ("http://127.0.0.1", "http://127.0.0.1"), ("*", "*")])
def test_origins_are_normalised(value: str, expected: str) -> None:
    assert cors.origin("cors_origins[0]", value) == expected


@pytest.mark.parametrize("value", ["https://a.example.com/", "ftp://a.example.com", "https://a.example.com:99999",
                                   "https://user@a.example.com", "https://a.example.com?x", "null", "",
                                   "https://-bad.example.com", 'https://a.example.com"'])
def test_bad_origins(value: str) -> None:
    with pytest.raises(v.ValidationError) as e:
        cors.origin("cors_origins[0]", value)
    assert e.value.field == "cors_origins[0]"


def test_every_public_location_carries_the_edge_headers() -> None:
    """The request_id macro is the one place: every location of public.conf (gate, pools, error pages, the
    503 while the gate restarts) adds CORS and timings; a location without it would drop them all."""
    from manager.render import render
    from tests.test_render import golden_input

    text = render(golden_input(tls=True), 1)["public.conf"]
    blocks = text.split("        location ")[1:]
    assert len(blocks) > 10
    for block in blocks:
        name = block.split("{", 1)[0].strip()
        for header in ("Access-Control-Allow-Origin", "Server-Timing", "X-Process-Time", "X-Request-ID"):
            assert f"add_header {header} " in block, (name, header)
    pool = next(b for b in blocks if b.startswith("@pool_"))
    assert "proxy_hide_header Access-Control-Allow-Origin;" in pool  # never a second one from the upstream


# ---- the gate's side, without nginx ----

def edge_gate(tmp_path, keys, **extra):
    from authsvc.gate import Gate
    from tests.test_gate import PEPPER, write_snapshot

    write_snapshot(tmp_path / "snapshot.json", keys, **extra)
    return Gate(tmp_path / "snapshot.json", PEPPER)


def test_gate_pass_through_routes(tmp_path) -> None:
    from authsvc import keys as keyformat
    from tests.test_gate import Call, key_entry

    plain, granted, models_only = (keyformat.generate()[1] for _ in range(3))
    gate = edge_gate(tmp_path, [key_entry(plain), key_entry(granted, endpoints=["/v1/*", "/tokenize", "/props*"]),
                                key_entry(models_only, endpoints=["/tokenize"], models=["gpt-4o"])],
                     pools=[{"name": "main", "models": ["llama3:latest", "gpt-4o"], "passthrough": ["/props*"]},
                            {"name": "embed", "models": ["nomic"], "passthrough": ["/tokenize"]},
                            {"name": "vllm", "models": ["mistral"], "passthrough": ["/tokenize"]}])
    assert Call(gate, "/tokenize", plain, {"model": "nomic"}).status == 403  # no endpoint list: no pass-through
    c = Call(gate, "/tokenize", granted, {"model": "mistral", "prompt": "x"})
    assert c.status == 200 and c.headers["X-Accel-Redirect"] == "@pool_vllm"  # the pool that serves the model
    assert Call(gate, "/tokenize", granted, {"prompt": "x"}).headers["X-Accel-Redirect"] == "@pool_embed"
    assert Call(gate, "/tokenize", granted, {"model": "gpt-4o"}).status == 404  # no pool listing it serves it
    assert Call(gate, "/props/slots", granted, method="GET").headers["X-Accel-Redirect"] == "@pool_main"
    assert Call(gate, "/tokenize", models_only, {"model": "mistral"}).status == 404  # not the key's model
    assert Call(gate, "/detokenize", granted, {"model": "qwen"}).status == 404
    assert Call(gate, "/tokenize", None, {"model": "qwen"}).status == 401


def test_gate_methods_and_head(tmp_path) -> None:
    from authsvc import keys as keyformat
    from tests.test_gate import Call, key_entry

    token = keyformat.generate()[1]
    gate = edge_gate(tmp_path, [key_entry(token)])
    c = Call(gate, "/v1/chat/completions", token, method="GET")
    assert c.status == 405 and c.headers["Allow"] == "POST" and c.json()["error"]["code"] == "method_not_allowed"
    assert Call(gate, "/v1/models", token, method="HEAD").json()["object"] == "list"  # answered like GET
    assert Call(gate, "/v1/models", None, method="PUT").status == 401  # no key: nothing learnt about routes


def test_gate_limits_requests_without_a_valid_key(tmp_path) -> None:
    from authsvc import keys as keyformat
    from tests.test_gate import Call, key_entry

    token = keyformat.generate()[1]
    gate = edge_gate(tmp_path, [key_entry(token)], unauthenticated_rpm=3,
                     bruteforce={"max_failures": 0})
    assert [Call(gate, "/v1/models", "bst_x_y", method="GET").status for _ in range(4)] == [401, 401, 401, 429]
    c = Call(gate, "/nowhere", None, method="GET")
    assert c.status == 429 and int(c.headers["Retry-After"]) >= 1
    assert c.headers["X-Bastion-Log"] == "0"  # the second refusal in a row: not logged
    assert Call(gate, "/v1/models", None, method="GET", HTTP_X_REAL_IP="10.9.9.9").status == 401  # another address
    assert Call(gate, "/v1/models", token, method="GET").status == 200
