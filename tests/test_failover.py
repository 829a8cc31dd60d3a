"""Retries inside a pool, fallback across a route's pools, per-pool timeouts (manager/traffic.py,
nginx_templates/_fallback.j2): real nginx, the real gate and manager, fake upstreams."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from authsvc import keys as keyformat
from authsvc.gate import Gate
from authsvc.keys import key_id_of
from manager import generations, metering, snapshot, traffic
from manager import pools as pools_mod
from manager.context import Bastion
from manager.datadir import DataDir
from manager.validation import ValidationError
from tests.conftest import NGINX, Stack, free_port, needs_nginx
from tests.fakes import FakeUpstream, FakeWebSocket, ws_frame, ws_handshake, ws_read
from tests.test_gate import PEPPER, Call, key_entry, write_snapshot
from tests.test_metering import record

needs_njs = pytest.mark.skipif(metering.detect(NGINX).module is None, reason="no njs module for this nginx")


@pytest.fixture(scope="module")
def ups() -> Iterator[dict[str, FakeUpstream]]:
    made = {
        "good1": FakeUpstream("good1", ["r"]),
        "good2": FakeUpstream("good2", ["m"]),
        "sick": FakeUpstream("sick", ["r"]),
        "cutter": FakeUpstream("cutter", ["c"], chunk_delay=0.1, chunks=6),
        "slow": FakeUpstream("slow", ["s"]),
        "stalls": FakeUpstream("stalls", ["st"], chunks=6),
        "locked": FakeUpstream("locked", ["k"], api_key="sk-right"),
    }
    made["sick"].fail_status = 503
    made["cutter"].cut_after = 3
    made["slow"].delay = 3.0
    made["stalls"].stall_after, made["stalls"].stall = 2, 4.0
    yield made
    for up in made.values():
        up.close()


@pytest.fixture(scope="module")
def realtime() -> Iterator[FakeWebSocket]:
    up = FakeWebSocket("rt")
    yield up
    up.close()


@pytest.fixture(scope="module")
def key(stack: Stack, ups: dict[str, FakeUpstream], realtime: FakeWebSocket) -> str:
    """Pools: `dead` (nothing listens), `live` (good2), `retry` (sick answers 503, then good1), `cut` (a stream
    that dies after 3 events), `slow` (answers after 3 s, read_timeout 1 s), `stalls` (goes silent mid-stream,
    read_timeout 1 s), `bal` (good1 again, its own nginx upstream state); routes in front of them. No health
    checks: nginx alone finds the failures."""
    stack.cli("settings", "set", "health_interval", "0")
    dead = f"http://127.0.0.1:{free_port()}"
    stack.cli("pools", "add", "dead", "--url", dead, "--models", "m,p,c,s,st")
    stack.cli("pools", "add", "dead-2", "--url", f"http://127.0.0.1:{free_port()}", "--models", "gone")
    stack.cli("routes", "set", "gone", "--pool", "dead", "--pool", "dead-2")
    stack.cli("pools", "add", "live", "--url", ups["good2"].url, "--models", "m,p,c,s,st,b,k")
    stack.cli("pools", "add", "retry", "--url", ups["sick"].url, "--url", ups["good1"].url, "--models", "r,p",
              "--retries", "1")
    stack.cli("pools", "add", "cut", "--url", ups["cutter"].url, "--models", "c")
    stack.cli("pools", "add", "slow", "--url", ups["slow"].url, "--models", "s", "--read-timeout", "1")
    stack.cli("pools", "add", "stalls", "--url", ups["stalls"].url, "--models", "st", "--read-timeout", "1")
    stack.cli("pools", "add", "rt", "--url", realtime.url, "--models", "rt-model", "--websocket")
    stack.cli("pools", "add", "keyed", "--url", ups["locked"].url, "--models", "k,k-alone", "--api-key", "sk-wrong")
    stack.cli("routes", "set", "k", "--pool", "keyed", "--pool", "live")
    stack.cli("routes", "set", "m", "--pool", "dead", "--pool", "live")
    stack.cli("routes", "set", "p", "--pool", "retry", "--pool", "live")
    stack.cli("routes", "set", "c", "--pool", "cut", "--pool", "live")
    stack.cli("routes", "set", "s", "--pool", "slow", "--pool", "live")
    stack.cli("routes", "set", "st", "--pool", "stalls", "--pool", "live")
    stack.cli("pools", "add", "bal", "--url", ups["good1"].url, "--models", "b")
    stack.cli("routes", "set", "b", "--pool", "bal", "--pool", "live", "--mode", "balance")
    k = stack.key("failover", "--rpm", "1000")
    time.sleep(0.5)  # the gate reads the new snapshot within 0.25 s
    return k


def chat(stack: Stack, key: str, model: str, stream: bool = False, path: str = "/v1/chat/completions",
         timeout: float = 20) -> tuple[requests.Response, str]:
    request_id = f"fo-{uuid.uuid4().hex[:12]}"
    r = requests.post(stack.base + path, json={"model": model, "stream": stream, "messages": []},
                      headers={"Authorization": f"Bearer {key}", "X-Request-ID": request_id}, timeout=timeout,
                      stream=stream)
    return r, request_id


def posts(up: FakeUpstream) -> int:
    return sum(r["method"] == "POST" for r in up.requests)


def test_a_dead_pool_falls_back_to_the_next_before_the_first_byte(stack: Stack, key: str,
                                                                   ups: dict[str, FakeUpstream]) -> None:
    r, request_id = chat(stack, key, "m")
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"]["content"] == "hello from good2"
    # the client sees its own key's limits, read from the gate's answer before the failed first hop
    assert r.headers["x-ratelimit-limit-requests"] == "1000"
    rec = record(stack, request_id)
    # the record names the pool and upstream that answered, with the gate's key and model
    assert rec["pool"] == "live" and rec["status"] == "200"
    assert rec["upstream_addr"].rpartition(" ")[2] == f"127.0.0.1:{ups['good2'].port}"
    assert (rec["key"], rec["model"]) == (key_id_of(key), "m")  # as the gate named them, before the failed hop


def test_when_every_pool_fails_the_client_gets_the_json_502(stack: Stack, key: str) -> None:
    r, request_id = chat(stack, key, "gone")
    assert r.status_code == 502 and r.headers["Content-Type"] == "application/json"
    assert r.json()["error"]["message"] == "No upstream server could answer the request."
    rec = record(stack, request_id)
    assert (rec["pool"], rec["status"], rec["key"]) == ("dead-2", "502", key_id_of(key))  # a name with "-" in the chain


@needs_njs
def test_the_fallback_hop_gets_the_usage_insertion_and_is_metered(stack: Stack, key: str,
                                                                  ups: dict[str, FakeUpstream]) -> None:
    r, request_id = chat(stack, key, "m", stream=True)
    text = r.text
    assert r.status_code == 200 and text.endswith("data: [DONE]\n\n")
    assert '"choices":[]' not in text  # the usage event the gate asked for is taken out again
    body = json.loads([q for q in ups["good2"].requests if q["method"] == "POST"][-1]["body"])
    assert body["stream_options"] == {"include_usage": True}
    rec = record(stack, request_id)
    assert (rec["pool"], rec["outcome"], rec["total_tokens"]) == ("live", "completed", "21")


def test_an_upstream_answering_503_is_retried_on_the_next_upstream(stack: Stack, key: str,
                                                                   ups: dict[str, FakeUpstream]) -> None:
    before = posts(ups["sick"])
    for _ in range(4):
        r, request_id = chat(stack, key, "r")
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["message"]["content"] == "hello from good1"
    assert posts(ups["sick"]) > before  # round robin sent some to the sick one first: each was retried
    rec = record(stack, request_id)
    assert rec["pool"] == "retry" and rec["upstream_addr"].rpartition(" ")[2] == f"127.0.0.1:{ups['good1'].port}"


def test_other_upstream_errors_pass_through_and_the_last_pool_answers_as_it_is(stack: Stack, key: str,
                                                                               ups: dict[str, FakeUpstream]) -> None:
    # a 418 of the first pool is the upstream's answer, not a failure: untouched, no fallback
    seen = posts(ups["good2"])
    r, _ = chat(stack, key, "p", path="/v1/fail/418")
    assert r.status_code == 418 and r.json()["error"]["code"] == "upstream_said_so"
    assert r.json()["error"]["message"] == "good1 failed on purpose"  # sick's 503, if tried first, was retried
    assert posts(ups["good2"]) == seen
    # every upstream of `retry` answers 503: the route falls back to `live`, whose own 503 reaches the client
    r, request_id = chat(stack, key, "p", path="/v1/fail/503")
    assert r.status_code == 503
    assert r.json()["error"]["message"] == "good2 failed on purpose"
    assert record(stack, request_id)["pool"] == "live"


def test_an_upstream_refusing_the_pool_key_falls_back_and_alone_is_the_gateways_502(
        stack: Stack, key: str, ups: dict[str, FakeUpstream]) -> None:
    r, request_id = chat(stack, key, "k")
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == "hello from good2"
    assert record(stack, request_id)["pool"] == "live"
    r, _ = chat(stack, key, "k-alone")  # the only pool: the refusal is the gateway's fault, as before
    assert r.status_code == 502 and r.json()["error"]["code"] == "upstream_auth_failed"


def test_a_stream_that_already_started_is_never_retried(stack: Stack, key: str, ups: dict[str, FakeUpstream]) -> None:
    cutter, good2 = ups["cutter"], ups["good2"]
    cut_before, live_before = posts(cutter), posts(good2)
    r, request_id = chat(stack, key, "c", stream=True)
    assert r.status_code == 200
    got = b""
    with pytest.raises(requests.exceptions.ChunkedEncodingError):
        for piece in r.iter_content(None):
            got += piece
    assert got.count(b"data: ") == 3 and b"cutter-2" in got and b"[DONE]" not in got
    time.sleep(0.5)
    assert posts(cutter) == cut_before + 1  # not tried again on the same pool
    assert posts(good2) == live_before  # nor on the next one
    rec = record(stack, request_id)
    assert rec["pool"] == "cut" and rec["status"] == "200"


def test_a_pool_read_timeout_falls_back_before_the_first_byte(stack: Stack, key: str,
                                                              ups: dict[str, FakeUpstream]) -> None:
    started = time.monotonic()
    r, request_id = chat(stack, key, "s")
    elapsed = time.monotonic() - started
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == "hello from good2"
    assert 0.9 < elapsed < 2.5, elapsed  # the pool's 1 s, not the global 600 s nor the upstream's 3 s
    rec = record(stack, request_id)
    assert rec["pool"] == "live"
    # nginx lists every hop: the gate's 200, the timed-out try of `slow`, then `live`'s answer
    assert rec["upstream_status"] == "200 : 504 : 200"


def test_a_stream_that_goes_silent_is_cut_after_the_pool_read_timeout_not_retried(
        stack: Stack, key: str, ups: dict[str, FakeUpstream]) -> None:
    live_before = posts(ups["good2"])
    started = time.monotonic()
    r, request_id = chat(stack, key, "st", stream=True)
    got = b""
    with pytest.raises(requests.exceptions.ChunkedEncodingError):
        for piece in r.iter_content(None):
            got += piece
    elapsed = time.monotonic() - started
    assert got.count(b"data: ") == 2
    assert 0.9 < elapsed < 3.5, elapsed  # cut by the pool's 1 s idle timer, not the 4 s stall
    assert posts(ups["good2"]) == live_before
    rec = record(stack, request_id)
    assert rec["pool"] == "stalls"
    if metering.detect(NGINX).module:
        assert rec["outcome"] == "timeout"


def test_a_balanced_route_starts_at_each_pool_in_turn(stack: Stack, key: str, ups: dict[str, FakeUpstream]) -> None:
    pools = []
    for _ in range(4):
        r, request_id = chat(stack, key, "b")
        assert r.status_code == 200, r.text
        pools.append(record(stack, request_id)["pool"])
    assert sorted(pools) == ["bal", "bal", "live", "live"]


# ---- WebSocket pass-through ----------------------------------------------------------------------------------

def test_a_websocket_upgrade_is_checked_then_tunnelled(stack: Stack, key: str, realtime: FakeWebSocket) -> None:
    line, headers, _, sock = ws_handshake(stack.public_port, "model=rt-model", key)
    with sock:
        assert line.startswith("HTTP/1.1 101"), line
        request_id = headers["x-request-id"]
        for text in (b"hello", b"again " * 30):  # frames both ways, a 16-bit length too
            sock.sendall(ws_frame(text, mask=True))
            assert ws_read(sock) == b"rt: " + text
    seen = realtime.handshakes[-1]
    assert seen["line"] == "GET /v1/realtime?model=rt-model HTTP/1.1"
    assert seen["headers"]["upgrade"].lower() == "websocket"
    assert "authorization" not in seen["headers"] and key not in json.dumps(seen)  # the client's key stays here
    rec = record(stack, request_id)
    assert (rec["pool"], rec["status"], rec["key"], rec["model"]) == ("rt", "101", key_id_of(key), "rt-model")


@pytest.mark.parametrize(("query", "with_key", "status", "code"), [
    ("model=rt-model", False, 401, "invalid_api_key"),
    ("", True, 400, "missing_model"),
    ("model=rt-model&model=m", True, 400, "missing_model"),  # two models: which one the upstream reads is unsure
    ("model=nope", True, 404, "model_not_found"),
    ("model=m", True, 400, "websocket_not_enabled"),  # its pools pass no WebSocket
])
def test_a_websocket_upgrade_the_gate_refuses_never_reaches_an_upstream(
        stack: Stack, key: str, realtime: FakeWebSocket, query: str, with_key: bool, status: int, code: str) -> None:
    before = len(realtime.handshakes)
    line, headers, body, sock = ws_handshake(stack.public_port, query, key if with_key else None)
    with sock:
        assert line.split()[1] == str(status), line
        length = int(headers["content-length"])
        while len(body) < length:
            body += sock.recv(4096)
    assert json.loads(body)["error"]["code"] == code
    assert len(realtime.handshakes) == before


# ---- settings (manager/traffic.py) -----------------------------------------------------------------------------

@pytest.mark.parametrize(("given", "field"), [
    ({"retry_statuses": [418]}, "retry_statuses[0]"),
    ({"retry_statuses": [True]}, "retry_statuses[0]"),
    ({"retry_statuses": "503"}, "retry_statuses"),
    ({"retries": 1.5}, "retries"),
    ({"retry_timeout": 3601}, "retry_timeout"),
    ({"connect_timeout": 0}, "connect_timeout"),
    ({"read_timeout": "5s"}, "read_timeout"),
    ({"websocket": "yes"}, "websocket"),
])
def test_bad_traffic_settings_name_the_field(given: dict, field: str) -> None:
    with pytest.raises(ValidationError) as e:
        traffic.pool_fields(given, defaults=True)
    assert e.value.field == field


def test_traffic_settings_render_as_nginx_directives() -> None:
    settings = {"connect_timeout": 5, "read_timeout": 600}
    old = traffic.view({"name": "p"}, settings)  # a pool stored before the settings existed: the defaults
    assert old["next_upstream"] == "error timeout http_502 http_503 http_504 non_idempotent"
    assert (old["tries"], old["retry_timeout"], old["read_timeout"], old["connect_timeout"]) == (3, 30, 600, 5)
    assert old["fallback_statuses"] == [502, 503, 504] and old["websocket"] is False
    mine = traffic.view({"retries": 0, "retry_statuses": [429], "read_timeout": 9, "connect_timeout": 1}, settings)
    assert mine["next_upstream"] == "error timeout http_429 non_idempotent"
    assert (mine["tries"], mine["read_timeout"], mine["connect_timeout"]) == (1, 9, 1)
    assert mine["fallback_statuses"] == [429, 502, 504]  # nginx's own 502 and 504 always go on to the next pool


# ---- the gate's chain (authsvc/gate.py), without nginx --------------------------------------------------------

def chain_gate(tmp_path: Path, token: str) -> Gate:
    write_snapshot(tmp_path / "snapshot.json", [key_entry(token)],
                   pools=[{"name": "a", "models": ["x", "y"]}, {"name": "b", "models": ["x"]},
                          {"name": "c", "models": ["z"], "include_usage": False}],
                   routes=[{"model": "bal", "pools": ["a", "b", "c"], "mode": "balance"},
                           {"model": "z*", "pools": ["a", "c"]}])
    return Gate(tmp_path / "snapshot.json", PEPPER)


def test_the_gate_names_the_chain_only_when_there_is_a_next_pool(tmp_path: Path) -> None:
    token = keyformat.generate()[1]
    gate = chain_gate(tmp_path, token)
    one = Call(gate, "/v1/chat/completions", token, {"model": "y"})
    assert one.headers["X-Accel-Redirect"] == "@pool_a" and "X-Bastion-Fallback" not in one.headers
    two = Call(gate, "/v1/chat/completions", token, {"model": "x"})  # served by a then b, in the pools' order
    assert (two.headers["X-Accel-Redirect"], two.headers["X-Bastion-Fallback"]) == ("@then_a", "a,b")
    starts = [Call(gate, "/v1/chat/completions", token, {"model": "bal"}).headers["X-Bastion-Fallback"]
              for _ in range(4)]
    assert starts == ["a,b,c", "b,c,a", "c,a,b", "a,b,c"]


def test_the_usage_insertion_needs_every_pool_of_the_chain_to_take_it(tmp_path: Path) -> None:
    token = keyformat.generate()[1]
    gate = chain_gate(tmp_path, token)
    body = {"model": "x", "stream": True, "messages": []}
    assert "X-Bastion-Usage" in Call(gate, "/v1/chat/completions", token, body).headers
    body["model"] = "zeta"  # a then c, and c does not take stream_options: the body goes to both unchanged
    c = Call(gate, "/v1/chat/completions", token, body)
    assert c.headers["X-Bastion-Fallback"] == "a,c" and "X-Bastion-Usage" not in c.headers


@needs_nginx
def test_the_gate_hears_of_websocket_only_once_nginx_has_the_location(tmp_path: Path) -> None:
    """While a change is applied the snapshot names only what the live generation has (context.change
    publishes with `only_pools` first): a pool just switched to WebSocket gets no upgrade before its @ws_."""
    b = Bastion(DataDir.at(tmp_path / "data"))
    pools_mod.add(b, "p", ["http://127.0.0.1:9"], models=["m"])
    b.store.table("pools").update({"websocket": True})  # in the store, not yet rendered
    assert snapshot.build(b, only_pools=generations.live_pools(b.dirs))["pools"][0]["websocket"] is False
    assert snapshot.build(b)["pools"][0]["websocket"] is True
    pools_mod.update(b, "p", websocket=True)
    assert snapshot.build(b, only_pools=generations.live_pools(b.dirs))["pools"][0]["websocket"] is True
    assert "location @ws_p " in generations.joined(generations.files(b.dirs, generations.live(b.dirs)))


def test_an_ollama_stream_falls_back_too(stack: Stack, key: str) -> None:
    r, request_id = chat(stack, key, "m", stream=True, path="/api/chat")
    lines = [json.loads(line) for line in r.text.splitlines()]
    assert r.status_code == 200 and lines[0]["message"]["content"] == "good2-0" and lines[-1]["done"] is True
    rec = record(stack, request_id)
    assert rec["pool"] == "live"
    if metering.detect(NGINX).module:
        assert (rec["outcome"], rec["total_tokens"]) == ("completed", "14")


def test_a_fallback_goes_only_to_pools_that_take_the_same_body(tmp_path: Path) -> None:
    """The gate edits the body for the first pool (a model alias): a pool that knows the model under another
    upstream name is left out of the chain, one under the same name stays in."""
    token = keyformat.generate()[1]
    write_snapshot(tmp_path / "snapshot.json", [key_entry(token)], body_edits=True,
                   pools=[{"name": "a", "models": [], "aliases": {"pub": "up-a"}},
                          {"name": "b", "models": [], "aliases": {"pub": "up-b"}},
                          {"name": "c", "models": [], "aliases": {"pub": "up-a"}}],
                   routes=[{"model": "pub", "pools": ["a", "b", "c"]}])
    call = Call(Gate(tmp_path / "snapshot.json", PEPPER), "/v1/chat/completions", token, {"model": "pub"})
    assert (call.headers["X-Accel-Redirect"], call.headers["X-Bastion-Fallback"]) == ("@then_a", "a,c")
    assert "up-a" in call.headers["X-Bastion-Edit"]
