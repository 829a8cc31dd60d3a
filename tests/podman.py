"""A private podman for the container smoke test (tests/test_container.py): its own containers.conf and
storage.conf written to a temporary dir (CONTAINERS_CONF, CONTAINERS_STORAGE_CONF), never the machine's
global configuration. Images live in a cache dir (default /var/tmp/bastion-container-test, env
BASTION_CONTAINER_CACHE) so the debootstrapped base image and the build's layers survive between runs.

Also runnable: `python -m tests.podman base` builds (or finds) the base image and prints its name.
"""

from __future__ import annotations

import os
import re
import resource
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

CACHE = Path(os.environ.get("BASTION_CONTAINER_CACHE", "/var/tmp/bastion-container-test"))
BASE_IMAGE = "localhost/bastion-base:bookworm"
SUITE = "bookworm"
DEFAULT_MIRROR = "http://deb.debian.org/debian"


def apt_mirror(sources: Path = Path("/etc/apt")) -> str:
    """The machine's configured Debian mirror (deb822 .sources or one-line .list files), for debootstrap."""
    lists = sources / "sources.list.d"
    files = [*sorted(lists.glob("*.sources")), sources / "sources.list", *sorted(lists.glob("*.list"))]
    for file in files:
        try:
            text = file.read_text()
        except OSError:
            continue
        for stanza in re.split(r"\n\s*\n", text):
            if re.search(r"^Enabled:\s*no", stanza, re.M | re.I):
                continue
            if not re.search(rf"^Suites:.*\b{SUITE}\b", stanza, re.M):
                continue
            for uri in re.findall(r"^URIs:\s*(.+)$", stanza, re.M):
                for u in uri.split():
                    if not u.rstrip("/").endswith("-security"):
                        return u
        for m in re.finditer(rf"^deb\s+(?:\[[^]]*\]\s+)?(\S+)\s+{SUITE}\s", text, re.M):
            if not m.group(1).rstrip("/").endswith("-security"):
                return m.group(1)
    return DEFAULT_MIRROR


class Podman:
    """`podman` with a private configuration; `run()` returns the CompletedProcess (check=True by default)."""

    def __init__(self, cache: Path = CACHE):
        self.cache = cache
        for d in ("storage", "run", "tmp"):
            (cache / d).mkdir(parents=True, exist_ok=True, mode=0o700)
        self.conf_dir = Path(tempfile.mkdtemp(prefix="bastion-podman-"))
        # podman's defaults (nofile 1M, nproc 4M for root) exceed this machine's hard limits (runc's prlimit got
        # EPERM here even for nproc 65535 under a hard limit of 96363; 32768 worked): stay well within them
        nofile, nproc = (min(cap if h == resource.RLIM_INFINITY else h, cap) for h, cap in (
            (resource.getrlimit(resource.RLIMIT_NOFILE)[1], 65536),
            (resource.getrlimit(resource.RLIMIT_NPROC)[1], 32768)))
        (self.conf_dir / "containers.conf").write_text(f"""\
[containers]
default_ulimits = ["nofile={nofile}:{nofile}", "nproc={nproc}:{nproc}"]
log_driver = "k8s-file"

[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"
events_logfile_path = "{self.conf_dir}/events.log"
tmp_dir = "{cache}/tmp"

[network]
network_config_dir = "{self.conf_dir}/networks"
""")
        (self.conf_dir / "storage.conf").write_text(f"""\
[storage]
driver = "overlay"
graphroot = "{cache}/storage"
runroot = "{cache}/run"
""")
        self.env = {**os.environ, "CONTAINERS_CONF": str(self.conf_dir / "containers.conf"),
                    "CONTAINERS_STORAGE_CONF": str(self.conf_dir / "storage.conf")}

    def run(self, *args: str, check: bool = True, timeout: float = 600, **kw) -> subprocess.CompletedProcess:
        kw.setdefault("capture_output", True)
        proc = subprocess.run(["podman", *args], env=self.env, timeout=timeout, **kw)
        if check and proc.returncode != 0:
            err = proc.stderr.decode(errors="replace") if isinstance(proc.stderr, bytes) else proc.stderr
            raise RuntimeError(f"podman {' '.join(args[:3])} failed ({proc.returncode}):\n{err}")
        return proc

    def out(self, *args: str, **kw) -> str:
        return self.run(*args, text=True, **kw).stdout.strip()

    def image_exists(self, name: str) -> bool:
        return self.run("image", "exists", name, check=False).returncode == 0

    def base_image(self, echo=print) -> str:
        """A plain Debian bookworm (no Python) from debootstrap and the machine's mirror, made once and kept."""
        if self.image_exists(BASE_IMAGE):
            return BASE_IMAGE
        mirror = apt_mirror()
        echo(f"building {BASE_IMAGE} with debootstrap from {mirror} (once; kept in {self.cache})")
        root = Path(tempfile.mkdtemp(prefix="bastion-rootfs-", dir=self.cache / "tmp"))
        try:
            subprocess.run(["debootstrap", "--variant=minbase", SUITE, str(root), mirror], check=True,
                           capture_output=True, timeout=900)
            for leftover in ("var/cache/apt/archives", "var/lib/apt/lists"):
                for f in (root / leftover).glob("*"):
                    if f.is_file():
                        f.unlink()
            tar = subprocess.Popen(["tar", "-C", str(root), "-c", "."], stdout=subprocess.PIPE)
            self.run("import", "-", BASE_IMAGE, stdin=tar.stdout)
            tar.wait()
        finally:
            shutil.rmtree(root, ignore_errors=True)
        return BASE_IMAGE

    def close(self) -> None:
        shutil.rmtree(self.conf_dir, ignore_errors=True)


def host_ca_bundle() -> Path | None:
    """The host's CA bundle (a TLS-intercepting proxy's CA may be in it): handed to the build as a secret."""
    candidates = (os.environ.get("PIP_CERT"), os.environ.get("SSL_CERT_FILE"), "/etc/ssl/certs/ca-certificates.crt")
    for candidate in candidates:
        if candidate and Path(candidate).is_file():
            return Path(candidate)
    return None


if __name__ == "__main__":
    if sys.argv[1:] == ["base"]:
        p = Podman()
        try:
            print(p.base_image())
        finally:
            p.close()
    else:
        sys.exit("usage: python -m tests.podman base")
