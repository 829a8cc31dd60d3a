"""Every path Bastion writes, all under one data dir, and the first-start initialisation of that dir."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from authsvc.snapshot import KEYS_DB
from manager.store import StoreCorrupt, create_secret

DEFAULT_DATA_DIR = "./data"


@dataclass(frozen=True)
class DataDir:
    root: Path

    @classmethod
    def at(cls, path: str | os.PathLike[str]) -> DataDir:
        return cls(Path(path).resolve())

    @property
    def store(self) -> Path:
        return self.root / "store.json"

    @property
    def pepper(self) -> Path:
        return self.root / "pepper"

    @property
    def jwt_secret(self) -> Path:
        return self.root / "jwt_secret"

    @property
    def keys_db(self) -> Path:
        return self.root / KEYS_DB

    @property
    def snapshot(self) -> Path:
        return self.root / "snapshot.json"

    @property
    def usage_db(self) -> Path:
        return self.root / "usage.sqlite3"

    @property
    def nginx(self) -> Path:
        return self.root / "nginx"

    @property
    def generations(self) -> Path:
        return self.nginx / "generations"

    @property
    def live(self) -> Path:
        """Symlink to the live generation; nginx runs with `-c live/nginx.conf`."""
        return self.nginx / "live"

    @property
    def nginx_conf(self) -> Path:
        return self.live / "nginx.conf"

    @property
    def nginx_pid(self) -> Path:
        return self.nginx / "nginx.pid"

    @property
    def nginx_temp(self) -> Path:
        return self.nginx / "temp"

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    @property
    def access_log(self) -> Path:
        return self.logs / "access.log"

    @property
    def error_log(self) -> Path:
        return self.logs / "error.log"

    @property
    def run(self) -> Path:
        return self.root / "run"

    @property
    def gate_socket(self) -> Path:
        return self.run / "authsvc.sock"

    @property
    def manager_socket(self) -> Path:
        return self.run / "manager.sock"

    @property
    def certbot(self) -> Path:
        """certbot's own dirs (its --config-dir holds the ACME account and the issued certificates)."""
        return self.root / "certbot"

    @property
    def certbot_config(self) -> Path:
        return self.certbot / "config"

    @property
    def certbot_work(self) -> Path:
        return self.certbot / "work"

    @property
    def certbot_logs(self) -> Path:
        return self.certbot / "logs"

    @property
    def acme_webroot(self) -> Path:
        """HTTP-01 answers: nginx serves `<this>/.well-known/acme-challenge/` on the HTTP listener."""
        return self.root / "acme-webroot"

    @property
    def certs(self) -> Path:
        return self.root / "certs"

    @property
    def uploaded_certs(self) -> Path:
        """One dir per uploaded certificate: fullchain.pem and privkey.pem (0600)."""
        return self.certs / "uploaded"

    @property
    def cert_state(self) -> Path:
        return self.certs / "state.json"

    @property
    def cloudflare_credentials(self) -> Path:
        """certbot-dns-cloudflare's credentials file (0600): the API token, written, never read back."""
        return self.certs / "cloudflare.ini"

    def ensure(self) -> None:
        """Create the directory tree, the key pepper and the JWT secret (idempotent).

        Directories are 0711: nginx workers (an unprivileged user when started as root) must traverse to the
        sockets, but listing is denied; every file holding a secret is 0600.
        """
        for d in (self.root, self.nginx, self.generations, self.nginx_temp, self.logs, self.run):
            d.mkdir(parents=True, exist_ok=True)
            os.chmod(d, 0o711)
        if not self.pepper.exists() and self.keys_db.exists():
            # a new pepper would silently turn every existing key into a wrong one
            raise StoreCorrupt(f"{self.pepper} is missing but {self.keys_db} holds keys hashed with it; restore it "
                               "from a backup (or move the key database aside to start without keys)")
        create_secret(self.pepper)
        create_secret(self.jwt_secret)

    def read_pepper(self) -> bytes:
        return self.pepper.read_bytes().strip()
