"""Usage analytics: nginx's JSON access log, ingested into SQLite, and the questions asked of it.

nginx writes the log (Python is never in the request path); `ingest()` reads from the saved offset to the
last complete line and stores the offset in the same transaction as the rows, so each line is counted once
even when the supervisor and a CLI command ingest at the same time, and a transaction that fails (a full disk)
is read again at the next run.

Files are followed by inode, each with its own offset: after a rotation (`access.log` renamed to
`access.log.1`, nginx told to reopen) the rest of the old file, including lines nginx wrote to it before it
reopened, is read before and alongside the new one. A file shorter than its offset was truncated in place and is
read from its start.

nginx cannot unwrite half a record: when a write is cut short (a full disk) the next record is glued to the torn
one on the same line. Every record starts with `{"time":` and `escape=json` writes `"` inside values as `\\"`,
so that text occurs only where a record starts: such a line is split there, the torn part skipped and logged.

`maintain()` is the supervisor's periodic upkeep: size-based rotation of nginx's logs and the retention of raw
usage rows, deleted in small batches so ingestion and readers never wait long for the database.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sqlite3
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

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
CREATE TABLE IF NOT EXISTS ingest_files (
    inode INTEGER PRIMARY KEY,
    offset INTEGER NOT NULL
);
"""
COLUMNS = ("request_id", "start", "end", "key", "model", "pool", "upstream", "status", "upstream_status",
           "bytes_sent", "request_length", "ttfb", "duration", "method", "uri", "remote_addr")
INSERT = f"INSERT INTO requests ({', '.join(COLUMNS)}) VALUES ({', '.join('?' * len(COLUMNS))})"
BATCH_BYTES = 8 << 20
RECORD_START = '{"time":'  # how nginx's `bastion` log_format begins every record (nginx_templates/nginx.conf.j2)
# nginx's other logs in the same directory, rotated by size like access.log (nothing ingests them)
OTHER_NGINX_LOGS = ("admin-access.log", "error.log")
PRUNE_BATCH = 5000  # rows per DELETE: a few ms of write lock each
PRUNE_PAUSE = 0.01  # seconds between batches, so ingestion and other writers get the lock
PRUNE_INTERVAL = 300.0  # seconds between retention runs of maintain()

_decode = json.JSONDecoder().raw_decode


def _last(value: str) -> str:
    """nginx lists every upstream tried ("a, b" for retries, "a : b" across an internal redirect)."""
    return value.replace(" : ", ", ").rsplit(", ", 1)[-1].strip() if value else ""


def _seconds(value: str) -> float | None:
    try:
        return float(_last(value))
    except ValueError:
        return None  # "-": no upstream answered


def _row(line: str) -> tuple[Any, ...] | None:
    """One log line as a `requests` row (values in COLUMNS order), or None unless it is exactly one record."""
    try:
        entry, end = _decode(line)
        if end != len(line):
            return None
        get = entry.get
        time_ = float(entry["time"])
        duration = float(entry["request_time"])
        proxied = bool(get("pool"))
        upstream_status = _last(get("upstream_status", "")) if proxied else ""
        return (get("request_id"), time_ - duration, time_, get("key") or None, get("model") or None,
                get("pool") or None, _last(get("upstream", "")) if proxied else None, get("status"),
                int(upstream_status) if upstream_status.isdigit() else None, get("bytes_sent"),
                get("request_length"), _seconds(get("upstream_header_time", "")) if proxied else None, duration,
                get("method"), get("uri"), get("remote_addr"))
    except (ValueError, KeyError, TypeError, AttributeError):
        return None


def parse_line(line: str) -> dict[str, Any] | None:
    row = _row(line)
    return dict(zip(COLUMNS, row, strict=True)) if row else None


def parse_lines(text: str) -> tuple[list[tuple[Any, ...]], int]:
    """Rows of the complete lines in `text`, and how many torn or unreadable pieces were skipped."""
    rows, skipped = [], 0
    for line in text.split("\n"):  # not splitlines(): U+2028 and friends may appear raw in a value
        if row := _row(line):
            rows.append(row)
        elif line:
            head, *records = line.split(RECORD_START)
            skipped += bool(head)
            for record in records:
                if row := _row(RECORD_START + record):
                    rows.append(row)
                else:
                    skipped += 1
    return rows, skipped


def _insert(db: sqlite3.Connection, rows: list[tuple[Any, ...]]) -> int:
    """Insert rows; returns how many were refused. Only a line nginx did not write (edited by hand) can carry a
    value SQLite cannot store (an object, a huge number): that row is dropped instead of failing every run."""
    db.execute("SAVEPOINT batch")
    try:
        db.executemany(INSERT, rows)
        return 0
    except (sqlite3.ProgrammingError, OverflowError):
        db.execute("ROLLBACK TO batch")
        refused = 0
        for row in rows:
            try:
                db.execute(INSERT, row)
            except (sqlite3.ProgrammingError, OverflowError):
                refused += 1
        return refused
    finally:
        db.execute("RELEASE batch")


@contextmanager
def _transaction(db: sqlite3.Connection) -> Iterator[None]:
    db.execute("BEGIN IMMEDIATE")
    try:
        yield
        db.execute("COMMIT")
    except BaseException:
        if db.in_transaction:  # SQLite may have rolled back already (a full disk)
            db.execute("ROLLBACK")
        raise


def _stat(path: Path) -> os.stat_result | None:
    try:
        return path.stat()
    except FileNotFoundError:
        return None


class Usage:
    def __init__(self, db_path: Path, log_path: Path):
        self.db_path = db_path
        self.log_path = log_path
        self.rotated_path = log_path.with_name(log_path.name + ".1")
        self.skipped = 0  # torn or unreadable lines this instance has stepped over
        self._next_prune = 0.0
        with self._connect() as db:
            db.executescript(SCHEMA)
            self._migrate(db)

    @staticmethod
    def _migrate(db: sqlite3.Connection) -> None:
        """Databases from before per-file offsets keep one (inode, offset) row in `ingest_state`."""
        old = "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'ingest_state'"
        if not db.execute(old).fetchone():
            return
        with _transaction(db):
            if db.execute(old).fetchone():
                db.execute("INSERT OR IGNORE INTO ingest_files (inode, offset) SELECT inode, offset FROM ingest_state")
                db.execute("DROP TABLE ingest_state")

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
        """Read new complete lines of the access log, the rotated one first, into the store; returns how many
        rows were added."""
        added = 0
        with self._connect() as db:
            for path in (self.rotated_path, self.log_path):
                more = True
                while more:
                    with _transaction(db):
                        n, skipped, more = self._ingest_batch(db, path)
                    added += n
                    if skipped:  # logged once committed: a failed batch is read (and counted) again
                        self.skipped += skipped
                        log.warning("%s: skipped %d torn or unreadable line(s)", path, skipped)
            with _transaction(db):
                self._forget_gone_files(db)
        return added

    def _ingest_batch(self, db: sqlite3.Connection, path: Path) -> tuple[int, int, bool]:
        try:
            f = path.open("rb")
        except FileNotFoundError:
            return 0, 0, False
        with f:
            st = os.fstat(f.fileno())
            known = db.execute("SELECT offset FROM ingest_files WHERE inode = ?", (st.st_ino,)).fetchone()
            if known is None and path == self.rotated_path:
                return 0, 0, False  # not a file we followed: read before it was moved there, or moved by hand
            offset = known[0] if known and known[0] <= st.st_size else 0
            if known and offset == st.st_size:
                return 0, 0, False  # (a new file gets its row at once, even empty: it may be renamed any time)
            f.seek(offset)
            chunk = f.read(BATCH_BYTES)
        end = chunk.rfind(b"\n") + 1
        rows, skipped = parse_lines(chunk[:end].decode(errors="replace"))
        refused = _insert(db, rows)
        db.execute("INSERT OR REPLACE INTO ingest_files (inode, offset) VALUES (?, ?)", (st.st_ino, offset + end))
        return len(rows) - refused, skipped + refused, len(chunk) == BATCH_BYTES and end > 0

    def _forget_gone_files(self, db: sqlite3.Connection) -> None:
        """Offsets are kept for the log and its rotated copy only: a deleted file's inode number is reused."""
        live = [st.st_ino for path in (self.rotated_path, self.log_path) if (st := _stat(path))]
        db.execute(f"DELETE FROM ingest_files WHERE inode NOT IN ({', '.join('?' * len(live))})", live)

    def maintain(self, settings: dict[str, Any], nginx_pid: int | None) -> None:
        """Periodic upkeep (the supervisor calls it every second): rotate nginx's logs by size, and every few
        minutes delete usage rows past their retention."""
        if settings["log_max_mb"] and nginx_pid:
            self.rotate(settings["log_max_mb"] << 20, nginx_pid)
        if time.monotonic() >= self._next_prune:
            self._next_prune = time.monotonic() + PRUNE_INTERVAL
            self.prune(settings["usage_retention_days"])

    def rotate(self, max_bytes: int, nginx_pid: int) -> list[Path]:
        """Rename each of nginx's logs larger than `max_bytes` to NAME.1 (replacing the previous one), then have
        nginx reopen its logs (SIGUSR1 to the master). Returns the logs rotated.

        access.log.1 is replaced only once it has been ingested to its end; until then access.log keeps growing,
        so no usage line is ever lost."""
        rotated = []
        for path in (self.log_path.with_name(name) for name in OTHER_NGINX_LOGS):
            if (st := _stat(path)) and st.st_size > max_bytes:
                os.replace(path, path.with_name(path.name + ".1"))
                rotated.append(path)
        if (st := _stat(self.log_path)) and st.st_size > max_bytes and self._release_rotated():
            os.replace(self.log_path, self.rotated_path)
            rotated.append(self.log_path)
        if rotated:
            log.info("rotated %s at %d bytes; nginx reopens its logs", ", ".join(p.name for p in rotated), max_bytes)
            try:
                os.kill(nginx_pid, signal.SIGUSR1)
            except OSError as e:  # nginx is gone: it opens new files when it starts again
                log.warning("could not signal nginx (pid %d) to reopen its logs: %s", nginx_pid, e)
        return rotated

    def _release_rotated(self) -> bool:
        """Make way for renaming access.log to access.log.1: True once the present access.log.1 has been read to
        its end (a torn record at its very end is given up). access.log's offset is recorded by inode
        beforehand, so the renamed file is followed from where ingestion stands."""
        try:
            return self._record_rotation()
        except sqlite3.Error as e:  # a full disk, say: rotate later (the other logs rotate and nginx reopens)
            log.warning("%s is rotated later: %s", self.log_path, e)
            return False

    def _record_rotation(self) -> bool:
        with self._connect() as db, _transaction(db):
            current, previous = _stat(self.log_path), _stat(self.rotated_path)
            if current is None:
                return False
            known = previous and db.execute("SELECT offset FROM ingest_files WHERE inode = ?",
                                            (previous.st_ino,)).fetchone()
            if previous and known:
                with self.rotated_path.open("rb") as f:
                    f.seek(known[0])
                    rest = f.read(BATCH_BYTES)
                if b"\n" in rest:
                    log.info("%s is not fully ingested yet: %s is rotated later", self.rotated_path, self.log_path)
                    return False
                if rest:
                    self.skipped += 1
                    log.warning("%s: skipped a torn line at its end", self.rotated_path)
                db.execute("DELETE FROM ingest_files WHERE inode = ?", (previous.st_ino,))
            db.execute("INSERT OR IGNORE INTO ingest_files (inode, offset) VALUES (?, 0)", (current.st_ino,))
        return True

    def prune(self, retention_days: int, now: float | None = None) -> int:
        """Delete rows of requests that started more than `retention_days` ago (0 keeps everything), a small
        batch per transaction so that nobody waits long for the database. Returns how many were deleted."""
        if not retention_days:
            return 0
        cutoff = (time.time() if now is None else now) - retention_days * 86400
        deleted = 0
        with self._connect() as db:
            while True:
                n = db.execute("DELETE FROM requests WHERE id IN (SELECT id FROM requests WHERE start < ? LIMIT ?)",
                               (cutoff, PRUNE_BATCH)).rowcount
                deleted += n
                if n < PRUNE_BATCH:
                    break
                time.sleep(PRUNE_PAUSE)
        if deleted:
            log.info("deleted %d usage rows older than %d days", deleted, retention_days)
        return deleted

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

    def last_used(self, keys: Iterable[str]) -> dict[str, float]:
        """When each key was last used: the end of its latest request, one probe of the (key, start) index per
        key, never a scan."""
        with self._connect() as db:
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
