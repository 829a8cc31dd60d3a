"""Usage ingestion under faults: torn log lines, a failing database, log rotation, retention of raw rows."""

from __future__ import annotations

import itertools
import logging
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import requests

from manager import settings as settings_mod
from manager import usage as usage_mod
from manager import usage_queries as q
from manager import validation as v
from manager.usage import Usage
from manager.usage_log import RECORD_START, format_record
from manager.usage_records import RECORD_FIELDS
from tests.conftest import Stack
from tests.fakes import FakeUpstream


def record(request_id: str, t: float = 1_764_000_000.5, **fields) -> str:
    """One line as nginx's `bastion` log_format writes it (newline-terminated)."""
    values = {"end": t, "request_id": request_id, "key": "k1", "model": "m", "pool": "p",
              "upstream": "unix:/x/authsvc.sock : 10.0.0.1:8000", "status": 200, "bytes_sent": 10,
              "request_length": 5, "duration": 0.5, "upstream_status": "200 : 200", "ttfb": "0.001 : 0.1",
              "method": "POST", "uri": "/v1/chat/completions", "remote_addr": "127.0.0.1", **fields}
    return format_record(**values)


def append(path: Path, text: str) -> None:
    with path.open("a", encoding="utf-8") as f:
        f.write(text)


def ids(usage: Usage) -> list[str]:
    return sorted(r["request_id"] for r in records_of(usage))


def records_of(usage: Usage) -> list[dict]:
    return q.records(usage, limit=1_000_000).records


@pytest.fixture
def usage(tmp_path: Path) -> Usage:
    return Usage(tmp_path / "usage.sqlite3", tmp_path / "access.log")


# ---- torn lines ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("cut", [1, 8, 30, 120, -3, -2, -1])  # -1: all but the newline reached the disk
def test_torn_record_is_skipped_and_the_record_glued_to_it_kept(usage: Usage, cut: int,
                                                                caplog: pytest.LogCaptureFixture) -> None:
    """A write cut short by a full disk leaves half a record; nginx's next record follows on the same line."""
    torn = record("torn")[:cut]
    usage.log_path.write_text(record("a") + torn + record("b") + record("c"))
    with caplog.at_level(logging.WARNING, logger="manager.usage"):
        added = usage.ingest()
    complete = cut == -1
    assert ids(usage) == sorted(["a", "b", "c", *(["torn"] if complete else [])])
    assert added == (4 if complete else 3)
    assert usage.ingest() == 0  # exactly once
    if not complete:
        assert usage.skipped == 1 and "torn" in caplog.text


def test_torn_record_seen_before_the_next_record_arrives(usage: Usage) -> None:
    """As it happens: ingestion runs while the disk is full (the torn record waits for its newline), the next
    record arrives once space returns."""
    usage.log_path.write_text(record("a") + record("torn")[:100])
    assert usage.ingest() == 1
    assert usage.ingest() == 0
    append(usage.log_path, record("b"))
    assert usage.ingest() == 1
    append(usage.log_path, record("c"))
    assert usage.ingest() == 1
    assert ids(usage) == ["a", "b", "c"] and usage.skipped == 1


def test_record_start_inside_a_value_splits_nothing(usage: Usage) -> None:
    """nginx writes `"` and tabs inside values as `\\x22` and `\\x09`, so a record marker in a URI is not a record
    start; raw U+2028 (nginx escapes them as UTF-8 bytes) does not end a line either."""
    uri = '/v1/x"B1\t1\tfake\u2028\u2029\x85y\\'
    usage.log_path.write_text(record("a", uri=uri) + record("b"))
    assert usage.ingest() == 2
    assert {r["request_id"]: r["uri"] for r in records_of(usage)} == {"a": uri, "b": "/v1/chat/completions"}
    assert usage.skipped == 0


def test_a_line_nginx_cannot_write_does_not_stop_ingestion(usage: Usage) -> None:
    """nginx never writes one, but a hand-edited or damaged log must not make every later ingestion fail: a line
    with a field too few, a status or an end time that is not a number, a broken escape, or (in the earlier
    JSON format) an object where text belongs is skipped; a number too large for a 64-bit integer is unknown."""
    legacy_object = ('{"time":1.5,"request_id":{"x":1},"key":"k","model":"m","pool":"p","status":200,'
                     '"request_time":0.5,"uri":"/v1/x"}\n')
    usage.log_path.write_text(record("a") + record("bad", status="x") + record("short").replace("\t", "", 1)
                              + record("escape").replace("/v1/chat", "/v1/\\xZZchat") + legacy_object
                              + record("huge", bytes_sent=2**70) + record("timeless", t="soon") + record("b"))
    assert usage.ingest() == 3
    assert ids(usage) == ["a", "b", "huge"] and usage.skipped == 5
    assert [r["bytes_sent"] for r in records_of(usage) if r["request_id"] == "huge"] == [None]
    append(usage.log_path, record("c"))
    assert usage.ingest() == 1


# ---- a failing database -------------------------------------------------------------------------------------

def test_ingestion_failing_between_read_and_commit_counts_every_line_once(usage: Usage,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """The offset is written after the rows in the same transaction: refuse that write (an injected fault at
    the last step before COMMIT, in the second of several batches) and nothing of the failed batch remains."""
    lines = [record(f"r{i}") for i in range(40)]
    usage.log_path.write_text("".join(lines))
    monkeypatch.setattr(usage_mod, "BATCH_BYTES", len(lines[0]) * 10 + 5)
    offset_writes = []

    class FailingConnection(sqlite3.Connection):
        def execute(self, sql: str, *args):
            if sql.startswith("INSERT OR REPLACE INTO ingest_"):
                offset_writes.append(sql)
                if len(offset_writes) == 2:
                    raise sqlite3.OperationalError("injected: database or disk is full")
            return super().execute(sql, *args)

    connect = sqlite3.connect
    monkeypatch.setattr(usage_mod.sqlite3, "connect", lambda *a, **kw: connect(*a, factory=FailingConnection, **kw))
    with pytest.raises(sqlite3.DatabaseError):
        usage.ingest()
    assert ids(usage) == sorted(f"r{i}" for i in range(10))  # the first batch committed, the second not
    append(usage.log_path, record("late"))
    assert usage.ingest() == 31
    assert ids(usage) == sorted([*(f"r{i}" for i in range(40)), "late"])
    assert usage.ingest() == 0


@pytest.fixture
def full_disk_of(tmp_path: Path) -> Iterator[Callable[[str], Path]]:
    """Mounts a tmpfs of the given size (root only) for the test to fill."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mounts: list[Path] = []

    def mount(size: str) -> Path:
        path = tmp_path / f"fs{len(mounts)}"
        path.mkdir()
        subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], check=True)
        mounts.append(path)
        return path

    yield mount
    for path in mounts:
        subprocess.run(["umount", "-l", str(path)], check=True)


def fill(path: Path) -> None:
    with path.open("wb", buffering=0) as f, pytest.raises(OSError):
        while True:
            f.write(b"\0" * 4096)


def test_ingestion_on_a_full_disk_resumes_without_losing_or_doubling_lines(tmp_path: Path, full_disk_of) -> None:
    """The database on a 2 MB tmpfs that the test fills."""
    disk = full_disk_of("2m")
    usage = Usage(disk / "usage.sqlite3", tmp_path / "access.log")
    usage.log_path.write_text("".join(record(f"a{i}") for i in range(50)))
    assert usage.ingest() == 50
    filler = disk / "filler"
    fill(filler)
    append(usage.log_path, "".join(record(f"b{i}") for i in range(5000)))
    with pytest.raises(sqlite3.OperationalError):
        usage.ingest()
    with pytest.raises(sqlite3.OperationalError):
        usage.ingest()  # still full: fails again, harmlessly
    filler.unlink()
    assert usage.ingest() == 5000
    assert ids(usage) == sorted([*(f"a{i}" for i in range(50)), *(f"b{i}" for i in range(5000))])
    assert usage.ingest() == 0


# ---- rotation -------------------------------------------------------------------------------------------------

def test_rotation_by_hand_loses_no_line_of_the_moved_file(usage: Usage) -> None:
    """Lines written before the move but after the last ingestion, and lines nginx's workers write to the moved
    file until they reopen, are read; each once."""
    log = usage.log_path
    old = log.with_name("access.log.1")
    log.write_text(record("a1") + record("a2"))
    assert usage.ingest() == 2
    append(log, record("a3"))  # after the last ingestion
    log.rename(old)
    append(old, record("a4"))  # a worker that has not reopened yet
    log.write_text(record("b1"))
    assert usage.ingest() == 3
    append(old, record("a5"))
    append(log, record("b2"))
    assert usage.ingest() == 2
    assert ids(usage) == ["a1", "a2", "a3", "a4", "a5", "b1", "b2"]
    assert usage.ingest() == 0


@pytest.fixture
def fake_master() -> Iterator[subprocess.Popen]:
    """A process standing in for nginx's master: prints a line per SIGUSR1 (reopen logs)."""
    code = ("import signal, sys, time\n"
            "signal.signal(signal.SIGUSR1, lambda *_: print('reopen', flush=True))\n"
            "print('ready', flush=True)\n"
            "time.sleep(60)\n")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline() == "ready\n"
    yield proc
    proc.kill()
    proc.wait()


def settings(**values) -> dict:
    return {**settings_mod.DEFAULTS, **values}


def test_rotation_is_triggered_by_size_and_waits_for_ingestion(usage: Usage, fake_master: subprocess.Popen) -> None:
    logs = usage.log_path.parent
    admin, errors = logs / "admin-access.log", logs / "error.log"
    big = "".join(record(f"a{i}") for i in range(8000))
    assert len(big) > 1 << 20
    usage.log_path.write_text(big)
    admin.write_text("x" * (1 << 20) + "x\n")
    errors.write_text("small\n")
    usage.maintain(settings(log_max_mb=2), fake_master.pid)
    assert not usage.rotated_path.exists() and not (logs / "admin-access.log.1").exists()  # under the limit

    usage.maintain(settings(log_max_mb=1), fake_master.pid)
    assert fake_master.stdout.readline() == "reopen\n"
    assert usage.rotated_path.read_text() == big and (logs / "admin-access.log.1").exists()
    assert errors.read_text() == "small\n" and not (logs / "error.log.1").exists()
    usage.log_path.write_text("".join(record(f"b{i}") for i in range(8000)))  # nginx reopened, then wrote

    usage.maintain(settings(log_max_mb=1), fake_master.pid)  # access.log.1 was never ingested: it stays
    assert usage.rotated_path.read_text() == big
    assert usage.ingest() == 16000
    append(usage.log_path, record("c"))
    usage.maintain(settings(log_max_mb=1), fake_master.pid)
    assert fake_master.stdout.readline() == "reopen\n"
    assert usage.rotated_path.read_text().startswith(record("b0"))
    assert usage.ingest() == 1
    assert usage.ingest() == 0 and len(ids(usage)) == 16001

    usage.log_path.write_text(big)
    usage.maintain(settings(log_max_mb=0), fake_master.pid)  # 0: never rotate
    assert usage.log_path.read_text() == big


def test_rotation_with_real_nginx_loses_and_doubles_nothing(stack: Stack) -> None:
    """A real master and its workers: lines written between the move and SIGUSR1 land in the moved file;
    afterwards nginx writes a new access.log. Ingestion by the supervisor runs concurrently all along."""
    stack.cli("settings", "set", "bruteforce_max_failures", "0")  # keyless probes make the log lines here
    stack.cli("settings", "set", "unauthenticated_rpm", "0")
    logs = stack.data_dir / "logs"
    usage = Usage(stack.data_dir / "usage.sqlite3", logs / "access.log")
    master = int((stack.data_dir / "nginx" / "nginx.pid").read_text())
    sent: list[str] = []

    def send(prefix: str, n: int) -> None:
        for i in range(n):
            rid = f"{prefix}-{i}"
            assert stack.get("/v1/models", headers={"X-Request-ID": rid}).status_code == 401
            sent.append(rid)

    def reopened(old_inode: int) -> None:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if usage.log_path.exists() and usage.log_path.stat().st_ino != old_inode:
                return
            time.sleep(0.02)
        raise AssertionError("nginx did not reopen access.log")

    def all_recorded_once() -> None:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            usage.ingest()
            if set(sent) <= set(ids(usage)):
                break
            time.sleep(0.2)
        assert [rid for rid in ids(usage) if rid in set(sent)] == sorted(sent)  # every request, none twice

    send("before", 20)
    time.sleep(1.5)  # the supervisor has ingested these
    send("unread", 20)
    inode = usage.log_path.stat().st_ino
    usage.log_path.rename(logs / "access.log.1")  # by hand, as an operator would
    send("moved", 20)  # nginx still writes to the moved file
    os.kill(master, signal.SIGUSR1)
    reopened(inode)
    send("after", 20)
    all_recorded_once()

    inode = usage.log_path.stat().st_ino
    assert usage.log_path in usage.rotate(1, master)  # and now by size (error.log too)
    send("late", 10)
    reopened(inode)
    send("new", 10)

    all_recorded_once()


def test_record_start_in_a_uri_is_escaped_by_real_nginx(stack: Stack) -> None:
    """The reasoning behind splitting torn lines, checked against nginx itself; and a client cannot hide a
    request from usage with a raw line separator in its URI."""
    stack.cli("settings", "set", "bruteforce_max_failures", "0")  # keyless probes make the log lines here
    stack.cli("settings", "set", "unauthenticated_rpm", "0")
    r = requests.get(stack.base + "/v1/x%22B1%091%E2%80%A8", headers={"X-Request-ID": "escape-probe"},
                     timeout=10)
    assert r.status_code in (401, 404)
    usage = Usage(stack.data_dir / "usage.sqlite3", stack.data_dir / "logs" / "access.log")
    deadline = time.monotonic() + 10
    while not (rows := [r for r in records_of(usage) if r["request_id"] == "escape-probe"]):
        assert time.monotonic() < deadline, "the request was not recorded"
        usage.ingest()
        time.sleep(0.2)
    assert len(rows) == 1 and rows[0]["uri"] == '/v1/x"B1\t1\u2028'
    text = (stack.data_dir / "logs" / "access.log").read_text(errors="replace")
    assert "\t/v1/x\\x22B1\\x091\\xE2\\x80\\xA8\t" in text


def test_no_usage_line_lost_after_the_data_dir_was_full(tmp_path: Path, full_disk_of) -> None:
    """The whole stack on a small tmpfs that the test fills: nginx's write that reaches the end of the free space
    is cut short (a torn record) and its next record, once space returns, is glued to it."""
    stack = Stack(full_disk_of("32m") / "data")
    stack.start()
    try:
        key = stack.key("k")
        time.sleep(0.6)  # the gate picks the key up within 0.25 s
        access_log = stack.data_dir / "logs" / "access.log"
        sent: dict[str, list[str]] = {"before": [], "full": [], "after": []}

        def send(phase: str, n: int) -> None:
            for i in range(n):
                rid = f"{phase}-{i}"
                assert stack.get("/v1/models", key, headers={"X-Request-ID": rid}).status_code == 200
                sent[phase].append(rid)

        send("before", 10)
        if access_log.stat().st_size % 4096 == 0:  # the last page must have room for part of a record
            send("before", 1)
        fill(stack.data_dir / "filler")
        send("full", 30)  # the data plane keeps answering
        (stack.data_dir / "filler").unlink()
        time.sleep(1.1)  # nginx writes no log line for the rest of a second in which a write failed with ENOSPC
        send("after", 10)
        text = access_log.read_text(errors="replace")
        assert any(line.count(RECORD_START) > 1 for line in text.split("\n")), "no torn record: nothing was tested"

        usage = Usage(stack.data_dir / "usage.sqlite3", access_log)
        deadline = time.monotonic() + 10
        while not set(sent["before"] + sent["after"]) <= set(ids(usage)):
            assert time.monotonic() < deadline, sorted(set(sent["before"] + sent["after"]) - set(ids(usage)))
            usage.ingest()
            time.sleep(0.2)
        recorded = [rid for rid in ids(usage) if rid.startswith(("before-", "full-", "after-"))]
        assert len(recorded) == len(set(recorded))  # none twice
        assert set(sent["before"] + sent["after"]) <= set(recorded)
    finally:
        stack.stop()


# ---- retention ------------------------------------------------------------------------------------------------

def test_retention_deletes_old_segments_one_at_a_time_and_rewrites_the_one_across_the_cutoff(
        usage: Usage, monkeypatch: pytest.MonkeyPatch) -> None:
    now = 1_764_000_000.0
    day = 86400
    lines = ([record(f"old{i}", now - 31 * day) for i in range(23)]
             + [record(f"new{i}", now - 29 * day) for i in range(5)])
    monkeypatch.setattr(usage_mod, "BATCH_BYTES", len(lines[0]) * 10 + 5)  # segments of 10, 10, 3 old + 5 new
    usage.log_path.write_text("".join(lines))
    assert usage.ingest() == 28
    statements: list[str] = []
    connect = sqlite3.connect

    def traced(*args, **kw) -> sqlite3.Connection:
        db = connect(*args, **kw)
        db.set_trace_callback(statements.append)
        return db

    monkeypatch.setattr(usage_mod.sqlite3, "connect", traced)
    assert usage.prune(0, now=now) == 0  # 0 keeps everything
    assert usage.prune(30, now=now) == 23
    assert ids(usage) == sorted(f"new{i}" for i in range(5))
    assert sum(s.startswith("DELETE FROM segments") for s in statements) == 3  # one per transaction
    with usage._connect() as db:
        assert [tuple(r) for r in db.execute("SELECT rows, min_start, max_start FROM segments")] == [
            (5, now - 29 * day - 0.5, now - 29 * day - 0.5)]
        assert db.execute("SELECT COUNT(*) FROM segment_keys").fetchone()[0] == 1
    assert usage.prune(30, now=now) == 0


def test_small_segments_are_merged_and_every_record_kept_once(usage: Usage) -> None:
    """A quiet gateway ingests a record or two a second: the tiny segments are merged once there are enough."""
    for i in range(usage_mod.COMPACT_AFTER * 2 + 3):
        append(usage.log_path, record(f"r{i:03}", 1_764_000_000.0 + i, key=f"k{i % 3}"))
        assert usage.ingest() == 1
    with usage._connect() as db:
        sizes = [r[0] for r in db.execute("SELECT rows FROM segments ORDER BY id")]
        assert db.execute("SELECT COUNT(DISTINCT key) FROM segment_keys").fetchone()[0] == 3
    assert len(sizes) < usage_mod.COMPACT_AFTER and sum(sizes) == usage_mod.COMPACT_AFTER * 2 + 3
    assert ids(usage) == [f"r{i:03}" for i in range(usage_mod.COMPACT_AFTER * 2 + 3)]
    assert q.last_used(usage, ["k0", "k1", "k2", "k9"]) == {
        f"k{k}": 1_764_000_000.0 + max(i for i in range(usage_mod.COMPACT_AFTER * 2 + 3) if i % 3 == k)
        for k in range(3)}


def test_maintain_applies_the_retention_setting(usage: Usage) -> None:
    usage.log_path.write_text(record("ancient", time.time() - 100 * 86400) + record("recent", time.time() - 10))
    usage.ingest()
    usage.maintain(settings(usage_retention_days=90), None)
    assert ids(usage) == ["recent"]


@pytest.mark.parametrize(("name", "value"), [("usage_retention_days", -1), ("usage_retention_days", 36501),
                                             ("usage_retention_days", "ninety"), ("log_max_mb", -1),
                                             ("log_max_mb", True), ("log_max_mb", 100_001),
                                             ("usage_day_retention_days", 30), ("usage_minute_retention_days", -1)])
def test_retention_and_rotation_settings_validated(name: str, value: object) -> None:
    with pytest.raises(v.ValidationError) as e:
        settings_mod.VALIDATORS[name](name, value)
    assert name in str(e.value)
    assert settings_mod.DEFAULTS["usage_retention_days"] == 90 and settings_mod.DEFAULTS["log_max_mb"] == 100


# ---- rollups --------------------------------------------------------------------------------------------------

def rollup(usage: Usage, span: str, **where) -> list[dict]:
    clauses = " AND ".join(f"{k} = ?" for k in where)
    seconds = usage_mod.TOTAL_SPAN if span == "total" else usage_mod.SPANS[span]
    with usage._connect() as db:
        rows = db.execute(f"SELECT * FROM rollups WHERE span = ? {'AND ' + clauses if where else ''} "
                          "ORDER BY bucket, key, model, pool", (seconds, *where.values()))
        return [dict(r) for r in rows]


def test_rollups_add_up_each_batch_per_minute_hour_and_day(usage: Usage, monkeypatch: pytest.MonkeyPatch) -> None:
    """Several batches (small BATCH_BYTES) that share minutes: every sum equals the one computed from the records."""
    t0 = 1_764_000_000.0 - 1_764_000_000.0 % 86400  # midnight
    lines = []
    for i in range(300):
        fields = {"key": f"k{i % 3}", "model": "m", "duration": 0.2 + i % 7, "ttfb": f"0.001 : {0.03 * (i % 5)}",
                  "status": (200, 200, 200, 429, 502)[i % 5], "outcome": ("completed", "client_cut", "")[i % 3]}
        if i % 4:
            fields.update(prompt_tokens=10, completion_tokens=i, total_tokens=10 + i)
        lines.append(record(f"r{i}", t0 + i * 37, **fields))  # 300 requests over about three hours
    lines.append(record("refused", t0 + 5, key="", model="", pool="", status=401, upstream="unix:/x/a.sock"))
    usage.log_path.write_text("".join(lines))
    monkeypatch.setattr(usage_mod, "BATCH_BYTES", len(lines[0]) * 17 + 3)
    assert usage.ingest() == 301
    records = records_of(usage)
    for span, seconds in usage_mod.SPANS.items():
        rows = rollup(usage, span)
        assert sum(r["requests"] for r in rows) == 301
        assert sum(r["total_tokens"] for r in rows) == sum(r["total_tokens"] or 0 for r in records)
        assert sum(r["metered"] for r in rows) == sum(r["total_tokens"] is not None for r in records) == 225
        assert sum(r["server_errors"] for r in rows) == 60 and sum(r["client_errors"] for r in rows) == 61
        assert sum(r["client_cut"] for r in rows) == 100
        for r in rows:
            assert r["bucket"] % seconds == 0
            inside = [x for x in records if r["bucket"] <= x["end"] < r["bucket"] + seconds
                      and (x["key"] or "") == r["key"] and (x["pool"] or "") == r["pool"]]
            assert r["requests"] == len(inside) > 0
            assert r["d2"] == sum(x["duration"] <= 0.25 for x in inside)
            assert r["t3"] == sum(x["ttfb"] is not None and x["ttfb"] <= 0.05 for x in inside)
            assert r["duration_sum"] == pytest.approx(sum(x["duration"] for x in inside))
    assert len(rollup(usage, "day")) == 4  # three keys and the refused request (no key, no pool)
    assert rollup(usage, "day", key="")[0]["client_errors"] == 1


def test_rollups_are_built_for_a_database_of_the_schema_before(tmp_path: Path) -> None:
    """Version 1 had no outcome, token columns or rollups: they are added and built from the records kept."""
    db_path = tmp_path / "usage.sqlite3"
    db = sqlite3.connect(db_path)
    db.executescript("""CREATE TABLE requests (id INTEGER PRIMARY KEY, request_id TEXT, start REAL NOT NULL,
        end REAL NOT NULL, key TEXT, model TEXT, pool TEXT, upstream TEXT, status INTEGER, upstream_status INTEGER,
        bytes_sent INTEGER, request_length INTEGER, ttfb REAL, duration REAL, method TEXT, uri TEXT,
        remote_addr TEXT);
        CREATE TABLE ingest_state (inode INTEGER, offset INTEGER);
        INSERT INTO ingest_state VALUES (7, 100);
        INSERT INTO requests (request_id, start, end, key, status, duration) VALUES ('a', 100, 101, 'k', 200, 1),
            ('b', 100, 102, 'k', 500, 2);""")
    db.commit()
    db.close()
    usage = Usage(db_path, tmp_path / "access.log")
    assert rollup(usage, "day") == []  # built by backfill(), in small steps (the supervisor's upkeep)
    assert usage.backfill()
    (day,) = rollup(usage, "day")
    assert (day["requests"], day["server_errors"], day["duration_sum"], day["key"]) == (2, 1, 3.0, "k")
    assert {r["request_id"]: r["total_tokens"] for r in records_of(usage)} == {"a": None, "b": None}
    with usage._connect() as db:
        assert [tuple(r) for r in db.execute("SELECT inode, offset FROM ingest_files")] == [(7, 100)]
    assert Usage(db_path, tmp_path / "access.log").backfill()  # opening it again changes nothing
    assert rollup(usage, "day")[0]["requests"] == 2


def test_rollup_retention_per_span(usage: Usage) -> None:
    now = 1_764_000_000.0
    day = 86400
    usage.log_path.write_text(record("old", now - 20 * day) + record("new", now - 60))
    usage.ingest()
    assert usage.prune(0, {"minute": 14, "hour": 0, "day": 0}, now=now) == 1
    assert [r["bucket"] > now - 120 for r in rollup(usage, "minute")] == [True]
    assert len(rollup(usage, "hour")) == len(rollup(usage, "day")) == 2
    assert usage.prune(0, {"minute": 14, "hour": 10, "day": 30}, now=now) == 1
    assert ids(usage) == ["new", "old"]  # raw records follow their own retention


# ---- restarts and crashes -------------------------------------------------------------------------------------

def test_restarting_bastion_during_traffic_loses_and_doubles_no_record(tmp_path: Path) -> None:
    """Two clients keep sending chat completions through a pool while `bastion up` is stopped and started again
    and the log is reopened by hand: every request that got an answer is recorded exactly once."""
    upstream = FakeUpstream("restart", ["m"])
    stack = Stack(tmp_path / "data")
    stack.start()
    try:
        stack.cli("pools", "add", "main", "--url", upstream.url, "--models", "m")
        key = stack.key("k")
        time.sleep(0.6)  # the gate picks the key up within 0.25 s
        answered: list[str] = []
        stop = threading.Event()

        def client(name: str) -> None:
            with requests.Session() as s:
                for i in itertools.count():
                    if stop.is_set():
                        return
                    rid = f"{name}-{i}"
                    try:
                        r = s.post(stack.base + "/v1/chat/completions", timeout=10,
                                   headers={"Authorization": f"Bearer {key}", "X-Request-ID": rid},
                                   json={"model": "m", "messages": [{"role": "user", "content": "hi"}]})
                    except requests.ConnectionError:
                        time.sleep(0.05)  # nginx is down for a moment: this request never reached it
                        continue
                    assert r.headers["X-Request-ID"] == rid
                    answered.append(rid)

        clients = [threading.Thread(target=client, args=(name,)) for name in ("a", "b")]
        for t in clients:
            t.start()
        time.sleep(1.5)
        stack.stop()
        stack.start()
        time.sleep(1.0)
        logs = stack.data_dir / "logs"
        (logs / "access.log").rename(logs / "access.log.1")
        os.kill(int((stack.data_dir / "nginx" / "nginx.pid").read_text()), signal.SIGUSR1)  # nginx -s reopen
        time.sleep(1.0)
        stop.set()
        for t in clients:
            t.join()
        usage = Usage(stack.data_dir / "usage.sqlite3", logs / "access.log")
        deadline = time.monotonic() + 15
        while not set(answered) <= set(ids(usage)):
            assert time.monotonic() < deadline, f"{len(set(answered) - set(ids(usage)))} answered requests missing"
            time.sleep(0.3)
        recorded = [rid for rid in ids(usage) if rid[:2] in ("a-", "b-")]
        assert len(answered) > 100 and sorted(answered) == recorded  # all of them, none twice
    finally:
        stack.stop()
        upstream.close()


INGEST_FOREVER = """import sys; from pathlib import Path; from manager import usage
usage.BATCH_BYTES = 2000
u = usage.Usage(Path(sys.argv[1]), Path(sys.argv[2]))
while True: u.ingest()
"""


def test_ingestion_killed_at_any_moment_loses_and_doubles_nothing(tmp_path: Path) -> None:
    """A process ingesting in small transactions is killed with SIGKILL again and again while the log grows;
    the next one carries on from the last committed offset."""
    log = tmp_path / "access.log"
    db = tmp_path / "usage.sqlite3"
    written = 0
    for round_ in range(8):
        proc = subprocess.Popen([sys.executable, "-c", INGEST_FOREVER, str(db), str(log)],
                                cwd=Path(__file__).parent.parent)
        append(log, "".join(record(f"r{round_}-{i}") for i in range(300)))
        written += 300
        time.sleep(0.2 + round_ * 0.05)
        proc.kill()
        proc.wait()
    usage = Usage(db, log)
    usage.ingest()
    assert ids(usage) == sorted(f"r{r}-{i}" for r in range(8) for i in range(300))
    with usage._connect() as conn:  # the rollups count each record once too
        assert conn.execute("SELECT SUM(requests) FROM rollups WHERE span = 60").fetchone()[0] == written


LEGACY_REQUESTS = """CREATE TABLE requests (id INTEGER PRIMARY KEY, request_id TEXT, start REAL NOT NULL,
    end REAL NOT NULL, key TEXT, model TEXT, pool TEXT, upstream TEXT, status INTEGER, upstream_status INTEGER,
    bytes_sent INTEGER, request_length INTEGER, ttfb REAL, duration REAL, method TEXT, uri TEXT, remote_addr TEXT,
    outcome TEXT, prompt_tokens INTEGER, completion_tokens INTEGER, total_tokens INTEGER)"""


def legacy_store(tmp_path: Path, lines: str, version: int) -> tuple[Usage, Path]:
    """A store of schema `version` as an upgrade finds it (records as rows of a `requests` table, rollups of
    today's shape), holding the records of `lines`, and the fresh store they were ingested into."""
    fresh = Usage(tmp_path / "fresh.sqlite3", tmp_path / "fresh.log")
    fresh.log_path.write_text(lines)
    fresh.ingest()
    path = tmp_path / "legacy.sqlite3"
    db = sqlite3.connect(path)
    db.execute(LEGACY_REQUESTS)
    db.executemany(f"INSERT INTO requests VALUES ({', '.join('?' * len(RECORD_FIELDS))})",
                   [[r[f] for f in RECORD_FIELDS] for r in records_of(fresh)])
    db.executescript(usage_mod.ROLLUPS_SCHEMA)
    db.execute("ATTACH ? AS fresh", (str(fresh.db_path),))
    db.execute("INSERT INTO rollups SELECT * FROM fresh.rollups")
    db.execute(f"PRAGMA user_version = {version}")
    db.commit()
    db.close()
    return fresh, path


def test_records_of_schema_4_are_moved_into_segments_and_counted_once(tmp_path: Path) -> None:
    lines = "".join(record(f"r{i}", 1_764_000_000.0 + i, status=200 + i % 2 * 300) for i in range(50))
    fresh, path = legacy_store(tmp_path, lines, version=4)
    usage = Usage(path, tmp_path / "access.log")
    append(usage.log_path, record("new", 1_764_000_100.0))
    assert usage.ingest() == 1  # ids above the records not moved yet
    assert ids(usage) == ["new"]  # until moved, records are in the rollups only
    assert usage.backfill()
    assert ids(usage) == sorted([*(f"r{i}" for i in range(50)), "new"])
    assert {r["id"] for r in records_of(usage)} == set(range(1, 52))
    assert [r for r in records_of(usage) if r["request_id"] != "new"] == records_of(fresh)
    for span in (*usage_mod.SPANS, "total"):
        assert sum(r["requests"] for r in rollup(usage, span)) == 51
        assert sum(r["server_errors"] for r in rollup(usage, span)) == 25
    with usage._connect() as db:
        assert db.execute("SELECT name FROM sqlite_master WHERE name = 'requests'").fetchone() is None


def test_values_sqlite_kept_that_do_not_fit_a_record_are_moved_as_unknown(tmp_path: Path) -> None:
    """SQLite stored whatever it was given (a column's affinity converts only what looks like a number)."""
    _, path = legacy_store(tmp_path, record("a"), version=4)
    with sqlite3.connect(path) as db:
        db.execute("UPDATE requests SET bytes_sent = 'lots', request_length = 1e30, ttfb = 'x', model = 7")
    usage = Usage(path, tmp_path / "access.log")
    assert usage.backfill()
    (moved,) = records_of(usage)
    assert (moved["bytes_sent"], moved["request_length"], moved["ttfb"], moved["model"]) == (None, None, None, "7")
    assert (moved["request_id"], moved["status"], moved["duration"]) == ("a", 200, 0.5)


@pytest.mark.parametrize("version", [2, 3])
def test_rollups_of_an_earlier_schema_are_made_anew_from_the_records(tmp_path: Path, version: int) -> None:
    """Schemas 2 and 3 had other rollup columns (no `failed`; no all-time rows): the rollups are built again."""
    fresh, path = legacy_store(tmp_path, record("a") + record("b", status=502)
                               + record("c", status=200, outcome="upstream_cut")
                               + record("d", status=504, outcome="timeout"), version)
    with sqlite3.connect(path) as db:
        db.execute("ALTER TABLE rollups DROP COLUMN failed")
        db.execute("DELETE FROM rollups WHERE span = 0 OR span = 60")
    old = Usage(path, tmp_path / "access.log")
    assert rollup(old, "day") == [] and old.backfill()
    for span in (*usage_mod.SPANS, "total"):
        assert rollup(old, span) == rollup(fresh, span)
    assert {r["failed"] for r in rollup(old, "day")} == {3}
    assert records_of(old) == records_of(fresh)


def test_backfill_after_an_upgrade_is_done_in_small_steps_while_ingestion_goes_on(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An upgrade must not hold the database for minutes: the records kept are moved and added to the new
    rollups a batch per transaction, and lines ingested meanwhile are counted once."""
    _, path = legacy_store(tmp_path, "".join(record(f"old{i}", 1_764_000_000.0 + i) for i in range(100)), 1)
    monkeypatch.setattr(usage_mod, "BACKFILL_BATCH", 30)
    usage = Usage(path, tmp_path / "access.log")
    steps = 0
    while not usage.backfill(budget=0):
        steps += 1
        append(usage.log_path, record(f"new{steps}", 1_764_000_000.0 + 50))
        usage.ingest()
    assert steps == 3  # 30 + 30 + 30 + 10
    assert sum(r["requests"] for r in rollup(usage, "minute")) == 103
    assert sum(r["requests"] for r in rollup(usage, "total")) == 103
    assert len(ids(usage)) == 103
    assert usage.backfill()  # nothing left


def test_day_rollups_are_kept_for_month_quotas() -> None:
    check = settings_mod.VALIDATORS["usage_day_retention_days"]
    assert [check("usage_day_retention_days", days) for days in (0, 31, 400)] == [0, 31, 400]
    with pytest.raises(v.ValidationError, match=r"usage_day_retention_days.*at least 31"):
        check("usage_day_retention_days", 7)


def test_an_api_read_catches_up_one_batch_at_most(usage: Usage, monkeypatch: pytest.MonkeyPatch) -> None:
    """After downtime the log may hold gigabytes: a read through the API must not ingest all of it before it
    answers (nginx gives up on the manager after 60 s); the supervisor does the rest."""
    lines = [record(f"r{i:02}") for i in range(50)]  # all of one length: 10 in a batch
    usage.log_path.write_text("".join(lines))
    monkeypatch.setattr(usage_mod, "BATCH_BYTES", len(lines[0]) * 10 + 5)
    assert usage.catch_up() == 10
    assert usage.catch_up() == 10
    assert usage.ingest() == 30 and len(ids(usage)) == 50
