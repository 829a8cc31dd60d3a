"""What certbot does not keep about a certificate: where it came from, the last renewal attempt and its result,
the last deploy. One small JSON file under the data dir, changed under an exclusive lock (several manager
workers, the CLI and certbot's deploy hook may write it) and replaced atomically.
"""

from __future__ import annotations

import fcntl
import json
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from authsvc.files import write_atomic

Entry = dict[str, Any]


class State:
    def __init__(self, path: Path):
        self.path = path
        self.lock = path.with_suffix(".lock")

    def all(self) -> dict[str, Entry]:
        try:
            data = json.loads(self.path.read_text())
        except FileNotFoundError:
            return {}
        except ValueError:  # damaged by hand: the status still lists the certificates, without history
            return {}
        return data if isinstance(data, dict) else {}

    def get(self, name: str) -> Entry:
        entry = self.all().get(name)
        return entry if isinstance(entry, dict) else {}

    def update(self, name: str, change: Callable[[Entry], Entry | None]) -> None:
        """Replace the entry of `name` by `change(entry)` (None removes it)."""
        with self._locked():
            data = self.all()
            new = change(dict(data.get(name) or {}))
            if new is None:
                data.pop(name, None)
            else:
                data[name] = new
            write_atomic(self.path, json.dumps(data, indent=1, sort_keys=True).encode())

    def set(self, name: str, **values: Any) -> None:
        self.update(name, lambda entry: {**entry, **values})

    @contextmanager
    def _locked(self) -> Iterator[None]:
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(self.lock, os.O_CREAT | os.O_RDWR, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)
