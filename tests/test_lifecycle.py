"""Stack lifecycle: start-up failures, config apply with rollback, reloads under traffic, clean shutdown."""

from __future__ import annotations

import contextlib
import json
import os
import resource
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import requests

from tests.conftest import Stack, free_port, needs_nginx
from tests.fakes import FakeUpstream

pytestmark = needs_nginx


def test_up_fails_with_the_reason_when_the_port_is_taken(tmp_path: Path) -> None:
    with socket.socket() as blocker:
        blocker.bind(("127.0.0.1", 0))
        blocker.listen()
        port = blocker.getsockname()[1]
        proc = subprocess.run(
            [sys.executable, "-m", "manager.cli", "--data-dir", str(tmp_path / "data"), "up",
             "--public", f"127.0.0.1:{port}", "--admin", f"127.0.0.1:{free_port()}"],
            capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0
    assert "Address already in use" in proc.stdout + proc.stderr
    # nothing is left running
    assert not list((tmp_path / "data" / "run").glob("*.sock")) or all(
        not _listening(p) for p in (tmp_path / "data" / "run").glob("*.sock"))


def _listening(sock_path: Path) -> bool:
    with socket.socket(socket.AF_UNIX) as s:
        try:
            s.connect(str(sock_path))
            return True
        except OSError:
            return False


@pytest.fixture
def running(tmp_path: Path):
    up = FakeUpstream("slow", ["slow-model"], chunk_delay=0.3, chunks=8)
    stack = Stack(tmp_path / "data")
    stack.start()
    stack.cli("pools", "add", "slow", "--url", up.url)
    key = stack.key("k")
    time.sleep(0.5)
    yield stack, key, up
    stack.stop()
    up.close()


def test_rejected_reload_rolls_back_and_traffic_keeps_flowing(running) -> None:
    stack, key, _ = running
    gen_before = stack.get("/healthz").json()["generation"]
    conf_before = (stack.data_dir / "nginx" / "live" / "nginx.conf").read_text()
    with socket.socket() as blocker:
        blocker.bind(("127.0.0.1", 0))
        blocker.listen()
        taken = blocker.getsockname()[1]
        # `nginx -t` does not notice a taken port; the master refuses it at reload
        out = stack.cli("settings", "set", "admin_listen", f"127.0.0.1:{taken}", ok=False)
        assert "rejected the new configuration at reload" in out and "Address already in use" in out
        assert stack.get("/healthz").json()["generation"] == gen_before
        assert stack.post("/v1/chat/completions", key, json={"model": "slow-model"}).status_code == 200
    assert (stack.data_dir / "nginx" / "live" / "nginx.conf").read_text() == conf_before
    assert json.loads(stack.cli("settings", "show"))["admin_listen"] == f"127.0.0.1:{stack.admin_port}"


def test_streams_in_flight_survive_a_reload(running) -> None:
    stack, key, _ = running
    got: list[bytes] = []

    def consume() -> None:
        r = stack.post("/v1/chat/completions", key, json={"model": "slow-model", "stream": True}, stream=True)
        got.extend(line for line in r.iter_lines() if line)

    reader = threading.Thread(target=consume)
    reader.start()
    time.sleep(0.5)
    gen = stack.get("/healthz").json()["generation"]
    stack.cli("settings", "set", "read_timeout", "900")  # a real change: new generation, reload
    assert stack.get("/healthz").json()["generation"] == gen + 1
    reader.join(10)
    assert got[-1] == b"data: [DONE]" and len(got) == 9


def test_sigterm_stops_everything(tmp_path: Path) -> None:
    stack = Stack(tmp_path / "data")
    stack.start()
    master = int((stack.data_dir / "nginx" / "nginx.pid").read_text())
    stack.stop()
    assert stack.proc.returncode == 0
    with pytest.raises(requests.ConnectionError):
        requests.get(stack.base + "/healthz", timeout=2)
    with pytest.raises(ProcessLookupError):
        os.kill(master, 0)


def test_dead_gate_is_restarted(running) -> None:
    stack, key, _ = running
    gate_pids = [int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit() and
                 b"authsvc.server" in (p / "cmdline").read_bytes() and
                 str(stack.data_dir).encode() in (p / "environ").read_bytes()]
    assert gate_pids
    for pid in gate_pids:
        os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        if stack.get("/v1/models", key).status_code == 200:
            break
        time.sleep(0.2)
    assert stack.get("/v1/models", key).status_code == 200
    assert "authsvc exited" in stack.output.read_text()


def test_second_up_on_a_running_data_dir_changes_nothing(running) -> None:
    stack, key, _ = running
    out = stack.cli("up", "--public", f"127.0.0.1:{free_port()}", ok=False)
    assert "already running" in out
    assert json.loads(stack.cli("settings", "show"))["public_listen"] == f"127.0.0.1:{stack.public_port}"
    assert stack.get("/v1/models", key).status_code == 200


def test_health_checks_take_a_dead_upstream_out_and_back(running) -> None:
    stack, key, _ = running
    port = free_port()
    dead = f"http://127.0.0.1:{port}"
    stack.cli("settings", "set", "health_fails", "1")
    stack.cli("pools", "add-upstream", "slow", dead)
    stack.cli("settings", "set", "health_interval", "1")

    def upstream_down() -> bool:
        pool = json.loads(stack.cli("pools", "list", "--json"))[0]
        return next(u for u in pool["upstreams"] if u["url"] == dead)["down"]

    deadline = time.monotonic() + 15
    while "is down" not in stack.cli("audit"):  # audited once nginx runs the new configuration
        assert time.monotonic() < deadline, "the dead upstream was never marked down"
        time.sleep(0.3)
    assert upstream_down()
    conf = (stack.data_dir / "nginx" / "live" / "nginx.conf").read_text()
    assert f"server 127.0.0.1:{port} max_fails=3 fail_timeout=10s down;  # failed its health checks" in conf
    for _ in range(4):  # every request lands on the live upstream
        assert stack.post("/v1/chat/completions", key, json={"model": "slow-model"}).status_code == 200
    revived = FakeUpstream("revived", ["slow-model"], port=port)
    try:
        deadline = time.monotonic() + 15
        while "is up again" not in stack.cli("audit"):
            assert time.monotonic() < deadline, "the revived upstream was never marked up"
            time.sleep(0.3)
        while "is up again" not in stack.cli("audit"):  # audited once the re-apply finished
            assert time.monotonic() < deadline, "the revival was never audited"
            time.sleep(0.3)
    finally:
        revived.close()


def _open_files(pid: int) -> tuple[int, int]:
    """A process's (soft, hard) open-file limits, from /proc."""
    for line in (Path("/proc") / str(pid) / "limits").read_text().splitlines():
        if line.startswith("Max open files"):
            soft, hard = line.split()[3:5]
            return int(soft), int(hard)
    raise AssertionError(f"no open-file limit for {pid}")


def _children(parent: int) -> list[int]:
    return [int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit()
            and (p / "stat").read_text().rsplit(")", 1)[1].split()[1] == str(parent)]


def test_up_makes_room_for_max_streams(tmp_path: Path) -> None:
    """Started with the usual soft limit of 1,024 open files, `bastion up` raises it for its children, and
    nginx's workers get room for max_streams streams (two connections each): 5,000 by default."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard < 11_280:
        pytest.skip(f"the open-file hard limit is {hard}")
    stack = Stack(tmp_path / "data")
    resource.setrlimit(resource.RLIMIT_NOFILE, (1024, hard))
    try:
        stack.start()
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    try:
        master = int((stack.data_dir / "nginx" / "nginx.pid").read_text())
        workers = _children(master)
        assert workers and all(_open_files(w) == (11_280, 11_280) for w in workers)
        conf = (stack.data_dir / "nginx" / "live" / "nginx.conf").read_text()
        assert "worker_connections 11024;" in conf
        assert _open_files(stack.proc.pid)[0] == hard  # the supervisor, hence the gate and the manager

        out = stack.cli("settings", "set", "max_streams", str(hard), ok=False)
        assert "max_streams" in out and "ulimit -Hn" in out
        assert "worker_connections 11024;" in (stack.data_dir / "nginx" / "live" / "nginx.conf").read_text()
        stack.cli("settings", "set", "max_streams", "1000")
        workers = _children(int((stack.data_dir / "nginx" / "nginx.pid").read_text()))
        deadline = time.monotonic() + 10  # the reload replaces the workers
        while time.monotonic() < deadline and any(_open_files(w)[0] != 3280 for w in workers):
            time.sleep(0.1)
            workers = _children(master)
        assert workers and all(_open_files(w)[0] == 3280 for w in workers)
    finally:
        stack.stop()


def test_sigterm_cuts_streams_at_the_stop_budget(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A container engine kills after its grace period: `up` ends streams at BASTION_STOP_TIMEOUT and exits 0."""
    monkeypatch.setenv("BASTION_STOP_TIMEOUT", "1")
    up = FakeUpstream("slow", ["slow-model"], chunk_delay=1.0, chunks=8)  # an 8 s stream
    stack = Stack(tmp_path / "data")
    got: list[bytes] = []

    def consume(r: requests.Response) -> None:
        with contextlib.suppress(requests.RequestException):
            got.extend(line for line in r.iter_lines() if line)

    try:
        stack.start()
        stack.cli("pools", "add", "slow", "--url", up.url)
        key = stack.key("k")
        r = stack.post("/v1/chat/completions", key, json={"model": "slow-model", "stream": True}, stream=True)
        assert r.status_code == 200
        reader = threading.Thread(target=consume, args=(r,))
        reader.start()
        time.sleep(1.5)  # under way
        started = time.monotonic()
        stack.proc.send_signal(signal.SIGTERM)
        stack.proc.wait(15)
        took = time.monotonic() - started
        reader.join(10)
        assert stack.proc.returncode == 0 and took < 4, took  # not the 6.5 s the stream had left
        assert 1 < len(got) < 9 and got[-1] != b"data: [DONE]", got
    finally:
        stack.stop()
        up.close()
