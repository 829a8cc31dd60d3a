"""Pool API kinds without nginx: what discovery detects, and how the gate routes and lists by them."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from authsvc import keys as keyformat
from authsvc.gate import FALLBACK_HEADER, Gate
from authsvc.model_lists import FALLBACK_VERSION, RUNNING_FILE, version_key
from manager import discovery, pools
from manager.validation import ValidationError
from tests.fakes import FakeUpstream
from tests.test_gate import PEPPER, Call, key_entry, write_keys

# ---- discovery ----------------------------------------------------------------------------------------------


@pytest.fixture
def servers():
    made: list[FakeUpstream] = []

    def make(*args, **kw) -> FakeUpstream:
        made.append(FakeUpstream(*args, **kw))
        return made[-1]

    yield make
    for up in made:
        up.close()


def test_discovery_detects_the_apis_and_keeps_the_details(servers) -> None:
    openai_only = servers("vllm", ["gpt-x"], apis=("openai",))
    found = discovery.discover_pool_models({"name": "p", "upstreams": [{"url": openai_only.url}]})
    assert (found.models, found.error, found.kinds, found.version) == (["gpt-x"], None, ("openai",), None)
    assert found.info == {"openai": {"gpt-x": {"created": 1_700_000_000, "owned_by": "vllm-org"}}}
    assert "/api/version" not in [r["path"] for r in openai_only.requests]  # only asked of an Ollama

    ollama_only = servers("old-ollama", ["llama3:latest"], apis=("ollama",))
    ollama_only.version = "0.5.7"
    both = servers("ollama", ["llama3:latest", "qwen:7b"])
    found = discovery.discover_pool_models({"name": "p", "upstreams": [{"url": ollama_only.url},
                                                                       {"url": both.url}]})
    # the old Ollama has no /v1: the pool speaks only what both upstreams speak
    assert (found.models, found.kinds, found.version) == (["llama3:latest", "qwen:7b"], ("ollama",), "0.5.7")
    tag = found.info["ollama"]["llama3:latest"]
    assert tag["size"] == 4_661_224_676 + len("llama3:latest") and len(tag["digest"]) == 64
    assert tag["details"]["quantization_level"] == "Q4_K_M" and tag["modified_at"].startswith("2025-03-14")
    assert found.info["openai"]["qwen:7b"]["owned_by"] == "ollama-org"
    # nothing but POST-free listing paths were asked: discovery never costs inference
    assert {r["method"] for up in (ollama_only, both, openai_only) for r in up.requests} == {"GET"}


def test_hostile_details_are_cut_to_known_small_fields() -> None:
    entry = {"name": "m", "size": "huge", "digest": "d" * 5000, "modified_at": 5, "extra": "x" * 10_000,
             "details": {"family": ["not", "a", "string"], "format": "gguf", "evil": "<script>",
                         "families": ["a", 3, "b" * 500]}}
    assert discovery.ollama_details(entry) == {"digest": "d" * discovery.MAX_TEXT,
                                               "details": {"format": "gguf", "families": ["a", "b" * 100]}}
    assert discovery.openai_details({"id": "m", "created": True, "owned_by": {"x": 1}}) == {}


def test_pool_kinds_are_what_every_answering_upstream_speaks() -> None:
    assert discovery.pool_kinds([("openai", "ollama"), ("ollama",)]) == ("ollama",)
    assert discovery.pool_kinds([("openai",), ("ollama",)]) == ("openai", "ollama")  # nothing shared
    assert discovery.pool_kinds([]) == ()


def test_versions_order_numerically() -> None:
    assert min(["0.10.0", "0.6.5", "0.9.1-rc1"], key=version_key) == "0.6.5"


def test_api_kinds_setting_is_validated_and_names_the_field() -> None:
    assert pools.checked_kinds("api_kinds", ["ollama", "openai", "ollama"]) == ["openai", "ollama"]
    assert pools.checked_kinds("api_kinds", None) == []
    with pytest.raises(ValidationError) as e:
        pools.checked_kinds("api_kinds", ["openai", "grpc"])
    assert e.value.field == "api_kinds[1]" and "openai, ollama" in str(e.value)
    with pytest.raises(ValidationError) as e:
        pools.checked_kinds("api_kinds", "openai")
    assert e.value.field == "api_kinds"
    # configured beats detected; never detected (upstreams down so far): both, so the pool is not cut off
    assert pools.effective_kinds({"api_kinds": ["ollama"]}, {"kinds": ["openai"]}) == ["ollama"]
    assert pools.effective_kinds({"api_kinds": []}, {"kinds": ["openai"]}) == ["openai"]
    assert pools.effective_kinds({}, None) == ["openai", "ollama"]


# ---- the gate -----------------------------------------------------------------------------------------------

def snapshot(path: Path, token: str, **key_rules) -> None:
    """`vllm` (OpenAI only, listed first), `ollama` (both APIs, details from its upstreams)."""
    data = {"pools": [
        {"name": "vllm", "models": ["gpt-x", "both"], "kinds": ["openai"], "created": 1_600_000_000,
         "openai": {"gpt-x": {"created": 1_700_000_000, "owned_by": "vllm-org"}}},
        {"name": "ollama", "models": ["llama3:latest", "both"], "kinds": ["openai", "ollama"], "version": "0.6.5",
         "created": 1_600_000_000,
         "openai": {"llama3:latest": {"created": 1_700_000_001, "owned_by": "library"}},
         "ollama": {"llama3:latest": {"size": 42, "digest": "abc", "modified_at": "2025-01-01T00:00:00Z",
                                      "details": {"family": "llama"}}}},
        {"name": "old", "models": ["tiny"], "kinds": ["ollama"], "version": "0.5.1", "created": 0}]}
    path.write_text(json.dumps(data))
    write_keys(path.with_name("keys.sqlite3"), [key_entry(token, **key_rules)])


@pytest.fixture
def gate(tmp_path: Path) -> tuple[Gate, str]:
    token = keyformat.generate()[1]
    snapshot(tmp_path / "snapshot.json", token)
    return Gate(tmp_path / "snapshot.json", PEPPER), token


def test_ollama_routes_go_only_to_pools_that_speak_ollama(gate) -> None:
    g, token = gate
    c = Call(g, "/api/chat", token, {"model": "gpt-x", "messages": []})
    assert (c.status, c.json()) == (404, {"error": "The model `gpt-x` does not exist or you do not have access "
                                                    "to it."})
    # served by both pools: /api/* skips the OpenAI-only one listed first, and has no fallback to it; /v1 takes
    # the first and may fall back to the second
    c = Call(g, "/api/chat", token, {"model": "both"})
    assert c.headers["X-Accel-Redirect"] == "@pool_ollama" and FALLBACK_HEADER not in c.headers
    c = Call(g, "/v1/chat/completions", token, {"model": "both"})
    assert (c.headers["X-Accel-Redirect"], c.headers[FALLBACK_HEADER]) == ("@then_vllm", "vllm,ollama")
    assert Call(g, "/api/show", token, {"model": "llama3"}).headers["X-Accel-Redirect"] == "@pool_ollama"
    # an Ollama-only pool gets no /v1 request
    assert Call(g, "/v1/chat/completions", token, {"model": "tiny"}).status == 404
    assert Call(g, "/api/generate", token, {"model": "tiny"}).headers["X-Accel-Redirect"] == "@pool_old"
    # no model: the first pool that speaks the API
    assert Call(g, "/api/blobs/x", token, method="GET").status == 403  # model management stays blocked
    assert Call(g, "/v1/files", token, method="GET").headers["X-Accel-Redirect"] == "@pool_vllm"


def test_no_pool_of_the_api_is_a_503_that_says_so(tmp_path: Path) -> None:
    token = keyformat.generate()[1]
    (tmp_path / "snapshot.json").write_text(json.dumps({"pools": [{"name": "p", "models": ["m"],
                                                                   "kinds": ["openai"]}]}))
    write_keys(tmp_path / "keys.sqlite3", [key_entry(token)])
    g = Gate(tmp_path / "snapshot.json", PEPPER)
    c = Call(g, "/api/embeddings/x", token, method="GET")
    assert (c.status, c.json()) == (503, {"error": "No upstream pool speaks the Ollama API"})
    assert Call(g, "/v1/files", token, method="GET").headers["X-Accel-Redirect"] == "@pool_p"


def test_lists_carry_the_upstream_details(gate) -> None:
    g, token = gate
    listed = {m["id"]: m for m in Call(g, "/v1/models", token, method="GET").json()["data"]}
    assert set(listed) == {"gpt-x", "both", "llama3:latest"}  # `tiny`: its pool speaks no OpenAI
    assert listed["gpt-x"] == {"id": "gpt-x", "object": "model", "created": 1_700_000_000, "owned_by": "vllm-org"}
    assert listed["llama3:latest"]["owned_by"] == "library"
    assert listed["both"] == {"id": "both", "object": "model", "created": 1_600_000_000, "owned_by": "vllm"}
    assert Call(g, "/v1/models/llama3", token, method="GET").json()["created"] == 1_700_000_001
    assert Call(g, "/v1/models/tiny", token, method="GET").status == 404
    tags = {m["name"]: m for m in Call(g, "/api/tags", token, method="GET").json()["models"]}
    assert set(tags) == {"both", "llama3:latest", "tiny"}  # gpt-x: only an OpenAI-only pool serves it
    assert tags["llama3:latest"] == {"name": "llama3:latest", "model": "llama3:latest", "size": 42, "digest": "abc",
                                     "modified_at": "2025-01-01T00:00:00Z", "details": {"family": "llama"}}
    assert tags["tiny"]["modified_at"] == "1970-01-01T00:00:00Z" and tags["tiny"]["details"] == {}
    assert Call(g, "/api/version", token, method="GET").json() == {"version": "0.5.1"}  # the lowest


def test_lists_are_filtered_for_a_restricted_key(tmp_path: Path) -> None:
    token = keyformat.generate()[1]
    snapshot(tmp_path / "snapshot.json", token, models=["llama3*"])
    g = Gate(tmp_path / "snapshot.json", PEPPER)
    assert [m["id"] for m in Call(g, "/v1/models", token, method="GET").json()["data"]] == ["llama3:latest"]
    assert [m["name"] for m in Call(g, "/api/tags", token, method="GET").json()["models"]] == ["llama3:latest"]
    assert Call(g, "/v1/models/gpt-x", token, method="GET").status == 404


def test_ps_serves_what_the_manager_polled_for_the_key(tmp_path: Path) -> None:
    token = keyformat.generate()[1]
    snapshot(tmp_path / "snapshot.json", token, models=["llama3*", "unlisted", "gpt-x"])
    g = Gate(tmp_path / "snapshot.json", PEPPER)
    assert Call(g, "/api/ps", token, method="GET").json() == {"models": []}  # nothing polled yet
    running = tmp_path / "run" / RUNNING_FILE
    running.parent.mkdir(exist_ok=True)
    entry = {"name": "llama3:latest", "model": "llama3:latest", "size": 1, "expires_at": "2099-01-01T00:00:00Z"}
    running.write_text(json.dumps({"pools": {"ollama": [entry, {**entry, "name": "tiny"},  # the key may not
                                                        {**entry, "name": "unlisted"}],  # served by no pool
                                             "vllm": [{**entry, "name": "gpt-x"}],  # no longer Ollama-kind
                                             "old": [entry]}}))  # the same model twice: listed once
    assert g.running.load()
    assert Call(g, "/api/ps", token, method="GET").json() == {"models": [entry]}
    running.write_text("{not json")
    os.utime(running, (time.time() + 5, time.time() + 5))
    assert not g.running.load() and g.running.problem
    assert Call(g, "/api/ps", token, method="GET").json() == {"models": [entry]}  # the last good list stays


def test_version_without_an_ollama_version_is_the_fallback(tmp_path: Path) -> None:
    token = keyformat.generate()[1]
    (tmp_path / "snapshot.json").write_text(json.dumps({"pools": [{"name": "p", "models": ["m"]}]}))
    write_keys(tmp_path / "keys.sqlite3", [key_entry(token)])
    g = Gate(tmp_path / "snapshot.json", PEPPER)
    assert Call(g, "/api/version", token, method="GET").json() == {"version": FALLBACK_VERSION}
    # a snapshot without kinds (written before they existed): every pool speaks both, as before
    assert Call(g, "/api/chat", token, {"model": "m"}).headers["X-Accel-Redirect"] == "@pool_p"
    assert [m["name"] for m in Call(g, "/api/tags", token, method="GET").json()["models"]] == ["m"]
