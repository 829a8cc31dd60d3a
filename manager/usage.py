"""Usage analytics: nginx's usage log (manager/usage_log.py), ingested into SQLite, rolled up, and pruned.

nginx writes the log (Python is never in the request path); `ingest()` reads from the saved offset to the
last complete line and stores the offset in the same transaction as the records and their rollups, so each line
is counted once even when the supervisor and a CLI command ingest at the same time, and a transaction that
fails (a full disk) is read again at the next run. The manager is the only writer.

Files are followed by inode, each with its own offset: after a rotation (`access.log` renamed to
`access.log.1`, nginx told to reopen) the rest of the old file, including lines nginx wrote to it before it
reopened, is read before and alongside the new one. A file shorter than its offset was truncated in place and is
read from its start.

Records are kept in segments: a batch of them as one compressed Arrow table in a row of `segments`
(manager/usage_records.py, decision 43), so a line costs about a microsecond of CPU to ingest instead of a
SQLite row with its indexes (about ten). Small segments are merged (`_compact`); `segment_keys` says which
segments hold a key's records. Queries read the segments of their time range (or key) and filter in Arrow.

Rollups: each ingested batch is added to per-minute, per-hour and per-day rows by (key, model, pool), with
request, error, outcome, token and byte counts and cumulative histograms of duration and time to first byte
(Prometheus-style `le` buckets, so percentiles and /metrics come from the same rows). Summaries over long
ranges read rollups, never the raw records. One more row per (key, model, pool), span `TOTAL_SPAN`, holds the
all-time sums: never pruned, so /metrics reads monotonic counters from a few thousand rows, however many days of
rollups are kept (docs/decisions.md, decision 27).

`maintain()` is the supervisor's periodic upkeep: size-based rotation of nginx's logs and the retention of raw
records and rollups, deleted in small batches so ingestion and readers never wait long for the database.
"""

from __future__ import annotations

import logging
import os
import signal
import sqlite3
import time
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from manager import usage_records as ur
from manager.usage_records import ROLLUP_NAMES

log = logging.getLogger(__name__)

SPANS = {"minute": 60, "hour": 3600, "day": 86400}
TOTAL_SPAN = 0  # all-time rows (bucket 0): the counters of /metrics, never pruned
SCHEMA_VERSION = 5
ROLLUPS_SCHEMA = f"""
CREATE TABLE IF NOT EXISTS rollups (
    span INTEGER NOT NULL, bucket INTEGER NOT NULL, key TEXT NOT NULL, model TEXT NOT NULL, pool TEXT NOT NULL,
    {", ".join(f"{name} {'REAL' if name.endswith('_sum') else 'INTEGER'} NOT NULL DEFAULT 0" for name in ROLLUP_NAMES)},
    PRIMARY KEY (span, key, bucket, model, pool)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS rollups_span_bucket ON rollups (span, bucket);
"""
SCHEMA = f"""
-- records by the thousand as compressed Arrow tables (manager/usage_records.py): ids first_id..last_id
CREATE TABLE IF NOT EXISTS segments (
    id INTEGER PRIMARY KEY, first_id INTEGER NOT NULL, last_id INTEGER NOT NULL, min_start REAL NOT NULL,
    max_start REAL NOT NULL, rows INTEGER NOT NULL, data BLOB NOT NULL
);
-- which segments hold a key's records, and its latest end in each
CREATE TABLE IF NOT EXISTS segment_keys (
    key TEXT NOT NULL, segment INTEGER NOT NULL, last_end REAL NOT NULL, PRIMARY KEY (key, segment)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS segment_keys_segment ON segment_keys (segment);
CREATE TABLE IF NOT EXISTS ingest_files (
    inode INTEGER PRIMARY KEY,
    offset INTEGER NOT NULL
);
-- records of the table before segments (`requests`, schema 4 and earlier) whose ids in (next_id, last_id] are
-- still to be added to the rollups as backfill() moves them into segments
CREATE TABLE IF NOT EXISTS rollup_backfill (next_id INTEGER NOT NULL, last_id INTEGER NOT NULL);
{ROLLUPS_SCHEMA}"""
# the columns the `requests` table of schema 4 and earlier gained over time (older ones are added to move it)
LEGACY_COLUMNS = ("outcome TEXT", "prompt_tokens INTEGER", "completion_tokens INTEGER", "total_tokens INTEGER")
_ADD_ROWS = f"""INSERT INTO rollups (span, bucket, key, model, pool, {", ".join(ROLLUP_NAMES)})
SELECT ?1, {{bucket}}, key, model, pool, {", ".join(f"SUM({name})" for name in ROLLUP_NAMES)}
FROM temp.batch GROUP BY 2, 3, 4, 5
ON CONFLICT DO UPDATE SET {", ".join(f"{name} = {name} + excluded.{name}" for name in ROLLUP_NAMES)}"""
_ADD_BATCH = _ADD_ROWS.format(bucket="minute / ?1 * ?1")
_ADD_TOTAL = _ADD_ROWS.format(bucket="0")
BATCH_BYTES = 8 << 20
SEGMENT_ROWS = 20_000  # a segment smaller than this is merged with the other small ones...
COMPACT_AFTER = 16  # ...once there are this many
# nginx's other logs in the same directory, rotated by size like access.log (nothing ingests them)
OTHER_NGINX_LOGS = ("admin-access.log", "error.log")
PRUNE_BATCH = 5000  # rollup rows per DELETE: a few ms of write lock each
PRUNE_PAUSE = 0.01  # seconds between batches, so ingestion and other writers get the lock
PRUNE_INTERVAL = 300.0  # seconds between retention runs of maintain()
BACKFILL_BATCH = 20_000  # records of the earlier table moved per transaction by backfill(): about 0.1 s of lock
BACKFILL_BUDGET = 0.5  # seconds of backfill per maintain() call


def _has_legacy(db: sqlite3.Connection) -> bool:
    return db.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'requests'").fetchone() is not None


def _next_id(db: sqlite3.Connection) -> int:
    """The id of the next record: above every record kept, in segments or (until moved) in the earlier table."""
    top = db.execute("SELECT COALESCE(MAX(last_id), 0) FROM segments").fetchone()[0]
    if _has_legacy(db):
        top = max(top, db.execute("SELECT COALESCE(MAX(id), 0) FROM requests").fetchone()[0])
    return top + 1


def _add(db: sqlite3.Connection, records: pa.Table, rolled_up: pa.Table | None = None) -> None:
    """Keep `records` (with ids) in segments of at most SEGMENT_ROWS and add `rolled_up` (by default all of
    them) to the rollups of every span."""
    for offset in range(0, len(records), SEGMENT_ROWS):
        _put_segment(db, records.slice(offset, SEGMENT_ROWS))
    _roll_up(db, records if rolled_up is None else rolled_up)


def _put_segment(db: sqlite3.Connection, records: pa.Table) -> None:
    ids, starts = pc.min_max(records["id"]).as_py(), pc.min_max(records["start"]).as_py()
    segment = db.execute(
        "INSERT INTO segments (first_id, last_id, min_start, max_start, rows, data) VALUES (?, ?, ?, ?, ?, ?)",
        (ids["min"], ids["max"], starts["min"], starts["max"], len(records), ur.encode(records))).lastrowid
    db.executemany("INSERT INTO segment_keys (key, segment, last_end) VALUES (?, ?, ?)",
                   [(key, segment, end) for key, end in ur.last_ends(records)])


def _roll_up(db: sqlite3.Connection, records: pa.Table) -> None:
    """Add `records` to the rollups of every span: their per-minute sums, then each span's rows from those."""
    sums = ur.minute_sums(records)
    if not sums:
        return
    db.execute(f"CREATE TEMP TABLE IF NOT EXISTS batch (minute, key, model, pool, {', '.join(ROLLUP_NAMES)})")
    db.execute("DELETE FROM temp.batch")
    db.executemany(f"INSERT INTO temp.batch VALUES ({', '.join('?' * (4 + len(ROLLUP_NAMES)))})", sums)
    for span in SPANS.values():
        db.execute(_ADD_BATCH, (span,))
    db.execute(_ADD_TOTAL, (TOTAL_SPAN,))


def _drop_segments(db: sqlite3.Connection, ids: list[int]) -> None:
    marks = ", ".join("?" * len(ids))
    db.execute(f"DELETE FROM segment_keys WHERE segment IN ({marks})", ids)
    db.execute(f"DELETE FROM segments WHERE id IN ({marks})", ids)


def segments(db: sqlite3.Connection, where: str = "true", args: Sequence[Any] = ()) -> pa.Table:
    """The records of the segments matching `where` (SQL over the segments table), in id order."""
    blobs = [row[0] for row in db.execute(f"SELECT data FROM segments WHERE {where} ORDER BY id", args)]
    return ur.decode(blobs)


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


def _resume_at(offset: int | None, size: int) -> int:
    """Where ingestion goes on in a file: at its offset, or at its start when it is new or was truncated below."""
    return offset if offset is not None and offset <= size else 0


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
        self._backfilled = False
        with self._connect() as db:
            db.executescript(SCHEMA)
            self._migrate(db)

    @staticmethod
    def _migrate(db: sqlite3.Connection) -> None:
        """Bring a database of an older schema up to SCHEMA_VERSION, once, whoever opens it first, in one short
        transaction. Up to version 4 records were rows of a `requests` table: it stays until `backfill()` has
        moved them into segments. Version 0 kept one (inode, offset) row in `ingest_state`; before version 4
        records had no outcome or tokens and rollups were missing or had other columns: the rollups are made
        anew, empty, and backfill() adds the records to them as it moves them, in small transactions (a big
        database takes minutes, which must not lock out the manager, the CLI or ingestion)."""
        if db.execute("PRAGMA user_version").fetchone()[0] >= SCHEMA_VERSION:
            return
        with _transaction(db):
            version = db.execute("PRAGMA user_version").fetchone()[0]
            if version >= SCHEMA_VERSION:
                return
            if db.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'ingest_state'").fetchone():
                db.execute("INSERT OR IGNORE INTO ingest_files (inode, offset) SELECT inode, offset FROM ingest_state")
                db.execute("DROP TABLE ingest_state")
            if _has_legacy(db):
                present = {row[1] for row in db.execute("PRAGMA table_info(requests)")}
                for column in LEGACY_COLUMNS:
                    if column.split()[0] not in present:
                        db.execute(f"ALTER TABLE requests ADD COLUMN {column}")
                if version < 4:
                    db.execute("DROP TABLE rollups")
                    for statement in filter(str.strip, ROLLUPS_SCHEMA.split(";")):
                        db.execute(statement)
                    db.execute("DELETE FROM rollup_backfill")
                    db.execute("INSERT INTO rollup_backfill SELECT 0, MAX(id) FROM requests HAVING MAX(id) IS NOT NULL")
            db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")

    def backfill(self, budget: float = BACKFILL_BUDGET) -> bool:
        """Move the records of the table before segments (schema 4 and earlier) into segments, BACKFILL_BATCH per
        transaction, adding those the rollups lack to them, for at most about `budget` seconds (the supervisor
        calls it every second). Returns True once nothing is left. Until moved, a record is in the rollups
        (summaries, quotas, /metrics) but not yet in the record queries."""
        deadline = time.monotonic() + budget
        with self._connect() as db:
            while True:
                with _transaction(db):
                    if not _has_legacy(db):
                        return True
                    rows = db.execute(f"SELECT {', '.join(ur.RECORD_FIELDS)} FROM requests ORDER BY id LIMIT ?",
                                      (BACKFILL_BATCH,)).fetchall()
                    records = ur.from_rows(rows)
                    marker = db.execute("SELECT next_id, last_id FROM rollup_backfill").fetchone()
                    ids = records["id"]
                    unrolled = records.filter(pc.and_(pc.greater(ids, marker[0]), pc.less_equal(ids, marker[1]))
                                              ) if marker else records.slice(0, 0)
                    _add(db, records, unrolled)
                    if len(rows) < BACKFILL_BATCH:
                        db.execute("DROP TABLE requests")
                        db.execute("DELETE FROM rollup_backfill")
                        log.info("usage records: the records kept from before are all moved into segments")
                        return True
                    db.execute("DELETE FROM requests WHERE id <= ?", (rows[-1][0],))
                if time.monotonic() >= deadline:
                    log.info("usage records: moving the records kept from before (up to id %d done)", rows[-1][0])
                    return False

    @contextmanager
    def _connect(self, query_only: bool = False) -> Iterator[sqlite3.Connection]:
        db = sqlite3.connect(self.db_path, timeout=30, isolation_level=None)
        db.row_factory = sqlite3.Row
        try:
            db.execute("PRAGMA journal_mode=WAL")
            if query_only:
                db.execute("PRAGMA query_only = ON")
            yield db
        finally:
            db.close()

    def ingest(self, max_batches: int | None = None) -> int:
        """Read new complete lines of the access log, the rotated one first, into the store (at most
        `max_batches` transactions of BATCH_BYTES); returns how many rows were added."""
        added = batches = 0
        with self._connect() as db:
            for path in (self.rotated_path, self.log_path):
                more = True
                while more and (max_batches is None or batches < max_batches):
                    with _transaction(db):
                        n, skipped, more = self._ingest_batch(db, path)
                    added += n
                    batches += bool(n or skipped)
                    if skipped:  # logged once committed: a failed batch is read (and counted) again
                        self.skipped += skipped
                        log.warning("%s: skipped %d torn or unreadable line(s)", path, skipped)
            with _transaction(db):
                self._forget_gone_files(db)
                if added:
                    self._compact(db)
        if added:  # Arrow's allocator keeps what a batch freed (about 100 MB after an 8 MB one) unless asked
            pa.default_memory_pool().release_unused()
        return added

    def catch_up(self) -> int:
        """What an API read does before answering: one batch at most (8 MB, well under a second), so a read
        never works through a whole backlog (after downtime) inside an HTTP request; the supervisor ingests
        the rest within seconds."""
        return self.ingest(max_batches=1)

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
            offset = _resume_at(known and known[0], st.st_size)
            if known and offset == st.st_size:
                return 0, 0, False  # (a new file gets its row at once, even empty: it may be renamed any time)
            f.seek(offset)
            chunk = f.read(BATCH_BYTES)
        end = chunk.rfind(b"\n") + 1
        records, skipped = ur.read_chunk(chunk[:end])
        if len(records):
            _add(db, ur.with_ids(records, _next_id(db)))
        db.execute("INSERT OR REPLACE INTO ingest_files (inode, offset) VALUES (?, ?)", (st.st_ino, offset + end))
        return len(records), skipped, len(chunk) == BATCH_BYTES and end > 0

    @staticmethod
    def _compact(db: sqlite3.Connection) -> None:
        """Merge the small segments (a quiet gateway ingests a few records a second) once there are COMPACT_AFTER
        of them: each record is merged again at most about SEGMENT_ROWS / COMPACT_AFTER times."""
        small = [row[0] for row in db.execute("SELECT id FROM segments WHERE rows < ? ORDER BY id LIMIT ?",
                                              (SEGMENT_ROWS, COMPACT_AFTER * 4))]
        if len(small) < COMPACT_AFTER:
            return
        records = segments(db, f"id IN ({', '.join('?' * len(small))})", small)
        _drop_segments(db, small)
        for offset in range(0, len(records), SEGMENT_ROWS):
            _put_segment(db, records.slice(offset, SEGMENT_ROWS))

    def _forget_gone_files(self, db: sqlite3.Connection) -> None:
        """Offsets are kept for the log and its rotated copy only: a deleted file's inode number is reused.
        The log is looked at first: a rotation renames it to the rotated path, so a rotation between the two
        looks finds the moved file under its new name (the other order would miss it and lose its unread end)."""
        live = [st.st_ino for path in (self.log_path, self.rotated_path) if (st := _stat(path))]
        db.execute(f"DELETE FROM ingest_files WHERE inode NOT IN ({', '.join('?' * len(live))})", live)

    def maintain(self, settings: dict[str, Any], nginx_pid: int | None) -> None:
        """Periodic upkeep (the supervisor calls it every second): rotate nginx's logs by size, add records kept
        from before the rollups to them (after an upgrade), and every few minutes delete usage records and
        rollups past their retention."""
        if settings["log_max_mb"] and nginx_pid:
            self.rotate(settings["log_max_mb"] << 20, nginx_pid)
        if not self._backfilled:
            self._backfilled = self.backfill()
        if time.monotonic() >= self._next_prune:
            self._next_prune = time.monotonic() + PRUNE_INTERVAL
            self.prune(settings["usage_retention_days"],
                       {span: settings[f"usage_{span}_retention_days"] for span in SPANS})

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

    def prune(self, retention_days: int, rollup_days: dict[str, int] | None = None, now: float | None = None) -> int:
        """Delete records of requests that started more than `retention_days` ago and rollup rows of each span
        older than its `rollup_days` (0 keeps everything), a segment or a small batch of rollup rows per
        transaction so that nobody waits long for the database. Returns how many records and rows were deleted."""
        now = time.time() if now is None else now
        deleted = 0
        with self._connect() as db:
            if retention_days:
                deleted += self._log_pruned("records", retention_days,
                                            self._prune_records(db, now - retention_days * 86400))
            for name, days in (rollup_days or {}).items():
                if days:
                    delete = (f"DELETE FROM rollups WHERE (span, key, bucket, model, pool) IN (SELECT span, key, "
                              f"bucket, model, pool FROM rollups WHERE span = {SPANS[name]} AND bucket < ? LIMIT ?)")
                    deleted += self._log_pruned(f"{name} rollups", days,
                                                self._delete_batches(db, delete, now - days * 86400))
        return deleted

    @staticmethod
    def _log_pruned(what: str, days: int, n: int) -> int:
        if n:
            log.info("deleted %d usage %s older than %d days", n, what, days)
        return n

    @staticmethod
    def _prune_records(db: sqlite3.Connection, cutoff: float) -> int:
        """Delete the segments whose records all started before `cutoff`; one with records on both sides is
        written again with the newer ones only. One segment per transaction."""
        deleted = 0
        while True:
            with _transaction(db):
                row = db.execute("SELECT id, rows, max_start FROM segments WHERE min_start < ? ORDER BY id LIMIT 1",
                                 (cutoff,)).fetchone()
                if row is None:
                    return deleted
                kept = 0
                if row["max_start"] >= cutoff:
                    records = segments(db, "id = ?", (row["id"],))
                    newer = records.filter(pc.greater_equal(records["start"], cutoff))
                    _put_segment(db, newer)
                    kept = len(newer)
                _drop_segments(db, [row["id"]])
                deleted += row["rows"] - kept
            time.sleep(PRUNE_PAUSE)

    @staticmethod
    def _delete_batches(db: sqlite3.Connection, delete: str, cutoff: float) -> int:
        deleted = 0
        while True:
            n = db.execute(delete, (cutoff, PRUNE_BATCH)).rowcount
            deleted += n
            if n < PRUNE_BATCH:
                return deleted
            time.sleep(PRUNE_PAUSE)

    def reader(self) -> AbstractContextManager[sqlite3.Connection]:
        """A connection for the queries (manager/usage_queries.py): query_only, so a reader never writes."""
        return self._connect(query_only=True)

    def backlog(self) -> int:
        """Bytes of the access log (and its rotated copy) not ingested yet: a stat and a small read."""
        with self._connect() as db:
            offsets = dict(db.execute("SELECT inode, offset FROM ingest_files").fetchall())
        waiting = 0
        for path in (self.rotated_path, self.log_path):
            if st := _stat(path):
                known = offsets.get(st.st_ino)
                if known is None and path == self.rotated_path:
                    continue  # not a file ingestion follows: never read
                waiting += st.st_size - _resume_at(known, st.st_size)
        return waiting
