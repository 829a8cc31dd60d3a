"""The certbot command lines Bastion runs, and running them.

Every run is an argv list (never a shell) of the certbot installed with Bastion (beside its Python), with its
config, work and logs dirs under the data dir and `REQUESTS_CA_BUNDLE` set from `acme_ca_bundle`. Runs are
serialised by a lock under the data dir (certbot would refuse a second instance with a less useful message).
The one string certbot itself hands to a shell is the deploy hook; it is built with `shlex.join`, so a data dir
path with any character in it stays one argument.
"""

from __future__ import annotations

import fcntl
import logging
import os
import shlex
import shutil
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path

from manager.datadir import DataDir
from manager.errors import Conflict

log = logging.getLogger(__name__)

DEADLINE = 240.0  # the admin listener waits 300 s for the answer to an obtain
MAX_MESSAGE = 2000
NOISE = ("Saving debug log to", "Ask for help or search for solutions", "See the logfile",
         "Some challenges have failed", "- - - -", "Need help?", "If you like Certbot", "Donating to",
         "* Donating", "* Donate", "NEXT STEPS:", "- The certificate will need to be renewed",
         "These files will be updated when")
PROGRESS_ONLY = ("Account registered", "Requesting a certificate for", "Renewing an existing certificate for",
                 "Processing ")  # steps worth showing while certbot runs, not in the explanation of a failure


class CertbotFailed(Exception):
    """certbot ran and failed (or could not run); `str(error)` is its own explanation, trimmed."""


@dataclass(frozen=True)
class Account:
    """What every request to the ACME server needs, from the settings."""

    server: str
    email: str | None
    ca_bundle: str | None
    key_type: str


class Certbot:
    def __init__(self, dirs: DataDir):
        self.dirs = dirs

    def certonly(self, account: Account, name: str, domains: list[str], challenge_args: list[str]) -> list[str]:
        contact = ["--email", account.email] if account.email else ["--register-unsafely-without-email"]
        return [*self._command("certonly"), "--agree-tos", *contact, "--server", account.server,
                "--key-type", account.key_type, "--cert-name", name, f"--domains={','.join(domains)}",
                *challenge_args]

    def webroot_args(self) -> list[str]:
        return ["--authenticator", "webroot", "--webroot-path", str(self.dirs.acme_webroot)]

    def cloudflare_args(self, propagation_seconds: int) -> list[str]:
        return ["--authenticator", "dns-cloudflare",
                "--dns-cloudflare-credentials", str(self.dirs.cloudflare_credentials),
                "--dns-cloudflare-propagation-seconds", str(propagation_seconds)]

    def renew(self, name: str, force: bool) -> list[str]:
        hook = shlex.join([sys.executable, "-m", "manager.cli", "--data-dir", str(self.dirs.root), "certs", "deployed"])
        return [*self._command("renew"), "--cert-name", name, "--no-random-sleep-on-renew", "--deploy-hook", hook,
                *(["--force-renewal"] if force else [])]

    def delete(self, name: str) -> list[str]:
        return [*self._command("delete"), "--cert-name", name]

    def _command(self, verb: str) -> list[str]:
        return [certbot_binary(), verb, "--non-interactive",
                "--config-dir", str(self.dirs.certbot_config), "--work-dir", str(self.dirs.certbot_work),
                "--logs-dir", str(self.dirs.certbot_logs), "--max-log-backups", "20"]

    def lineages(self) -> list[str]:
        """Names of the certificates certbot keeps."""
        live = self.dirs.certbot_config / "live"
        return sorted(p.name for p in live.iterdir() if p.is_dir()) if live.is_dir() else []

    @contextmanager
    def lock(self) -> Iterator[None]:
        """One certbot run at a time in this data dir; a second one is refused at once (409)."""
        self.dirs.certbot.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(self.dirs.certbot / "bastion.lock", os.O_CREAT | os.O_RDWR, 0o600)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise Conflict("certificates", "another certificate operation is running; try again when it "
                                               "has finished") from None
            yield
        finally:
            os.close(fd)

    def run(self, argv: list[str], ca_bundle: str | None, on_line: Callable[[str], None] = lambda _: None,
            secret: str | None = None, deadline: float = DEADLINE) -> str:
        """Run certbot; each line it prints goes to `on_line`. Returns its output; raises CertbotFailed."""
        env = dict(os.environ)
        if ca_bundle:
            env["REQUESTS_CA_BUNDLE"] = ca_bundle
        log.info("running certbot %s", argv[1])
        try:
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                    text=True, errors="replace", env=env, start_new_session=True)
        except OSError as e:
            raise CertbotFailed(f"certbot could not be started: {e}") from None
        timer = threading.Timer(deadline, lambda: _kill(proc))
        timer.start()
        lines: list[str] = []
        try:
            assert proc.stdout is not None
            for raw in proc.stdout:
                line = _redact(raw.rstrip(), secret)
                lines.append(line)
                if line.strip() and not _noise(line):
                    on_line(line.strip())
            proc.wait()
        finally:
            timer.cancel()
        output = "\n".join(lines)
        if proc.returncode != 0:
            if proc.returncode == -signal.SIGKILL:
                raise CertbotFailed(f"certbot did not finish within {deadline:g} s and was stopped")
            raise CertbotFailed(explain(output, self.dirs))
        return output


def certbot_binary() -> str:
    """The certbot script installed with Bastion's Python (the package has no `python -m certbot`)."""
    beside = Path(sys.executable).with_name("certbot")
    return str(beside) if beside.exists() else shutil.which("certbot") or "certbot"


def explain(output: str, dirs: DataDir) -> str:
    """certbot's explanation of a failure, without its advertising and pointers to logs."""
    kept = [line.strip() for line in output.splitlines()
            if line.strip() and not _noise(line) and not line.strip().startswith(PROGRESS_ONLY)]
    text = "\n".join(kept)
    if len(text) > MAX_MESSAGE:
        text = "..." + text[-MAX_MESSAGE:]
    return text or f"certbot failed; see {dirs.certbot_logs / 'letsencrypt.log'}"


def _noise(line: str) -> bool:
    return line.strip().startswith(NOISE)


def _redact(line: str, secret: str | None) -> str:
    return line.replace(secret, "[redacted]") if secret else line


def _kill(proc: subprocess.Popen) -> None:
    with suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
