"""The query side of usage analytics (manager/usage_queries.py): filters, paging, group counts, summaries from
the rollups (percentiles, costs), CSV; through the functions, the Flask app and the CLI, on synthetic lines
written as nginx writes them and ingested by Usage.ingest()."""

from __future__ import annotations

import csv
import io
import json
import math
import random
from pathlib import Path

import pytest
from click.testing import CliRunner

from manager import usage as usage_mod
from manager import usage_queries as q
from manager.cli import main as cli_main
from manager.usage import Usage
from manager.usage_log import format_record
from manager.usage_records import DURATION_BOUNDS

T0 = 1_764_000_000  # a multiple of 86400 * 100: 2025-11-24T16:00:00Z, not a day boundary
DAY0 = T0 - T0 % 86400


def line(i: int, end: float, **fields) -> str:
    values = {"end": end, "request_id": f"r{i:05d}", "key": "k1", "model": "m1", "pool": "p1",
              "upstream": "unix:/x/authsvc.sock : 10.0.0.1:8000", "status": 200, "bytes_sent": 100,
              "request_length": 50, "duration": 0.5, "upstream_status": "200 : 200", "ttfb": "0.001 : 0.1",
              "method": "POST", "uri": "/v1/chat/completions", "remote_addr": "127.0.0.1", "outcome": "completed",
              "prompt_tokens": 10, "completion_tokens": 20, "total_tokens": 30, **fields}
    return format_record(**values)


def make_usage(tmp_path: Path, lines: list[str]) -> Usage:
    usage = Usage(tmp_path / "usage.sqlite3", tmp_path / "access.log")
    with usage.log_path.open("a") as f:
        f.write("".join(lines))
    assert usage.ingest() == len(lines)
    return usage


@pytest.fixture
def mixed(tmp_path: Path) -> Usage:
    """300 requests over 5 hours: 3 keys, 2 models, 2 pools, statuses, outcomes, metered and not."""
    rng = random.Random(7)
    lines = []
    for i in range(300):
        status = rng.choice([200, 200, 200, 404, 429, 500, 502])
        metered = rng.random() < 0.8
        lines.append(line(i, T0 + i * 60 + rng.random(), key=f"k{i % 3}", model=rng.choice(["m1", "m2"]),
                          pool=rng.choice(["p1", "p2"]), status=status, duration=round(rng.uniform(0.01, 20), 3),
                          outcome=rng.choice(["completed", "completed", "upstream_cut", "timeout", ""]),
                          prompt_tokens=i if metered else "", completion_tokens=2 * i if metered else "",
                          total_tokens=3 * i if metered else ""))
    return make_usage(tmp_path, lines)


def all_records(usage: Usage) -> list[dict]:
    return q.records(usage, limit=100_000).records


# ---- records: filters and paging ----------------------------------------------------------------------------

@pytest.mark.parametrize("filters, keep", [
    (q.Filters(key="k1"), lambda r: r["key"] == "k1"),
    (q.Filters(model="m2", pool="p1"), lambda r: r["model"] == "m2" and r["pool"] == "p1"),
    (q.Filters(status="429"), lambda r: r["status"] == 429),
    (q.Filters(status="5xx"), lambda r: 500 <= r["status"] <= 599),
    (q.Filters(outcome="timeout"), lambda r: r["outcome"] == "timeout"),
    (q.Filters(outcome="unknown"), lambda r: r["outcome"] is None),
    (q.Filters(since=T0 + 3600, until=T0 + 7200), lambda r: T0 + 3600 <= r["start"] < T0 + 7200),
])
def test_record_filters(mixed: Usage, filters: q.Filters, keep) -> None:
    expected = [r["request_id"] for r in all_records(mixed) if keep(r)]
    got = [r["request_id"] for r in q.records(mixed, filters, limit=10_000).records]
    assert got == expected and 0 < len(got) < 300


def test_cursor_pages_have_no_gaps_or_repeats_even_with_equal_starts_and_new_rows(tmp_path: Path) -> None:
    # 60 records share 6 start times (ties are broken by id)
    usage = make_usage(tmp_path, [line(i, T0 + i // 10, duration=0) for i in range(60)])
    seen, after = [], None
    for page_number in range(100):
        page = q.records(usage, limit=7, after=after)
        seen += [r["request_id"] for r in page.records]
        if page_number == 2:  # newer requests arrive while an operator pages: they are not on later pages
            with usage.log_path.open("a") as f:
                f.write("".join(line(1000 + i, T0 + 500, duration=0) for i in range(5)))
            assert usage.ingest() == 5
        if page.next_cursor is None:
            break
        after = q.cursor("cursor", page.next_cursor)
    assert len(seen) == len(set(seen)) == 60
    assert seen == [r["request_id"] for r in sorted(all_records(usage), key=lambda r: (-r["start"], -r["id"]))
                    if r["request_id"] < "r01000"]


def test_pages_read_across_segments_keep_the_order_of_start_times(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """The log is in order of END: a long stream lands in a later segment than shorter requests that started
    after it. Pages read segments newest first and stop early; they must still equal the full order."""
    monkeypatch.setattr(usage_mod, "BATCH_BYTES", 1500)  # a segment per few lines
    monkeypatch.setattr(usage_mod, "COMPACT_AFTER", 10**6)
    rng = random.Random(3)
    usage = make_usage(tmp_path, [line(i, T0 + i, duration=rng.choice([0, 1, 5, 40, 200]), key=f"k{i % 2}")
                                  for i in range(150)])
    with usage.reader() as db:
        assert db.execute("SELECT COUNT(*) FROM segments").fetchone()[0] > 15
    everything = sorted(all_records(usage), key=lambda r: (-r["start"], -r["id"]))
    assert len(everything) == 150
    for filters in (q.Filters(), q.Filters(key="k1"), q.Filters(since=T0 + 20, until=T0 + 120)):
        expected = [r["id"] for r in everything if r in q.records(usage, filters, limit=1000).records]
        for limit in (2, 9):
            seen, after = [], None
            while True:
                page = q.records(usage, filters, limit=limit, after=after)
                seen += [r["id"] for r in page.records]
                if page.next_cursor is None:
                    break
                after = q.cursor("cursor", page.next_cursor)
            assert seen == expected
        assert [r["id"] for r in q.records(usage, filters, limit=10, offset=20).records] == expected[20:30]


def test_offset_pages_cover_everything_once(mixed: Usage) -> None:
    pages = [q.records(mixed, limit=64, offset=o).records for o in range(0, 320, 64)]
    ids = [r["id"] for page in pages for r in page]
    assert len(ids) == len(set(ids)) == 300


def test_group_counts_are_exact(mixed: Usage) -> None:
    rows = all_records(mixed)
    groups = q.group_counts(mixed, q.Filters(status="2xx"), ("key", "outcome"))
    for g in groups:
        members = [r for r in rows if r["key"] == g["key"] and r["outcome"] == g["outcome"] and r["status"] < 300]
        metered = [r for r in members if r["total_tokens"] is not None]
        assert g["requests"] == len(members) and g["metered"] == len(metered)
        assert g["errors"] == (len(members) if g["outcome"] in ("upstream_cut", "timeout") else 0)  # cut 200s
        assert g["total_tokens"] == (sum(r["total_tokens"] for r in metered) if metered else None)
    assert sum(g["requests"] for g in groups) == sum(r["status"] < 300 for r in rows)
    assert [g["requests"] for g in groups] == sorted((g["requests"] for g in groups), reverse=True)


# ---- summaries from the rollups -----------------------------------------------------------------------------

def test_summary_matches_the_records(mixed: Usage) -> None:
    rows = all_records(mixed)
    result = q.summary(mixed, group_by=("key", "pool"))
    assert result.span == 86400 and result.since is None  # unbounded: per-day rollups are exact
    assert len(result.rows) == 6
    for s in result.rows:
        members = [r for r in rows if r["key"] == s["key"] and r["pool"] == s["pool"]]
        metered = [r for r in members if r["total_tokens"] is not None]
        assert s["requests"] == len(members)
        assert s["client_errors"] == sum(400 <= r["status"] < 500 for r in members)
        assert s["server_errors"] == sum(r["status"] >= 500 for r in members)
        assert s["upstream_cut"] == sum(r["outcome"] == "upstream_cut" for r in members)
        assert s["errors"] == sum(r["status"] >= 400 or r["outcome"] in ("upstream_cut", "timeout")
                                  for r in members)  # each failed request once
        assert s["metered"] == len(metered)
        assert s["prompt_tokens"] == sum(r["prompt_tokens"] for r in metered)
        assert s["avg_duration"] == pytest.approx(sum(r["duration"] for r in members) / len(members), abs=1e-6)


def test_summary_buckets_by_end_time_and_widens_the_range_to_whole_buckets(tmp_path: Path) -> None:
    # started in the first hour, ended in the second: counted in the second
    usage = make_usage(tmp_path, [line(0, DAY0 + 3600 + 10, duration=20), line(1, DAY0 + 2 * 3600 + 5)])
    result = q.summary(usage, q.Filters(since=DAY0 + 1800, until=DAY0 + 3 * 3600 - 1), group_by=(),
                       bucket="hour")
    assert (result.span, result.since, result.until) == (3600, DAY0, DAY0 + 3 * 3600)
    assert [(r["bucket"], r["requests"]) for r in result.rows] == [(DAY0 + 3600, 1), (DAY0 + 7200, 1)]
    # no buckets: an unaligned short range is read from the per-minute rollups
    result = q.summary(usage, q.Filters(since=DAY0 + 3600 + 5, until=DAY0 + 3600 + 30), group_by=())
    assert (result.span, result.since, result.until) == (60, DAY0 + 3600, DAY0 + 3660)
    assert [r["requests"] for r in result.rows] == [1]
    assert q.summary(usage, q.Filters(since=DAY0, until=DAY0 + 86400), group_by=()).span == 86400


def exact_quantile(values: list[float], quantile: float) -> float:
    ordered = sorted(values)
    return ordered[max(0, math.ceil(quantile * len(ordered)) - 1)]


@pytest.mark.parametrize("spread", ["uniform", "lognormal"])
def test_percentiles_are_close_to_the_exact_ones(tmp_path: Path, spread: str) -> None:
    rng = random.Random(1)
    if spread == "uniform":
        durations = [rng.uniform(0, 10) for _ in range(4000)]
        ttfbs = [rng.uniform(0, 1) for _ in range(4000)]
    else:
        durations = [min(rng.lognormvariate(0, 1), 299) for _ in range(4000)]
        ttfbs = [min(rng.lognormvariate(-3, 1), 29) for _ in range(4000)]
    usage = make_usage(tmp_path, [line(i, T0 + i, duration=f"{d:.3f}", ttfb=f"0.001 : {t:.3f}")
                                  for i, (d, t) in enumerate(zip(durations, ttfbs, strict=True))])
    [row] = q.summary(usage, group_by=()).rows
    for name, values, bounds in (("duration", durations, DURATION_BOUNDS), ("ttfb", ttfbs, None)):
        for quantile in (0.5, 0.95):
            exact, estimate = exact_quantile(values, quantile), row[f"p{round(quantile * 100)}_{name}"]
            if spread == "uniform":  # linear inside a bucket is right for evenly spread values
                assert abs(estimate - exact) <= 0.02 * exact, (name, quantile, estimate, exact)
            else:  # otherwise within the width of the bucket holding the exact value
                upper = next(b for b in (bounds or q.TTFB_BOUNDS) if b >= exact)
                lower = max([0.0, *(b for b in (bounds or q.TTFB_BOUNDS) if b < exact)])
                assert lower <= estimate <= upper, (name, quantile, estimate, exact)


def test_percentile_beyond_the_last_bound_and_without_ttfb(tmp_path: Path) -> None:
    usage = make_usage(tmp_path, [line(i, T0 + i, duration=400, ttfb="-", pool="") for i in range(10)])
    [row] = q.summary(usage, group_by=()).rows
    assert row["p50_duration"] == row["p95_duration"] == DURATION_BOUNDS[-1]  # as histogram_quantile answers
    assert row["p50_ttfb"] is None and row["avg_ttfb"] is None


def test_costs_from_prices_per_model(tmp_path: Path) -> None:
    usage = make_usage(tmp_path, [
        line(0, T0, key="a", model="priced", prompt_tokens=10**6, completion_tokens=500_000, total_tokens=1_500_000),
        line(1, T0 + 1, key="a", model="free", prompt_tokens=10, completion_tokens=10, total_tokens=20),
        line(2, T0 + 2, key="b", model="free", prompt_tokens=5, completion_tokens=5, total_tokens=10),
        line(3, T0 + 3, key="c", model="priced", prompt_tokens="", completion_tokens="", total_tokens=""),
    ])
    prices = {"priced": {"input": 2.0, "output": 8.0}}
    rows = {r["key"]: r for r in q.summary(usage, group_by=("key",), prices=prices).rows}
    assert rows["a"]["cost"] == pytest.approx(2.0 + 4.0) and rows["a"]["unpriced_tokens"] == 20
    assert rows["b"]["cost"] is None and rows["b"]["unpriced_tokens"] == 10  # no price for its model
    assert rows["c"]["cost"] is None and rows["c"]["total_tokens"] is None  # no metered request: unknown, not 0
    assert rows["c"]["metered"] == 0 and rows["c"]["requests"] == 1
    by_model = {r["model"]: r for r in q.summary(usage, group_by=("model",), prices=prices).rows}
    assert by_model["priced"]["cost"] == pytest.approx(6.0) and by_model["priced"]["unpriced_tokens"] == 0
    assert q.summary(usage, group_by=("key",)).rows[0]["cost"] is None  # no prices at all
    many = {**prices, **{f"other-{i}": {"input": 1.0, "output": 1.0} for i in range(999)}}  # as many as allowed
    assert q.summary(usage, group_by=("key",), prices=many).rows == list(rows.values())


# ---- CSV ----------------------------------------------------------------------------------------------------

def test_csv_is_rfc4180_and_never_a_formula() -> None:
    rows = [{"a": 'say "hi", then\nleave', "b": "=HYPERLINK(\"http://x\")", "c": -1.5},
            {"a": "+1", "b": "@SUM(A1)", "c": None}, {"a": "-2", "b": "\tcmd", "c": 3}]
    text = "".join(q.to_csv(["a", "b", "c"], rows))
    assert text.startswith("a,b,c\r\n") and text.endswith("\r\n")
    assert '"say ""hi"", then\nleave"' in text
    parsed = list(csv.reader(io.StringIO(text, newline="")))
    assert parsed == [["a", "b", "c"], ['say "hi", then\nleave', "'=HYPERLINK(\"http://x\")", "-1.5"],
                      ["'+1", "'@SUM(A1)", ""], ["'-2", "'\tcmd", "3"]]


# ---- the API ------------------------------------------------------------------------------------------------

@pytest.fixture
def api(tmp_path: Path):
    from manager import users
    from manager.app import create_app

    app = create_app({"DATA_DIR": str(tmp_path / "data")})
    bastion = app.extensions["bastion"]
    users.create(bastion, "root", "root-password", "admin")
    client = app.test_client()
    token = client.post("/auth/token", json={"username": "root", "password": "root-password"}).json["token"]
    client.environ_base["HTTP_AUTHORIZATION"] = f"Bearer {token}"
    bastion.dirs.access_log.parent.mkdir(parents=True, exist_ok=True)
    with bastion.dirs.access_log.open("a") as f:
        f.write("".join(line(i, T0 + i * 10, key=f"k{i % 2}", status=200 if i % 5 else 503,
                             request_id=f"=cmd|{i}" if i == 7 else f"r{i:05d}") for i in range(50)))
    return client, bastion


@pytest.mark.parametrize("path, query, field", [
    ("/api/v1/usage", "key=a%20b", "key"),
    ("/api/v1/usage", "model=bad%20model", "model"),
    ("/api/v1/usage", "pool=Bad!", "pool"),
    ("/api/v1/usage", "status=600", "status"),
    ("/api/v1/usage", "status=6xx", "status"),
    ("/api/v1/usage", "outcome=fine", "outcome"),
    ("/api/v1/usage", "since=-1", "since"),
    ("/api/v1/usage", "until=nan", "until"),
    ("/api/v1/usage", "since=100&until=100", "until"),
    ("/api/v1/usage", "limit=0", "limit"),
    ("/api/v1/usage", "limit=10001", "limit"),
    ("/api/v1/usage", "offset=-1", "offset"),
    ("/api/v1/usage", "cursor=abc", "cursor"),
    ("/api/v1/usage", "cursor=1.5_2&offset=3", "cursor"),
    ("/api/v1/usage", "group_by=key,colour", "group_by"),
    ("/api/v1/usage", "format=xml", "format"),
    ("/api/v1/usage", "modle=m1", "modle"),
    ("/api/v1/usage", "key=k1&key=k2", "key"),
    ("/api/v1/usage/summary", "group_by=status", "group_by"),
    ("/api/v1/usage/summary", "bucket=week", "bucket"),
    ("/api/v1/usage/summary", "fields=requests,colour", "fields"),
    ("/api/v1/usage/summary", "fields=none", "fields"),
    ("/api/v1/usage/summary", "status=200", "status"),
    ("/api/v1/usage/summary", "limit=abc", "limit"),
    ("/api/v1/usage/summary", "since=1e308", "since"),
])
def test_bad_query_parameters_are_refused_naming_them(api, path: str, query: str, field: str) -> None:
    client, _ = api
    r = client.get(f"{path}?{query}")
    assert r.status_code == 400 and r.json["error"]["field"] == field, r.text


def test_api_pages_records_by_cursor_and_exports_csv(api) -> None:
    client, _ = api
    seen, cursor = [], None
    while True:
        page = {"cursor": cursor} if cursor else {}
        r = client.get("/api/v1/usage", query_string={"key": "k1", "limit": 4, **page})
        assert r.status_code == 200, r.text
        seen += [rec["request_id"] for rec in r.json["records"]]
        if not (cursor := r.json["next_cursor"]):
            break
    assert len(seen) == len(set(seen)) == 25
    r = client.get("/api/v1/usage?status=5xx", headers={"Accept": "text/csv"})
    assert r.status_code == 200 and r.mimetype == "text/csv" and "attachment" in r.headers["Content-Disposition"]
    table = list(csv.DictReader(io.StringIO(r.get_data(as_text=True), newline="")))
    assert len(table) == 10 and {row["status"] for row in table} == {"503"}
    r = client.get("/api/v1/usage?format=csv&limit=1000")
    assert "'=cmd|7" in r.get_data(as_text=True)  # a request id a client chose is never a formula
    r = client.get("/api/v1/usage?group_by=key,status")
    assert sorted((g["key"], g["status"], g["requests"]) for g in r.json["groups"]) == [
        ("k0", 200, 20), ("k0", 503, 5), ("k1", 200, 20), ("k1", 503, 5)]
    assert client.get("/api/v1/usage/records?limit=3").json[0]["request_id"] == "r00049"  # the older route


def test_api_summary_with_prices_from_the_settings(api) -> None:
    client, bastion = api
    r = client.patch("/api/v1/settings", json={"model_prices": {"m1": {"input": 1.0, "output": "x"}}})
    assert r.status_code == 400 and r.json["error"]["field"] == "model_prices.m1.output", r.text
    r = client.patch("/api/v1/settings", json={"model_prices": {"m1": {"input": 1.0}}})
    assert r.status_code == 400 and r.json["error"]["field"] == "model_prices.m1.output", r.text
    r = client.patch("/api/v1/settings", json={"model_prices": {"bad model": {"input": 1, "output": 1}}})
    assert r.status_code == 400 and r.json["error"]["field"] == "model_prices", r.text
    assert bastion.settings()["model_prices"] == {}
    from manager import settings as settings_mod
    settings_mod.update(bastion, {"model_prices": {"m1": {"input": 1000.0, "output": 2000.0}}})
    r = client.get("/api/v1/usage/summary", query_string={"group_by": "key", "bucket": "hour"})
    assert r.status_code == 200, r.text
    body = r.json
    assert body["span"] == 3600 and body["group_by"] == ["key"] and body["truncated"] is False
    assert sum(row["requests"] for row in body["rows"]) == 50
    k0 = [row for row in body["rows"] if row["key"] == "k0"]
    assert sum(row["cost"] for row in k0) == pytest.approx(25 * (10 * 1000 + 20 * 2000) / 1e6)
    assert sum(row["server_errors"] for row in k0) == 5
    r = client.get("/api/v1/usage/summary?group_by=none&format=csv")
    table = list(csv.DictReader(io.StringIO(r.get_data(as_text=True), newline="")))
    assert len(table) == 1 and table[0]["requests"] == "50" and "p95_duration" in table[0]
    r = client.get("/api/v1/usage/summary?group_by=key&fields=p95_duration,cost,requests")
    assert [sorted(row) for row in r.json["rows"]] == [["cost", "key", "p95_duration", "requests"]] * 2
    assert {row["key"]: row["requests"] for row in r.json["rows"]} == {"k0": 25, "k1": 25}
    r = client.get("/api/v1/usage/summary?limit=1&group_by=key")
    assert r.json["truncated"] is True and len(r.json["rows"]) == 1


def test_llm_proxy_analytics_shape(api) -> None:
    from manager import keys

    client, bastion = api
    record, _ = keys.create(bastion, "someone")
    with bastion.dirs.access_log.open("a") as f:
        f.write(line(100, 1_000_020, key=record["id"], duration=1.5) + line(101, 1_000_010, key=record["id"],
                                                                            status=502, duration=1))
    r = client.get(f"/api/analytics/{record['id']}?startDate=0&endDate=2000000000")
    assert r.json == {"success": True, "records": [{"startTime": 1_000_009_000, "endTime": None},
                                                   {"startTime": 1_000_018_500, "endTime": 1_000_020_000}]}


# ---- the CLI ------------------------------------------------------------------------------------------------

def test_cli_usage_by_key_and_hour_in_each_format(api) -> None:
    _, bastion = api
    data_dir = str(bastion.dirs.root)

    def run(*args: str):
        return CliRunner().invoke(cli_main, ["--data-dir", data_dir, "usage", "--since", str(T0 - 1), *args])

    result = run("--by", "key,hour", "--format", "json")
    assert result.exit_code == 0, result.output
    rows = json.loads(result.output)
    assert {r["key"] for r in rows} == {"k0", "k1"} and sum(r["requests"] for r in rows) == 50
    assert all(r["bucket"] % 3600 == 0 for r in rows)
    result = run("--by", "key", "--format", "csv")
    assert result.output.startswith("key,requests,errors,") and result.stdout_bytes.count(b"\r\n") == 3
    result = run("--by", "model")
    assert result.exit_code == 0 and result.output.splitlines()[0].split()[:3] == ["MODEL", "REQUESTS", "ERRORS"]
    assert "m1" in result.output and "(from the per-day rollups" in result.output  # a year back: days
    result = run("--records", "--status", "5xx", "--format", "json")
    assert len(json.loads(result.output)) == 10
    for args, field in ((["--by", "hour,day"], "--by"), (["--status", "500"], "--status"),
                        (["--by", "colour"], "--by"), (["--model", "bad model"], "model")):
        result = run(*args)
        assert result.exit_code != 0 and f"{field}:" in result.output, (args, result.output)


# ---- through nginx's admin listener -------------------------------------------------------------------------

def test_usage_routes_through_the_real_stack(stack) -> None:
    """Refused requests are recorded too (no key, 401): both routes see them, CSV passes nginx unchanged."""
    import requests

    for _ in range(3):
        assert stack.get("/v1/models", "bst_aaaaaaaaaaaa_" + "x" * 40).status_code == 401
    headers = {"Authorization": f"Bearer {stack.admin_token()}"}
    r = requests.get(stack.admin + "/api/v1/usage", params={"status": "401", "limit": 2}, headers=headers, timeout=10)
    assert r.status_code == 200 and len(r.json()["records"]) == 2 and r.json()["next_cursor"], r.text
    r = requests.get(stack.admin + "/api/v1/usage", params={"cursor": r.json()["next_cursor"], "status": "4xx"},
                     headers={**headers, "Accept": "text/csv"}, timeout=10)
    assert r.headers["Content-Type"].startswith("text/csv") and r.text.count("\r\n") == 2, r.text
    assert r.text.startswith("id,request_id,start,end,key,") and ",401," in r.text
    r = requests.get(stack.admin + "/api/v1/usage/summary", params={"group_by": "none", "bucket": "minute"},
                     headers=headers, timeout=10)
    assert r.status_code == 200 and sum(row["client_errors"] for row in r.json()["rows"]) >= 3, r.text
    r = requests.get(stack.admin + "/api/v1/usage/summary", params={"bucket": "weekly"}, headers=headers, timeout=10)
    assert r.status_code == 400 and r.json()["error"]["field"] == "bucket"
