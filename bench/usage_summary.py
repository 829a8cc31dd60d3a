"""Usage queries over 1,000,000 synthetic records: `python bench/usage_summary.py [RECORDS]`.

Builds a fresh usage.sqlite3 (in a temporary directory) with RECORDS requests spread over 30 days, ~100 keys of
very different activity, 6 models on 3 pools, errors, cut streams and token counts; records are stored directly
in segments and rolled up by manager.usage's own `_add` (what ingestion does per batch). Then times the
queries behind `/api/v1/usage/summary`, `/api/v1/usage` and `bastion usage`: best of 5 runs each, wall clock,
warm page cache (the database is a few hundred MB; a summary reads only the rollups).
"""

from __future__ import annotations

import itertools
import json
import random
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from manager import usage as usage_mod
from manager import usage_queries as q
from manager import usage_records
from manager.usage import Usage

DAYS = 30
KEYS = 100
MODELS = {"llama3.1:8b": "small", "qwen2.5:7b": "small", "llama3.1:70b": "large", "qwen2.5:72b": "large",
          "nomic-embed-text": "embed", "bge-m3": "embed"}
PRICES = {"llama3.1:70b": {"input": 0.6, "output": 0.8}, "qwen2.5:72b": {"input": 0.5, "output": 0.7},
          "llama3.1:8b": {"input": 0.05, "output": 0.08}}
END = 1_764_547_200  # 2025-12-01T00:00:00Z


def rows(n: int, rng: random.Random):
    models = list(MODELS)
    key_ids = [f"{i:03d}bench{rng.randrange(36**4):04x}"[:12] for i in range(KEYS)]
    weights = [1 / (i + 1) for i in range(KEYS)]  # a few heavy keys, a long tail
    favourite = {k: rng.choice(models) for k in key_ids}
    keys = rng.choices(key_ids, weights, k=n)
    span = DAYS * 86400
    for i, key in enumerate(keys):
        model = favourite[key] if rng.random() < 0.8 else rng.choice(models)
        end = END - span + span * i / n + rng.random()
        duration = min(rng.lognormvariate(0.5, 1.2), 600)
        ttfb = min(duration, rng.lognormvariate(-2, 1))
        roll = rng.random()
        status = 200 if roll < 0.95 else 429 if roll < 0.97 else 400 if roll < 0.98 else 502
        outcome = ("completed" if status != 200 or roll < 0.93 else "upstream_cut" if roll < 0.94 else
                   "client_cut" if roll < 0.945 else "timeout")
        metered = status == 200 and roll < 0.9
        prompt, completion = rng.randrange(10, 4000), rng.randrange(0, 1000)
        yield (f"{i:032x}", end - duration, end, key, model, MODELS[model], f"10.0.0.{i % 8}:8000", status,
               status, rng.randrange(200, 50_000), rng.randrange(200, 20_000), ttfb, duration, "POST",
               "/v1/chat/completions", f"198.51.100.{i % 250}", outcome, prompt if metered else None,
               completion if metered else None, prompt + completion if metered else None)


def build(usage: Usage, n: int) -> float:
    start = time.perf_counter()
    with usage._connect() as db:
        db.execute("BEGIN")
        generated = enumerate(rows(n, random.Random(1)), 1)
        while chunk := list(itertools.islice(generated, 100_000)):
            usage_mod._add(db, usage_records.from_rows((i, *row) for i, row in chunk))
        db.execute("COMMIT")
        db.execute("ANALYZE")
    return time.perf_counter() - start


def timed(label: str, fn: Callable[[], object], runs: int = 5) -> float:
    best, result = float("inf"), None
    for _ in range(runs):
        start = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - start)
    if isinstance(result, q.Summary) and result.rows_json is not None:
        size = f"{len(result.rows_json) / 2**20:.1f} MB of JSON"
    else:
        rows = result.rows if isinstance(result, q.Summary) else getattr(result, "records", result)
        size = f"{len(rows):,} rows"
    print(f"  {label:<66} {best * 1000:8.1f} ms  ({size})")
    return best


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 1_000_000
    with tempfile.TemporaryDirectory() as tmp:
        usage = Usage(Path(tmp) / "usage.sqlite3", Path(tmp) / "access.log")
        built = build(usage, n)
        with usage.reader() as db:
            spans = dict(db.execute("SELECT span, COUNT(*) FROM rollups GROUP BY span").fetchall())
        size = sum(p.stat().st_size for p in Path(tmp).glob("usage.sqlite3*")) / 2**20
        print(f"{n:,} records over {DAYS} days, {KEYS} keys, {len(MODELS)} models: built in {built:.1f} s, "
              f"{size:.0f} MB; rollup rows: {spans.get(60, 0):,} per minute, {spans.get(3600, 0):,} per hour, "
              f"{spans.get(86400, 0):,} per day")
        since, until = END - DAYS * 86400, END
        month = q.Filters(since=since, until=until)
        print("summaries (from the rollups):")
        target = timed("30 days per key, hourly buckets, as the API's JSON (target 300 ms)",
                       lambda: q.summary(usage, month, ("key",), "hour", PRICES, as_json=True))
        timed("  the same as Python rows (CLI, CSV)", lambda: q.summary(usage, month, ("key",), "hour", PRICES))
        timed("  the same without prices", lambda: q.summary(usage, month, ("key",), "hour", as_json=True))
        timed("  the same, fields=requests,errors,total_tokens,cost,p95_duration",
              lambda: q.summary(usage, month, ("key",), "hour", PRICES, as_json=True,
                                fields=("requests", "errors", "total_tokens", "cost", "p95_duration")))
        timed("30 days per key, totals", lambda: q.summary(usage, month, ("key",), "none", PRICES))
        timed("30 days per key and model, daily buckets",
              lambda: q.summary(usage, month, ("key", "model"), "day", PRICES))
        timed("30 days per pool, hourly buckets", lambda: q.summary(usage, month, ("pool",), "hour", PRICES))
        one_key = timed("one key, 30 days, hourly buckets",
                                  lambda: q.summary(usage, q.Filters(key=usage_key(usage), since=since, until=until),
                                          ("model",), "hour", PRICES))
        timed("last 24 h per key and model (per-minute rollups)",
              lambda: q.summary(usage, q.Filters(since=until - 86400 + 7, until=until), ("key", "model"), "none",
                                PRICES))
        result = q.summary(usage, month, ("key",), "hour", PRICES)
        timed("  json.dumps of those rows (for comparison)", lambda: [json.dumps(result.rows)])
        timed("  their CSV", lambda: ["".join(q.to_csv(result.columns, result.rows))])
        print("records (raw segments):")
        timed("newest 100", lambda: q.records(usage, q.Filters(), 100))
        timed("one key's newest 100", lambda: q.records(usage, q.Filters(key=usage_key(usage)), 100))
        page = q.records(usage, q.Filters(), 1000, offset=n // 2)
        after = q.cursor("cursor", f"{page.records[-1]['start']!r}_{page.records[-1]['id']}")
        timed("a page of 100 half way down, by cursor", lambda: q.records(usage, q.Filters(), 100, after))
        timed("a page of 100 half way down, by offset", lambda: q.records(usage, q.Filters(), 100, offset=n // 2))
        timed("5xx of the last 24 h (status filter)",
              lambda: q.records(usage, q.Filters(status="5xx", since=until - 86400), 1000))
        timed("30 days grouped by status (exact, scans the records)",
              lambda: q.group_counts(usage, month, ("status",)), runs=2)
        for label, seconds in (("one key's", one_key), ("every key's at once", target)):
            verdict = "OK" if seconds < 0.3 else "OVER TARGET"
            print(f"30-day hourly summary, {label}: {seconds * 1000:.0f} ms ({verdict}, target 300 ms)")


def usage_key(usage: Usage) -> str:
    with usage.reader() as db:
        return db.execute("SELECT key FROM rollups WHERE span = 86400 GROUP BY key ORDER BY SUM(requests) DESC "
                          "LIMIT 1").fetchone()[0]


if __name__ == "__main__":
    main()
