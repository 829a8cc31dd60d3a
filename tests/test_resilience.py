"""The data plane outlives every control-plane fault: a corrupt store, a crash-looping gate (issue 7, classes 1
and 9). Real `bastion up`, real nginx, the gate and gunicorn."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from manager.supervisor import BACKOFF_MAX, STABLE_AFTER, Child
from tests.conftest import Stack, needs_nginx
from tests.fakes import FakeUpstream

pytestmark = needs_nginx


class Traffic(threading.Thread):
    """Chat requests in a loop from one keep-alive session; counts every outcome."""

    def __init__(self, stack: Stack, key: str, model: str):
        super().__init__(daemon=True)
        self.stack, self.key, self.model = stack, key, model
        self.outcomes: Counter[str] = Counter()
        self.stop = threading.Event()

    def run(self) -> None:
        session = requests.Session()
        for n in range(10**9):
            if self.stop.is_set():
                return
            path = "/api/chat" if n % 2 else "/v1/chat/completions"  # both error shapes
            try:
                r = session.post(self.stack.base + path, json={"model": self.model},
                                 headers={"Authorization": f"Bearer {self.key}"}, timeout=10)
                self.outcomes[outcome(r)] += 1
            except (requests.RequestException, ValueError) as e:
                self.outcomes[type(e).__name__] += 1
            time.sleep(0.01)

    def finish(self) -> Counter[str]:
        self.stop.set()
        self.join(15)
        return self.outcomes


def outcome(r: requests.Response) -> str:
    """"200", or the status with the error code (OpenAI shape) or "ollama" (Ollama shape, a plain string)."""
    if r.status_code == 200:
        return "200"
    error = r.json()["error"]
    return f"{r.status_code} {error['code'] if isinstance(error, dict) else 'ollama'}"


@pytest.fixture
def serving(tmp_path: Path) -> Iterator[tuple[Stack, str]]:
    up = FakeUpstream("up", ["m1"])
    stack = Stack(tmp_path / "data")
    stack.start()
    stack.cli("pools", "add", "p", "--url", up.url)
    key = stack.key("k")
    # the periodic jobs read the store: make them run often while it is broken
    stack.cli("settings", "set", "health_interval", "1")
    stack.cli("settings", "set", "discovery_interval", "5")
    time.sleep(0.5)
    yield stack, key
    stack.stop()
    up.close()


def gate_pids(stack: Stack) -> list[int]:
    pids = []
    for p in Path("/proc").iterdir():
        try:
            if (p.name.isdigit() and b"authsvc.server" in (p / "cmdline").read_bytes()
                    and str(stack.data_dir).encode() in (p / "environ").read_bytes()):
                pids.append(int(p.name))
        except OSError:
            continue
    return pids


def test_corrupt_store_while_traffic_flows(serving) -> None:
    stack, key = serving
    token = stack.admin_token()
    store = stack.data_dir / "store.json"
    good = store.read_bytes()
    traffic = Traffic(stack, key, "m1")
    traffic.start()
    time.sleep(1)
    store.write_text('{"keys": ')
    time.sleep(6)  # several health checks, a discovery run and many supervisor ticks on a broken store
    r = requests.get(stack.admin + "/api/v1/pools", headers={"Authorization": f"Bearer {token}"}, timeout=10)
    assert r.status_code == 503 and str(store) in r.json()["message"]
    health = requests.get(stack.admin + "/api/v1/health", timeout=10).json()
    assert health["status"] == "degraded" and health["store"].startswith("unreadable")
    assert stack.proc.poll() is None, stack.output.read_text()
    store.write_bytes(good)
    outcomes = traffic.finish()
    assert set(outcomes) == {"200"} and outcomes["200"] > 50, outcomes
    r = requests.get(stack.admin + "/api/v1/pools", headers={"Authorization": f"Bearer {token}"}, timeout=10)
    assert r.status_code == 200
    # reported, not repeated every second
    assert 1 <= stack.output.read_text().count("health checks failed") <= 2


def test_up_on_a_corrupt_store_serves_the_last_good_configuration(serving) -> None:
    stack, key = serving
    stack.stop()
    (stack.data_dir / "store.json").write_text('{"keys": ')
    stack.start()
    assert stack.post("/v1/chat/completions", key, json={"model": "m1"}).status_code == 200
    assert "starting on the last good configuration" in stack.output.read_text()
    # the manager runs too, and says what is wrong
    assert requests.get(stack.admin + "/api/v1/health", timeout=10).json()["status"] == "degraded"
    r = requests.post(stack.admin + "/auth/token", json={"username": "admin", "password": "x" * 10}, timeout=10)
    assert r.status_code == 503 and "store.json" in r.json()["message"]


def test_gate_killed_ten_times_in_twenty_seconds(serving) -> None:
    stack, key = serving
    traffic = Traffic(stack, key, "m1")
    traffic.start()
    for _ in range(10):
        for pid in gate_pids(stack):
            os.kill(pid, signal.SIGKILL)
        time.sleep(2)
    deadline = time.monotonic() + BACKOFF_MAX + 10
    while stack.post("/v1/chat/completions", key, json={"model": "m1"}).status_code != 200:
        assert time.monotonic() < deadline, "the gate never came back"
        time.sleep(0.2)
    outcomes = traffic.finish()
    assert stack.proc.poll() is None, stack.output.read_text()
    # the public listener answered every request: 200, or JSON 503 while the gate was down
    assert set(outcomes) == {"200", "503 gateway_unavailable", "503 ollama"}, outcomes
    r = stack.post("/v1/chat/completions", key, json={"model": "m1"})
    assert r.status_code == 200


def test_back_off_grows_to_a_cap_and_starts_over_after_a_stable_run(tmp_path: Path) -> None:
    child = Child("x", ["true"], tmp_path / "x.log", lambda: True)
    now = 1000.0
    child.started = now
    delays = [child.schedule_restart(now + i) for i in range(8)]
    assert delays[0] == 0.5 and delays == sorted(delays) and delays[-1] == BACKOFF_MAX
    child.started = now
    assert child.schedule_restart(now + STABLE_AFTER + 1) == 0.5


def test_child_log_rotation_keeps_the_child_writing(tmp_path: Path) -> None:
    log = tmp_path / "child.log"
    child = Child("writer", ["sh", "-c", "while true; do echo line; sleep 0.01; done"], log, lambda: True)
    child.start({"PATH": os.environ["PATH"]})
    try:
        time.sleep(0.3)
        child.rotate_log(10)
        assert (tmp_path / "child.log.1").read_text().startswith("line\n")
        time.sleep(0.2)
        # appending at the new end: no hole of NUL bytes where the old content was
        assert log.read_bytes().startswith(b"line\n") and log.stat().st_size < 4096
    finally:
        child.stop()


def test_health_raises_the_alarm_when_changes_stop_reaching_the_gate(serving) -> None:
    """The gate keeps serving what it has when it cannot read snapshot.json or keys.sqlite3; a key revoked
    meanwhile would keep working, so the manager's health says so."""
    stack, key = serving

    def health() -> dict:
        return requests.get(stack.admin + "/api/v1/health", timeout=10).json()

    def wait_for(condition) -> dict:
        deadline = time.monotonic() + 10
        while not condition(h := health()):
            assert time.monotonic() < deadline, h
            stack.get("/v1/models", key)  # the gate looks at its files when requests come
            time.sleep(0.2)
        return h

    assert health()["status"] == "ok" and health()["gate"] == []
    assert stack.post("/v1/chat/completions", key, json={"model": "m1"}).status_code == 200  # gate up to date
    files = [stack.data_dir / f"keys.sqlite3{suffix}" for suffix in ("", "-wal", "-shm")]
    for f in files:  # e.g. a bad restore from a backup
        if f.exists():
            f.rename(f.with_name(f.name + ".spare"))
    files[0].write_bytes(b"not a database" * 100)
    h = wait_for(lambda h: h["gate"])
    assert h["status"] == "degraded" and "key store unreadable" in h["gate"][0]
    assert stack.post("/v1/chat/completions", key, json={"model": "m1"}).status_code == 200  # still serving
    for f in files:
        f.unlink(missing_ok=True)
        if f.with_name(f.name + ".spare").exists():
            f.with_name(f.name + ".spare").rename(f)
    wait_for(lambda h: h["status"] == "ok")


def test_a_snapshot_the_gate_cannot_read_is_published_again(serving) -> None:
    stack, key = serving
    assert stack.post("/v1/chat/completions", key, json={"model": "m1"}).status_code == 200
    snapshot = stack.data_dir / "snapshot.json"
    good = snapshot.read_bytes()
    snapshot.write_text("{")
    deadline = time.monotonic() + 15
    while snapshot.read_bytes() != good:  # the gate reports it, the supervisor publishes it again
        assert time.monotonic() < deadline, "snapshot.json was never repaired"
        assert stack.post("/v1/chat/completions", key, json={"model": "m1"}).status_code == 200
        time.sleep(0.2)
    assert "published it again from the store" in stack.output.read_text()
