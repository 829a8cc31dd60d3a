"""Configuration state (keys, pools, routes, settings) in TinyDB under the data dir.

Every write is atomic (temp file, fsync, rename) and every change runs inside `Store.transaction()`, which
holds an exclusive `flock` so the manager, the supervisor and CLI commands never interleave their
read-modify-write cycles. A file that is not valid JSON is reported as `StoreCorrupt` naming the file; it is
never overwritten.
"""

from __future__ import annotations

import fcntl
import json
import os
import secrets
import threading
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from tinydb import TinyDB
from tinydb.storages import Storage
from tinydb.table import Document

from authsvc.files import write_atomic

VERSION_TABLE = "store_version"


class StoreCorrupt(RuntimeError):
    """The store file exists but cannot be read; nothing was written."""


class StoreNewer(StoreCorrupt):
    """The store was written by a newer version of Bastion; nothing was written."""


def create_secret(path: Path) -> None:
    """Create a random 0600 secret file unless one exists. Written aside and hard-linked into place, so two
    processes starting at once agree on one secret and nobody ever reads a half-written file."""
    if path.exists():
        return
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.new")
    write_atomic(tmp, secrets.token_hex(32).encode())
    try:
        os.link(tmp, path)  # fails if another process won the race: keep theirs
    except FileExistsError:
        pass
    finally:
        tmp.unlink(missing_ok=True)


class AtomicJSONStorage(Storage):
    """TinyDB storage that reads the whole file and writes it back atomically with mode 0600."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def read(self) -> dict[str, Any] | None:
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            return None
        if not raw.strip():
            raise StoreCorrupt(f"{self.path} is empty; restore it from a backup or move it aside to start afresh")
        try:
            data = json.loads(raw)
        except ValueError as e:
            raise StoreCorrupt(
                f"{self.path} is not valid JSON ({e}); restore it from a backup or move it aside to start afresh"
            ) from e
        if not isinstance(data, dict):
            raise StoreCorrupt(f"{self.path} does not hold a JSON object")
        return data

    def write(self, data: dict[str, Any]) -> None:
        write_atomic(self.path, json.dumps(data, indent=1, sort_keys=True).encode())


class Store:
    """The TinyDB database plus the cross-process lock that guards writes to it."""

    def __init__(self, path: Path):
        self.path = path
        self._lock_path = path.with_name(path.name + ".lock")
        self._local = threading.local()
        self._thread_lock = threading.RLock()
        self.db = TinyDB(path, storage=AtomicJSONStorage)

    def check(self) -> None:
        """Read the file once; raises StoreCorrupt naming it. The CLI calls this first, so a bad file is reported
        before anything is done; long-running processes do not, so they keep serving and report it per call."""
        self.db.storage.read()

    @contextmanager
    def transaction(self) -> Iterator[TinyDB]:
        """Hold the exclusive lock for a read-modify-write; re-entrant within one thread."""
        with self._thread_lock:
            depth = getattr(self._local, "depth", 0)
            if depth == 0:
                fd = os.open(self._lock_path, os.O_RDWR | os.O_CREAT, 0o600)
                fcntl.flock(fd, fcntl.LOCK_EX)
                self._local.fd = fd
                # TinyDB's Table objects cache the next document id; another process may have inserted
                # since, so start each transaction with fresh ones.
                self.db._tables.clear()
            self._local.depth = depth + 1
            try:
                yield self.db
            finally:
                self._local.depth -= 1
                if self._local.depth == 0:
                    fcntl.flock(self._local.fd, fcntl.LOCK_UN)
                    os.close(self._local.fd)

    def dump(self) -> dict[str, Any] | None:
        return self.db.storage.read()

    def restore(self, data: dict[str, Any] | None) -> None:
        """Put back what `dump()` returned (used to undo a change nginx refused)."""
        if data is None:
            self.path.unlink(missing_ok=True)
        else:
            self.db.storage.write(data)
        self.db._tables.clear()

    def table(self, name: str):
        # No query cache: another process may have changed the file since the last search.
        return self.db.table(name, cache_size=0)

    # The resource modules (pools, users, CIDR groups...) find and change documents through these, by field
    # values, never with TinyDB's queries or document ids: how a document is found is this module's business.
    # A match is field=value pairs, all of which must hold; a set as the value matches any of its members.
    # Writes belong inside `transaction()` (Bastion.change() holds it).

    def all(self, table: str) -> list[dict[str, Any]]:
        return [dict(doc) for doc in self.table(table).all()]

    def find(self, table: str, **match: Any) -> dict[str, Any] | None:
        found = self.table(table).get(_matching(match))
        return dict(found) if found is not None else None

    def count(self, table: str, **match: Any) -> int:
        return self.table(table).count(_matching(match))

    def insert(self, table: str, doc: dict[str, Any]) -> None:
        self.table(table).insert(doc)

    def update(self, table: str, changes: dict[str, Any] | Callable[[dict[str, Any]], None], **match: Any) -> int:
        """Set `changes` (or apply the function) on every matching document; returns how many matched."""
        return len(self.table(table).update(changes, _matching(match)))

    def upsert(self, table: str, doc: dict[str, Any], **match: Any) -> None:
        self.table(table).upsert(doc, _matching(match))

    def remove(self, table: str, **match: Any) -> int:
        return len(self.table(table).remove(_matching(match)))

    def tables(self) -> set[str]:
        return self.db.tables()

    def drop(self, table: str) -> None:
        self.db.drop_table(table)

    def replace_all(self, table: str, docs: list[dict[str, Any]]) -> None:
        """The table's documents become `docs`, in this order (a rollback to a kept generation)."""
        self.table(table).truncate()
        self.table(table).insert_multiple(docs)

    def version(self) -> int:
        """The layout version of the file (manager/context.py STORE_VERSION); 0 before versions were kept."""
        doc = self.table(VERSION_TABLE).get(doc_id=1)
        return int((doc or {}).get("version", 0))

    def set_version(self, version: int) -> None:
        with self.transaction():
            self.table(VERSION_TABLE).upsert(Document({"version": version}, doc_id=1))

    def get_setting(self, key: str, default: Any = None) -> Any:
        doc = self.table("settings").get(doc_id=1)
        return (doc or {}).get(key, default)

    def settings(self) -> dict[str, Any]:
        return dict(self.table("settings").get(doc_id=1) or {})

    def update_settings(self, **values: Any) -> None:
        with self.transaction():
            table = self.table("settings")
            if table.get(doc_id=1) is None:
                table.insert(values)
            else:
                table.update(values, doc_ids=[1])


def _matching(match: dict[str, Any]) -> Callable[[Mapping[str, Any]], bool]:
    if not match:
        raise ValueError("a store lookup needs at least one field to match")
    pairs = tuple(match.items())
    return lambda doc: all(doc.get(k) in x if isinstance(x, set | frozenset) else doc.get(k) == x for k, x in pairs)
