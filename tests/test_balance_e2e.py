"""Model-aware balancing with real nginx, the real gate and manager, and fake Ollama upstreams that charge a
model-load delay (manager/balancing.py, authsvc/balance.py)."""

from __future__ import annotations

import json
import os
import ssl
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from tests.conftest import Stack
from tests.fakes import FakeUpstream
from tests.test_metering import record

LOAD = 0.3


@pytest.fixture(scope="module")
def ollamas() -> Iterator[dict[str, FakeUpstream]]:
    made = {name: FakeUpstream(name, ["m1", "m2", "m3"]) for name in ("ola", "olb", "olc")}
    for up, loaded in zip(made.values(), (["m1"], ["m2"], ["m3"]), strict=True):
        up.load_delay, up.max_loaded, up.running = LOAD, 1, loaded
    yield made
    for up in made.values():
        up.close()


def polled(stack: Stack, urls: set[str], timeout: float = 15) -> dict:
    """run/ollama-ps.json once it has figures for every one of `urls`."""
    path = stack.data_dir / "run" / "ollama-ps.json"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            data = json.loads(path.read_text())
            if urls <= set(data.get("upstreams", {})):
                return data
        except (OSError, ValueError):
            pass
        time.sleep(0.2)
    raise AssertionError(f"no figures for {urls}")


@pytest.fixture(scope="module")
def key(stack: Stack, ollamas: dict[str, FakeUpstream]) -> str:
    stack.cli("settings", "set", "health_interval", "1")
    stack.cli("pools", "add", "ol", "--url", ollamas["ola"].url, "--url", ollamas["olb"].url, "--models", "m1,m2",
              "--model-aware")
    k = stack.key("balance")
    polled(stack, {ollamas["ola"].url, ollamas["olb"].url})
    time.sleep(0.5)  # the gate loads the file within 0.25 s
    return k


def chat(stack: Stack, key: str, model: str, request_id: str = "") -> tuple[str, float]:
    started = time.monotonic()
    r = requests.post(stack.base + "/api/chat", json={"model": model, "stream": False, "messages": []},
                      headers={"Authorization": f"Bearer {key}", "X-Request-ID": request_id or uuid.uuid4().hex},
                      timeout=20)
    assert r.status_code == 200, r.text
    return r.json()["message"]["content"].removeprefix("hello from "), time.monotonic() - started


def test_requests_go_to_the_upstream_that_has_their_model_loaded(stack: Stack, key: str,
                                                                  ollamas: dict[str, FakeUpstream]) -> None:
    before = ollamas["ola"].loads + ollamas["olb"].loads
    answered = [chat(stack, key, model) for model in ("m1", "m2", "m1", "m1", "m2", "m2", "m1", "m2")]
    assert [name for name, _ in answered] == ["ola", "olb", "ola", "ola", "olb", "olb", "ola", "olb"]
    assert ollamas["ola"].loads + ollamas["olb"].loads == before  # no model was loaded again
    assert max(t for _, t in answered) < LOAD


def test_round_robin_when_off(stack: Stack, key: str, ollamas: dict[str, FakeUpstream]) -> None:
    """The same requests without the setting: nginx alternates, so models load (what the setting saves)."""
    stack.cli("pools", "update", "ol", "--no-model-aware")
    try:
        time.sleep(0.5)
        before = ollamas["ola"].loads + ollamas["olb"].loads
        answered = {chat(stack, key, "m1")[0] for _ in range(4)}
        assert answered == {"ola", "olb"} and ollamas["ola"].loads + ollamas["olb"].loads > before
    finally:
        stack.cli("pools", "update", "ol", "--model-aware")
        ollamas["ola"].running, ollamas["olb"].running = ["m1"], ["m2"]
        time.sleep(0.5)


def test_nginx_still_fails_over_when_the_picked_upstream_dies(stack: Stack, key: str,
                                                               ollamas: dict[str, FakeUpstream]) -> None:
    stack.cli("pools", "add", "ol3", "--url", ollamas["olc"].url, "--url", ollamas["ola"].url, "--models", "m3",
              "--model-aware", "--retries", "1")
    polled(stack, {ollamas["olc"].url})
    time.sleep(0.5)
    assert chat(stack, key, "m3")[0] == "olc"  # where m3 is loaded
    ollamas["olc"].close()  # dies; the gate's figures still say m3 is loaded there
    name, _ = chat(stack, key, "m3", request_id := f"bal-{uuid.uuid4().hex[:12]}")
    assert name == "ola"
    # nginx tried olc first, as the gate said (refused), then the pool's other upstream, before the first byte
    rec = record(stack, request_id)
    assert (rec["pool"], rec["status"]) == ("ol3", "200")
    tried = f"127.0.0.1:{ollamas['olc'].port}, 127.0.0.1:{ollamas['ola'].port}"
    assert rec["upstream_addr"].rpartition(" : ")[2] == tried  # after the gate's socket


@pytest.fixture(scope="module")
def tls_pair(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[list[FakeUpstream], Path]]:
    """Two https Ollama upstreams (a self-signed certificate for localhost), m5 loaded on one, m6 on the other."""
    root = tmp_path_factory.mktemp("tls-upstreams")
    cert, key = root / "cert.pem", root / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=DNS:localhost", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    made = [FakeUpstream(name, ["m5", "m6"]) for name in ("tlsa", "tlsb")]
    for up, loaded in zip(made, (["m5"], ["m6"]), strict=True):
        up.server.socket = context.wrap_socket(up.server.socket, server_side=True)
        up.url = f"https://localhost:{up.port}"
        up.load_delay, up.max_loaded, up.running = LOAD, 1, loaded
    yield made, cert
    for up in made:
        up.close()


def test_https_pools_keep_tls_verification_and_keepalive(stack: Stack, key: str,
                                                         tls_pair: tuple[list[FakeUpstream], Path]) -> None:
    """With the variable proxy_pass: the certificate is verified against the pool's name (ca_bundle), and each
    upstream's block reuses its connections."""
    ups, cert = tls_pair
    stack.cli("settings", "set", "ca_bundle", str(cert))
    stack.cli("pools", "add", "olt", "--url", ups[0].url, "--url", ups[1].url, "--models", "m5,m6", "--model-aware")
    polled(stack, {up.url for up in ups})
    time.sleep(0.5)
    answered = [chat(stack, key, model)[0] for model in ("m5", "m6") * 6]
    assert answered == ["tlsa", "tlsb"] * 6 and ups[0].loads + ups[1].loads == 0
    workers = os.cpu_count() or 1  # worker_processes auto: each worker keeps its own idle connections
    for up in ups:
        peers = {r["peer"][1] for r in up.requests if r["method"] == "POST"}
        assert len(peers) <= workers < 6


def test_a_route_falls_back_from_a_model_aware_pool_and_the_pick_stays_with_its_pool(
        stack: Stack, key: str, ollamas: dict[str, FakeUpstream]) -> None:
    """Both upstreams of `sick` list m1 loaded but answer 503: the gate picks one, nginx tries it and the other,
    then the route's next pool `ol` (model-aware too), where the first pool's pick does not apply."""
    sick = [FakeUpstream(name, ["m1"]) for name in ("sick1", "sick2")]
    try:
        for up in sick:
            up.fail_status, up.running = 503, ["m1"]
        stack.cli("pools", "add", "sick", "--url", sick[0].url, "--url", sick[1].url, "--models", "m1",
                  "--model-aware")
        stack.cli("routes", "set", "m1", "--pool", "sick", "--pool", "ol")
        polled(stack, {up.url for up in sick})
        time.sleep(0.5)
        ollamas["ola"].running, ollamas["olb"].running = ["m2"], ["m2"]  # the figures still say m1 on ola
        name, _ = chat(stack, key, "m1", request_id := f"bal-{uuid.uuid4().hex[:12]}")
        rec = record(stack, request_id)
        assert rec["pool"] == "ol" and rec["status"] == "200"
        hops = rec["upstream_addr"].split(" : ")
        assert len(hops) == 3 and len(hops[1].split(", ")) == 2  # gate, both sick upstreams, then ol
        assert name in ("ola", "olb")
    finally:
        stack.cli("routes", "remove", "m1")
        for up in sick:
            up.close()


def test_vllm_upstreams_get_requests_by_their_queue(stack: Stack, key: str) -> None:
    """OpenAI-only upstreams answering /metrics as vLLM does: the one with the shorter queue gets the requests
    until the gate's own count evens them out."""
    vllms = [FakeUpstream(name, ["meta/llama-8b"], apis=("openai",)) for name in ("busy", "idle")]
    try:
        for up, waiting in zip(vllms, (6, 0), strict=True):
            up.metrics = ("# TYPE vllm:num_requests_waiting gauge\n"
                          f'vllm:num_requests_waiting{{engine="0",model_name="meta/llama-8b"}} {waiting}.0\n')
        stack.cli("pools", "add", "vl", "--url", vllms[0].url, "--url", vllms[1].url, "--models", "meta/llama-8b",
                  "--model-aware")
        data = polled(stack, {up.url for up in vllms})
        assert data["upstreams"][vllms[0].url] == {"models": ["meta/llama-8b"], "waiting": 6}
        time.sleep(0.5)
        answered = []
        for _ in range(4):
            r = requests.post(stack.base + "/v1/chat/completions", json={"model": "meta/llama-8b", "messages": []},
                              headers={"Authorization": f"Bearer {key}"}, timeout=20)
            assert r.status_code == 200, r.text
            answered.append(r.json()["choices"][0]["message"]["content"].removeprefix("hello from "))
        assert answered == ["idle"] * 4
    finally:
        stack.cli("pools", "remove", "vl")
        for up in vllms:
            up.close()
