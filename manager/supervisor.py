"""`bastion up`: run nginx, the gate (authsvc.server) and the manager (gunicorn) in the foreground.

The data plane (nginx + gate) never depends on the control plane: a child that dies is restarted forever with
back-off (0.5 s doubling to 5 s; a child that ran for a while starts over at 0.5 s), and nothing the store, the
manager, the periodic jobs or the disk do can stop the supervisor. While it runs, long-lived threads ingest the
access log, refresh discovered models and probe upstreams; their errors are logged (once per distinct error),
never fatal. Only nginx failing to start at all makes `up` exit non-zero; Ctrl-C/SIGTERM stops every child.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import requests

from manager import capacity, environment, generations, health, pools, quotas, running, snapshot
from manager import settings as settings_mod
from manager.apply import healthz_url, recover
from manager.certs import manage as cert_manage
from manager.context import Bastion
from manager.store import StoreCorrupt

log = logging.getLogger(__name__)

START_TIMEOUT = 15.0
TICK = 0.25
BACKOFF_FIRST = 0.5
BACKOFF_MAX = 5.0
STABLE_AFTER = 30.0  # a child that ran this long was healthy: its next restart is quick again
BACKGROUND_NICENESS = 10
REPEAT_WARNING_AFTER = 300.0  # the same background error is logged again only after this long


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
    started: float = 0.0
    is_ready: bool = False
    failures: int = 0  # runs in a row that ended before STABLE_AFTER
    restart_at: float | None = None

    def start(self, env: dict[str, str]) -> None:
        """Start afresh: leftovers of a previous run (its process group, a stale socket) are cleared first."""
        if self.proc:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        if self.socket:
            self.socket.unlink(missing_ok=True)
        try:
            out = self.log.open("ab")
        except OSError:  # a missing or broken logs dir must not keep the child down
            out = open(os.devnull, "ab")  # noqa: SIM115 - closed below, the child keeps its own copy
        with out:
            self.proc = subprocess.Popen(self.argv, stdout=out, stderr=subprocess.STDOUT, env=env,
                                         start_new_session=True)
        self.started, self.is_ready, self.restart_at = time.monotonic(), False, None

    def wait_ready(self, timeout: float = START_TIMEOUT) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.exited():
                raise StartupError(f"{self.name} exited with status {self.proc.returncode}:\n{self.tail()}")
            if self.ready():
                self.is_ready = True
                return
            time.sleep(0.05)
        raise StartupError(f"{self.name} did not become ready within {timeout:.0f} s:\n{self.tail()}")

    def exited(self) -> bool:
        return self.proc is not None and self.proc.poll() is not None

    def schedule_restart(self, now: float) -> float:
        """Set when to start again; returns the delay."""
        if now - self.started >= STABLE_AFTER:
            self.failures = 0
        delay = min(BACKOFF_MAX, BACKOFF_FIRST * 2 ** self.failures)
        self.failures += 1
        self.restart_at = now + delay
        return delay

    def rotate_log(self, max_bytes: int) -> None:
        """Copy the log to NAME.1 and empty it when it is over `max_bytes`. The child keeps writing: its file
        was opened for appending, so it carries on at the new end (lines written during the copy are lost)."""
        try:
            if self.log.stat().st_size > max_bytes:
                shutil.copyfile(self.log, self.log.with_name(self.log.name + ".1"))
                os.truncate(self.log, 0)
        except FileNotFoundError:
            pass

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


class Periodic(threading.Thread):
    """A background job run every `interval()` seconds (0 = paused) until `stopping` is set; errors are logged,
    the same one only once per REPEAT_WARNING_AFTER, and recovery is logged too."""

    def __init__(self, name: str, interval: Callable[[], float], job: Callable[[], Any], stopping: threading.Event):
        super().__init__(name=name, daemon=True)
        self.interval, self.job, self.stopping = interval, job, stopping
        self._last_error: tuple[str, float] | None = None

    def run(self) -> None:
        # Linux niceness is per thread: background work yields the CPU to nginx and the gate under load
        with contextlib.suppress(OSError):
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), BACKGROUND_NICENESS)
        last = time.monotonic()
        while not self.stopping.wait(TICK):  # short waits: a changed interval takes effect at once
            interval = self._safe_interval()
            if interval and time.monotonic() - last >= interval:
                last = time.monotonic()
                self.run_once()

    def _safe_interval(self) -> float:
        try:
            return float(self.interval())
        except Exception:  # settings unreadable: keep the job going at a sane pace
            return 60.0

    def run_once(self) -> None:
        try:
            self.job()
        except Exception as e:  # a failed job must never stop the gateway
            message, now = f"{type(e).__name__}: {e}", time.monotonic()
            last = self._last_error
            if not last or last[0] != message or now - last[1] > REPEAT_WARNING_AFTER:
                log.warning("%s failed (will retry): %s", self.name, message)
                self._last_error = (message, now)
        else:
            if self._last_error:
                log.info("%s works again", self.name)
                self._last_error = None


class Supervisor:
    def __init__(self, bastion: Bastion, echo: Callable[[str], None] = print):
        self.bastion = bastion
        self.echo = echo
        self.stopping = threading.Event()
        self._settings: dict[str, Any] | None = None
        dirs = bastion.dirs
        # children get no secrets from the environment: the admin user and the Cloudflare token exist by now
        self.env = environment.child_env(os.environ)
        self.stop_timeout = environment.stop_timeout()
        self.env.update(BASTION_DATA_DIR=str(dirs.root), BASTION_NGINX=bastion.nginx.binary)
        self.gate = Child(
            "authsvc",
            # one asyncio thread serving nginx's requests (decision 44): the gate never waits on I/O
            [sys.executable, "-m", "authsvc.server", str(dirs.gate_socket)],
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
        self.children = (self.nginx, self.gate, self.manager)
        self.quotas = quotas.Publisher(bastion)

    def settings(self) -> dict[str, Any]:
        """The store's settings; while the store is unreadable, the last good ones (or the live generation's)."""
        try:
            self._settings = self.bastion.settings()
        except (StoreCorrupt, OSError):
            if self._settings is None:
                self._settings = settings_mod.effective(generations.live_settings(self.bastion.dirs))
        return self._settings

    def _nginx_ready(self) -> bool:
        try:
            return requests.get(healthz_url(self.settings()["public_listen"]), timeout=1).ok
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
            self.watch()
            return 0
        finally:
            self.shutdown()

    def start(self) -> None:
        dirs, bastion = self.bastion.dirs, self.bastion
        capacity.raise_soft_limit()  # nginx, the gate and the manager inherit it: every stream is open files
        self.echo("applying nginx configuration...")
        try:
            recover(bastion)  # an apply killed mid-way: keep its generation if nginx takes it, else go back
            result = bastion.apply("up")
            self.echo(f"  generation {result.generation}")
        except Exception as e:  # a corrupt store, a full disk, a config nginx now refuses...
            live = generations.live(dirs)
            if not live:
                raise StartupError(str(e)) from None
            log.error("%s; serving the last good configuration (generation %d) until it is fixed", e, live)
        for child in (self.gate, self.manager):
            self.echo(f"starting {child.name}...")
            child.start(self.env)
            child.wait_ready()
            self._on_ready(child)
        self.echo("starting nginx...")
        self.nginx.start(self.env)
        self.nginx.wait_ready()
        settings = self.settings()
        self.echo(f"Bastion is up (data dir {dirs.root})")
        self.echo(f"  OpenAI base URL: http://{settings['public_listen']}/v1")
        self.echo(f"  Ollama base URL: http://{settings['public_listen']}")
        self.echo(f"  admin:           http://{settings['admin_listen']}/")
        cli = shutil.which("bastion") or str(Path(sys.executable).with_name("bastion"))
        data = "" if dirs.root == Path.cwd() / "data" else f" --data-dir {dirs.root}"
        self.echo(f"Add a pool and a key:  {cli}{data} pools add NAME --url http://HOST:PORT")
        self.echo(f"                       {cli}{data} keys create NAME      (Ctrl-C stops the stack)")

    def watch(self) -> None:
        """Tend the children until asked to stop; nothing raised in here ends the supervisor."""
        for job in self._jobs():
            job.start()
        while not self.stopping.wait(TICK):
            for child in self.children:
                try:
                    self._tend(child)
                except Exception:  # e.g. fork failing under memory pressure: try again next tick
                    log.exception("could not look after %s; trying again", child.name)
        self.echo("stopping...")

    def _jobs(self) -> list[Periodic]:
        def health_interval() -> float:
            return self.settings()["health_interval"]

        return [
            Periodic("usage ingestion", lambda: 1.0, self._ingest, self.stopping),
            Periodic("model discovery and DNS", lambda: self.settings()["discovery_interval"], self._refresh,
                     self.stopping),
            Periodic("health checks", health_interval, lambda: health.check(self.bastion), self.stopping),
            # the Ollama upstreams' running models, for the gate's /api/ps (polled even with health checks off)
            Periodic("running models", lambda: health_interval() or 10.0, lambda: running.poll(self.bastion),
                     self.stopping),
            Periodic("log upkeep", lambda: 1.0, self._log_upkeep, self.stopping),
            Periodic("snapshot repair", lambda: 2.0, self._repair_snapshot, self.stopping),
            # looks every minute, renews at most twice a day (manage.RENEWAL_CHECK_EVERY), failures recorded
            Periodic("certificate renewal", lambda: 60.0, lambda: cert_manage.scheduled_renewal(self.bastion),
                     self.stopping),
        ]

    def _ingest(self) -> None:
        """Read the access log into the usage store, then hand the gate its quota figures."""
        self.bastion.usage.ingest()
        self.quotas.run()

    def _log_upkeep(self) -> None:
        """Rotate nginx's logs (without losing a usage line) and the children's own logs; prune usage rows."""
        settings = self.settings()
        self.bastion.usage.maintain(settings, self.bastion.nginx.master_pid())
        if settings["log_max_mb"]:
            for child in self.children:
                child.rotate_log(settings["log_max_mb"] << 20)

    def _repair_snapshot(self) -> None:
        """A snapshot.json the gate cannot read (edited by hand, damaged) is published again from the store; a
        gate restarted meanwhile would otherwise serve no pool at all."""
        if any(p.startswith(snapshot.SNAPSHOT_UNREADABLE) for p in snapshot.gate_problems(self.bastion)):
            self.bastion.publish_snapshot()
            log.warning("the gate could not read snapshot.json: published it again from the store")

    def _tend(self, child: Child) -> None:
        """One look at a child: restart it when its back-off is over, notice when it died or became ready."""
        now = time.monotonic()
        if child.restart_at is not None:
            if now >= child.restart_at:
                log.info("restarting %s", child.name)
                child.start(self.env)
        elif child.exited():
            delay = child.schedule_restart(now)
            log.warning("%s exited with status %s; restarting in %.1f s. Last output:\n%s",
                        child.name, child.proc.returncode, delay, child.tail())
        elif not child.is_ready:
            if child.ready():
                child.is_ready = True
                self._on_ready(child)
                log.info("%s is ready", child.name)
            elif now - child.started > START_TIMEOUT:
                log.error("%s did not become ready within %.0f s; killing it", child.name, START_TIMEOUT)
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(child.proc.pid, signal.SIGKILL)

    def _on_ready(self, child: Child) -> None:
        owner = self.bastion.dirs.root.stat()
        if child.socket and os.geteuid() == 0 and owner.st_uid != 0:
            # nginx workers run as the data dir's owner (see render_input.worker_user): let them connect
            os.chown(child.socket, owner.st_uid, owner.st_gid)

    def _refresh(self) -> None:
        """Ask upstreams for their models; re-apply when an upstream host did not resolve at the last apply,
        so it comes into service once DNS answers (other DNS changes are taken at the next apply)."""
        pools.refresh_discovered(self.bastion)
        conf = self.bastion.dirs.nginx_conf
        if not conf.exists() or "did not resolve" not in conf.read_text():
            return
        result = self.bastion.apply("supervisor")
        if result.changed:
            self.bastion.audit.record("supervisor", f"re-resolved upstream hosts (generation {result.generation})")

    def shutdown(self) -> None:
        self.stopping.set()
        self.nginx.stop(signal.SIGQUIT, self.stop_timeout)  # graceful: in-flight streams finish, within the budget
        for child in (self.manager, self.gate):
            child.stop()
        with contextlib.suppress(Exception):  # a last read of the log must not block shutdown
            self.bastion.usage.ingest()
