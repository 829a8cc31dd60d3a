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
from tests.fakes import FakeUpstream
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


def test_bad_alias_and_key_fields_are_refused_naming_the_field() -> None:
    with pytest.raises(v.ValidationError, match="aliases.gpt"):
        pools_mod.alias_map("aliases", {"gpt": "gpt"})
    with pytest.raises(v.ValidationError, match="aliases"):
        pools_mod.alias_map("aliases", ["gpt"])
    with pytest.raises(v.ValidationError, match="aliases.auto"):
        pools_mod.alias_map("aliases", {"auto": "x"})
    with pytest.raises(v.ValidationError, match="aliases.x"):
        pools_mod.alias_map("aliases", {"x": "bad name!"})
    for value in (0, -1, 10_001, "many", 1.5, True):
        with pytest.raises(v.ValidationError, match="max_parallel"):
            keys_mod.max_parallel("max_parallel", value)
    assert keys_mod.max_parallel("max_parallel", "none") is None
    with pytest.raises(v.ValidationError, match="default_model"):
        keys_mod.default_model("default_model", "auto")
    with pytest.raises(v.ValidationError, match=r"auto_models\[1\]"):
        settings_mod.auto_models("auto_models", ["a", "auto"])
