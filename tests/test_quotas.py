"""Quotas without nginx: the window arithmetic, figures from the rollups, their publication, the key store
migration, validation, and the gate's answers."""

from __future__ import annotations

import json
import sqlite3
import time
from datetime import UTC, datetime
from pathlib import Path

import pytest

from authsvc import keys as keyformat
from authsvc import quotas as q
from authsvc.gate import Gate
from authsvc.snapshot import KEYS_DB, KeyRule
from manager import keys as keys_mod
from manager import keystore, quotas
from manager import validation as v
from manager.context import Bastion
from manager.datadir import DataDir
from manager.keystore import SCHEMA, KeyStore
from tests.test_gate import PEPPER, Call, key_entry, write_snapshot
from tests.test_usage import append, record


def ts(text: str) -> int:
    return int(datetime.fromisoformat(text).replace(tzinfo=UTC).timestamp())


# ---- window arithmetic ----------------------------------------------------------------------------------

@pytest.mark.parametrize(("at", "start", "end"), [
    ("2026-03-15T12:00:00", "2026-03-01T00:00:00", "2026-04-01T00:00:00"),
    ("2026-12-31T23:59:59", "2026-12-01T00:00:00", "2027-01-01T00:00:00"),  # the year turns
    ("2027-01-01T00:00:00", "2027-01-01T00:00:00", "2027-02-01T00:00:00"),  # its first second is in it
    ("2028-02-29T10:00:00", "2028-02-01T00:00:00", "2028-03-01T00:00:00"),  # leap year
    ("2026-02-28T23:59:59", "2026-02-01T00:00:00", "2026-03-01T00:00:00"),
])
def test_month_bounds_are_utc_calendar_months(at: str, start: str, end: str) -> None:
    assert q.month_bounds(ts(at)) == (ts(start), ts(end))
    assert q.month_bounds(ts(at) + 0.999) == (ts(start), ts(end))


def test_day_and_minute_starts() -> None:
    t = ts("2026-03-15T12:34:56")
    assert q.day_start(t) == ts("2026-03-15T00:00:00") and q.day_start(t + 0.5) == ts("2026-03-15T00:00:00")
    assert q.minute_start(t) == ts("2026-03-15T12:34:00")
    assert q.day_start(ts("2026-03-16T00:00:00")) == ts("2026-03-16T00:00:00")


def test_sliding_minute_weighs_the_previous_minute_by_what_is_left_of_it() -> None:
    b = ts("2026-03-15T12:00:00")
    c = q.Consumption(minutes=((b - 60, 600), (b, 100)))
    assert c.minute_tokens(b) == 700  # the previous minute is wholly inside [now - 60, now)
    assert c.minute_tokens(b + 15) == pytest.approx(100 + 600 * 0.75)
    assert c.minute_tokens(b + 59.999) == pytest.approx(100, abs=0.1)
    # with no newer figures the current minute ages in turn, and at two minutes nothing is left
    assert c.minute_tokens(b + 60) == 100
    assert c.minute_tokens(b + 90) == pytest.approx(50)
    assert c.minute_tokens(b + 120) == 0 and c.minute_tokens(b + 1000) == 0
    assert c.minute_reset(b + 15) == 105 and c.minute_reset(b + 500) == 0


def test_tpm_wait_is_when_the_window_falls_below_the_limit() -> None:
    b = ts("2026-03-15T12:00:00")
    c = q.Consumption(minutes=((b - 60, 600), (b, 100)))
    assert c.tpm_wait(1000, b + 15) == 0  # 550 < 1000: no wait
    assert c.tpm_wait(400, b + 15) == pytest.approx(15)  # 100 + 600 * (45 - x) / 60 = 400
    assert c.minute_tokens(b + 15 + c.tpm_wait(400, b + 15)) == pytest.approx(400)
    only = q.Consumption(minutes=((b, 1000),))
    assert only.tpm_wait(500, b + 30) == pytest.approx(60)  # full until b + 60, half at b + 90
    assert only.tpm_wait(1000, b + 30) == pytest.approx(30)  # falls below once b + 60 is past


def test_day_and_month_figures_age_by_themselves() -> None:
    day = ts("2026-03-31T00:00:00")
    month, month_end = q.month_bounds(day)
    c = q.Consumption(day=day, day_tokens=5, day_requests=2, month=month, month_end=month_end, month_tokens=50)
    assert c.tokens_today(day) == 5 and c.requests_today(day + 86399.9) == 2
    assert c.tokens_today(day + 86400) == 0 and c.requests_today(day + 86400) == 0
    assert c.tokens_today(day - 1) == 0
    assert c.tokens_this_month(month_end - 0.5) == 50 and c.tokens_this_month(month_end) == 0


def test_figures_file_round_trip_leaves_out_keys_that_used_nothing() -> None:
    c = q.Consumption(((60, 5),), 0, 5, 1, 0, 100, 5)
    data = q.render({"a": c, "b": q.NOTHING})
    assert q.parse(data) == {"a": c}


# ---- figures from the rollups ---------------------------------------------------------------------------

@pytest.fixture
def bastion(tmp_path: Path) -> Bastion:
    return Bastion(DataDir.at(tmp_path / "data"))


def usage_line(key: str, end: float, tokens: int | None, pool: str = "p", rid: str | None = None) -> str:
    fields = {"key": key, "pool": pool, "total_tokens": "" if tokens is None else tokens}
    if not pool:
        fields.update(upstream="", upstream_status="", ttfb="", status=429)
    return record(rid or f"{key}-{end}-{tokens}-{pool}", end, **fields)


def test_consumption_counts_each_window_at_its_boundaries(bastion: Bastion) -> None:
    """Now is the first minute of a day and of a month: the previous minute counts for the sliding minute
    (weighted), not for the day or month."""
    m = ts("2026-03-01T00:00:00")
    append(bastion.dirs.access_log, "".join([
        usage_line("k", m - 90, 1000),  # two minutes ago: outside every window
        usage_line("k", m - 30, 100),  # the previous minute, the previous day and month
        usage_line("k", m + 5, 10),
        usage_line("k", m + 6, None),  # not metered: a request, no tokens
        usage_line("k", m + 7, None, pool=""),  # refused by the gate: neither
        usage_line("other", m + 8, 5000),
    ]))
    bastion.usage.ingest()
    with bastion.usage.reader() as db:
        c = quotas.consumption(db, "k", m + 20)
    assert c.minutes == ((m - 60, 100), (m, 10))
    assert c.minute_tokens(m + 20) == pytest.approx(10 + 100 * 40 / 60)
    assert (c.day, c.day_tokens, c.day_requests) == (m, 10, 2)
    assert (c.month, c.month_end, c.month_tokens) == (m, ts("2026-04-01T00:00:00"), 10)
    # later in the month: the first day counts for the month only
    later = ts("2026-03-15T08:00:00")
    append(bastion.dirs.access_log, usage_line("k", later - 1, 7))
    bastion.usage.ingest()
    with bastion.usage.reader() as db:
        c = quotas.consumption(db, "k", later)
    assert (c.day_tokens, c.day_requests, c.month_tokens) == (7, 1, 17)
    assert c.minutes == ((q.minute_start(later - 1), 7),)


def test_publisher_recomputes_only_quota_keys_with_new_records(bastion: Bastion) -> None:
    now = time.time()
    publisher = quotas.Publisher(bastion)
    path = bastion.dirs.run / q.QUOTAS_FILE
    free, _ = keys_mod.create(bastion, "free")
    assert publisher.run() == 0 and q.parse(path.read_bytes()) == {}  # no quota key: nothing read
    limited, _ = keys_mod.create(bastion, "limited", tokens_per_day=100)
    assert publisher.run() == 1 and q.parse(path.read_bytes()) == {}  # a quota key that used nothing
    append(bastion.dirs.access_log, usage_line(free["id"], now, 50))
    bastion.usage.ingest()
    assert publisher.run() == 0  # only a key without quotas was used
    append(bastion.dirs.access_log, usage_line(limited["id"], now, 40))
    bastion.usage.ingest()
    assert publisher.run() == 1
    assert q.parse(path.read_bytes())[limited["id"]].tokens_today(now) == 40
    stamp = path.stat().st_mtime_ns
    assert publisher.run() == 0 and path.stat().st_mtime_ns == stamp  # nothing new: not rewritten
    path.write_bytes(b"damaged")
    publisher.run()  # a file that is not the one written last is written again
    assert q.parse(path.read_bytes())[limited["id"]].tokens_today(now) == 40
    keys_mod.update(bastion, free["id"], tpm=1000)  # a new quota key is computed at once, old usage included
    assert publisher.run() == 1
    assert q.parse(path.read_bytes())[free["id"]].tokens_today(now) == 50
    keys_mod.update(bastion, limited["id"], tokens_per_day=None)
    assert publisher.run() == 0 and limited["id"] not in q.parse(path.read_bytes())
    keys_mod.revoke(bastion, free["id"])
    publisher.run()
    assert q.parse(path.read_bytes()) == {}


def test_key_details_show_each_quota(bastion: Bastion) -> None:
    now = time.time()
    k, _ = keys_mod.create(bastion, "d", tpm=100, tokens_per_day=1000, tokens_per_month=5000, requests_per_day=3)
    append(bastion.dirs.access_log, usage_line(k["id"], now - 1, 30) + usage_line(k["id"], now - 1, 1500))
    bastion.usage.ingest()
    state = quotas.details(bastion, keys_mod.get(bastion, k["id"]), now)
    assert state["tpm"]["limit"] == 100 and state["tpm"]["used"] == 1530 and state["tpm"]["remaining"] == 0
    assert state["tokens_per_day"] == {"limit": 1000, "used": 1530, "remaining": 0,
                                       "resets_at": q.day_start(now) + 86400, "window": "UTC day"}
    assert state["requests_per_day"]["used"] == 2 and state["requests_per_day"]["remaining"] == 1
    assert state["tokens_per_month"]["remaining"] == 3470
    assert state["tokens_per_month"]["resets_at"] == q.month_bounds(now)[1]
    assert quotas.details(bastion, keys_mod.create(bastion, "none")[0]) == {}


# ---- keys: the new fields -------------------------------------------------------------------------------

@pytest.mark.parametrize("bad", [0, -5, "abc", True, 1.5, 10**16, [], ""])
@pytest.mark.parametrize("field", ["tpm", "tokens_per_day", "tokens_per_month", "requests_per_day"])
def test_bad_quotas_are_refused_naming_the_field(bastion: Bastion, field: str, bad) -> None:
    k, _ = keys_mod.create(bastion, "k", **{field: 10})
    with pytest.raises(v.ValidationError) as e:
        keys_mod.create(bastion, "x", **{field: bad})
    assert e.value.field == field and "positive integer" in str(e.value)
    with pytest.raises(v.ValidationError):
        keys_mod.update(bastion, k["id"], **{field: bad})
    assert bastion.keystore.count() == 1 and keys_mod.get(bastion, k["id"])[field] == 10


def test_quotas_set_and_removed(bastion: Bastion) -> None:
    k, _ = keys_mod.create(bastion, "k", tpm="500", requests_per_day=2)
    assert (k["tpm"], k["requests_per_day"], k["tokens_per_day"]) == (500, 2, None)
    assert keys_mod.update(bastion, k["id"], tpm=None, tokens_per_day="none")["tpm"] is None
    assert bastion.keystore.with_quotas() == [k["id"]]
    keys_mod.update(bastion, k["id"], requests_per_day=None)
    assert bastion.keystore.with_quotas() == []


def test_key_store_of_schema_1_is_migrated_keeping_its_keys(tmp_path: Path) -> None:
    path = tmp_path / KEYS_DB
    db = sqlite3.connect(path)
    db.executescript(SCHEMA)  # the schema every file starts from (version 1)
    db.execute("INSERT INTO keys VALUES ('old1', 1, 'd', 'old', 1, NULL, '[]', '[]', 7, '[]', '[]', 1.0, 'cli', NULL)")
    db.execute("UPDATE meta SET version = 1")
    db.commit()
    # the gate reading a file the manager has not migrated yet: no quotas
    db.row_factory = sqlite3.Row
    rule = KeyRule.from_row(db.execute("SELECT * FROM keys").fetchone(), {})
    assert rule.rpm == 7 and not rule.quotas
    db.close()
    store = KeyStore(path)
    old = store.get("old1")
    assert old["name"] == "old" and old["rpm"] == 7 and old["tpm"] is None and old["requests_per_day"] is None
    assert old["max_parallel"] is None and old["default_model"] is None and old["allow_auto"] is False
    store.update("old1", lambda _: {"tpm": 9})
    assert store.with_quotas() == ["old1"]
    assert KeyStore(path).get("old1")["tpm"] == 9  # opening again migrates nothing twice
    check = sqlite3.connect(path)
    assert check.execute("SELECT schema FROM meta").fetchone()[0] == keystore.SCHEMA_VERSION
    plan = check.execute("EXPLAIN QUERY PLAN SELECT id FROM keys WHERE (tpm IS NOT NULL OR tokens_per_day IS NOT"
                         " NULL OR tokens_per_month IS NOT NULL OR requests_per_day IS NOT NULL) AND revoked_at IS"
                         " NULL").fetchall()
    assert "keys_quotas" in str(plan)


# ---- the gate -------------------------------------------------------------------------------------------

NOW = float(ts("2026-03-15T12:00:30"))


def quota_gate(tmp_path: Path, token: str, figures: q.Consumption | None, **quotas_: int) -> Gate:
    write_snapshot(tmp_path / "snapshot.json", [key_entry(token, **quotas_)])
    run = tmp_path / "run"
    run.mkdir(exist_ok=True)
    if figures is not None:
        (run / q.QUOTAS_FILE).write_bytes(q.render({keyformat.key_id_of(token): figures}))
    return Gate(tmp_path / "snapshot.json", PEPPER, clock=lambda: NOW)


def today(tokens: int = 0, requests: int = 0, month_tokens: int = 0) -> q.Consumption:
    month, end = q.month_bounds(NOW)
    return q.Consumption((), q.day_start(NOW), tokens, requests, month, end, month_tokens)


CHAT = {"model": "gpt-4o", "messages": []}


@pytest.mark.parametrize(("rules", "figures", "unit"), [
    ({"tokens_per_day": 100}, today(tokens=100), "100 tokens per UTC day"),
    ({"requests_per_day": 3}, today(requests=3), "3 requests per UTC day"),
    ({"tokens_per_month": 1000}, today(month_tokens=1500), "1000 tokens per UTC month"),
])
def test_exhausted_quota_is_insufficient_quota(tmp_path: Path, rules, figures, unit) -> None:
    token = keyformat.generate()[1]
    gate = quota_gate(tmp_path, token, figures, **rules)
    c = Call(gate, "/v1/chat/completions", token, CHAT)
    assert c.status == 429 and c.headers["x-should-retry"] == "false" and "Retry-After" not in c.headers
    error = c.json()["error"]
    assert error["type"] == error["code"] == "insufficient_quota" and error["param"] is None
    assert unit in error["message"] and "it resets at 2026-" in error["message"]
    ollama = Call(gate, "/api/chat", token, {"model": "llama3", "messages": []})
    assert ollama.status == 429 and unit in ollama.json()["error"]


def test_quota_not_reached_passes(tmp_path: Path) -> None:
    token = keyformat.generate()[1]
    gate = quota_gate(tmp_path, token, today(tokens=99, requests=2, month_tokens=999), tokens_per_day=100,
                      requests_per_day=3, tokens_per_month=1000)
    c = Call(gate, "/v1/chat/completions", token, CHAT)
    assert c.status == 200 and "x-ratelimit-limit-tokens" not in c.headers


def test_yesterdays_figures_do_not_count_today(tmp_path: Path) -> None:
    token = keyformat.generate()[1]
    old = q.Consumption((), q.day_start(NOW) - 86400, 500, 500, 0, 0, 0)
    gate = quota_gate(tmp_path, token, old, tokens_per_day=100, requests_per_day=1)
    assert Call(gate, "/v1/chat/completions", token, CHAT).status == 200


def test_tpm_headers_and_refusal(tmp_path: Path) -> None:
    token = keyformat.generate()[1]
    minute = q.minute_start(NOW)
    figures = q.Consumption(minutes=((minute, 60),))
    gate = quota_gate(tmp_path, token, figures, tpm=100)
    c = Call(gate, "/v1/chat/completions", token, CHAT)
    assert c.status == 200
    assert (c.headers["x-ratelimit-limit-tokens"], c.headers["x-ratelimit-remaining-tokens"]) == ("100", "40")
    assert c.headers["x-ratelimit-reset-tokens"] == "90.000s"  # NOW is 30 s into the minute
    gate = quota_gate(tmp_path, token, figures, tpm=60)
    c = Call(gate, "/v1/chat/completions", token, CHAT)
    assert c.status == 429 and c.json()["error"]["code"] == "rate_limit_exceeded"
    assert c.json()["error"]["type"] == "requests"
    assert c.headers["x-ratelimit-remaining-tokens"] == "0" and c.headers["x-ratelimit-limit-tokens"] == "60"
    # 60 tokens weigh fully until the minute ends (30 s), then fall below 60 at once
    assert c.headers["Retry-After"] == "30"


def test_key_without_quotas_or_without_figures_is_unaffected(tmp_path: Path) -> None:
    token = keyformat.generate()[1]
    gate = quota_gate(tmp_path, token, None, tokens_per_day=1)  # nothing published yet: nothing used
    assert Call(gate, "/v1/chat/completions", token, CHAT).status == 200
    other = keyformat.generate()[1]
    (tmp_path / "x").mkdir()
    gate = quota_gate(tmp_path / "x", other, today(tokens=10**9, requests=10**9))
    c = Call(gate, "/v1/chat/completions", other, CHAT)
    assert c.status == 200 and not any(h.startswith("x-ratelimit") for h in c.headers)


def test_gate_reloads_changed_figures_and_keeps_the_last_good_ones(tmp_path: Path) -> None:
    token = keyformat.generate()[1]
    gate = quota_gate(tmp_path, token, today(tokens=5), tokens_per_day=10)
    assert Call(gate, "/v1/chat/completions", token, CHAT).status == 200
    path = tmp_path / "run" / q.QUOTAS_FILE
    path.write_bytes(q.render({keyformat.key_id_of(token): today(tokens=10)}))
    assert gate.quotas.load()
    assert Call(gate, "/v1/chat/completions", token, CHAT).status == 429
    path.write_bytes(b"{not json")
    assert not gate.quotas.load() and gate.quotas.problem
    assert Call(gate, "/v1/chat/completions", token, CHAT).status == 429
    path.write_text(json.dumps({"keys": {}}))
    assert gate.quotas.load() and Call(gate, "/v1/chat/completions", token, CHAT).status == 200


def test_gate_counts_the_requests_it_lets_through(tmp_path: Path) -> None:
    """The figure lags (the access log is written when a request ends): the gate's own count does not."""
    token = keyformat.generate()[1]
    clock = [NOW]
    write_snapshot(tmp_path / "snapshot.json", [key_entry(token, requests_per_day=3)])
    gate = Gate(tmp_path / "snapshot.json", PEPPER, clock=lambda: clock[0])
    assert Call(gate, "/v1/models", token, method="GET").status == 200  # answered by the gate: not counted
    assert Call(gate, "/v1/chat/completions", token, {"model": "nope"}).status == 404  # refused: not counted
    assert [Call(gate, "/v1/chat/completions", token, CHAT).status for _ in range(4)] == [200, 200, 200, 429]
    clock[0] = q.day_start(NOW) + 86400  # a new UTC day
    assert Call(gate, "/v1/chat/completions", token, CHAT).status == 200
    # a gate restarted (or a figure higher than its own count, e.g. another node's requests) starts from the figure
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / q.QUOTAS_FILE).write_bytes(q.render({keyformat.key_id_of(token): q.Consumption(
        day=q.day_start(clock[0]), day_requests=2)}))
    gate = Gate(tmp_path / "snapshot.json", PEPPER, clock=lambda: clock[0])
    assert [Call(gate, "/v1/chat/completions", token, CHAT).status for _ in range(2)] == [200, 429]


def test_unreadable_figures_are_reported_in_the_health_check(tmp_path: Path, bastion: Bastion) -> None:
    from authsvc.snapshot import StatusBoard
    from manager.snapshot import gate_problems

    token = keyformat.generate()[1]
    gate = quota_gate(tmp_path, token, None, tpm=10)
    (tmp_path / "run" / q.QUOTAS_FILE).write_bytes(b"{damaged")
    gate.quotas.load()
    StatusBoard(gate.source, bastion.dirs.run, more=gate.status).publish()  # what the gate's status thread writes
    assert [p for p in gate_problems(bastion) if p.startswith("quota figures unreadable: ")]
    (tmp_path / "run" / q.QUOTAS_FILE).write_bytes(q.render({}))
    gate.quotas.load()
    StatusBoard(gate.source, bastion.dirs.run, more=gate.status).publish()
    assert gate_problems(bastion) == []
