"""`bastion up`: run nginx, the gate (granian) and the manager (gunicorn) in the foreground.

Ctrl-C/SIGTERM stops every child. A gate or manager that dies is restarted (at most `MAX_RESTARTS` a
minute); nginx dying, or failing to start, stops the stack with the reason and a non-zero exit. While running,
the supervisor ingests the access log every second and refreshes discovered models on a schedule.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import requests

from manager import generations, health, pools
from manager.apply import healthz_url
from manager.context import Bastion

START_TIMEOUT = 15.0
MAX_RESTARTS = 5
BACKGROUND_NICENESS = 10


class StartupError(RuntimeError):
    pass


@dataclass
class Child:
    name: str
    argv: list[str]
    log: Path
    ready: Callable[[], bool]
    socket: Path | None = None
    proc: subprocess.Popen | None = None
    restarts: list[float] = field(default_factory=list)

    def start(self, env: dict[str, str]) -> None:
        """Start afresh: leftovers of a previous run (its process group, a stale socket) are cleared first."""
        if self.proc:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
        if self.socket:
            self.socket.unlink(missing_ok=True)
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(self.argv, stdout=out, stderr=subprocess.STDOUT, env=env,
                                         start_new_session=True)

    def wait_ready(self, timeout: float = START_TIMEOUT) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc and self.proc.poll() is not None:
                raise StartupError(f"{self.name} exited with status {self.proc.returncode}:\n{self.tail()}")
            if self.ready():
                return
            time.sleep(0.05)
        raise StartupError(f"{self.name} did not become ready within {timeout:.0f} s:\n{self.tail()}")

    def tail(self, lines: int = 15) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 10.0) -> None:
        if not self.proc or self.proc.poll() is not None:
            return
        self.proc.send_signal(sig)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


class Supervisor:
    def __init__(self, bastion: Bastion, echo: Callable[[str], None] = print):
        self.bastion = bastion
        self.echo = echo
        self.stopping = threading.Event()
        self._busy: set[str] = set()
        dirs = bastion.dirs
        # children get no BASTION_ADMIN_PASSWORD: the admin user exists before they start
        self.env = {k: x for k, x in os.environ.items() if k != "BASTION_ADMIN_PASSWORD"}
        self.env.update(BASTION_DATA_DIR=str(dirs.root), BASTION_NGINX=bastion.nginx.binary)
        self.gate = Child(
            "authsvc",
            [sys.executable, "-m", "granian", "--interface", "wsgi", "--uds", str(dirs.gate_socket),
             "--uds-permissions", "0600", "--workers", "1", "--no-ws", "--no-access-log",
             # the gate never waits on I/O: one Python thread avoids GIL hand-offs (measured ~2x, docs/benchmarks.md)
             "--blocking-threads", "1", "authsvc.wsgi:app"],
            dirs.logs / "authsvc.log",
            dirs.gate_socket.exists,
            dirs.gate_socket,
        )
        self.manager = Child(
            "manager",
            [sys.executable, "-m", "gunicorn", "--bind", f"unix:{dirs.manager_socket}", "--umask", "0o177",
             "--workers", "2", "--threads", "4", "--worker-class", "gthread",
             # idle connections outlive nginx's upstream keepalive_timeout (25 s), see RECIPES.md
             "--keep-alive", "30", "--no-control-socket", "manager.wsgi:app"],
            dirs.logs / "manager.log",
            dirs.manager_socket.exists,
            dirs.manager_socket,
        )
        self.nginx = Child("nginx", bastion.nginx.run_argv(), dirs.logs / "nginx.log", self._nginx_ready)

    def _nginx_ready(self) -> bool:
        try:
            return requests.get(healthz_url(self.bastion.settings()["public_listen"]), timeout=1).ok
        except requests.RequestException:
            return False

    def run(self) -> int:
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: self.stopping.set())
        try:
            self.start()
        except StartupError as e:
            self.echo(f"error: {e}")
            self.shutdown()
            return 1
        try:
            return self.watch()
        finally:
            self.shutdown()

    def start(self) -> None:
        dirs, bastion = self.bastion.dirs, self.bastion
        self.echo("applying nginx configuration...")
        result = bastion.apply("up")
        self.echo(f"  generation {result.generation}")
        for child in (self.gate, self.manager):
            self.echo(f"starting {child.name}...")
            self._start(child)
        self.echo("starting nginx...")
        self.nginx.start(self.env)
        self.nginx.wait_ready()
        settings = bastion.settings()
        self.echo(f"Bastion is up (data dir {dirs.root})")
        self.echo(f"  OpenAI base URL: http://{settings['public_listen']}/v1")
        self.echo(f"  Ollama base URL: http://{settings['public_listen']}")
        self.echo(f"  admin:           http://{settings['admin_listen']}/")
        cli = shutil.which("bastion") or str(Path(sys.executable).with_name("bastion"))
        data = "" if dirs.root == Path.cwd() / "data" else f" --data-dir {dirs.root}"
        self.echo(f"Add a pool and a key:  {cli}{data} pools add NAME --url http://HOST:PORT")
        self.echo(f"                       {cli}{data} keys create NAME      (Ctrl-C stops the stack)")

    def watch(self) -> int:
        next_discovery = next_health = time.monotonic()
        while not self.stopping.wait(1.0):
            if self.nginx.proc and self.nginx.proc.poll() is not None:
                self.echo(f"error: nginx exited with status {self.nginx.proc.returncode}:\n{self.nginx.tail()}")
                return 1
            for child in (self.gate, self.manager):
                if child.proc and child.proc.poll() is not None and not self._restart(child):
                    return 1
            self._background("usage ingestion", self.bastion.usage.ingest)
            settings, now = self.bastion.settings(), time.monotonic()
            self._background("log upkeep", lambda s=settings: self.bastion.usage.maintain(s, self.nginx.proc.pid))
            if now >= next_discovery:
                next_discovery = now + settings["discovery_interval"]
                self._background("model discovery and DNS", self._refresh)
            if settings["health_interval"] and now >= next_health:
                next_health = now + settings["health_interval"]
                self._background("health checks", lambda: health.check(self.bastion))
        self.echo("stopping...")
        return 0

    def _start(self, child: Child) -> None:
        child.start(self.env)
        child.wait_ready()
        owner = self.bastion.dirs.root.stat()
        if child.socket and os.geteuid() == 0 and owner.st_uid != 0:
            # nginx workers run as the data dir's owner (see apply.worker_user): let them connect
            os.chown(child.socket, owner.st_uid, owner.st_gid)

    def _refresh(self) -> None:
        """Ask upstreams for their models; re-apply when an upstream host did not resolve at the last apply,
        so it comes into service once DNS answers (other DNS changes are taken at the next apply)."""
        pools.refresh_discovered(self.bastion)
        if "did not resolve" not in generations.live_text_masked(self.bastion.dirs):
            return
        result = self.bastion.apply("supervisor")
        if result.changed:
            self.bastion.audit.record("supervisor", f"re-resolved upstream hosts (generation {result.generation})")

    def _restart(self, child: Child) -> bool:
        now = time.monotonic()
        child.restarts = [t for t in child.restarts if now - t < 60] + [now]
        if len(child.restarts) > MAX_RESTARTS:
            self.echo(f"error: {child.name} keeps dying; last output:\n{child.tail()}")
            return False
        self.echo(f"{child.name} exited with status {child.proc.returncode}; restarting")
        try:
            self._start(child)
        except StartupError as e:
            self.echo(f"error: {e}")
            return False
        return True

    def _background(self, name: str, job: Callable[[], object]) -> None:
        """Run periodic work without blocking the watch loop, one run of each job at a time; errors are
        reported, never fatal."""
        if name in self._busy:
            return
        self._busy.add(name)

        def run() -> None:
            # Linux niceness is per thread: background work yields the CPU to nginx and the gate under load
            with contextlib.suppress(OSError):
                os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), BACKGROUND_NICENESS)
            try:
                job()
            except Exception as e:  # a failed refresh must not stop the gateway
                self.echo(f"warning: {name}: {e}")
            finally:
                self._busy.discard(name)
        threading.Thread(target=run, daemon=True).start()

    def shutdown(self) -> None:
        self.nginx.stop(signal.SIGQUIT)  # graceful: in-flight streams finish
        for child in (self.manager, self.gate):
            child.stop()
        with contextlib.suppress(Exception):  # a last read of the log must not block shutdown
            self.bastion.usage.ingest()
