"""Model aliases, a key's default model, "model": "auto" and max_parallel (authsvc/aliases.py, meter.js, the
limit_conn zones): the gate's decisions in-process, then real nginx + njs + gate + manager with fake upstreams."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest
import requests

from authsvc import aliases, bodies
from authsvc import keys as keyformat
from authsvc.gate import Gate
from manager import keys as keys_mod
from manager import pools as pools_mod
from manager import settings as settings_mod
from manager import validation as v
from tests.conftest import NGINX, Stack
from tests.fakes import FakeUpstream, FakeWebSocket, ws_frame, ws_handshake, ws_read
from tests.test_gate import PEPPER, Call, key_entry, write_snapshot
from tests.test_metering import needs_njs, record, rid

POOLS = [{"name": "main", "models": ["llama3:latest"], "aliases": {"gpt-4o": "llama3:latest"}},
         {"name": "other", "models": ["qwen"], "aliases": {"gpt-4o-mini": "qwen"}, "live": False},
         {"name": "third", "models": ["phi"]}]


def edited(raw: bytes, header: str) -> bytes:
    """The body nginx sends upstream: what meter.js does with X-Bastion-Edit."""
    out, at = b"", 0
    for start, end, text in json.loads(header):
        out += raw[at:start] + text.encode()
        at = end
    return out + raw[at:]


@pytest.fixture
def tokens() -> dict[str, str]:
    return {name: keyformat.generate()[1] for name in ("plain", "default", "auto", "limited", "parallel")}


@pytest.fixture
def gate(tmp_path: Path, tokens: dict[str, str]) -> Gate:
    entries = [key_entry(tokens["plain"]), key_entry(tokens["default"], default_model="gpt-4o"),
               key_entry(tokens["auto"], allow_auto=True), key_entry(tokens["parallel"], max_parallel=2),
               key_entry(tokens["limited"], allow_auto=True, models=["phi", "gpt-4o-mini"])]
    write_snapshot(tmp_path / "snapshot.json", entries, pools=POOLS, routes=[], body_edits=True,
                   auto_models=["gpt-4o-mini", "gpt-4o", "phi"])
    return Gate(tmp_path / "snapshot.json", PEPPER)


@pytest.mark.parametrize("raw", [
    b'{"model":"gpt-4o","messages":[{"role":"user","content":"\\"model\\":\\"gpt-4o\\""}]}',
    '{"messages":[{"role":"user","content":"héllo 🎉"}],"tools":[{"model":"x"}], "model" : "gpt-4o"}'.encode(),
])
def test_an_alias_is_routed_on_its_public_name_and_the_upstream_gets_its_own(gate: Gate, tokens: dict[str, str],
                                                                             raw: bytes) -> None:
    call = Call(gate, "/v1/chat/completions", tokens["plain"], raw)
    assert call.status == 200, call.body
    assert call.headers["X-Accel-Redirect"] == "@pool_main"
    assert call.headers["X-Bastion-Model"] == "gpt-4o"  # usage and allow-lists: the public name
    assert call.headers[aliases.PUBLIC_HEADER] == "gpt-4o"
    sent = edited(raw, call.headers[aliases.EDIT_HEADER])
    body, original = json.loads(sent), json.loads(raw)
    assert body.pop("model") == "llama3:latest"
    original.pop("model")
    assert body == original  # nothing else changed, byte-exact elsewhere
    assert sent.replace(b'"llama3:latest"', b'"gpt-4o"', 1) == raw


def test_an_alias_answers_to_its_ollama_long_name_too(gate: Gate, tokens: dict[str, str]) -> None:
    raw = b'{"model":"gpt-4o:latest"}'
    call = Call(gate, "/api/chat", tokens["plain"], raw)
    assert call.headers["X-Accel-Redirect"] == "@pool_main"
    assert json.loads(edited(raw, call.headers[aliases.EDIT_HEADER]))["model"] == "llama3:latest"


def test_a_plain_model_goes_unedited(gate: Gate, tokens: dict[str, str]) -> None:
    call = Call(gate, "/v1/chat/completions", tokens["plain"], {"model": "phi", "messages": []})
    assert call.status == 200 and aliases.EDIT_HEADER not in call.headers and aliases.PUBLIC_HEADER not in call.headers


def test_an_alias_and_include_usage_are_one_list_of_edits(gate: Gate, tokens: dict[str, str]) -> None:
    raw = b'{"model":"gpt-4o","stream":true,"messages":[{"role":"user","content":"caf\xc3\xa9"}]}'
    call = Call(gate, "/v1/chat/completions", tokens["plain"], raw)
    body = json.loads(edited(raw, call.headers[aliases.EDIT_HEADER]))
    assert body["model"] == "llama3:latest" and body["stream_options"] == {"include_usage": True}
    assert body["messages"][0]["content"] == "café"


def test_an_ollama_alias_is_rewritten_in_the_key_ollama_reads(gate: Gate, tokens: dict[str, str]) -> None:
    raw = b'{"Model":"gpt-4o","messages":[]}'
    call = Call(gate, "/api/chat", tokens["plain"], raw)
    assert call.status == 200, call.body
    assert json.loads(edited(raw, call.headers[aliases.EDIT_HEADER])) == {"Model": "llama3:latest", "messages": []}


def test_the_default_model_fills_a_body_without_one(gate: Gate, tokens: dict[str, str]) -> None:
    for raw in (b'{"messages":[]}', b' {}'):
        call = Call(gate, "/v1/chat/completions", tokens["default"], raw)
        assert call.status == 200, call.body
        assert call.headers["X-Bastion-Model"] == "gpt-4o"  # recorded as the resolved model
        assert json.loads(edited(raw, call.headers[aliases.EDIT_HEADER]))["model"] == "llama3:latest"
    # a body that names a model keeps it; "model": null is not "no model" (a second key would be ambiguous)
    assert Call(gate, "/v1/chat/completions", tokens["default"], {"model": "phi"}).headers["X-Bastion-Model"] == "phi"
    assert Call(gate, "/v1/chat/completions", tokens["default"], {"model": None}).status == 400
    # a key without a default model: as before
    missing = Call(gate, "/v1/chat/completions", tokens["plain"], {"messages": []})
    assert missing.status == 400 and missing.json()["error"]["code"] == "missing_model"


def test_auto_resolves_to_the_first_model_with_a_live_pool_the_key_may_use(gate: Gate, tokens: dict[str, str]
                                                                            ) -> None:
    raw = b'{"model": "auto", "messages": []}'
    call = Call(gate, "/v1/chat/completions", tokens["auto"], raw)
    # gpt-4o-mini's only pool is down: gpt-4o (an alias on main) is next
    assert call.status == 200, call.body
    assert call.headers["X-Bastion-Model"] == "gpt-4o" and call.headers["X-Accel-Redirect"] == "@pool_main"
    assert json.loads(edited(raw, call.headers[aliases.EDIT_HEADER]))["model"] == "llama3:latest"
    # the allow-list sees resolved names: this key may not use gpt-4o, so phi
    limited = Call(gate, "/v1/chat/completions", tokens["limited"], raw)
    assert limited.headers["X-Bastion-Model"] == "phi" and aliases.PUBLIC_HEADER not in limited.headers
    assert json.loads(edited(raw, limited.headers[aliases.EDIT_HEADER]))["model"] == "phi"
    # a key that does not allow auto: "auto" is just a name nothing serves
    assert Call(gate, "/v1/chat/completions", tokens["plain"], raw).status == 404


def test_without_body_edits_an_alias_is_a_clear_503(tmp_path: Path, tokens: dict[str, str]) -> None:
    write_snapshot(tmp_path / "snapshot.json", [key_entry(tokens["plain"])], pools=POOLS, routes=[])
    gate = Gate(tmp_path / "snapshot.json", PEPPER)
    call = Call(gate, "/v1/chat/completions", tokens["plain"], {"model": "gpt-4o"})
    assert call.status == 503 and call.json()["error"]["code"] == "body_edit_unavailable"
    assert Call(gate, "/v1/chat/completions", tokens["plain"], {"model": "phi"}).status == 200


def test_max_parallel_is_handed_to_nginx(gate: Gate, tokens: dict[str, str]) -> None:
    assert Call(gate, "/v1/chat/completions", tokens["parallel"], {"model": "phi"}).headers[
        "X-Bastion-Parallel"] == "2"
    assert "X-Bastion-Parallel" not in Call(gate, "/v1/chat/completions", tokens["plain"], {"model": "phi"}).headers


def test_model_span_is_in_bytes() -> None:
    raw = '{"a":"ééé","model":"x"}'.encode()
    start, end = bodies.model_span(raw, False)
    assert raw[start:end] == b'"x"'


def test_without_njs_aliases_default_models_and_auto_are_refused_at_config_time(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from manager.context import Bastion
    from manager.datadir import DataDir

    monkeypatch.setenv("BASTION_NJS_MODULE", "off")
    bastion = Bastion(DataDir.at(tmp_path / "data"), NGINX)
    with pytest.raises(v.ValidationError, match="njs") as refused:
        pools_mod.add(bastion, "main", ["http://127.0.0.1:9"], models=["llama3"], aliases={"gpt-4o": "llama3"})
    assert refused.value.field == "aliases" and pools_mod.all_pools(bastion) == []
    for field, value in (("default_model", "llama3"), ("allow_auto", True)):
        with pytest.raises(v.ValidationError, match="njs") as refused:
            keys_mod.create(bastion, "k", **{field: value})
        assert refused.value.field == field
    assert keys_mod.all_keys(bastion) == []


def test_bad_alias_and_key_fields_are_refused_naming_the_field() -> None:
    with pytest.raises(v.ValidationError, match=r"aliases\.gpt"):
        pools_mod.alias_map("aliases", {"gpt": "gpt"})
    with pytest.raises(v.ValidationError, match="aliases"):
        pools_mod.alias_map("aliases", ["gpt"])
    with pytest.raises(v.ValidationError, match=r"aliases\.auto"):
        pools_mod.alias_map("aliases", {"auto": "x"})
    with pytest.raises(v.ValidationError, match=r"aliases\.x"):
        pools_mod.alias_map("aliases", {"x": "bad name!"})
    for value in (0, -1, 10_001, "many", 1.5, True):
        with pytest.raises(v.ValidationError, match="max_parallel"):
            keys_mod.max_parallel("max_parallel", value)
    assert keys_mod.max_parallel("max_parallel", "none") is None
    with pytest.raises(v.ValidationError, match="default_model"):
        keys_mod.default_model("default_model", "auto")
    with pytest.raises(v.ValidationError, match=r"auto_models\[1\]"):
        settings_mod.auto_models("auto_models", ["a", "auto"])


# ---- end to end: real nginx + njs, the gate and the manager, fake upstreams ----------------------------------

UPSTREAM_NAME = "llama3:latest"


@pytest.fixture(scope="module")
def fakes() -> Iterator[dict[str, FakeUpstream]]:
    ups = {"alias": FakeUpstream("alias", [UPSTREAM_NAME, "phi"], chunk_delay=0.02, chunks=4),
           "slow": FakeUpstream("slow", ["slow-model"], chunk_delay=0.4, chunks=5)}
    yield ups
    for up in ups.values():
        up.close()


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, fakes: dict[str, FakeUpstream]) -> Iterator[Stack]:
    if not Path(NGINX).exists():
        pytest.skip("nginx is not installed")
    s = Stack(tmp_path_factory.mktemp("aliases") / "data")
    s.start()
    s.cli("settings", "set", "bruteforce_max_failures", "0")
    s.cli("pools", "add", "main", "--url", fakes["alias"].url, "--models", f"{UPSTREAM_NAME},phi",
          "--alias", f"gpt-4o={UPSTREAM_NAME}")
    s.cli("pools", "add", "slow", "--url", fakes["slow"].url, "--models", "slow-model")
    yield s
    s.stop()


@pytest.fixture
def up(fakes: dict[str, FakeUpstream]) -> Iterator[FakeUpstream]:
    alias = fakes["alias"]
    alias.requests.clear()
    yield alias
    alias.suffix, alias.tool_args, alias.split = "", None, False
    alias.answer, alias.answer_type = None, "application/json"


def loaded(stack: Stack, *options: str) -> str:
    """A new key with `options`, once the gate has it."""
    key = stack.key(f"k{time.monotonic_ns()}", *options)
    deadline = time.monotonic() + 10
    while stack.get("/v1/models", key).status_code != 200:
        assert time.monotonic() < deadline, "the gate did not load the key"
        time.sleep(0.05)
    return key


def sent_model(up: FakeUpstream, path: str) -> str:
    bodies_seen = [json.loads(r["body"]) for r in up.requests if r["path"] == path]
    body = bodies_seen[-1]
    return body.get("model", body.get("Model"))


@needs_njs
def test_an_alias_reaches_the_upstream_by_its_name_and_the_client_sees_the_public_one(
        stack: Stack, up: FakeUpstream) -> None:
    key = loaded(stack, "--models", "gpt-4o")  # the allow-list names the public name only
    client = openai.OpenAI(base_url=stack.base + "/v1", api_key=key, max_retries=0)
    up.tool_args = json.dumps({"model": UPSTREAM_NAME})  # what the model wrote: never touched
    answer = client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}])
    assert sent_model(up, "/v1/chat/completions") == UPSTREAM_NAME
    assert answer.model == "gpt-4o"
    assert json.loads(answer.choices[0].message.tool_calls[0].function.arguments) == {"model": UPSTREAM_NAME}
    # streamed: every chunk says the public name; the text that spells the upstream's name stays as written
    up.suffix = f' "model":"{UPSTREAM_NAME}" é'
    request_id = rid()
    chunks = list(client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}],
                                                 stream=True, stream_options={"include_usage": True},
                                                 extra_headers={"X-Request-ID": request_id}))
    assert sent_model(up, "/v1/chat/completions") == UPSTREAM_NAME
    assert chunks and {c.model for c in chunks} == {"gpt-4o"}
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text.count(f'"model":"{UPSTREAM_NAME}"') == up.chunks
    rec = record(stack, request_id)
    assert (rec["model"], rec["total_tokens"]) == ("gpt-4o", str(11 + up.chunks * 2))
    # the client did not ask for usage (Bastion adds it, then takes the event out) and every event arrives cut
    # in two inside an "é": still the public name everywhere, the text intact, no usage event
    up.split = True
    request_id = rid()
    chunks = list(client.chat.completions.create(model="gpt-4o", messages=[], stream=True,
                                                 extra_headers={"X-Request-ID": request_id}))
    assert len(chunks) == up.chunks and {c.model for c in chunks} == {"gpt-4o"}
    assert all(c.usage is None and c.choices[0].delta.content.endswith(up.suffix) for c in chunks)
    assert record(stack, request_id)["total_tokens"] == str(11 + up.chunks * 2)
    # the allow-list sees the public name; the upstream's own name is served as itself, unedited
    assert stack.post("/v1/chat/completions", key, json={"model": UPSTREAM_NAME}).status_code == 404
    anyone = openai.OpenAI(base_url=stack.base + "/v1", api_key=loaded(stack), max_retries=0)
    assert anyone.chat.completions.create(model=UPSTREAM_NAME, messages=[]).model == UPSTREAM_NAME


@needs_njs
def test_a_websocket_to_an_alias_reaches_the_upstream_under_its_name(stack: Stack) -> None:
    """A realtime session names its model in the query string: the upstream reads its own name there, every
    other parameter byte for byte; the log and the key's allow-list see the public name."""
    realtime = FakeWebSocket("rt")
    try:
        stack.cli("pools", "add", "rt", "--url", realtime.url, "--models", "rt-up", "--alias", "rt-pub=rt-up",
                  "--websocket")
        key = loaded(stack, "--models", "rt-pub")
        line, headers, _, sock = ws_handshake(stack.public_port, "voice=a%20b&model=rt-pub&x=%26", key)
        with sock:
            assert line.startswith("HTTP/1.1 101"), line
            sock.sendall(ws_frame(b"hello", mask=True))
            assert ws_read(sock) == b"rt: hello"
        assert realtime.handshakes[-1]["line"] == "GET /v1/realtime?voice=a%20b&model=rt-up&x=%26 HTTP/1.1"
        rec = record(stack, headers["x-request-id"])
        assert (rec["pool"], rec["status"], rec["model"]) == ("rt", "101", "rt-pub")
        line, _, _, sock = ws_handshake(stack.public_port, "model=rt-up", key)  # not on the key's list
        sock.close()
        assert line.split()[1] == "404", line
    finally:
        stack.cli("pools", "remove", "rt")
        realtime.close()


def test_a_websocket_query_names_the_upstream_model_and_keeps_the_rest() -> None:
    assert aliases.query_with_model("model=pub", "up") == "model=up"
    assert aliases.query_with_model("a=1&model=pub&b=%2F", "up:7b") == "a=1&model=up%3A7b&b=%2F"
    assert aliases.query_with_model("mod%65l=pub&x", "up/x y") == "model=up%2Fx%20y&x"


@needs_njs
def test_an_ollama_alias_is_reported_back_in_every_ndjson_line(stack: Stack, up: FakeUpstream) -> None:
    key = loaded(stack)
    up.suffix = f' "model": "{UPSTREAM_NAME}"'
    r = stack.post("/api/chat", key, json={"model": "gpt-4o", "messages": []}, stream=True)
    lines = [json.loads(line) for line in r.iter_lines() if line]
    assert r.status_code == 200 and len(lines) == up.chunks + 1
    assert {line["model"] for line in lines} == {"gpt-4o"}
    assert sent_model(up, "/api/chat") == UPSTREAM_NAME
    assert all(UPSTREAM_NAME in line["message"]["content"] for line in lines[:-1])
    up.tool_args = json.dumps({"model": UPSTREAM_NAME})  # Ollama sends arguments as an object: a nested "model"
    whole = stack.post("/api/chat", key, json={"model": "gpt-4o", "messages": [], "stream": False}).json()
    assert whole["model"] == "gpt-4o"
    assert whole["message"]["tool_calls"][0]["function"]["arguments"] == {"model": UPSTREAM_NAME}


@needs_njs
def test_default_model_and_auto_end_to_end(stack: Stack, up: FakeUpstream) -> None:
    key = loaded(stack, "--default-model", "gpt-4o")
    r = stack.post("/v1/chat/completions", key, json={"messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 200, r.text
    assert r.json()["model"] == "gpt-4o" and sent_model(up, "/v1/chat/completions") == UPSTREAM_NAME
    dead = FakeUpstream("dead", ["dead-model"])
    dead_url = dead.url
    dead.close()  # nothing listens there any more
    stack.cli("pools", "add", "dead", "--url", dead_url, "--models", "dead-model")
    stack.cli("settings", "set", "auto_models", "dead-model,phi")
    stack.cli("settings", "set", "health_fails", "1")
    stack.cli("settings", "set", "health_interval", "1")
    auto = loaded(stack, "--allow-auto")
    deadline = time.monotonic() + 20
    while True:  # once the health checks marked the dead pool down, auto skips it
        request_id = rid()
        r = stack.post("/v1/chat/completions", auto, json={"model": "auto", "messages": []},
                       headers={"X-Request-ID": request_id})
        if r.status_code == 200:
            break
        assert time.monotonic() < deadline, r.text
        time.sleep(0.5)
    assert r.json()["model"] == "phi" and sent_model(up, "/v1/chat/completions") == "phi"
    assert record(stack, request_id)["model"] == "phi"  # usage records the resolved model
    # a key without allow_auto: "auto" is a model nothing serves
    assert stack.post("/v1/chat/completions", key, json={"model": "auto"}).status_code == 404


@needs_njs
def test_max_parallel_lets_exactly_that_many_streams_through(stack: Stack, fakes: dict[str, FakeUpstream]) -> None:
    key = loaded(stack, "--max-parallel", "2")
    assert '"max_parallel": 2' in stack.cli("keys", "show", keyformat.key_id_of(key), "--json")
    body = {"model": "slow-model", "stream": True, "messages": []}
    sessions = [requests.Session() for _ in range(2)]  # requests.post would close a stream's connection
    streams = [session.post(stack.base + "/v1/chat/completions", json=body, stream=True, timeout=10,
                            headers={"Authorization": f"Bearer {key}"}) for session in sessions]
    readers = [s.iter_lines() for s in streams]  # kept: a dropped reader closes its connection
    for s, reader in zip(streams, readers, strict=True):  # both are in flight: their first event arrived
        assert s.status_code == 200
        assert next(reader).startswith(b"data: ")
    third = stack.post("/v1/chat/completions", key, json=body)
    assert third.status_code == 429 and third.headers["Retry-After"] == "1"
    error = third.json()["error"]
    assert error["code"] == "too_many_parallel_requests" and "at most 2" in error["message"]
    ollama = stack.post("/api/chat", key, json={"model": "slow-model", "messages": []})
    assert ollama.status_code == 429 and set(ollama.json()) == {"error"}
    other = loaded(stack, "--max-parallel", "2")  # counted per key
    assert stack.post("/v1/chat/completions", other, json={"model": "slow-model"}).status_code == 200
    streams[0].close()  # the client goes away: its slot is free at once
    sessions[0].close()
    deadline = time.monotonic() + 3
    while (r := stack.post("/v1/chat/completions", key, json={"model": "slow-model"})).status_code == 429:
        assert time.monotonic() < deadline, "the slot was not freed"
        time.sleep(0.05)
    assert r.status_code == 200
    for _ in readers[1]:  # the other one ends normally
        pass
    sessions[1].close()
    results: list[int] = []
    threads = [threading.Thread(target=lambda: results.append(
        stack.post("/v1/chat/completions", key, json=body).status_code)) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results) == [200, 200, 429]


@needs_njs
def test_body_edits_are_byte_offsets_after_multibyte_text(stack: Stack, up: FakeUpstream) -> None:
    """The gate's offsets count bytes, and nginx splices bytes: text before the edits does not shift them."""
    key = loaded(stack)
    raw = '{"model":"gpt-4o","messages":[{"role":"user","content":"héllo 🎉"}],"stream":true,"stream_options":{}}'
    r = stack.post("/v1/chat/completions", key, data=raw.encode(), headers={"Content-Type": "application/json"})
    assert r.status_code == 200, r.text
    sent = [x["body"] for x in up.requests if x["path"] == "/v1/chat/completions"][-1]
    assert json.loads(sent) == {**json.loads(raw), "model": UPSTREAM_NAME, "stream_options": {"include_usage": True}}


@needs_njs
def test_the_responses_api_reports_the_public_name_streamed_and_not(stack: Stack, up: FakeUpstream) -> None:
    key = loaded(stack)
    events = [{"type": "response.created", "response": {"id": "r1", "object": "response", "model": UPSTREAM_NAME,
                                                        "output": []}},
              {"type": "response.output_text.delta", "delta": f'"model":"{UPSTREAM_NAME}"'},
              {"type": "response.completed", "response": {"id": "r1", "model": UPSTREAM_NAME, "usage": {
                  "input_tokens": 2, "output_tokens": 3, "total_tokens": 5}}}]
    up.answer = b"".join(f"event: {e['type']}\ndata: {json.dumps(e)}\n\n".encode() for e in events)
    up.answer_type = "text/event-stream"
    r = stack.post("/v1/responses", key, json={"model": "gpt-4o", "input": "hi", "stream": True})
    got = [json.loads(line[6:]) for line in r.text.splitlines() if line.startswith("data: ")]
    assert sent_model(up, "/v1/responses") == UPSTREAM_NAME
    assert [e.get("response", {}).get("model") for e in got] == ["gpt-4o", None, "gpt-4o"]
    assert got[1]["delta"] == f'"model":"{UPSTREAM_NAME}"'
    up.answer, up.answer_type = json.dumps({"id": "r1", "object": "response", "model": UPSTREAM_NAME}).encode(), \
        "application/json"
    assert stack.post("/v1/responses", key, json={"model": "gpt-4o", "input": "hi"}).json()["model"] == "gpt-4o"


def test_status_warns_when_njs_went_away_under_configured_aliases(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    from manager import snapshot
    from manager.context import Bastion
    from manager.datadir import DataDir

    bastion = Bastion(DataDir.at(tmp_path / "data"), NGINX)
    with bastion.store.transaction() as db:  # configured while njs was there
        db.table("pools").insert({"name": "main", "upstreams": [{"url": "http://127.0.0.1:9"}], "models": ["x"],
                                  "aliases": {"gpt-4o": "x"}})
    bastion.keystore.insert({"id": "k1", "digest": "d", "name": "k", "allow_auto": True})
    monkeypatch.setenv("BASTION_NJS_MODULE", "off")
    problems = snapshot.edit_problems(bastion)
    assert len(problems) == 2 and "pool main" in problems[0] and "1 key(s)" in problems[1]
    assert snapshot.build(bastion)["body_edits"] is False
