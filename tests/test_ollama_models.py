"""Ollama model management through the management API, against the real stack and fake Ollama upstreams:
list, pull (a job with progress) and delete, on an upstream named by the pool, admins only."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
import requests

from tests.conftest import Stack
from tests.fakes import FakeUpstream

VIEWER_PASSWORD = "viewer-password-2"


@pytest.fixture(scope="module")
def ollama() -> Iterator[FakeUpstream]:
    up = FakeUpstream("ollama", ["llama3:latest"], api_key="ollama-key-1")
    up.pull_delay = 0.3
    yield up
    up.close()


@pytest.fixture(scope="module")
def vllm() -> Iterator[FakeUpstream]:
    up = FakeUpstream("vllm", ["gpt-x"], apis=("openai",))
    yield up
    up.close()


@pytest.fixture(scope="module")
def admin(stack: Stack, ollama: FakeUpstream, vllm: FakeUpstream) -> requests.Session:
    s = requests.Session()
    s.headers["Authorization"] = f"Bearer {stack.admin_token()}"
    for name, up, extra in (("oll", ollama, {"api_key": "ollama-key-1"}), ("vl", vllm, {})):
        r = s.post(stack.admin + "/api/v1/pools", json={"name": name, "upstreams": [up.url], **extra}, timeout=30)
        assert r.status_code == 201, r.text
    return s


def pulls(stack: Stack, s: requests.Session) -> list[dict]:
    r = s.get(stack.admin + "/api/v1/pools/oll/ollama/pulls", timeout=10)
    assert r.status_code == 200, r.text
    return r.json()


def test_list_shows_the_upstreams_models_with_details(stack: Stack, admin: requests.Session,
                                                        ollama: FakeUpstream) -> None:
    r = admin.get(stack.admin + "/api/v1/pools/oll/ollama/models", params={"upstream": ollama.url}, timeout=10)
    assert r.status_code == 200, r.text
    [model] = r.json()
    assert model["name"] == "llama3:latest" and model["details"]["quantization_level"] == "Q4_K_M"
    assert model["size"] > 0 and len(model["digest"]) == 64
    # the pool's API key went with the request (the fake refuses requests without it)
    assert ollama.requests[-1]["headers"]["Authorization"] == "Bearer ollama-key-1"


def test_pull_runs_as_a_job_with_progress(stack: Stack, admin: requests.Session, ollama: FakeUpstream) -> None:
    r = admin.post(stack.admin + "/api/v1/pools/oll/ollama/pulls",
                   json={"upstream": ollama.url, "model": "qwen2.5:0.5b"}, timeout=10)
    assert r.status_code == 202, r.text
    job = r.json()
    assert job["state"] == "running" and job["model"] == "qwen2.5:0.5b" and "pid" not in job
    # the same pull asked again joins the running one
    again = admin.post(stack.admin + "/api/v1/pools/oll/ollama/pulls",
                       json={"upstream": ollama.url, "model": "qwen2.5:0.5b"}, timeout=10).json()
    assert again["id"] == job["id"]
    seen = []
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        [now] = [j for j in pulls(stack, admin) if j["id"] == job["id"]]
        seen.append((now["status"], now["completed"], now["total"]))
        if now["state"] != "running":
            break
        time.sleep(0.1)
    assert now["state"] == "done" and now["error"] is None, now
    partial = [c / t for _, c, t in seen if t and c is not None and 0 < c < t]
    assert partial, seen  # progress was seen while the layer downloaded
    assert [r["body"] for r in ollama.requests if r["path"] == "/api/pull"] == [
        b'{"model": "qwen2.5:0.5b", "stream": true}']
    # the pool's models are asked again: the new one is served
    pool = admin.get(stack.admin + "/api/v1/pools/oll", timeout=10).json()
    assert "qwen2.5:0.5b" in pool["discovered_models"], pool
    audit = admin.get(stack.admin + "/api/v1/audit", timeout=10).json()
    assert any("pull ollama model qwen2.5:0.5b" in e["action"] for e in audit)


def test_a_failed_pull_says_why(stack: Stack, admin: requests.Session, ollama: FakeUpstream) -> None:
    r = admin.post(stack.admin + "/api/v1/pools/oll/ollama/pulls",
                   json={"upstream": ollama.url, "model": "missing-model:1b"}, timeout=10)
    assert r.status_code == 202, r.text
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        [job] = [j for j in pulls(stack, admin) if j["model"] == "missing-model:1b"]
        if job["state"] != "running":
            break
        time.sleep(0.1)
    assert job["state"] == "failed" and job["error"] == "pull model manifest: file does not exist", job


def test_delete_removes_the_model(stack: Stack, admin: requests.Session, ollama: FakeUpstream) -> None:
    ollama.models.append("doomed:1b")
    url = stack.admin + "/api/v1/pools/oll/ollama/models"
    r = admin.delete(url, params={"upstream": ollama.url, "model": "doomed:1b"}, timeout=10)
    assert r.status_code == 200, r.text
    assert "doomed:1b" not in ollama.models
    assert [r["body"] for r in ollama.requests if r["path"] == "/api/delete"][-1] == b'{"model": "doomed:1b"}'
    r = admin.delete(url, params={"upstream": ollama.url, "model": "doomed:1b"}, timeout=10)
    assert r.status_code == 502 and "model 'doomed:1b' not found" in r.json()["message"], r.text


def test_bad_requests_name_the_field_and_reach_no_upstream(stack: Stack, admin: requests.Session,
                                                             ollama: FakeUpstream, vllm: FakeUpstream) -> None:
    before = len(ollama.requests)
    base = stack.admin + "/api/v1/pools"
    cases = [
        (admin.post(f"{base}/oll/ollama/pulls", json={"upstream": ollama.url, "model": "bad name;"}, timeout=10),
         400, "model"),
        (admin.post(f"{base}/oll/ollama/pulls", json={"upstream": "http://127.0.0.1:9/", "model": "x"}, timeout=10),
         400, "upstream"),
        (admin.post(f"{base}/oll/ollama/pulls", json={"model": "x"}, timeout=10), 400, "upstream"),
        (admin.get(f"{base}/oll/ollama/models", timeout=10), 400, "upstream"),
        (admin.delete(f"{base}/oll/ollama/models", params={"upstream": ollama.url, "model": "../x"}, timeout=10),
         400, "model"),
        (admin.get(f"{base}/vl/ollama/models", params={"upstream": vllm.url}, timeout=10), 409, "upstream"),
        (admin.get(f"{base}/nope/ollama/models", params={"upstream": ollama.url}, timeout=10), 404, None),
        (admin.get(f"{base}/nope/ollama/pulls", timeout=10), 404, None),
    ]
    for r, status, field in cases:
        assert r.status_code == status, r.text
        if field:
            assert r.json()["error"]["field"] == field, r.text
    assert len(ollama.requests) == before
    assert not [r for r in vllm.requests if r["path"].startswith("/api/") and r["method"] != "GET"]


def test_viewer_gets_403(stack: Stack, admin: requests.Session, ollama: FakeUpstream) -> None:
    stack.cli("users", "add", "viewer2", "--role", "viewer", "--password", VIEWER_PASSWORD)
    token = stack.admin_token("viewer2", VIEWER_PASSWORD)
    auth = {"Authorization": f"Bearer {token}"}
    base = stack.admin + "/api/v1/pools/oll/ollama"
    assert requests.get(f"{base}/models", params={"upstream": ollama.url}, headers=auth, timeout=10).status_code == 403
    assert requests.get(f"{base}/pulls", headers=auth, timeout=10).status_code == 403
    assert requests.post(f"{base}/pulls", json={"upstream": ollama.url, "model": "x"}, headers=auth,
                         timeout=10).status_code == 403
    assert requests.delete(f"{base}/models", params={"upstream": ollama.url, "model": "llama3:latest"}, headers=auth,
                           timeout=10).status_code == 403
    assert "llama3:latest" in ollama.models


def test_a_pull_whose_worker_died_shows_as_interrupted(stack: Stack, admin: requests.Session,
                                                         ollama: FakeUpstream) -> None:
    import json

    now = time.time()
    folder = stack.data_dir / "run" / "ollama-pulls"
    folder.mkdir(exist_ok=True)
    dead = {"id": "0123456789abcdef", "pool": "oll", "upstream": ollama.url, "model": "ghost:1b", "author": "admin",
            "state": "running", "status": "pulling abc", "total": 10, "completed": 5, "error": None,
            "started": now - 5, "updated": now - 5, "finished": None, "pid": 2**22 + 12345}  # above pid_max
    (folder / "0123456789abcdef.json").write_text(json.dumps(dead))
    [job] = [j for j in pulls(stack, admin) if j["model"] == "ghost:1b"]
    assert job["state"] == "interrupted" and "pull again" in job["error"], job
    old = {**dead, "id": "fedcba9876543210", "model": "old:1b", "state": "done", "finished": now - 7200}
    (folder / "fedcba9876543210.json").write_text(json.dumps(old))
    assert not [j for j in pulls(stack, admin) if j["model"] == "old:1b"]
    assert not (folder / "fedcba9876543210.json").exists()  # finished over an hour ago: dropped
