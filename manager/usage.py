"""Usage analytics: nginx's JSON access log, ingested into SQLite, and the questions asked of it.

nginx writes the log (Python is never in the request path); `ingest()` reads from the saved offset to the
last complete line and stores the offset in the same transaction as the rows, so each line is counted once
even when the supervisor and a CLI command ingest at the same time. A rotated log (new inode, or shorter
than the offset) is read from its start.
"""

from __future__ import annotations

import json
import os
import sqlite3
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

SCHEMA = """
CREATE TABLE IF NOT EXISTS requests (
    id INTEGER PRIMARY KEY,
    request_id TEXT,
    start REAL NOT NULL,
    end REAL NOT NULL,
    key TEXT,
    model TEXT,
    pool TEXT,
    upstream TEXT,
    status INTEGER,
    upstream_status INTEGER,
    bytes_sent INTEGER,
    request_length INTEGER,
    ttfb REAL,
    duration REAL,
    method TEXT,
    uri TEXT,
    remote_addr TEXT
);
CREATE INDEX IF NOT EXISTS requests_key_start ON requests (key, start);
CREATE INDEX IF NOT EXISTS requests_start ON requests (start);
CREATE TABLE IF NOT EXISTS ingest_state (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    inode INTEGER NOT NULL,
    offset INTEGER NOT NULL
);
"""
COLUMNS = ("request_id", "start", "end", "key", "model", "pool", "upstream", "status", "upstream_status",
           "bytes_sent", "request_length", "ttfb", "duration", "method", "uri", "remote_addr")
BATCH_BYTES = 8 << 20


def _last(value: str) -> str:
    """nginx lists every upstream tried ("a, b" for retries, "a : b" across an internal redirect)."""
    return value.replace(" : ", ", ").rsplit(", ", 1)[-1].strip() if value else ""


def _seconds(value: str) -> float | None:
    try:
        return float(_last(value))
    except ValueError:
        return None  # "-": no upstream answered


def parse_line(line: str) -> dict[str, Any] | None:
    try:
        entry = json.loads(line)
        end = float(entry["time"])
        duration = float(entry["request_time"])
    except (ValueError, KeyError, TypeError):
        return None
    proxied = bool(entry.get("pool"))
    upstream_status = _last(entry.get("upstream_status", ""))
    return {
        "request_id": entry.get("request_id"),
        "start": end - duration,
        "end": end,
        "key": entry.get("key") or None,
        "model": entry.get("model") or None,
        "pool": entry.get("pool") or None,
        "upstream": _last(entry.get("upstream", "")) if proxied else None,
        "status": entry.get("status"),
        "upstream_status": int(upstream_status) if proxied and upstream_status.isdigit() else None,
        "bytes_sent": entry.get("bytes_sent"),
        "request_length": entry.get("request_length"),
        "ttfb": _seconds(entry.get("upstream_header_time", "")) if proxied else None,
        "duration": duration,
        "method": entry.get("method"),
        "uri": entry.get("uri"),
        "remote_addr": entry.get("remote_addr"),
    }


class Usage:
    def __init__(self, db_path: Path, log_path: Path):
        self.db_path = db_path
        self.log_path = log_path
        with self._connect() as db:
            db.executescript(SCHEMA)

    @contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        db = sqlite3.connect(self.db_path, timeout=30, isolation_level=None)
        db.row_factory = sqlite3.Row
        try:
            db.execute("PRAGMA journal_mode=WAL")
            yield db
        finally:
            db.close()

    def ingest(self) -> int:
        """Read new complete lines of the access log into the store; returns how many rows were added."""
        added = 0
        with self._connect() as db:
            while True:
                db.execute("BEGIN IMMEDIATE")
                try:
                    n, more = self._ingest_batch(db)
                    db.execute("COMMIT")
                except BaseException:
                    db.execute("ROLLBACK")
                    raise
                added += n
                if not more:
                    return added

    def _ingest_batch(self, db: sqlite3.Connection) -> tuple[int, bool]:
        try:
            f = self.log_path.open("rb")
        except FileNotFoundError:
            return 0, False
        with f:
            st = os.fstat(f.fileno())
            row = db.execute("SELECT inode, offset FROM ingest_state WHERE id = 1").fetchone()
            offset = row["offset"] if row and row["inode"] == st.st_ino and row["offset"] <= st.st_size else 0
            f.seek(offset)
            chunk = f.read(BATCH_BYTES)
        end = chunk.rfind(b"\n") + 1
        rows = [r for line in chunk[:end].decode(errors="replace").splitlines() if (r := parse_line(line))]
        db.executemany(
            f"INSERT INTO requests ({', '.join(COLUMNS)}) VALUES ({', '.join('?' * len(COLUMNS))})",
            [tuple(r[c] for c in COLUMNS) for r in rows],
        )
        db.execute("INSERT OR REPLACE INTO ingest_state (id, inode, offset) VALUES (1, ?, ?)",
                   (st.st_ino, offset + end))
        return len(rows), len(chunk) == BATCH_BYTES and end > 0

    def records(self, key: str | None = None, since: float | None = None, until: float | None = None,
                limit: int = 1000) -> list[dict[str, Any]]:
        where, args = self._filter(key, since, until)
        with self._connect() as db:
            rows = db.execute(f"SELECT * FROM requests {where} ORDER BY start DESC LIMIT ?", (*args, limit))
            return [dict(r) for r in rows]

    def summary(self, key: str | None = None, since: float | None = None,
                until: float | None = None) -> list[dict[str, Any]]:
        """Per key and model: requests, errors, bytes, mean time to first byte and duration."""
        where, args = self._filter(key, since, until)
        sql = f"""
            SELECT key, model, COUNT(*) AS requests,
                   SUM(CASE WHEN status >= 400 THEN 1 ELSE 0 END) AS errors,
                   SUM(bytes_sent) AS bytes_sent, AVG(ttfb) AS avg_ttfb, AVG(duration) AS avg_duration,
                   MAX(end) AS last_request
            FROM requests {where} GROUP BY key, model ORDER BY requests DESC"""
        with self._connect() as db:
            return [dict(r) for r in db.execute(sql, args)]

    def last_used(self, keys: Iterable[str] | None = None) -> dict[str, float]:
        """When each key was last used (every key when `keys` is None, a scan of all rows). For named keys:
        the end of each key's latest request, one probe of the (key, start) index per key, never a scan."""
        with self._connect() as db:
            if keys is None:
                rows = db.execute("SELECT key, MAX(end) AS last FROM requests WHERE key IS NOT NULL GROUP BY key")
                return {r["key"]: r["last"] for r in rows}
            found = {}
            for key in keys:
                row = db.execute("SELECT end FROM requests WHERE key = ? ORDER BY start DESC LIMIT 1",
                                 (key,)).fetchone()
                if row is not None:
                    found[key] = row["end"]
            return found

    @staticmethod
    def _filter(key: str | None, since: float | None, until: float | None) -> tuple[str, tuple[Any, ...]]:
        clauses, args = [], []
        for clause, value in (("key = ?", key), ("start >= ?", since), ("start < ?", until)):
            if value is not None:
                clauses.append(clause)
                args.append(value)
        return ("WHERE " + " AND ".join(clauses)) if clauses else "", tuple(args)
