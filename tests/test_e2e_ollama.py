"""End to end with real nginx: the real `ollama` library and the OpenAI SDK against a Bastion with one
OpenAI-only pool and one Ollama pool (an Ollama speaks both APIs, as the real server does)."""

from __future__ import annotations

import time

import ollama
import openai
import pytest
import requests

from tests.conftest import Stack
from tests.fakes import FakeUpstream


@pytest.fixture(scope="module")
def ups():
    made = {"vllm": FakeUpstream("vllm", ["gpt-x", "both-model"], apis=("openai",)),
            "ollama": FakeUpstream("ollama", ["llama3:latest", "both-model"], chunk_delay=0.2)}
    made["ollama"].running = ["llama3:latest", "both-model"]
    yield made
    for up in made.values():
        up.close()


@pytest.fixture(scope="module")
def keys(stack: Stack, ups) -> dict[str, str]:
    stack.cli("settings", "set", "health_interval", "1")  # /api/ps is polled at this pace
    out = stack.cli("pools", "add", "vllm", "--url", ups["vllm"].url)  # added first: the default pool
    assert "APIs (detected): openai" in out
    out = stack.cli("pools", "add", "local", "--url", ups["ollama"].url)
    assert "APIs (detected): openai, ollama" in out
    made = {"all": stack.key("all"), "llama": stack.key("llama", "--models", "llama3*")}
    time.sleep(0.5)  # the gate picks up new snapshots within 0.25 s
    return made


def served(up: FakeUpstream) -> int:
    """Requests of clients that reached `up` (health checks and discovery only GET lists)."""
    return sum(r["method"] == "POST" for r in up.requests)


def client(stack: Stack, key: str) -> ollama.Client:
    return ollama.Client(host=stack.base, headers={"Authorization": f"Bearer {key}"})


def test_root_answers_as_ollama_without_a_key(stack: Stack, keys) -> None:
    for method in ("GET", "HEAD"):
        r = requests.request(method, stack.base + "/", timeout=10)
        assert r.status_code == 200 and r.headers["Content-Type"] == "text/plain; charset=utf-8"
        assert r.headers["X-Request-ID"]
        assert r.text == ("Ollama is running" if method == "GET" else "")
    r = requests.post(stack.base + "/", timeout=10)
    assert r.status_code == 405 and r.json()["error"]["message"]


def test_list_shows_only_ollama_models_with_upstream_details(stack: Stack, keys, ups) -> None:
    listed = {m.model: m for m in client(stack, keys["all"]).list().models}
    assert set(listed) == {"llama3:latest", "both-model"}  # gpt-x: only the OpenAI-only pool serves it
    upstream = {m["name"]: m for m in requests.get(ups["ollama"].url + "/api/tags", timeout=5).json()["models"]}
    llama = listed["llama3:latest"]
    assert llama.digest == upstream["llama3:latest"]["digest"] and llama.size == upstream["llama3:latest"]["size"]
    assert llama.details.family == "llama" and llama.details.quantization_level == "Q4_K_M"
    assert llama.modified_at.year == 2025
    assert [m.model for m in client(stack, keys["llama"]).list().models] == ["llama3:latest"]


def test_chat_streams_through_the_ollama_pool_only(stack: Stack, keys, ups) -> None:
    ups["ollama"].stream_finished.clear()
    before = served(ups["vllm"])
    stream = client(stack, keys["all"]).chat(model="both-model", messages=[{"role": "user", "content": "hi"}],
                                              stream=True)
    first = next(stream)
    assert first.message.content == "ollama-0" and not ups["ollama"].stream_finished.is_set()
    rest = list(stream)
    assert rest[-1].done and rest[-1].eval_count == 5 and [p.message.content for p in rest[:-1]] == [
        f"ollama-{i}" for i in range(1, 5)]
    assert served(ups["vllm"]) == before  # listed first for both-model, but it speaks no Ollama
    # a model only the OpenAI-only pool serves: the gate's Ollama-shaped 404, never the upstream's
    with pytest.raises(ollama.ResponseError) as e:
        client(stack, keys["all"]).chat(model="gpt-x", messages=[{"role": "user", "content": "hi"}])
    assert e.value.status_code == 404 and "gpt-x" in e.value.error and "does not exist" in e.value.error
    assert served(ups["vllm"]) == before


def test_generate_embed_show_and_version(stack: Stack, keys) -> None:
    pieces = [p.response for p in client(stack, keys["all"]).generate(model="llama3", prompt="hi", stream=True)]
    assert pieces == [f"ollama-{i}" for i in range(5)] + [""]
    assert client(stack, keys["all"]).embed(model="both-model", input="hi").embeddings == [[0.1, 0.2, 0.3]]
    shown = client(stack, keys["all"]).show("llama3")
    assert shown.modelinfo["general.architecture"] == "llama" and shown.details.family == "llama"
    with pytest.raises(ollama.ResponseError) as e:
        client(stack, keys["llama"]).show("both-model")
    assert e.value.status_code == 404
    r = requests.get(stack.base + "/api/version", headers={"Authorization": f"Bearer {keys['all']}"}, timeout=10)
    assert r.json() == {"version": "0.6.5"}


def test_ps_aggregates_the_ollama_upstreams_for_the_key(stack: Stack, keys) -> None:
    deadline = time.monotonic() + 10
    while not (running := client(stack, keys["all"]).ps().models) and time.monotonic() < deadline:
        time.sleep(0.3)  # polled every health_interval (1 s here)
    assert {m.name for m in running} == {"llama3:latest", "both-model"}
    assert running[0].size_vram == 5_000_000_000 and running[0].details.family == "llama"
    assert [m.name for m in client(stack, keys["llama"]).ps().models] == ["llama3:latest"]


def test_openai_sdk_sees_upstream_details(stack: Stack, keys) -> None:
    sdk = openai.OpenAI(base_url=stack.base + "/v1", api_key=keys["all"], max_retries=0)
    models = {m.id: m for m in sdk.models.list()}
    assert set(models) == {"gpt-x", "both-model", "llama3:latest"}
    assert (models["gpt-x"].created, models["gpt-x"].owned_by) == (1_700_000_000, "vllm-org")
    assert (models["llama3:latest"].created, models["llama3:latest"].owned_by) == (1_700_000_000, "ollama-org")
    chat = sdk.chat.completions.create(model="both-model", messages=[{"role": "user", "content": "hi"}])
    assert chat.choices[0].message.content == "hello from vllm"  # /v1 still takes the first pool


def test_api_kinds_override_and_bad_input(stack: Stack, keys) -> None:
    out = stack.cli("pools", "update", "local", "--api-kinds", "grpc", ok=False)
    assert "api_kinds[0]" in out and "openai, ollama" in out
    assert len(client(stack, keys["all"]).list().models) == 2  # nothing changed
    stack.cli("pools", "update", "local", "--api-kinds", "openai")
    time.sleep(0.5)
    assert client(stack, keys["all"]).list().models == []
    with pytest.raises(ollama.ResponseError) as e:
        client(stack, keys["all"]).chat(model="llama3", messages=[])
    assert e.value.status_code == 404
    stack.cli("pools", "update", "local", "--api-kinds", "")  # back to what discovery detected
    time.sleep(0.5)
    assert len(client(stack, keys["all"]).list().models) == 2
