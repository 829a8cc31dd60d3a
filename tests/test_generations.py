"""Generations of several files, and applies killed mid-way: against a real nginx master on free ports."""

from __future__ import annotations

import json
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

from manager import apply as applier
from manager import configuration, generations, health, metering, pools, users
from manager import settings as settings_mod
from manager.app import create_app
from manager.context import Bastion
from manager.datadir import DataDir
from tests.conftest import free_port, needs_nginx

pytestmark = needs_nginx


class Live:
    """A Bastion data dir and the nginx master serving its live generation."""

    def __init__(self, data_dir: Path):
        self.bastion = Bastion(DataDir.at(data_dir))
        self.dirs = self.bastion.dirs
        self.listen = f"127.0.0.1:{free_port()}"
        settings_mod.update(self.bastion, {"public_listen": self.listen, "admin_listen": f"127.0.0.1:{free_port()}"})
        pools.add(self.bastion, "local", ["http://127.0.0.1:9"], models=["m"])
        self.proc = subprocess.Popen(self.bastion.nginx.run_argv(), start_new_session=True,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while self.serving() != generations.live(self.dirs):
            assert time.monotonic() < deadline, "nginx did not start"
            time.sleep(0.05)

    def serving(self) -> int | None:
        """The generation nginx answers /healthz with."""
        try:
            return requests.get(f"http://{self.listen}/healthz", timeout=2).json()["generation"]
        except requests.RequestException:
            return None

    def file(self, name: str) -> Path:
        return self.dirs.live / name

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(10)

    def assert_settled(self, generation: int) -> None:
        """nginx verifiably serves `generation`, the live one; no apply is pending, nothing unswitched is left."""
        assert generations.live(self.dirs) == generation
        assert self.serving() == generation
        assert not (self.dirs.nginx / "apply.json").exists()
        assert max(generations.numbers(self.dirs)) == generation
        assert not generations.drift(self.dirs)
        self.bastion.nginx.test(self.dirs.nginx_conf)


@pytest.fixture
def live(tmp_path: Path) -> Iterator[Live]:
    stack = Live(tmp_path / "data")
    yield stack
    stack.stop()


# ---- a generation of several files ----

def test_a_generation_holds_several_files(live: Live, monkeypatch: pytest.MonkeyPatch) -> None:
    first = generations.live(live.dirs)
    # with token metering the generation also holds the njs module it imports
    meter = ["meter.js"] if metering.detect(live.bastion.nginx.binary).module else []
    assert generations.names(live.dirs, first) == ["nginx.conf", *meter, "public.conf"]
    assert "include public.conf;" in live.file("nginx.conf").read_text()
    assert set(generations.meta(live.dirs, first)["files"]) == {"nginx.conf", "public.conf", *meter}

    # the included file is part of what nginx -t checks: a broken one is refused and nothing changes
    real_render = applier.render

    def broken(inp, generation):
        return {**real_render(inp, generation), "public.conf": "location {\n"}

    monkeypatch.setattr(applier, "render", broken)
    with pytest.raises(applier.ConfigTestFailed, match=r"public\.conf"):
        settings_mod.update(live.bastion, {"read_timeout": 700})
    monkeypatch.undo()
    assert max(generations.numbers(live.dirs)) == first and live.serving() == first

    # a reload reads the included file of the new generation (/healthz lives in public.conf)
    settings_mod.update(live.bastion, {"read_timeout": 700})
    second = generations.live(live.dirs)
    live.assert_settled(second)
    assert "proxy_read_timeout 700s;" in live.file("public.conf").read_text()
    history = generations.changes(live.dirs, second)
    assert f"generation {first}/public.conf" in history and "+            proxy_read_timeout 700s;" in history

    # a hand edit of the included file is drift, shown against what was rendered
    original = live.file("public.conf").read_text()
    live.file("public.conf").write_text(original.replace("client_max_body_size 16m;", "client_max_body_size 1m;"))
    assert generations.drifted(live.dirs) == ["public.conf"]
    assert "+        client_max_body_size 1m;" in generations.drift_diff(live.dirs, ["public.conf"])

    # a rollback writes every file afresh
    configuration.rollback(live.bastion, first, "test")
    third = generations.live(live.dirs)
    live.assert_settled(third)
    assert "proxy_read_timeout 600s;" in live.file("public.conf").read_text()
    assert "client_max_body_size 16m;" in live.file("public.conf").read_text()


def test_config_reads_neither_render_nor_resolve(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """GET handlers show what was rendered and what is on disk: no DNS, no health or store reads for a render."""
    monkeypatch.setattr(socket, "getaddrinfo", lambda host, port, *a, **k: [
        (socket.AF_INET, socket.SOCK_STREAM, 6, "", ("10.0.0.5", port))])
    data_dir = tmp_path / "data"
    bastion = Bastion(DataDir.at(data_dir))
    bastion.nginx.test = lambda conf: None  # type: ignore[method-assign]  # no nginx needed to read
    users.create(bastion, "admin", "right-password", "admin")
    pools.add(bastion, "gpu", ["http://gpu.example:8000"], models=["m"])
    conf = bastion.dirs.nginx_conf
    conf.write_text(conf.read_text().replace("worker_connections 11024;", "worker_connections 1024;"))
    app = create_app({"DATA_DIR": str(data_dir)})
    client = app.test_client()
    token = client.post("/auth/token", json={"username": "admin", "password": "right-password"}).json["token"]

    def forbidden(*args, **kwargs):
        raise AssertionError("a GET handler rendered the configuration")

    monkeypatch.setattr(socket, "getaddrinfo", forbidden)
    monkeypatch.setattr(health, "load", forbidden)
    reads = {path: client.get(path, headers={"Authorization": f"Bearer {token}"}) for path in (
        "/api/v1/config", "/nginx/config/get-default", "/nginx/config/get", "/api/v1/config/live",
        "/api/v1/config/history", f"/api/v1/config/history/{generations.live(bastion.dirs)}")}
    for path, r in reads.items():
        assert r.status_code == 200, (path, r.text)
    status = reads["/api/v1/config"].json
    assert status["drift"] is True and "+    worker_connections 1024;" in status["drift_diff"]
    default = reads["/nginx/config/get-default"].json["config"]
    assert "worker_connections 11024;" in default and "server 10.0.0.5:8000" in default


# ---- applies killed mid-way ----

KILLED_APPLY = """
import os, sys
import manager.apply, manager.generations, manager.nginx
from manager import settings
from manager.context import Bastion
from manager.datadir import DataDir

def die(*args, **kwargs):
    os._exit(17)

point = sys.argv[2]
if point == "before the test":
    manager.nginx.Nginx.test = die
elif point == "before the switch":
    manager.generations.switch = die
elif point == "before the reload":
    manager.nginx.Nginx.reload = staticmethod(die)
elif point == "before the verification":
    manager.apply.requests.get = die
settings.update(Bastion(DataDir.at(sys.argv[1])), {"max_fails": 5})
"""


@pytest.mark.parametrize("point", ["before the test", "before the switch", "before the reload",
                                   "before the verification"])
def test_an_apply_killed_mid_way_is_finished_at_the_next_start(live: Live, point: str) -> None:
    first = generations.live(live.dirs)
    killed = subprocess.run([sys.executable, "-c", KILLED_APPLY, str(live.dirs.root), point], timeout=60)
    assert killed.returncode == 17
    assert max(generations.numbers(live.dirs)) == first + 1  # the killed apply wrote its generation
    if point == "before the reload":
        assert generations.live(live.dirs) == first + 1 and live.serving() == first  # switched, not reloaded

    result = live.bastion.apply("up")  # what `bastion up` does first (any apply does it too)
    live.assert_settled(result.generation)
    assert "max_fails=5 " in live.file("nginx.conf").read_text()  # the change took effect
    assert generations.numbers(live.dirs)[-2:] == [first, result.generation]  # nothing unswitched left


def test_a_switch_to_a_generation_nginx_refuses_is_rolled_back(live: Live) -> None:
    """The state an apply leaves when killed after switching to files nginx does not take (here: a file
    truncated by the crash): the next start goes back to the previous generation, which nginx serves."""
    first = generations.live(live.dirs)
    broken = generations.directory(live.dirs, first + 1)
    shutil.copytree(generations.directory(live.dirs, first), broken)
    conf = broken / "nginx.conf"
    conf.write_text(conf.read_text()[:2000])
    (live.dirs.nginx / "apply.json").write_text(json.dumps({"previous": first, "generation": first + 1}))
    generations.switch(live.dirs, first + 1)

    assert live.bastion.apply("up").changed is False  # what `bastion up` does first (any apply does it too)
    live.assert_settled(first)


def test_recovery_keeps_a_good_switch_when_nginx_is_not_running(tmp_path: Path) -> None:
    """Killed after the switch while nginx was down: the live generation passes nginx -t, so it is kept."""
    bastion = Bastion(DataDir.at(tmp_path / "data"))
    bastion.apply("first")
    first = generations.live(bastion.dirs)
    second = generations.directory(bastion.dirs, first + 1)
    shutil.copytree(generations.directory(bastion.dirs, first), second)
    generations.begin(bastion.dirs, first, first + 1)
    generations.switch(bastion.dirs, first + 1)
    assert applier.recover(bastion) == first + 1
    assert generations.pending(bastion.dirs) is None and generations.live(bastion.dirs) == first + 1
    assert applier.recover(bastion) is None  # nothing left to recover
    assert os.path.isdir(second)


def test_recovery_discards_nothing_when_live_is_not_bastions_link(tmp_path: Path) -> None:
    """A backup that followed the `live` symlink restores it as a directory: which generations were switched to
    can no longer be told, so none of them (history, rollback states) may be deleted."""
    dirs = DataDir.at(tmp_path / "data")
    dirs.ensure()
    for g in (1, 2, 3):
        generations.directory(dirs, g).mkdir()
    generations.switch(dirs, 2)
    target = dirs.live.resolve()
    dirs.live.unlink()
    shutil.copytree(target, dirs.live)
    assert generations.unswitched(dirs) == []
    assert generations.numbers(dirs) == [1, 2, 3]
