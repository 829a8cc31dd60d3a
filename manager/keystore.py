"""API keys in SQLite (`keys.sqlite3` under the data dir, 0600, WAL): the only module that speaks SQL for keys.

Every write is one short transaction, O(log n) in the number of keys, that stamps the rows it writes with the
next value of a change counter (`meta.version`). Versions therefore grow in commit order, so the gate loads only
the rows above the last version it saw (`authsvc.snapshot.KeyFeed`, which reads columns by name). Revoked keys
stay, with `revoked_at` set, for the record and for usage history.

Keys used to live in store.json's "keys" table; `migrate_from` moves them here (idempotent, crash-safe).
"""

from __future__ import annotations

import json
import logging
import os
import sqlite3
import threading
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from authsvc.quotas import FIELDS as QUOTA_FIELDS  # the gate's list; NULL in the store: unlimited
from manager.store import Store, StoreCorrupt

log = logging.getLogger(__name__)

SCHEMA_VERSION = 3
LIST_FIELDS = ("models", "endpoints", "cidrs", "cidr_groups")
# traffic fields (schema 3): concurrent requests (NULL: unlimited), the model of a body without one, "auto"
TRAFFIC_FIELDS = ("max_parallel", "default_model", "allow_auto")
COLUMNS = ("id", "digest", "name", "enabled", "expires", "models", "endpoints", "rpm", "cidrs", "cidr_groups",
           "created_at", "created_by", "revoked_at", *QUOTA_FIELDS, *TRAFFIC_FIELDS)
# every file is created at schema 1 and brought up to date by MIGRATIONS, so new and old files end up alike
SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    schema INTEGER NOT NULL,
    version INTEGER NOT NULL
);
INSERT OR IGNORE INTO meta (id, schema, version) VALUES (1, 1, 0);
CREATE TABLE IF NOT EXISTS keys (
    id TEXT PRIMARY KEY,
    version INTEGER NOT NULL,
    digest TEXT NOT NULL,
    name TEXT NOT NULL,
    enabled INTEGER NOT NULL,
    expires REAL,
    models TEXT NOT NULL,
    endpoints TEXT NOT NULL,
    rpm INTEGER NOT NULL,
    cidrs TEXT NOT NULL,
    cidr_groups TEXT NOT NULL,
    created_at REAL NOT NULL,
    created_by TEXT NOT NULL,
    revoked_at REAL
);
CREATE INDEX IF NOT EXISTS keys_version ON keys (version);
"""
_HAS_QUOTA = " OR ".join(f"{f} IS NOT NULL" for f in QUOTA_FIELDS)
# schema version -> statements that bring a file of the previous version to it
MIGRATIONS: dict[int, list[str]] = {
    # quotas (NULL for existing keys: unlimited); the partial index finds the keys with one without a scan
    2: [*(f"ALTER TABLE keys ADD COLUMN {f} INTEGER" for f in QUOTA_FIELDS),
        f"CREATE INDEX keys_quotas ON keys (id) WHERE {_HAS_QUOTA}"],
    3: ["ALTER TABLE keys ADD COLUMN max_parallel INTEGER", "ALTER TABLE keys ADD COLUMN default_model TEXT",
        "ALTER TABLE keys ADD COLUMN allow_auto INTEGER NOT NULL DEFAULT 0",
        "CREATE INDEX keys_parallel ON keys (max_parallel) WHERE max_parallel IS NOT NULL"],
}
DEFAULTS: dict[str, Any] = {"enabled": True, "expires": None, "models": [], "endpoints": [], "rpm": 0, "cidrs": [],
                            "cidr_groups": [], "created_at": 0.0, "created_by": "unknown", "revoked_at": None,
                            **dict.fromkeys(QUOTA_FIELDS), "max_parallel": None, "default_model": None,
                            "allow_auto": False}


def to_row(record: dict[str, Any]) -> tuple[Any, ...]:
    """A key record as the values of COLUMNS (lists as JSON text)."""
    full = {**DEFAULTS, **record}
    return tuple(json.dumps(list(full[c])) if c in LIST_FIELDS else full[c] for c in COLUMNS)


def from_row(row: sqlite3.Row) -> dict[str, Any]:
    record = {c: row[c] for c in COLUMNS}
    for c in LIST_FIELDS:
        record[c] = json.loads(record[c])
    record["enabled"] = bool(record["enabled"])
    record["allow_auto"] = bool(record["allow_auto"])
    return record


class KeyStore:
    """One connection per thread (gunicorn threads, the supervisor's helpers); writers wait for each other."""

    def __init__(self, path: Path):
        self.path = path
        self._local = threading.local()
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)  # WAL and shm files take this file's mode
        os.close(fd)
        try:
            db = self._db()
            db.executescript(f"BEGIN IMMEDIATE; {SCHEMA}")
            try:
                self._upgrade(db)
            except BaseException:
                db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")
        except sqlite3.DatabaseError as e:
            raise StoreCorrupt(f"{path} is not a readable key database ({e}); restore it from a backup") from e

    def _db(self) -> sqlite3.Connection:
        db = getattr(self._local, "db", None)
        if db is None or self._local.pid != os.getpid():
            db = sqlite3.connect(self.path, timeout=30, isolation_level=None)
            db.row_factory = sqlite3.Row
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=FULL")  # a revocation survives a power cut
            self._local.db, self._local.pid = db, os.getpid()
        return db

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """One write transaction (taken at once, so the version counter cannot be read by two writers)."""
        db = self._db()
        db.execute("BEGIN IMMEDIATE")
        try:
            yield db
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")

    def _upgrade(self, db: sqlite3.Connection) -> None:
        schema = db.execute("SELECT schema FROM meta").fetchone()[0]
        if schema > SCHEMA_VERSION:
            raise StoreCorrupt(f"{self.path} has schema {schema}, newer than this Bastion knows ({SCHEMA_VERSION})")
        for target in range(schema + 1, SCHEMA_VERSION + 1):
            for statement in MIGRATIONS[target]:
                db.execute(statement)
            db.execute("UPDATE meta SET schema = ?", (target,))

    @staticmethod
    def _next_versions(db: sqlite3.Connection, count: int = 1) -> int:
        """Reserve `count` versions; returns the first."""
        version = db.execute("UPDATE meta SET version = version + ? RETURNING version", (count,)).fetchone()[0]
        return version - count + 1

    def insert(self, record: dict[str, Any]) -> None:
        with self._write() as db:
            self._insert(db, [record], "INSERT")

    def insert_missing(self, records: Iterable[dict[str, Any]]) -> int:
        """Insert many keys in one transaction, keeping any already stored; returns how many were new."""
        with self._write() as db:
            return self._insert(db, list(records), "INSERT OR IGNORE")

    def _insert(self, db: sqlite3.Connection, records: list[dict[str, Any]], verb: str) -> int:
        if not records:
            return 0
        first = self._next_versions(db, len(records))
        placeholders = ", ".join("?" * (len(COLUMNS) + 1))
        before = db.total_changes
        db.executemany(f"{verb} INTO keys (version, {', '.join(COLUMNS)}) VALUES ({placeholders})",
                       ((first + i, *to_row(r)) for i, r in enumerate(records)))
        return db.total_changes - before

    def get(self, key_id: str) -> dict[str, Any] | None:
        row = self._db().execute("SELECT * FROM keys WHERE id = ?", (key_id,)).fetchone()
        return from_row(row) if row else None

    def update(self, key_id: str, change: Callable[[dict[str, Any]], dict[str, Any]]) -> dict[str, Any] | None:
        """Apply `change(record) -> values to set` atomically; returns the record after, None if no such key.
        `change` may raise to abort; an empty result writes nothing."""
        with self._write() as db:
            row = db.execute("SELECT * FROM keys WHERE id = ?", (key_id,)).fetchone()
            if row is None:
                return None
            record = from_row(row)
            values = change(record)
            if not values:
                return record
            record.update(values)
            sets = ", ".join(f"{c} = ?" for c in COLUMNS[1:])
            db.execute(f"UPDATE keys SET version = ?, {sets} WHERE id = ?",
                       (self._next_versions(db), *to_row(record)[1:], key_id))
            return record

    def all(self, include_revoked: bool = False) -> list[dict[str, Any]]:
        where = "" if include_revoked else "WHERE revoked_at IS NULL"
        return [from_row(r) for r in self._db().execute(f"SELECT * FROM keys {where} ORDER BY created_at, id")]

    def using_group(self, name: str) -> list[str]:
        """Ids of the unrevoked keys that name the CIDR group (one scan in SQL; groups are rarely removed)."""
        rows = self._db().execute(
            "SELECT id FROM keys WHERE revoked_at IS NULL"
            " AND EXISTS (SELECT 1 FROM json_each(keys.cidr_groups) WHERE value = ?) ORDER BY created_at, id",
            (name,))
        return [r[0] for r in rows]

    def with_quotas(self) -> list[str]:
        """Ids of the unrevoked keys with any quota: a read of the partial index, O(keys with quotas)."""
        rows = self._db().execute(f"SELECT id FROM keys WHERE ({_HAS_QUOTA}) AND revoked_at IS NULL")
        return [r[0] for r in rows]

    def has_parallel_limit(self, limit: int) -> bool:
        """Whether an unrevoked key has this max_parallel (nginx then has its zone): one index lookup."""
        return self._db().execute("SELECT 1 FROM keys WHERE max_parallel = ? AND revoked_at IS NULL LIMIT 1",
                                  (limit,)).fetchone() is not None

    def count_editing(self) -> int:
        """Unrevoked keys with a default model or `allow_auto` (features that need njs; asked only without it)."""
        return self._db().execute("SELECT COUNT(*) FROM keys WHERE (default_model IS NOT NULL OR allow_auto)"
                                  " AND revoked_at IS NULL").fetchone()[0]

    def parallel_limits(self) -> list[int]:
        """The distinct `max_parallel` values of unrevoked keys: nginx has one connection zone per value."""
        rows = self._db().execute("SELECT DISTINCT max_parallel FROM keys WHERE max_parallel IS NOT NULL"
                                  " AND revoked_at IS NULL ORDER BY max_parallel")
        return [r[0] for r in rows]

    def count(self) -> int:
        return self._db().execute("SELECT COUNT(*) FROM keys").fetchone()[0]


def migrate_from(store: Store, keys: KeyStore) -> int:
    """Move store.json's "keys" table into `keys`: insert-or-ignore, then drop the table, both under the store
    lock. A crash in between leaves both copies; the next run inserts nothing new and drops the table."""
    with store.transaction():
        if "keys" not in store.tables():
            return 0
        moved = keys.insert_missing(store.all("keys"))
        store.drop("keys")
    log.info("moved %d keys from %s to %s", moved, store.path, keys.path)
    return moved
