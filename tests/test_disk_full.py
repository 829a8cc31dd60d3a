"""A full disk under the data dir (issue 7, class 5): traffic keeps flowing, admin sign-in still works, and no
usage line written after space returns is lost. Needs root to mount a small tmpfs as the data dir."""

from __future__ import annotations

import json
import os
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from tests.conftest import ADMIN_PASSWORD, Stack, needs_nginx
from tests.fakes import FakeUpstream

pytestmark = needs_nginx


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    mount = tmp_path / "disk"
    mount.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=48m", "tmpfs", str(mount)],
                                           capture_output=True).returncode != 0:
        pytest.skip("needs root to mount a tmpfs")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def fill(disk: Path) -> Path:
    """Write zeros until the filesystem is full; returns the filler file."""
    filler = disk / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        for size in (1 << 20, 4096, 1):  # big blocks, then the last crumbs
            try:
                while os.write(fd, b"\0" * size):
                    pass
            except OSError:
                pass
    finally:
        os.close(fd)
    return filler


def chat(stack: Stack, key: str, request_id: str) -> int:
    return stack.post("/v1/chat/completions", key, json={"model": "m1"},
                      headers={"X-Request-ID": request_id}).status_code


def test_full_disk_keeps_traffic_and_sign_in_working_and_loses_no_later_usage(small_disk: Path) -> None:
    up = FakeUpstream("up", ["m1"])
    stack = Stack(small_disk / "data")
    stack.start()
    try:
        stack.cli("pools", "add", "p", "--url", up.url)
        key = stack.key("k")
        time.sleep(0.5)
        assert chat(stack, key, "before-full") == 200
        filler = fill(small_disk)

        # the data plane needs no disk: every request is served while the disk is full
        assert all(chat(stack, key, f"full-{i}") == 200 for i in range(20))
        # sign-in works, wrong passwords are refused (not a 500), and the lockout still counts
        r = requests.post(stack.admin + "/auth/token", json={"username": "admin", "password": ADMIN_PASSWORD},
                          timeout=10)
        assert r.status_code == 200, r.text
        token = r.json()["token"]
        wrong = requests.post(stack.admin + "/auth/login", json={"username": "admin", "password": "wrong-pass"},
                              timeout=10)
        assert wrong.status_code == 401, wrong.text
        time.sleep(2)  # ingestion and health checks fail meanwhile; the supervisor goes on
        assert stack.proc.poll() is None, stack.output.read_text()

        filler.unlink()
        time.sleep(1.1)  # nginx skips writing a log for the rest of the second in which a write hit ENOSPC
        after = [f"after-{uuid.uuid4().hex[:8]}-{i}" for i in range(30)]
        assert all(chat(stack, key, rid) == 200 for rid in after)
        deadline = time.monotonic() + 15
        while True:
            r = requests.get(stack.admin + "/api/v1/usage/records", params={"limit": 1000},
                             headers={"Authorization": f"Bearer {token}"}, timeout=10)
            assert r.status_code == 200, r.text
            seen = {row["request_id"] for row in r.json()}
            if set(after) <= seen:
                break
            assert time.monotonic() < deadline, f"lost after space returned: {sorted(set(after) - seen)}"
            time.sleep(0.5)
        assert "before-full" in seen
        assert json.loads(json.dumps(r.json()))  # answers stay JSON
    finally:
        stack.stop()
        up.close()
