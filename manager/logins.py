"""Sign-in state, kept apart from the configuration: failed-login counters and logged-out tokens.

It lives in `auth.sqlite3` in the data dir (0600, indexed lookups) and in memory, so a full or read-only disk
never stops a sign-in, a lockout or a logout:

- Nothing is written before the password check. Concurrent attempts in one process cannot slip past the
  limit: its checks in flight are counted in memory per subject, and `failures + in flight` may never exceed
  `MAX_FAILURES`. Across processes (gunicorn's workers) a burst of parallel attempts can get up to
  `MAX_FAILURES` checks per process before the shared count locks the subject.
- Each outcome is kept in memory first and written to disk when the disk takes it (retried with every later
  write). Between memory and disk the newer record wins; a failure is counted inside one write transaction,
  so processes sharing the file never lose each other's counts while the disk is healthy.

Several processes share the file (the manager's gunicorn workers, the CLI). What a process could not write
stays in that process only: while the disk refuses writes, each worker enforces its own counts (at most
`MAX_FAILURES` password checks per subject per worker) and a logout ends the token in the worker that served
it (the browser's cookie is deleted either way); the other worker learns both once the disk takes them.
`unlock` (CLI `bastion auth unlock`) writes an unlock mark that overrides older records kept in memory.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from manager.store import Store, StoreCorrupt

log = logging.getLogger(__name__)

MAX_FAILURES = 5
LOCKOUT_BASE = 60.0
LOCKOUT_MAX = 3600.0
FAILURE_WINDOW = 900.0
KEEP_ROWS = 86400.0  # rows without a running lockout are deleted a day after their last change
ALL = "*"  # the subject of the row whose `last` marks the latest "unlock everything"
LEGACY_TABLES = ("login_failures", "revoked_tokens")  # where store.json kept this state before

SCHEMA = (
    "CREATE TABLE IF NOT EXISTS login_failures (subject TEXT PRIMARY KEY, failures INTEGER NOT NULL,"
    " lockouts INTEGER NOT NULL, last REAL NOT NULL, locked_until REAL NOT NULL)",
    "CREATE TABLE IF NOT EXISTS revoked_tokens (jti TEXT PRIMARY KEY, exp REAL NOT NULL)",
    "CREATE INDEX IF NOT EXISTS revoked_tokens_exp ON revoked_tokens (exp)",
)
UPSERT = (
    "INSERT INTO login_failures VALUES (?, ?, ?, ?, ?) ON CONFLICT (subject) DO UPDATE SET"
    " failures = excluded.failures, lockouts = excluded.lockouts, last = excluded.last,"
    " locked_until = excluded.locked_until WHERE excluded.last >= login_failures.last"
)


class LockedOut(Exception):
    def __init__(self, message: str, retry_after: float):
        super().__init__(message)
        self.retry_after = retry_after


@dataclass(frozen=True)
class Record:
    """The failed sign-ins of one subject (`user:NAME` or `ip:ADDR`)."""

    failures: int = 0
    lockouts: int = 0
    last: float = 0.0  # when the record last changed: the newer of memory and disk wins
    locked_until: float = 0.0

    def current(self, now: float) -> Record:
        """A run of failures is forgotten after `FAILURE_WINDOW` without another one (unless still locked)."""
        stale = self.last < now - FAILURE_WINDOW and self.locked_until <= now
        return Record(last=self.last) if stale else self

    def failed(self, now: float) -> Record:
        """After `MAX_FAILURES` in a row: locked out for 1 min, 2 min, ... at most `LOCKOUT_MAX`."""
        if self.failures + 1 < MAX_FAILURES:
            return Record(self.failures + 1, self.lockouts, now, self.locked_until)
        return Record(0, self.lockouts + 1, now, now + min(LOCKOUT_MAX, LOCKOUT_BASE * 2 ** self.lockouts))


@dataclass
class Attempt:
    succeeded: bool = False


class LoginState:
    def __init__(self, path: Path):
        self.path = path
        self._lock = threading.Lock()  # guards the dicts below and orders this process's writes
        self._local = threading.local()  # one SQLite connection per thread
        self._unsaved: dict[str, Record] = {}  # records the disk has not taken yet
        self._in_flight: Counter[str] = Counter()  # password checks running now, per subject
        self._revoked: dict[str, float] = {}  # jti -> exp of every logout this process served
        self._unsaved_revoked: dict[str, float] = {}

    # -- sign-in attempts -------------------------------------------------------------------------------------

    @contextmanager
    def attempt(self, subjects: list[str]) -> Iterator[Attempt]:
        """Admit one password check for these subjects (or raise `LockedOut`), then record its outcome:
        set `succeeded` on the yielded `Attempt` when the password was right; anything else counts as a failure."""
        now = time.time()
        with self._lock:
            records = self._records(subjects, now)
            for subject in subjects:
                wait = records[subject].locked_until - now
                if wait > 0:
                    raise LockedOut(f"too many failed logins; try again in {int(wait) + 1} s", wait)
            if any(records[s].failures + self._in_flight[s] >= MAX_FAILURES for s in subjects):
                raise LockedOut("too many sign-in attempts at once; try again in a moment", 1.0)
            self._in_flight.update(subjects)
        attempt = Attempt()
        try:
            yield attempt
        finally:
            with self._lock:
                self._in_flight.subtract(subjects)
                self._in_flight += Counter()  # drops subjects at zero
                self._record(subjects, attempt.succeeded, time.time())

    def _record(self, subjects: list[str], succeeded: bool, now: float) -> None:
        """Memory first, then disk (counting on top of the disk's current rows, in one transaction)."""
        def outcome(record: Record) -> Record:
            return Record(last=now) if succeeded else record.current(now).failed(now)

        try:
            with self._write() as db:
                self._write_unsaved(db, now)
                records = self._records(subjects, now, db)
                db.executemany(UPSERT, [(s, *_fields(outcome(records[s]))) for s in subjects])
            self._unsaved.clear()  # only once committed: memory keeps everything until the disk has it
            self._unsaved_revoked.clear()
            return
        except (sqlite3.Error, OSError) as e:
            log.warning("could not write %s (%s); sign-in counts kept in memory until it can be written",
                        self.path, e)
        records = self._records(subjects, now)
        for s in subjects:
            self._unsaved[s] = outcome(records[s])
        # memory holds at most the subjects that failed within the window or are locked out
        self._unsaved = {s: r for s, r in self._unsaved.items()
                         if r.last > now - FAILURE_WINDOW or r.locked_until > now}

    def _records(self, subjects: list[str], now: float, db: sqlite3.Connection | None = None) -> dict[str, Record]:
        """The current record of each subject: the newer of disk and memory (an unlock mark beats older memory)."""
        marks = ",".join("?" * (len(subjects) + 1))
        rows = self._read(f"SELECT subject, failures, lockouts, last, locked_until FROM login_failures "
                          f"WHERE subject IN ({marks})", (*subjects, ALL), db)
        disk = {row[0]: Record(*row[1:]) for row in rows}
        unlocked_at = disk.get(ALL, Record()).last
        result = {}
        for s in subjects:
            candidates = [disk.get(s, Record())]
            if (mem := self._unsaved.get(s)) and mem.last > unlocked_at:
                candidates.append(mem)
            result[s] = max(candidates, key=lambda r: r.last).current(now)
        return result

    def unlock(self, subject: str | None = None) -> int:
        """Clear lockouts and failure counts (all, or one subject); returns how many subjects had any."""
        now = time.time()
        with self._lock:
            active = "(failures > 0 OR locked_until > ?) AND subject != ?"
            try:
                with self._write() as db:
                    if subject:
                        count = db.execute(f"SELECT count(*) FROM login_failures WHERE subject = ? AND {active}",
                                           (subject, now, ALL)).fetchone()[0]
                        db.execute(UPSERT, (subject, *_fields(Record(last=now))))
                    else:
                        count = db.execute(f"SELECT count(*) FROM login_failures WHERE {active}",
                                           (now, ALL)).fetchone()[0]
                        db.execute("DELETE FROM login_failures")
                        db.execute(UPSERT, (ALL, *_fields(Record(last=now))))
            except (sqlite3.Error, OSError) as e:
                raise OSError(f"could not write {self.path}: {e}") from None
            if subject:
                self._unsaved.pop(subject, None)
            else:
                self._unsaved.clear()
        return count

    def subjects(self) -> set[str]:
        """Subjects with a record (disk and memory), for tests and diagnostics."""
        rows = self._read("SELECT subject FROM login_failures WHERE subject != ?", (ALL,))
        return {row[0] for row in rows} | set(self._unsaved)

    # -- logged-out tokens ------------------------------------------------------------------------------------

    def revoke(self, jti: str, exp: float) -> bool:
        """Deny this token from now on; returns False when only this process knows (the disk refused)."""
        now = time.time()
        with self._lock:
            self._revoked = {j: e for j, e in self._revoked.items() if e > now}
            self._revoked[jti] = exp
            self._unsaved_revoked[jti] = exp
            try:
                with self._write() as db:
                    self._write_unsaved(db, now)
                self._unsaved.clear()
                self._unsaved_revoked.clear()
                return True
            except (sqlite3.Error, OSError) as e:
                log.warning("could not write %s (%s); logout of token %s holds in this process only until "
                            "it can be written", self.path, e, jti)
                return False

    def is_revoked(self, jti: str) -> bool:
        if jti in self._revoked:
            return True
        try:
            return bool(self._read("SELECT 1 FROM revoked_tokens WHERE jti = ?", (jti,), strict=True))
        except (sqlite3.Error, OSError) as e:
            log.error("cannot read %s (%s); only logouts served by this process are enforced", self.path, e)
            return False

    # -- disk -------------------------------------------------------------------------------------------------

    def _write_unsaved(self, db: sqlite3.Connection, now: float) -> None:
        """Write what only memory holds and delete what no longer matters (inside a write transaction; the
        caller forgets the memory copies once it committed)."""
        db.executemany(UPSERT, [(s, *_fields(r)) for s, r in self._unsaved.items()])
        db.executemany("INSERT OR IGNORE INTO revoked_tokens VALUES (?, ?)", self._unsaved_revoked.items())
        db.execute("DELETE FROM revoked_tokens WHERE exp < ?", (now,))
        db.execute("DELETE FROM login_failures WHERE last < ? AND locked_until < ? AND subject != ?",
                   (now - KEEP_ROWS, now, ALL))

    def _connection(self, create: bool) -> sqlite3.Connection | None:
        db = getattr(self._local, "db", None)
        if db is None:
            if not self.path.exists():
                if not create:
                    return None  # nothing written yet: reading must not create the file
                os.close(os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600))
            db = sqlite3.connect(self.path.as_uri() + "?mode=rw", uri=True, timeout=10, isolation_level=None)
            self._local.db = db
        return db

    def _drop_connection(self) -> None:
        db = getattr(self._local, "db", None)
        self._local.db = None
        if db is not None:
            db.close()

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        try:
            db = self._connection(create=True)
            assert db is not None
            db.execute("BEGIN IMMEDIATE")
        except (sqlite3.Error, OSError):
            self._drop_connection()
            raise
        try:
            for statement in SCHEMA:
                db.execute(statement)
            yield db
            db.execute("COMMIT")
        except BaseException:
            try:
                db.execute("ROLLBACK")
            except sqlite3.Error:
                self._drop_connection()
            raise

    def _read(self, sql: str, params: tuple, db: sqlite3.Connection | None = None, strict: bool = False) -> list:
        """Rows of a query; nothing when the file or table does not exist yet. Other errors: raised if `strict`,
        else logged (memory alone decides then)."""
        try:
            db = db or self._connection(create=False)
            return [] if db is None else db.execute(sql, params).fetchall()
        except sqlite3.OperationalError as e:
            if str(e).startswith("no such table"):
                return []
            error: Exception = e
        except (sqlite3.Error, OSError) as e:
            error = e
        self._drop_connection()
        if strict:
            raise error
        log.warning("cannot read %s (%s); using the sign-in counts in memory", self.path, error)
        return []


def _fields(record: Record) -> tuple[int, int, float, float]:
    return record.failures, record.lockouts, record.last, record.locked_until


def drop_legacy_tables(store: Store) -> None:
    """Older versions kept this state in store.json; it is dropped there (lockouts are not carried over)."""
    try:
        with store.transaction():
            for name in LEGACY_TABLES:
                store.drop(name)
    except (OSError, StoreCorrupt) as e:
        log.warning("could not drop the old sign-in tables from %s (%s); they are ignored", store.path, e)
