"""Thin wrappers around the nginx binary and a running master: test, signal, inspect. Argv lists only."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
from pathlib import Path

from manager.datadir import DataDir


class NginxError(RuntimeError):
    """nginx refused something; `output` is nginx's own message."""

    def __init__(self, summary: str, output: str = ""):
        super().__init__(f"{summary}: {output.strip()}" if output.strip() else summary)
        self.summary = summary
        self.output = output.strip()


class Nginx:
    def __init__(self, dirs: DataDir, binary: str | None = None):
        self.dirs = dirs
        self.binary = binary or os.environ.get("BASTION_NGINX") or shutil.which("nginx") or "/usr/sbin/nginx"

    def base_argv(self, conf: Path) -> list[str]:
        return [self.binary, "-p", f"{self.dirs.nginx}/", "-c", str(conf)]

    def run_argv(self) -> list[str]:
        """Foreground master on the live generation (the supervisor owns the process)."""
        return [*self.base_argv(self.dirs.nginx_conf), "-g", "daemon off;"]

    def test(self, conf: Path) -> None:
        """Run `nginx -t` on `conf`. Raises NginxError carrying nginx's message when it fails."""
        if not Path(self.binary).exists():
            raise NginxError(f"nginx not found at {self.binary}; install it (apt-get install nginx)")
        proc = subprocess.run([*self.base_argv(conf), "-t", "-q"], capture_output=True, text=True, timeout=30)
        if proc.returncode != 0:
            raise NginxError("nginx -t rejected the configuration", proc.stderr or proc.stdout)

    def master_pid(self) -> int | None:
        """PID of the running master of this data dir, or None."""
        try:
            pid = int(self.dirs.nginx_pid.read_text().strip())
        except (OSError, ValueError):
            return None
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            return None
        # a stale pid file may name another process, even another nginx: require this data dir's prefix
        return pid if b"nginx" in cmdline and f"-p {self.dirs.nginx}/".encode() in cmdline else None

    @staticmethod
    def worker_pids(master: int) -> set[int]:
        pids = set()
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:  # processes come and go while we look (old workers exit during a reload)
                stat = (entry / "stat").read_text()
                # fields after the ")" that ends the command name: state, ppid, ...
                fields = stat[stat.rindex(")") + 2 :].split()
                if int(fields[1]) == master and "worker" in (entry / "cmdline").read_text(errors="replace"):
                    pids.add(int(entry.name))
            except (OSError, ValueError, IndexError):
                continue
        return pids

    @staticmethod
    def reload(master: int) -> None:
        os.kill(master, signal.SIGHUP)


def local_url(listen: str) -> str:
    """http://HOST:PORT of a listener as this machine reaches it (a wildcard address is reached on loopback)."""
    host, _, port = listen.rpartition(":")
    return f"http://{ {'0.0.0.0': '127.0.0.1', '[::]': '[::1]', '': '127.0.0.1'}.get(host, host)}:{port}"
