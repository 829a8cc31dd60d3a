"""Token metering and stream outcomes (nginx_templates/meter.js): real nginx + njs, the real gate and manager,
fake upstreams that answer like real servers; the access log is read as the lead's tab-separated records."""

from __future__ import annotations

import json
import socket
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest
import requests

from authsvc import include_usage
from authsvc.gate import Gate
from manager import metering
from tests.conftest import NGINX, Stack
from tests.fakes import FakeUpstream
from tests.test_gate import Call, key_entry, write_snapshot

# the `bastion` log_format's fields, in order (nginx_templates/_http.j2)
FIELDS = ("marker", "msec", "request_id", "key", "model", "pool", "upstream_addr", "status", "bytes_sent",
          "request_length", "request_time", "upstream_status", "upstream_header_time", "method", "uri",
          "remote_addr", "outcome", "prompt_tokens", "completion_tokens", "total_tokens")
READ_TIMEOUT = 2
needs_njs = pytest.mark.skipif(metering.detect(NGINX).module is None, reason="no njs module for this nginx")


def record(stack: Stack, request_id: str, wait: float = 10) -> dict[str, str]:
    """The access log record of one request, as a dict of FIELDS (waits for nginx to write it)."""
    deadline = time.monotonic() + wait
    while True:
        for line in (stack.data_dir / "logs" / "access.log").read_text().splitlines():
            values = line.split("\t")
            if len(values) == len(FIELDS) and values[2] == request_id:
                assert values[0] == '"B1'
                return dict(zip(FIELDS, values, strict=True))
        assert time.monotonic() < deadline, f"no log record for {request_id}"
        time.sleep(0.05)


def tokens(rec: dict[str, str]) -> tuple[str, str, str]:
    return rec["prompt_tokens"], rec["completion_tokens"], rec["total_tokens"]


def sent(up: FakeUpstream, path: str = "/v1/chat/completions") -> bytes:
    """The body of the last request to `path` the upstream got (health checks GET /v1/models meanwhile)."""
    return [r for r in up.requests if r["path"] == path][-1]["body"]


def rid() -> str:
    return f"meter-{uuid.uuid4().hex[:12]}"


# ---- the gate's insertion (authsvc/include_usage.py) ---------------------------------------------------------

def inserted(raw: bytes) -> bytes | None:
    """The body the upstream gets (what meter.js does with the gate's header), or None when unchanged."""
    body = json.loads(raw)
    ask = include_usage.insertion(raw, body)
    if ask is None:
        return None
    at, _, text = ask.partition(" ")
    return raw[:int(at)] + text.encode() + raw[int(at):]


@pytest.mark.parametrize("raw", [
    b'{"model":"m","stream":true,"messages":[]}',
    b' \n{ "model": "m", "stream": true, "messages": [{"role":"user","content":"h\xc3\xa9"}]}',
    b'{"model":"m","stream":true,"stream_options":{}}',
    b'{"model":"m","stream":true,"stream_options": {"continuous_usage_stats":true}}',
])
def test_the_gate_asks_for_usage_without_touching_anything_else(raw: bytes) -> None:
    changed = inserted(raw)
    assert changed is not None
    body, original = json.loads(changed), json.loads(raw)
    assert body["stream_options"]["include_usage"] is True
    body["stream_options"].pop("include_usage")
    if "stream_options" not in original:
        assert body.pop("stream_options") == {}
    assert body == original


@pytest.mark.parametrize("raw", [
    b'{"model":"m","messages":[]}',  # not streamed
    b'{"model":"m","stream":false}',
    b'{"model":"m","stream":"yes"}',
    b'{"model":"m","stream":true,"stream_options":{"include_usage":true}}',  # the client asked itself
    b'{"model":"m","stream":true,"stream_options":{"include_usage":false}}',  # ... or said no
    b'{"model":"m","stream":true,"stream_options":null}',
    # a stream_options object that cannot be told for sure from another one
    b'{"model":"m","stream":true,"tools":[{"stream_options":{}}],"stream_options":{}}',
    b'{"model":"m","stream":true,"stream\\u005foptions":{}}',
    b'["not", "an", "object"]',
])
def test_the_gate_leaves_other_bodies_alone(raw: bytes) -> None:
    assert inserted(raw) is None


def test_the_gate_sends_the_insertion_only_for_pools_that_want_it(tmp_path: Path) -> None:
    from authsvc import keys as keyformat

    token = keyformat.generate()[1]
    write_snapshot(tmp_path / "snapshot.json", [key_entry(token)],
                   pools=[{"name": "main", "models": ["gpt-4o"]},
                          {"name": "strict", "models": ["strict-model"], "include_usage": False}])
    gate = Gate(tmp_path / "snapshot.json", b"test-pepper")
    streamed = {"model": "gpt-4o", "stream": True, "messages": []}
    top = f"1 {include_usage.TOP_LEVEL}"
    assert Call(gate, "/v1/chat/completions", token, streamed).headers[include_usage.HEADER] == top
    assert Call(gate, "/v1/completions", token, streamed).headers[include_usage.HEADER] == top
    unstreamed = {**streamed, "stream": False}
    assert include_usage.HEADER not in Call(gate, "/v1/chat/completions", token, unstreamed).headers
    assert include_usage.HEADER not in Call(gate, "/v1/embeddings", token, streamed).headers
    assert include_usage.HEADER not in Call(gate, "/v1/chat/completions", token,
                                            {**streamed, "model": "strict-model"}).headers


# ---- keys with a token quota must be metered ---------------------------------------------------------------

@pytest.mark.parametrize(("raw", "param"), [
    (b'{"model":"m","stream":true,"stream_options":{"include_usage":false}}', "stream_options"),
    (b'{"model":"m","stream":true,"stream_options":{"include_usage":null}}', "stream_options"),
    (b'{"model":"m","stream":true,"stream_options":{"include_usage":1}}', "stream_options"),
    (b'{"model":"m","stream":true,"stream_options":null}', "stream_options"),
    (b'{"model":"m","stream":true,"stream_options":[]}', "stream_options"),
    (b'{"model":"m","stream":true,"stream_options":"x"}', "stream_options"),
    # include_usage given twice: parsers keeping the first one read false
    (b'{"model":"m","stream":true,"stream_options":{"include_usage":false,"include_usage":true}}',
     "stream_options"),
    # a second stream_options: the top-level one, nested ones, escaped ones
    (b'{"model":"m","stream":true,"stream_options":{"include_usage":false},"stream_options":{}}',
     "stream_options"),
    (b'{"model":"m","stream":true,"tools":[{"stream_options":{}}],"stream_options":{}}', "stream_options"),
    (b'{"model":"m","stream":true,"stream\\u005foptions":{}}', "stream_options"),
    (b'{"model":"m","stream":true,"stream_options":{},"stream\\u005foptions":{"include_usage":false}}',
     "stream_options"),
    # Ollama's /v1 (Go) matches keys in any case; C parsers end a key at NUL
    (b'{"model":"m","stream":true,"Stream_Options":{"include_usage":false}}', "stream_options"),
    (b'{"model":"m","stream":false,"STREAM":true}', "stream"),
    (b'{"model":"m","stream":true,"stream_options":{"Include_Usage":false}}', "stream_options"),
    (b'{"model":"m","stream":true,"stream_options":{"include_usage":true,"INCLUDE_USAGE":false}}',
     "stream_options"),
    (b'{"model":"m","stream":true,"stream_options\\u0000":{"include_usage":false}}', "stream_options"),
    # `stream` twice or escaped: parsers keeping the first one stream, the gate (last one) would not
    (b'{"model":"m","stream":true,"stream":false}', "stream"),
    (b'{"model":"m","str\\u0065am":true}', "stream"),
])
def test_a_token_quota_key_cannot_turn_usage_off(raw: bytes, param: str) -> None:
    with pytest.raises(include_usage.Unmeterable) as e:
        include_usage.metered_insertion(raw, json.loads(raw), pool_asks=True)
    assert e.value.param == param


@pytest.mark.parametrize(("raw", "expected"), [
    (b'{"model":"m","stream":true}', f"1 {include_usage.TOP_LEVEL}"),
    (b'{"model":"m","stream":true,"stream_options":{}}', '45 "include_usage":true'),
    (b'{"model":"m","stream":true,"stream_options":{"include_usage":true}}', None),  # metered as it is
    (b'{"model":"m","stream":false,"stream_options":{"include_usage":false}}', None),  # not streamed
    (b'{"model":"m","stream":null}', None),
    (b'{"model":"m","messages":[{"role":"user","content":"stream"}]}', None),
])
def test_a_token_quota_key_is_metered(raw: bytes, expected: str | None) -> None:
    assert include_usage.metered_insertion(raw, json.loads(raw), pool_asks=True) == expected


def test_a_token_quota_key_on_a_pool_without_include_usage_must_ask_itself() -> None:
    asked = b'{"model":"m","stream":true,"stream_options":{"include_usage":true}}'
    assert include_usage.metered_insertion(asked, json.loads(asked), pool_asks=False) is None
    for raw in (b'{"model":"m","stream":true}', b'{"model":"m","stream":true,"stream_options":{}}'):
        with pytest.raises(include_usage.Unmeterable, match="does not ask for usage"):
            include_usage.metered_insertion(raw, json.loads(raw), pool_asks=False)


@pytest.fixture
def quota_gate(tmp_path: Path) -> tuple[Gate, dict[str, str]]:
    from authsvc import keys as keyformat

    tokens = {name: keyformat.generate()[1] for name in ("plain", "tpm", "day", "month", "requests")}
    entries = [key_entry(tokens["plain"]), key_entry(tokens["tpm"], tpm=100_000),
               key_entry(tokens["day"], tokens_per_day=100_000), key_entry(tokens["month"], tokens_per_month=100_000),
               key_entry(tokens["requests"], requests_per_day=1000)]
    write_snapshot(tmp_path / "snapshot.json", entries,
                   pools=[{"name": "main", "models": ["gpt-4o"]},
                          {"name": "strict", "models": ["strict-model"], "include_usage": False}])
    return Gate(tmp_path / "snapshot.json", b"test-pepper"), tokens


def test_the_gate_refuses_unmetered_streams_of_token_quota_keys_only(quota_gate: tuple[Gate, dict[str, str]]
                                                                     ) -> None:
    gate, tokens = quota_gate
    off = {"model": "gpt-4o", "stream": True, "messages": [], "stream_options": {"include_usage": False}}
    for name in ("tpm", "day", "month"):
        call = Call(gate, "/v1/chat/completions", tokens[name], off)
        assert call.status == 400, name
        error = call.json()["error"]
        assert (error["param"], error["code"], error["type"]) == ("stream_options", "usage_required",
                                                                   "invalid_request_error")
        assert "token quota" in error["message"] and "cannot be turned off" in error["message"]
        assert Call(gate, "/v1/completions", tokens[name], off).status == 400
        assert Call(gate, "/v1/chat/completions", tokens[name], {**off, "stream_options": None}).status == 400
        # a pool that does not ask: only a client that asks itself streams
        strict = {**off, "model": "strict-model", "stream_options": {}}
        assert Call(gate, "/v1/chat/completions", tokens[name], strict).json()["error"]["param"] == "stream_options"
        asked = Call(gate, "/v1/chat/completions", tokens[name], {**strict, "stream_options": {"include_usage": True}})
        assert asked.status == 200 and include_usage.HEADER not in asked.headers
        # metered the usual way
        plain = Call(gate, "/v1/chat/completions", tokens[name], {**off, "stream_options": {}})
        at = json.dumps({**off, "stream_options": {}}).index('"stream_options": {') + len('"stream_options": {')
        assert plain.status == 200 and plain.headers[include_usage.HEADER] == f'{at} "include_usage":true'
        assert Call(gate, "/v1/chat/completions", tokens[name], {**off, "stream": False}).status == 200
        assert Call(gate, "/v1/embeddings", tokens[name], off).status == 200
    # keys without a token quota: today's behaviour, the client's stream untouched when it opted out
    for name in ("plain", "requests"):
        call = Call(gate, "/v1/chat/completions", tokens[name], off)
        assert call.status == 200 and include_usage.HEADER not in call.headers
        strict = Call(gate, "/v1/chat/completions", tokens[name], {**off, "model": "strict-model",
                                                                    "stream_options": {}})
        assert strict.status == 200 and include_usage.HEADER not in strict.headers


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions", "/v1/responses"])
@pytest.mark.parametrize("stream", [1, 0, "true", "false", [], {}])
def test_stream_must_be_a_boolean_for_every_key(quota_gate: tuple[Gate, dict[str, str]], path: str,
                                                stream: object) -> None:
    gate, tokens = quota_gate
    for name in ("plain", "day"):
        call = Call(gate, path, tokens[name], {"model": "gpt-4o", "stream": stream, "messages": []})
        assert call.status == 400
        error = call.json()["error"]
        assert (error["param"], error["code"], error["type"]) == ("stream", "invalid_type", "invalid_request_error")
        assert "'stream'" in error["message"] and "boolean" in error["message"]
    for fine in (True, False, None):
        call = Call(gate, path, tokens["plain"], {"model": "gpt-4o", "stream": fine, "messages": []})
        assert call.status == 200


# ---- end to end ------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def fakes() -> Iterator[dict[str, FakeUpstream]]:
    ups = {"meter": FakeUpstream("meter", ["meter-model"], chunk_delay=0.02, chunks=4),
           "plain": FakeUpstream("plain", ["plain-model"], chunk_delay=0.02, chunks=4)}
    yield ups
    for up in ups.values():
        up.close()


@pytest.fixture(scope="module")
def metered(tmp_path_factory: pytest.TempPathFactory, fakes: dict[str, FakeUpstream]) -> Iterator[Stack]:
    if not Path(NGINX).exists():
        pytest.skip("nginx is not installed")
    s = Stack(tmp_path_factory.mktemp("metering") / "data")
    s.start()
    s.cli("settings", "set", "read_timeout", str(READ_TIMEOUT))
    s.cli("pools", "add", "meter", "--url", fakes["meter"].url, "--models", "meter-model")
    s.cli("pools", "add", "plain", "--url", fakes["plain"].url, "--models", "plain-model", "--no-include-usage")
    yield s
    s.stop()


@pytest.fixture
def up(fakes: dict[str, FakeUpstream]) -> Iterator[FakeUpstream]:
    """The metered pool's upstream, its knobs put back after each test."""
    meter = fakes["meter"]
    meter.requests.clear()
    yield meter
    meter.chunks, meter.chunk_delay, meter.suffix = 4, 0.02, ""
    meter.usage_null = meter.split = meter.obfuscation = meter.prompt_logprobs = False
    meter.chat_usage = True
    meter.tool_args = meter.answer = None
    meter.answer_type = "application/json"
    meter.cut_after = meter.stall_after = None
    meter.linger = 0.0


@pytest.fixture(scope="module")
def key(metered: Stack) -> str:
    """A key the gate has loaded (it looks every 0.25 s; longer on a busy machine)."""
    metered.cli("settings", "set", "bruteforce_max_failures", "0")  # the polls below are no brute force
    key = metered.key("metering")
    deadline = time.monotonic() + 10
    while metered.get("/v1/models", key).status_code != 200:
        assert time.monotonic() < deadline, "the gate did not load the key"
        time.sleep(0.05)
    return key


def sdk(stack: Stack, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=stack.base + "/v1", api_key=key, max_retries=0)


@needs_njs
def test_status_says_njs_meters(metered: Stack) -> None:
    assert "token metering: njs" in metered.cli("status")
    assert requests.get(metered.admin + "/api/v1/health", timeout=10).json()["token_metering"] == "njs"


@needs_njs
def test_sdk_stream_without_include_usage_gets_no_usage_but_is_metered(metered: Stack, key: str,
                                                                       up: FakeUpstream) -> None:
    request_id = rid()
    stream = sdk(metered, key).chat.completions.create(
        model="meter-model", messages=[{"role": "user", "content": "hi"}], stream=True,
        extra_headers={"X-Request-ID": request_id})
    chunks = list(stream)
    assert [c.choices[0].delta.content for c in chunks] == [f"meter-{i} " for i in range(4)]
    assert all(c.usage is None for c in chunks)
    # the upstream was asked for usage...
    assert json.loads(sent(up))["stream_options"] == {"include_usage": True}
    # ...and the log has its counts
    rec = record(metered, request_id)
    assert tokens(rec) == ("11", "8", "19")
    assert (rec["outcome"], rec["pool"], rec["status"]) == ("completed", "meter", "200")


@needs_njs
def test_a_client_that_leaves_right_after_done_got_the_whole_stream(metered: Stack, key: str,
                                                                   up: FakeUpstream) -> None:
    """The client reads `data: [DONE]` and closes while the upstream has yet to end its body: the client got the
    whole answer, so the record says completed, with the counts (it said client_cut, by a race, before)."""
    up.linger = 1.0
    request_id = rid()
    with requests.post(metered.base + "/v1/chat/completions", stream=True, timeout=10,
                       headers={"Authorization": f"Bearer {key}", "X-Request-ID": request_id},
                       json={"model": "meter-model", "messages": [], "stream": True}) as r:
        for line in r.iter_lines():
            if line == b"data: [DONE]":
                break
    rec = record(metered, request_id)
    assert (rec["outcome"], tokens(rec)) == ("completed", ("11", "8", "19"))


@needs_njs
def test_sdk_stream_with_include_usage_passes_untouched(metered: Stack, key: str, up: FakeUpstream) -> None:
    request_id = rid()
    stream = sdk(metered, key).chat.completions.create(
        model="meter-model", messages=[{"role": "user", "content": "hi"}], stream=True,
        stream_options={"include_usage": True}, extra_headers={"X-Request-ID": request_id})
    chunks = list(stream)
    assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens == 19
    assert sent(up).count(b"stream_options") == 1  # the client's own, not a second one
    assert tokens(record(metered, request_id)) == ("11", "8", "19")


@needs_njs
def test_sdk_non_streamed_answers_are_metered(metered: Stack, key: str, up: FakeUpstream) -> None:
    client = sdk(metered, key)
    ids = [rid() for _ in range(3)]
    client.chat.completions.create(model="meter-model", messages=[{"role": "user", "content": "hi"}],
                                   extra_headers={"X-Request-ID": ids[0]})
    client.completions.create(model="meter-model", prompt="hi", extra_headers={"X-Request-ID": ids[1]})
    client.embeddings.create(model="meter-model", input="hi", extra_headers={"X-Request-ID": ids[2]})
    assert b"stream_options" not in sent(up)
    recs = [record(metered, i) for i in ids]
    assert [tokens(r) for r in recs] == [("3", "4", "7"), ("1", "3", "4"), ("1", "", "1")]
    assert {r["outcome"] for r in recs} == {"completed"}


def raw_stream(url: str, body: bytes, headers: dict[str, str]) -> bytes:
    with requests.post(url, data=body, headers={"Content-Type": "application/json", **headers}, stream=True,
                       timeout=10) as r:
        assert r.status_code == 200, r.text
        return b"".join(r.iter_content(None))


@needs_njs
@pytest.mark.parametrize("style", ["vllm", "openai", "obfuscated", "split"])
@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions"])
@pytest.mark.parametrize("asked", [False, True], ids=["not-asked", "asked"])
def test_streams_reach_the_client_byte_for_byte_as_the_upstream_sends_them(
        metered: Stack, key: str, up: FakeUpstream, style: str, path: str, asked: bool) -> None:
    """What the client gets through Bastion is, byte for byte, what the upstream sends it directly: when it did
    not ask for usage (Bastion asks, then takes the usage out again) and when it did (untouched), multibyte
    characters cut across chunks and OpenAI's `"usage":null` and `"obfuscation"` in every chunk included."""
    up.suffix = "é ☃ "
    up.usage_null = style == "openai"
    up.obfuscation = style == "obfuscated"
    up.split = style == "split"
    options = ', "stream_options": {"include_usage": true}' if asked else ""
    body = (' {\n  "model": "meter-model", "stream": true,\n  "messages": [{"role": "user", "content": "Grüße"}]'
            + options + "}").encode()
    direct = raw_stream(up.url + path, body, {})
    request_id = rid()
    through = raw_stream(metered.base + path, body, {"Authorization": f"Bearer {key}", "X-Request-ID": request_id})
    assert through == direct
    assert b"\xc3\xa9" in direct and (b'"usage":{' in direct) == asked
    # the upstream got the client's bytes, with the insertion only when the client did not ask
    assert sent(up, path) == (body if asked else body[:2] + include_usage.TOP_LEVEL.encode() + body[2:])
    rec = record(metered, request_id)
    assert tokens(rec) == ("11", "8", "19") and rec["outcome"] == "completed"


@needs_njs
def test_a_pool_without_include_usage_is_not_asked(metered: Stack, key: str, fakes: dict[str, FakeUpstream]) -> None:
    plain = fakes["plain"]
    request_id = rid()
    list(sdk(metered, key).chat.completions.create(
        model="plain-model", messages=[], stream=True, extra_headers={"X-Request-ID": request_id}))
    assert b"stream_options" not in sent(plain)
    rec = record(metered, request_id)
    assert tokens(rec) == ("", "", "") and rec["outcome"] == "completed"  # unknown, never guessed


@needs_njs
@pytest.mark.parametrize("stream", [True, False])
def test_ollama_chat_is_metered(metered: Stack, key: str, up: FakeUpstream, stream: bool) -> None:
    up.suffix, up.split = "é", stream
    request_id = rid()
    r = metered.post("/api/chat", key, json={"model": "meter-model", "messages": [], "stream": stream},
                     headers={"X-Request-ID": request_id}, stream=True)
    lines = [json.loads(line) for line in r.iter_lines() if line]
    assert lines[-1]["done"] is True
    rec = record(metered, request_id)
    assert tokens(rec) == ("9", "4", "13") and rec["outcome"] == "completed"


@needs_njs
def test_an_upstream_that_dies_mid_stream_is_an_upstream_cut(metered: Stack, key: str, up: FakeUpstream) -> None:
    up.cut_after = 2
    request_id = rid()
    with pytest.raises(openai.APIError):
        list(sdk(metered, key).chat.completions.create(
            model="meter-model", messages=[], stream=True, extra_headers={"X-Request-ID": request_id}))
    rec = record(metered, request_id)
    assert (rec["outcome"], rec["status"]) == ("upstream_cut", "200")  # nginx alone says 200
    assert tokens(rec) == ("", "", "")
    assert int(rec["bytes_sent"]) > 0


@needs_njs
def test_an_upstream_gone_silent_is_a_timeout(metered: Stack, key: str, up: FakeUpstream) -> None:
    up.stall_after, up.stall = 2, READ_TIMEOUT + 2
    request_id = rid()
    with pytest.raises(openai.APIError):
        list(sdk(metered, key).chat.completions.create(
            model="meter-model", messages=[], stream=True, extra_headers={"X-Request-ID": request_id}))
    rec = record(metered, request_id)
    assert rec["outcome"] == "timeout"
    assert float(rec["request_time"]) >= READ_TIMEOUT - 0.5


@needs_njs
def test_a_client_that_goes_away_is_a_client_cut(metered: Stack, key: str, up: FakeUpstream) -> None:
    up.chunks, up.chunk_delay = 40, 0.1
    request_id = rid()
    body = b'{"model":"meter-model","stream":true,"messages":[]}'
    with socket.create_connection(("127.0.0.1", metered.public_port)) as s:
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  + f"Authorization: Bearer {key}\r\nX-Request-ID: {request_id}\r\n".encode()
                  + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
        got = b""
        while b"data:" not in got:
            got += s.recv(4096)
    rec = record(metered, request_id)
    assert (rec["outcome"], rec["status"]) == ("client_cut", "200")
    assert tokens(rec) == ("", "", "")


@needs_njs
def test_requests_the_gate_refuses_have_no_outcome(metered: Stack) -> None:
    request_id = rid()
    r = metered.post("/v1/chat/completions", "bst_000000000000_" + "x" * 40, json={"model": "meter-model"},
                     headers={"X-Request-ID": request_id})
    assert r.status_code == 401
    rec = record(metered, request_id)
    assert (rec["outcome"], *tokens(rec)) == ("", "", "", "")


def test_without_njs_nothing_is_metered_and_all_still_works(tmp_path: Path, fakes: dict[str, FakeUpstream],
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    if not Path(NGINX).exists():
        pytest.skip("nginx is not installed")
    monkeypatch.setenv(metering.ENV, "off")
    s = Stack(tmp_path / "data")
    s.start()
    try:
        assert "token metering: unavailable: turned off" in s.cli("status")
        s.cli("pools", "add", "meter", "--url", fakes["meter"].url, "--models", "meter-model")
        live = s.data_dir / "nginx" / "live"
        assert "load_module" not in (live / "nginx.conf").read_text() and not (live / "meter.js").exists()
        assert "js_body_filter" not in (live / "public.conf").read_text()
        key = s.key("plain")
        request_id = rid()
        chunks = list(sdk(s, key).chat.completions.create(
            model="meter-model", messages=[], stream=True, extra_headers={"X-Request-ID": request_id}))
        assert len(chunks) == 4 and all(c.usage is None for c in chunks)
        assert b"stream_options" not in sent(fakes["meter"])
        rec = record(s, request_id)
        assert (rec["outcome"], *tokens(rec)) == ("", "", "", "") and rec["status"] == "200"
    finally:
        s.stop()


def test_the_pool_switch_is_validated_and_shown(metered: Stack) -> None:
    headers = {"Authorization": f"Bearer {metered.admin_token()}"}
    r = requests.patch(metered.admin + "/api/v1/pools/plain", json={"include_usage": "yes"}, headers=headers,
                       timeout=10)
    assert r.status_code == 400 and "include_usage" in r.text
    pools = {p["name"]: p for p in requests.get(metered.admin + "/api/v1/pools", headers=headers, timeout=10).json()}
    assert (pools["meter"]["include_usage"], pools["plain"]["include_usage"]) == (True, False)  # unchanged
    assert metered.cli("pools", "update", "plain", "--include-usage")
    assert requests.get(metered.admin + "/api/v1/pools/plain", headers=headers, timeout=10).json()["include_usage"]
    metered.cli("pools", "update", "plain", "--no-include-usage")


@needs_njs
def test_metered_tokens_count_against_a_daily_quota(metered: Stack, up: FakeUpstream) -> None:
    """The counts nginx reads from a stream the client did not ask usage for reach the key's quota: the next
    request is refused the OpenAI way."""
    up.chat_usage = False  # only the stream counts
    token = metered.key("quota", "--tokens-per-day", "15")
    stream = sdk(metered, token).chat.completions.create(model="meter-model", messages=[], stream=True)
    assert all(c.usage is None for c in stream)  # 19 tokens, metered from the injected usage event
    deadline = time.monotonic() + 10
    while True:
        try:
            sdk(metered, token).chat.completions.create(model="meter-model", messages=[])
        except openai.RateLimitError as e:
            assert e.code == "insufficient_quota"
            break
        assert time.monotonic() < deadline, "the quota was never enforced"
        time.sleep(0.2)


@needs_njs
def test_the_body_towards_the_upstream_keeps_its_framing(metered: Stack, key: str, up: FakeUpstream) -> None:
    """proxy_set_body sends the body nginx read: with its length, also for a chunked upload, and no
    Content-Length at all for a request without a body."""
    assert metered.get("/v1/files", key).status_code == 200
    got = [r for r in up.requests if r["path"] == "/v1/files"][-1]
    assert "Content-Length" not in got["headers"] and got["body"] == b""
    body = b'{"model": "meter-model", "messages": [], "stream": true}'
    r = metered.post("/v1/chat/completions", key, data=iter([body[:10], body[10:]]),
                     headers={"Content-Type": "application/json"})
    assert r.status_code == 200 and r.text.endswith("data: [DONE]\n\n")
    got = [r for r in up.requests if r["path"] == "/v1/chat/completions"][-1]
    assert got["body"] == body[:1] + include_usage.TOP_LEVEL.encode() + body[1:]
    assert got["headers"]["Content-Length"] == str(len(got["body"]))


@needs_njs
def test_metered_requests_reuse_the_upstream_connection_and_wait_for_nothing(metered: Stack, key: str,
                                                                           up: FakeUpstream) -> None:
    """proxy_set_body and the filters keep nginx's keepalive to the pool, and no answer is held back (a Python
    upstream with Nagle on, as http.server has it by default, held each one 40 ms: docs/benchmarks.md)."""
    session = requests.Session()
    body = {"model": "meter-model", "messages": [{"role": "user", "content": "hi"}]}
    times = []
    for _ in range(12):
        start = time.monotonic()
        r = session.post(metered.base + "/v1/chat/completions", json=body, timeout=10,
                         headers={"Authorization": f"Bearer {key}"})
        times.append(time.monotonic() - start)
        assert r.status_code == 200 and r.json()["usage"]["total_tokens"]
    peers = {r["peer"] for r in up.requests if r["path"] == "/v1/chat/completions"}
    assert len(peers) <= 2, f"{len(peers)} upstream connections for 12 requests (nginx has 2 workers at most)"
    times.sort()
    assert times[6] < 0.025, f"median {times[6] * 1000:.0f} ms per request"


@needs_njs
def test_a_quota_key_cannot_stream_without_usage_through_nginx(metered: Stack, key: str, up: FakeUpstream,
                                                               fakes: dict[str, FakeUpstream]) -> None:
    """Through real nginx with the OpenAI SDK: a key with a token quota that turns usage off gets a 400 naming
    stream_options and nothing reaches the upstream; a key without one streams as it asked, untouched."""
    quota = metered.key("quota-no-opt-out", "--tpm", "100000")
    deadline = time.monotonic() + 10  # the gate loads a new key within 0.25 s
    while metered.get("/v1/models", quota).status_code != 200:
        assert time.monotonic() < deadline, "the new key never reached the gate"
        time.sleep(0.05)
    messages = [{"role": "user", "content": "hi"}]
    for options in ({"include_usage": False}, None):
        with pytest.raises(openai.BadRequestError) as e:
            sdk(metered, quota).chat.completions.create(model="meter-model", messages=messages, stream=True,
                                                        extra_body={"stream_options": options})
        assert (e.value.param, e.value.code) == ("stream_options", "usage_required")
        assert "token quota" in e.value.message and "cannot be turned off" in e.value.message
    with pytest.raises(openai.BadRequestError) as e:
        sdk(metered, quota).chat.completions.create(model="plain-model", messages=messages, stream=True)
    assert e.value.param == "stream_options" and "does not ask for usage" in e.value.message
    assert not [r for r in up.requests if r["path"] == "/v1/chat/completions"]

    # the same request of a key without a quota streams normally, its opt-out passed on as sent
    request_id = rid()
    chunks = list(sdk(metered, key).chat.completions.create(
        model="meter-model", messages=messages, stream=True, stream_options={"include_usage": False},
        extra_headers={"X-Request-ID": request_id}))
    assert [c.choices[0].delta.content for c in chunks] == [f"meter-{i} " for i in range(4)]
    assert json.loads(sent(up))["stream_options"] == {"include_usage": False}
    assert record(metered, request_id)["outcome"] == "completed"

    # the quota key streams when it leaves usage on, and is metered; on the pool without include_usage it asks
    request_id = rid()
    chunks = list(sdk(metered, quota).chat.completions.create(
        model="meter-model", messages=messages, stream=True, extra_headers={"X-Request-ID": request_id}))
    assert all(c.usage is None for c in chunks) and len(chunks) == 4
    assert tokens(record(metered, request_id)) == ("11", "8", "19")
    chunks = list(sdk(metered, quota).chat.completions.create(
        model="plain-model", messages=messages, stream=True, stream_options={"include_usage": True}))
    assert chunks[-1].usage is not None


def test_a_stream_that_is_not_a_boolean_is_refused_through_nginx(metered: Stack, key: str,
                                                                 up: FakeUpstream) -> None:
    for stream in ("true", 1):
        r = metered.post("/v1/chat/completions", key, json={"model": "meter-model", "messages": [], "stream": stream})
        assert r.status_code == 400
        assert (r.json()["error"]["param"], r.json()["error"]["code"]) == ("stream", "invalid_type")
    assert not [r for r in up.requests if r["path"] == "/v1/chat/completions"]


FORGED = '{"usage":{"prompt_tokens":0,"completion_tokens":0,"total_tokens":0},"prompt_eval_count":0,"eval_count":0}'


@needs_njs
@pytest.mark.parametrize("args", [FORGED, '{"usage": "x", "eval_count": 1}'], ids=["forged-counts", "named-usage"])
@pytest.mark.parametrize("path", ["/v1/chat/completions", "/api/chat"])
def test_tool_call_arguments_cannot_change_the_counts(metered: Stack, key: str, up: FakeUpstream, path: str,
                                                      args: str) -> None:
    """The client writes the tool's schema, so the model can be made to write any arguments: OpenAI sends them
    as a JSON string, Ollama's /api/chat as JSON itself, before its own counts. Neither changes the record."""
    up.tool_args = args
    request_id = rid()
    r = metered.post(path, key, json={"model": "meter-model", "messages": [], "stream": False},
                     headers={"X-Request-ID": request_id})
    assert r.status_code == 200 and "usage" in json.dumps(r.json())
    expected = ("3", "4", "7") if path.startswith("/v1/") else ("9", "4", "13")
    assert tokens(record(metered, request_id)) == expected


@needs_njs
def test_prompt_tokens_after_the_usage_cannot_hide_it(metered: Stack, key: str, up: FakeUpstream) -> None:
    """vLLM writes prompt_logprobs after the usage, with the prompt's tokens as text ("usage" among them)."""
    up.prompt_logprobs = True
    request_id = rid()
    r = metered.post("/v1/chat/completions", key, json={"model": "meter-model", "messages": []},
                     headers={"X-Request-ID": request_id})
    assert r.json()["prompt_logprobs"][1]["7"]["decoded_token"] == "usage"
    assert tokens(record(metered, request_id)) == ("3", "4", "7")


ZERO = '{"prompt_tokens":0,"completion_tokens":0,"total_tokens":0}'


@needs_njs
@pytest.mark.parametrize(("answer", "expected"), [
    # the model's JSON as JSON (tool input objects, e.g. Anthropic-style), the answer's own usage without these
    # counts: unknown, never the forged zeros
    ('{"content":[{"type":"tool_use","input":{"usage":' + ZERO + '}}],"usage":{"input_tokens":5}}', ("5", "", "")),
    # the answer's usage first, a forged one nested after it
    ('{"usage":{"prompt_tokens":5,"completion_tokens":6,"total_tokens":11},"output":[{"arguments":{"usage":'
     + ZERO + '}}],"note":"}"}', ("5", "6", "11")),
    # json.dumps' spacing, a trailing newline
    ('{"choices": [], "usage": {"prompt_tokens": 5, "completion_tokens": 6}, "x": "]"}\n', ("5", "6", "11")),
    ('{"choices":[],"usage":{"prompt_tokens":5,"completion_tokens":6,"total_tokens":11}', ("", "", "")),  # cut
], ids=["nested-only", "nested-after", "spaced", "truncated"])
def test_only_the_top_level_usage_object_counts(metered: Stack, key: str, up: FakeUpstream, answer: str,
                                                expected: tuple[str, str, str]) -> None:
    up.answer = answer.encode()
    request_id = rid()
    r = metered.post("/v1/responses", key, json={"model": "meter-model"}, headers={"X-Request-ID": request_id})
    assert r.content == up.answer
    assert tokens(record(metered, request_id)) == expected


@needs_njs
def test_the_insertion_lands_at_its_byte_offset_after_multibyte_text(metered: Stack, key: str,
                                                                     up: FakeUpstream) -> None:
    """The gate's offset counts bytes; meter.js must too, whatever multibyte characters come before it."""
    body = ('{"model":"meter-model","stream":true,"messages":[{"role":"user","content":"héllo ☃ \\u00e9"}],'
            '"stream_options":{}}').encode()
    ask = include_usage.insertion(body, json.loads(body))
    assert ask is not None and int(ask.split(" ")[0]) > body.index("☃".encode())
    r = metered.post("/v1/chat/completions", key, data=body, headers={"Content-Type": "application/json"})
    assert r.status_code == 200 and r.text.endswith("data: [DONE]\n\n") and '"usage"' not in r.text
    at, _, text = ask.partition(" ")
    assert sent(up) == body[:int(at)] + text.encode() + body[int(at):]
    assert json.loads(sent(up))["stream_options"] == {"include_usage": True}


@needs_njs
def test_a_multipart_upload_reaches_the_upstream_byte_for_byte(metered: Stack, key: str, up: FakeUpstream) -> None:
    """An audio upload is binary (not UTF-8): the body nginx replays must be the client's bytes."""
    audio = b"RIFF\x24\x00\x00\x00WAVEfmt " + bytes(range(256)) * 4 + "é☃".encode() + b"\xff\xfe\x80\x00"
    body = (b'--XX\r\nContent-Disposition: form-data; name="model"\r\n\r\nmeter-model\r\n'
            b'--XX\r\nContent-Disposition: form-data; name="file"; filename="a.wav"\r\n'
            b"Content-Type: audio/wav\r\n\r\n" + audio + b"\r\n--XX--\r\n")
    r = metered.post("/v1/audio/transcriptions", key, data=body,
                     headers={"Content-Type": "multipart/form-data; boundary=XX"})
    assert r.status_code == 200, r.text
    got = [r for r in up.requests if r["path"] == "/v1/audio/transcriptions"][-1]
    assert got["body"] == body and got["headers"]["Content-Length"] == str(len(body))


RESPONSE_USAGE = ('{"input_tokens":9,"input_tokens_details":{"cached_tokens":0},"output_tokens":4,'
                  '"output_tokens_details":{"reasoning_tokens":0},"total_tokens":13}')


@needs_njs
def test_the_responses_api_is_metered_streamed_and_not(metered: Stack, key: str, up: FakeUpstream) -> None:
    """/v1/responses names its counts input_tokens and output_tokens; a stream carries them in the response of
    its last event (response.completed) and ends without [DONE]."""
    up.answer = ('{"id":"resp_1","object":"response","output":[{"type":"message","content":[{"type":"output_text",'
                 '"text":"usage: none"}]}],"usage":' + RESPONSE_USAGE + '}').encode()
    request_id = rid()
    r = metered.post("/v1/responses", key, json={"model": "meter-model", "input": "hi"},
                     headers={"X-Request-ID": request_id})
    assert r.content == up.answer
    assert tokens(record(metered, request_id)) == ("9", "4", "13")

    events = [
        ("response.created", '{"type":"response.created","response":{"id":"resp_2","status":"in_progress",'
                             '"usage":null}}'),
        ("response.output_text.delta", '{"type":"response.output_text.delta","delta":"\\"usage\\":{"}'),
        ("response.completed", '{"type":"response.completed","response":{"id":"resp_2","status":"completed",'
                               '"output":[],"usage":' + RESPONSE_USAGE + '}}'),
    ]
    up.answer = "".join(f"event: {name}\ndata: {data}\n\n" for name, data in events).encode()
    up.answer_type = "text/event-stream"
    request_id = rid()
    r = metered.post("/v1/responses", key, json={"model": "meter-model", "input": "hi", "stream": True},
                     headers={"X-Request-ID": request_id})
    assert r.content == up.answer  # passed on untouched
    rec = record(metered, request_id)
    assert tokens(rec) == ("9", "4", "13") and rec["outcome"] == "completed"
