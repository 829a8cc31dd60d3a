"""Shared fixtures: free ports, fake upstreams and a real Bastion stack (`bastion up` as a subprocess)."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
from click.testing import CliRunner

from manager.cli import main as cli_main
from tests.fakes import FakeUpstream

NGINX = shutil.which("nginx") or "/usr/sbin/nginx"
ADMIN_PASSWORD = "test-admin-password"
needs_nginx = pytest.mark.skipif(not Path(NGINX).exists(), reason="nginx is not installed")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Stack:
    """`bastion up` on free ports and a temporary data dir; `cli()` runs CLI commands against it."""

    def __init__(self, data_dir: Path):
        self.data_dir = data_dir
        self.public_port = free_port()
        self.admin_port = free_port()
        self.base = f"http://127.0.0.1:{self.public_port}"
        self.admin = f"http://127.0.0.1:{self.admin_port}"
        self.output = data_dir.parent / "up.out"
        self.proc: subprocess.Popen | None = None

    def cli(self, *args: str, ok: bool = True) -> str:
        result = CliRunner().invoke(cli_main, ["--data-dir", str(self.data_dir), *args], catch_exceptions=False)
        if ok:
            assert result.exit_code == 0, result.output
        return result.output

    def start(self, *up_args: str) -> None:
        """`bastion up` with the public and admin listeners, plus `up_args` (e.g. --http, --https)."""
        env = {**os.environ, "BASTION_DATA_DIR": str(self.data_dir), "BASTION_ADMIN_PASSWORD": ADMIN_PASSWORD}
        with self.output.open("wb") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "manager.cli", "up", "--public", f"127.0.0.1:{self.public_port}",
                 "--admin", f"127.0.0.1:{self.admin_port}", *up_args],
                stdout=out, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"bastion up exited:\n{self.output.read_text()}")
            if "Bastion is up" in self.output.read_text():
                return
            time.sleep(0.1)
        raise RuntimeError(f"bastion up did not start:\n{self.output.read_text()}")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def admin_token(self, username: str = "admin", password: str = ADMIN_PASSWORD) -> str:
        r = requests.post(self.admin + "/auth/token", json={"username": username, "password": password}, timeout=10)
        assert r.status_code == 200, r.text
        return r.json()["token"]

    def key(self, name: str = "test", *options: str) -> str:
        return self.cli("keys", "create", name, *options).splitlines()[0].strip()

    def get(self, path: str, key: str | None = None, **kw) -> requests.Response:
        headers = kw.pop("headers", {})
        if key:
            headers["Authorization"] = f"Bearer {key}"
        return requests.get(self.base + path, headers=headers, timeout=10, **kw)

    def post(self, path: str, key: str | None = None, **kw) -> requests.Response:
        headers = kw.pop("headers", {})
        if key:
            headers["Authorization"] = f"Bearer {key}"
        return requests.post(self.base + path, headers=headers, timeout=10, **kw)


@pytest.fixture(scope="module")
def upstreams() -> Iterator[dict[str, FakeUpstream]]:
    ups = {
        "alpha": FakeUpstream("alpha", ["alpha-model", "shared:latest"], chunk_delay=0.2),
        "beta": FakeUpstream("beta", ["beta-model"]),
        "beta2": FakeUpstream("beta2", ["beta-model"]),
    }
    yield ups
    for up in ups.values():
        up.close()


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    if not Path(NGINX).exists():
        pytest.skip("nginx is not installed")
    root = tmp_path_factory.mktemp("stack")
    s = Stack(root / "data")
    s.start()
    yield s
    s.stop()
