"""Quotas end to end: real nginx + gate + manager (`bastion up`), the official OpenAI SDK. Token consumption is
written into the access log as nginx's metering would (synthetic records for the key), so these tests do not
depend on njs; request counts come from real requests."""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Callable
from typing import Any

import openai
import pytest
import requests

from authsvc import keys as keyformat
from manager.usage_log import format_record
from tests.conftest import Stack
from tests.fakes import FakeUpstream
from tests.test_resilience import gate_pids

MODEL = "quota-model"
SETTLE = 8.0  # ingestion every second + publication + the gate's 0.25 s check: "a few seconds", with margin


@pytest.fixture(scope="module")
def upstream() -> FakeUpstream:
    up = FakeUpstream("q", [MODEL])
    up.chat_usage = False  # with njs metering, real answers would add their tokens to the synthetic ones
    yield up
    up.close()


@pytest.fixture(scope="module")
def ready(stack: Stack, upstream: FakeUpstream) -> Stack:
    stack.cli("settings", "set", "bruteforce_max_failures", "0")  # keys are polled before the gate has them
    stack.cli("settings", "set", "health_interval", "0")
    stack.cli("pools", "add", "q", "--url", upstream.url, "--models", MODEL)
    return stack


def new_key(stack: Stack, name: str, *options: str) -> tuple[str, str]:
    token = stack.key(name, *options)
    wait_for(lambda: stack.get("/v1/models", token).status_code == 200, "the gate to load the key")
    return token, keyformat.key_id_of(token)


def consume(stack: Stack, key_id: str, tokens: int) -> None:
    """A request of `key_id` that used `tokens`, as nginx logs it once njs has read the usage."""
    line = format_record(end=f"{time.time():.3f}", request_id=f"synthetic-{time.monotonic_ns()}", key=key_id,
                         model=MODEL, pool="q", upstream="127.0.0.1:1", status=200, bytes_sent=100,
                         request_length=100, duration=0.1, upstream_status=200, ttfb=0.05, method="POST",
                         uri="/v1/chat/completions", remote_addr="127.0.0.1", outcome="completed",
                         prompt_tokens=tokens // 2, completion_tokens=tokens - tokens // 2, total_tokens=tokens)
    with (stack.data_dir / "logs" / "access.log").open("a") as f:
        f.write(line)


def wait_for(check: Callable[[], Any], what: str, timeout: float = SETTLE) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result is not None and result is not False:  # (a 429 Response is falsy)
            return result
        assert time.monotonic() < deadline, f"waited {timeout} s for {what}"
        time.sleep(0.1)


def client(stack: Stack, token: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=stack.base + "/v1", api_key=token, max_retries=0)


def chat(stack: Stack, token: str) -> requests.Response:
    return stack.post("/v1/chat/completions", token, json={"model": MODEL, "messages": []})


def refused(stack: Stack, token: str, code: str) -> Callable[[], requests.Response | None]:
    def check() -> requests.Response | None:
        r = chat(stack, token)
        return r if r.status_code == 429 and r.json()["error"]["code"] == code else None
    return check


def admin_get(stack: Stack, path: str) -> dict:
    r = requests.get(stack.admin + path, headers={"Authorization": f"Bearer {stack.admin_token()}"}, timeout=10)
    assert r.status_code == 200, r.text
    return r.json()


def test_over_daily_token_quota_is_insufficient_quota_for_the_sdk(ready: Stack) -> None:
    over, over_id = new_key(ready, "over", "--tokens-per-day", "1000")
    under, under_id = new_key(ready, "under", "--tokens-per-day", "1000")
    free, free_id = new_key(ready, "free")
    for key_id in (under_id, free_id):
        consume(ready, key_id, 999 if key_id == under_id else 10**9)
    consume(ready, over_id, 600)
    consume(ready, over_id, 400)
    started = time.monotonic()
    wait_for(refused(ready, over, "insufficient_quota"), "the quota to be enforced")
    took = time.monotonic() - started
    with pytest.raises(openai.RateLimitError) as e:
        client(ready, over).chat.completions.create(model=MODEL, messages=[])
    assert e.value.code == "insufficient_quota" and e.value.type == "insufficient_quota"
    assert e.value.status_code == 429 and e.value.response.headers["x-should-retry"] == "false"
    assert "1000 tokens per UTC day" in e.value.message
    # x-should-retry: false: the SDK with its default retries gives up at once (a retry waits at least 0.375 s)
    started = time.monotonic()
    with pytest.raises(openai.RateLimitError):
        openai.OpenAI(base_url=ready.base + "/v1", api_key=over).chat.completions.create(model=MODEL, messages=[])
    assert time.monotonic() - started < 0.35
    # the key under its quota, and a key without quotas however much it used, pass
    assert client(ready, under).chat.completions.create(model=MODEL, messages=[]).choices
    answer = client(ready, free).chat.completions.with_raw_response.create(model=MODEL, messages=[])
    assert answer.http_response.status_code == 200
    assert not any(h.startswith("x-ratelimit") for h in answer.headers)
    # Ollama clients get Ollama's error shape
    r = ready.post("/api/chat", over, json={"model": MODEL, "messages": []})
    assert r.status_code == 429 and set(r.json()) == {"error"} and "tokens per UTC day" in r.json()["error"]
    print(f"quota enforced {took:.1f} s after the usage was logged")
    # the key's details say so
    state = admin_get(ready, f"/api/v1/keys/{over_id}")["quotas"]["tokens_per_day"]
    assert (state["limit"], state["used"], state["remaining"], state["window"]) == (1000, 1000, 0, "UTC day")
    assert state["resets_at"] % 86400 == 0 and state["resets_at"] > time.time()
    shown = ready.cli("keys", "show", over_id)
    assert "tokens_per_day" in shown and "UTC day" in shown and "1000" in shown
    assert json.loads(ready.cli("keys", "show", under_id, "--json"))["quotas"]["tokens_per_day"]["remaining"] == 1


def test_quota_raised_lowered_and_removed_takes_effect_within_seconds(ready: Stack) -> None:
    token, key_id = new_key(ready, "changing", "--tokens-per-day", "100")
    consume(ready, key_id, 500)
    wait_for(refused(ready, token, "insufficient_quota"), "the quota to be enforced")
    auth = {"Authorization": f"Bearer {ready.admin_token()}"}
    r = requests.patch(f"{ready.admin}/api/v1/keys/{key_id}", json={"tokens_per_day": 1000}, headers=auth, timeout=10)
    assert r.status_code == 200 and r.json()["tokens_per_day"] == 1000
    wait_for(lambda: chat(ready, token).status_code == 200, "the raised quota")
    r = requests.patch(f"{ready.admin}/api/v1/keys/{key_id}", json={"tokens_per_day": 0}, headers=auth, timeout=10)
    assert r.status_code == 400 and "tokens_per_day" in r.json()["message"]
    ready.cli("keys", "update", key_id, "--tokens-per-day", "500")
    wait_for(refused(ready, token, "insufficient_quota"), "the lowered quota")
    ready.cli("keys", "update", key_id, "--tokens-per-day", "none")
    wait_for(lambda: chat(ready, token).status_code == 200, "the removed quota")
    assert admin_get(ready, f"/api/v1/keys/{key_id}")["quotas"] == {}


def test_tpm_answers_rate_limit_exceeded_with_token_headers(ready: Stack) -> None:
    token, key_id = new_key(ready, "tpm", "--tpm", "1000")
    ok = client(ready, token).chat.completions.with_raw_response.create(model=MODEL, messages=[])
    # proxied answers carry the key's token window too (nginx copies the gate's headers)
    assert ok.headers["x-ratelimit-limit-tokens"] == "1000"
    assert ok.headers["x-ratelimit-remaining-tokens"] == "1000"
    consume(ready, key_id, 400)
    wait_for(lambda: chat(ready, token).headers.get("x-ratelimit-remaining-tokens") == "600", "the figures")
    consume(ready, key_id, 700)
    wait_for(refused(ready, token, "rate_limit_exceeded"), "the tpm to be enforced")
    with pytest.raises(openai.RateLimitError) as e:
        client(ready, token).chat.completions.create(model=MODEL, messages=[])
    assert e.value.code == "rate_limit_exceeded"
    headers = e.value.response.headers
    assert headers["x-ratelimit-limit-tokens"] == "1000" and headers["x-ratelimit-remaining-tokens"] == "0"
    assert 1 <= int(headers["retry-after"]) <= 120
    assert 0 < float(headers["x-ratelimit-reset-tokens"].rstrip("s")) <= 120
    state = admin_get(ready, f"/api/v1/keys/{key_id}")["quotas"]["tpm"]
    assert state["limit"] == 1000 and state["used"] >= 1000 and state["window"] == "sliding minute"


def test_requests_per_day_counts_requests_that_reached_the_pool(ready: Stack) -> None:
    token, key_id = new_key(ready, "rpd", "--requests-per-day", "3")
    assert ready.get("/v1/models", token).status_code == 200  # answered by the gate itself: not counted
    for _ in range(3):
        assert chat(ready, token).status_code == 200
    # the gate counts what it lets through itself: the 4th request is refused at once, not seconds later
    r = chat(ready, token)
    assert r.status_code == 429 and r.json()["error"]["code"] == "insufficient_quota"
    assert "3 requests per UTC day" in r.json()["error"]["message"]
    # the manager's figure, from the access log, agrees (the refusals are logged too, but do not count)
    def figure() -> dict | None:
        state = admin_get(ready, f"/api/v1/keys/{key_id}")["quotas"]["requests_per_day"]
        return state if state["used"] == 3 else None

    details = wait_for(figure, "the figure")
    assert details["remaining"] == 0 and details["limit"] == 3
    time.sleep(1.5)
    assert admin_get(ready, f"/api/v1/keys/{key_id}")["quotas"]["requests_per_day"]["used"] == 3


def test_gate_restart_reloads_the_figures(ready: Stack) -> None:
    token, key_id = new_key(ready, "restart", "--tokens-per-month", "50")
    consume(ready, key_id, 50)
    wait_for(refused(ready, token, "insufficient_quota"), "the quota to be enforced")
    for pid in gate_pids(ready):
        os.kill(pid, signal.SIGKILL)
    # the figures are not published again (they did not change): the new gate reads them from the file
    r = wait_for(lambda: r if (r := chat(ready, token)).status_code != 503 else None, "the gate to come back",
                 timeout=20)
    assert r.status_code == 429 and r.json()["error"]["code"] == "insufficient_quota"
