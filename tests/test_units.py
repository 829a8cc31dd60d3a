"""Pure logic: validators, the store's atomic writes and lock, access-log ingestion."""

from __future__ import annotations

import json
import multiprocessing
import os
from pathlib import Path

import pytest

from manager import usage_queries as q
from manager import validation as v
from manager.store import Store, StoreCorrupt
from manager.usage import Usage
from manager.usage_log import format_record, parse_line


@pytest.mark.parametrize(("url", "expected"), [
    ("http://127.0.0.1:8000", "http://127.0.0.1:8000"),
    ("http://localhost:11434/", "http://localhost:11434"),
    ("https://API.Example.com", "https://api.example.com:443"),
    ("http://[::1]:8000", "http://[::1]:8000"),
    ("http://gpu-box", "http://gpu-box:80"),
])
def test_upstream_urls_normalised(url: str, expected: str) -> None:
    assert v.upstream_url("url", url) == expected


@pytest.mark.parametrize("url", [
    "http://host:80; return 200", "http://ho st", "http://host/{x}", "http://host:80/$x", "gopher://host",
    "http://user:pw@host", "http://host?x=1", "http://host:0", "http://-bad-.com", "http://host:80\nx", "", 42,
    "http://a..b", "http://" + "a" * 64 + ".com",
])
def test_bad_upstream_urls(url) -> None:
    with pytest.raises(v.ValidationError) as e:
        v.upstream_url("upstreams[0].url", url)
    assert e.value.field == "upstreams[0].url"


def test_expiry_forms() -> None:
    assert v.expiry("e", "30d", now=1000.0) == 1000.0 + 30 * 86400
    assert v.expiry("e", None) is None
    assert v.expiry("e", "2999-01-01T00:00:00+00:00") == pytest.approx(32472144000.0)
    with pytest.raises(v.ValidationError):
        v.expiry("e", "1999-01-01")


def test_integers_reject_bools_and_ranges() -> None:
    assert v.integer("rpm", "12", 0, 100) == 12
    for bad in (True, 1.5, "1e3", 101, -1):
        with pytest.raises(v.ValidationError):
            v.integer("rpm", bad, 0, 100)


def test_cidrs() -> None:
    assert v.cidrs("c", ["10.0.0.1/8", "::1", "10.0.0.0/8"]) == ["10.0.0.0/8", "::1/128"]
    with pytest.raises(v.ValidationError):
        v.cidrs("c", "10.0.0.0/8")
    for bad in ("10.0.0.1/33", "0.0.0.0/0; allow all", "10.0.0.0/8\n", "all", "fe80::1%eth0;allow all;/128"):
        with pytest.raises(v.ValidationError):
            v.cidr("c", bad)


def _insert_many(path: str, n: int) -> None:
    store = Store(Path(path))
    for i in range(n):
        with store.transaction() as db:
            db.table("items").insert({"pid": os.getpid(), "i": i})


def test_store_transactions_from_several_processes_lose_nothing(tmp_path: Path) -> None:
    path = tmp_path / "store.json"
    procs = [multiprocessing.Process(target=_insert_many, args=(str(path), 25)) for _ in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(30)
    items = Store(path).table("items").all()
    assert len(items) == 75 and len({item.doc_id for item in items}) == 75
    assert path.stat().st_mode & 0o777 == 0o600
    assert not list(tmp_path.glob("*.tmp"))


@pytest.mark.parametrize("content", ["", "{\"keys\": ", "[1, 2]", "\x00\x00"])
def test_corrupt_store_refused(tmp_path: Path, content: str) -> None:
    path = tmp_path / "store.json"
    path.write_text(content)
    with pytest.raises(StoreCorrupt) as e:
        Store(path).check()
    assert str(path) in str(e.value)
    assert path.read_text() == content


def log_line(**fields) -> str:
    values = {"end": 1000.5, "request_id": "r1", "key": "k1", "model": "m", "pool": "p",
              "upstream": "unix:/x/authsvc.sock : 10.0.0.1:8000, 10.0.0.2:8000", "status": 200, "bytes_sent": 10,
              "request_length": 5, "duration": 0.5, "upstream_status": "200 : 502, 200",
              "ttfb": "0.001 : 0.000, 0.120", "method": "POST", "uri": "/v1/chat/completions",
              "remote_addr": "127.0.0.1", **fields}
    return format_record(**values).rstrip("\n")


def ingested(tmp_path: Path, *lines: str) -> list[dict]:
    log = tmp_path / "access.log"
    log.write_text("".join(line + "\n" for line in lines))
    usage = Usage(tmp_path / "usage.sqlite3", log)
    usage.ingest()
    return sorted(q.records(usage, limit=1000).records, key=lambda r: r["request_id"])


def test_records_take_the_upstream_that_answered(tmp_path: Path) -> None:
    row, refused, no_header, metered = ingested(
        tmp_path, log_line(request_id="a"), log_line(request_id="b", pool="", status=401, upstream="unix:/x/a.sock"),
        log_line(request_id="c", ttfb="0.001 : -"),
        log_line(request_id="d", outcome="completed", prompt_tokens=3, completion_tokens=4, total_tokens=7))
    assert row["upstream"] == "10.0.0.2:8000" and row["ttfb"] == 0.12 and row["upstream_status"] == 200
    assert row["start"] == 1000.0 and row["end"] == 1000.5 and row["status"] == 200
    assert row["outcome"] is None and row["total_tokens"] is None  # unknown, never 0
    assert refused["upstream"] is None and refused["ttfb"] is None and refused["pool"] is None
    assert no_header["ttfb"] is None
    assert (metered["outcome"], metered["prompt_tokens"], metered["completion_tokens"], metered["total_tokens"]) == (
        "completed", 3, 4, 7)
    assert parse_line("not a record") is None


def test_lines_of_the_json_format_before_are_still_read(tmp_path: Path) -> None:
    """An upgrade must not lose the lines nginx wrote in the old format and nobody ingested yet."""
    old = json.dumps({"time": 1000.5, "request_id": "old", "key": "k1", "model": "m", "pool": "p",
                      "upstream": "unix:/x/a.sock : 10.0.0.1:8000", "status": 200, "bytes_sent": 10,
                      "request_length": 5, "request_time": 0.5, "upstream_status": "200 : 200",
                      "upstream_header_time": "0.001 : 0.1", "upstream_response_time": "0.001 : 0.4",
                      "method": "POST", "uri": "/v1/chat/completions", "remote_addr": "127.0.0.1"})
    (record,) = ingested(tmp_path, old)
    assert (record["request_id"], record["upstream"], record["ttfb"], record["start"]) == (
        "old", "10.0.0.1:8000", 0.1, 1000.0)


def test_ingest_counts_each_line_once_and_follows_rotation(tmp_path: Path) -> None:
    log = tmp_path / "access.log"
    usage = Usage(tmp_path / "usage.sqlite3", log)
    assert usage.ingest() == 0  # no log yet
    log.write_text(log_line(request_id="a") + "\n" + log_line(request_id="b") + "\n" + log_line(request_id="c")[:20])
    assert usage.ingest() == 2
    assert usage.ingest() == 0  # the half-written line waits
    with log.open("a") as f:
        f.write(log_line(request_id="c")[20:] + "\n")
    assert usage.ingest() == 1
    log.rename(tmp_path / "access.log.1")
    log.write_text(log_line(request_id="d") + "\n")
    assert usage.ingest() == 1
    assert sorted(r["request_id"] for r in q.records(usage, limit=1000).records) == ["a", "b", "c", "d"]
    assert q.summary(usage).rows[0]["requests"] == 4
    assert q.last_used(usage, ["k1", "unknown"]) == {"k1": 1000.5}


@pytest.mark.parametrize(("check", "value"), [
    (v.name, "main\n"), (v.label, "alice\n"), (v.secret, "sk-1\n"), (v.endpoint, "/v1/*\n"),
    (lambda f, x: v.model(f, x), "llama3\n"), (v.upstream_url, "http://h:80/\n\nx"),
])
def test_trailing_newlines_never_pass(check, value: str) -> None:
    with pytest.raises(v.ValidationError):
        check("field", value)


@pytest.mark.parametrize("value", ["fe80::1%x;allow all;#", "::1%$host", "fe80::1%eth0"])
def test_ipv6_zone_ids_never_pass(value: str) -> None:
    with pytest.raises(v.ValidationError) as e:
        v.hostname("domain", value)
    assert "zone" in e.value.message
    with pytest.raises(v.ValidationError) as e:
        v.listen("public_listen", f"[{value}]:80")
    assert "zone" in e.value.message


def test_reload_errors_are_found_across_an_error_log_rotation(tmp_path: Path) -> None:
    from manager.apply import _emerg_since, _log_mark

    log = tmp_path / "error.log"
    log.write_text("[emerg] before the reload\n")
    mark = _log_mark(log)
    with log.open("a") as f:
        f.write("[emerg] old file, after the mark\n")
    log.rename(tmp_path / "error.log.1")  # log upkeep rotates it during the verify
    log.write_text("[alert] new file\n")
    assert _emerg_since(log, mark).splitlines() == ["[emerg] old file, after the mark", "[alert] new file"]
    assert _emerg_since(log, _log_mark(log)) == ""
