"""Reading the usage store (manager/usage.py writes it): single records, their counts, and summaries.

Records (`records`, `group_counts`) come from the segments of raw records (manager/usage_records.py): those of
the time range, or of the key, are read and filtered in Arrow by the request's START time, and paged newest first
by (start, id): a keyset cursor, so pages have no gaps or repeats while ingestion adds records.

Summaries (`summary`) come from the rollups only, never from the raw records, so a month of a busy gateway is
answered in milliseconds. Rollups are bucketed by the request's END time, per minute, hour or UTC day; a range
is widened outward to whole buckets of the span used (the answer says which). Percentiles are estimated from the
cumulative histograms as Prometheus' `histogram_quantile` does: the bucket holding the rank is found and the
value interpolated linearly between its bounds (so an estimate is off by at most that bucket's width; beyond
the last finite bound the answer is that bound).

Every parameter is checked here with an error naming it (`parse_*`), for the API and the CLI alike.
"""

from __future__ import annotations

import csv
import functools
import io
import math
import operator
import re
import sqlite3
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import pyarrow.compute as pc

from manager import usage_records as ur
from manager import validation as v
from manager.usage import SPANS, TOTAL_SPAN, segments
from manager.usage_records import DURATION_BOUNDS, OUTCOMES, ROLLUP_NAMES, TTFB_BOUNDS

if TYPE_CHECKING:
    from manager.usage import Usage

KEY_ID_RE = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
STATUS_RE = re.compile(r"^([1-5])xx$")
CURSOR_RE = re.compile(r"^(\d{1,20}(?:\.\d{1,20})?(?:e[+-]?\d{1,3})?)_(\d{1,18})$")
RECORD_GROUPS = ("key", "model", "pool", "status", "outcome")
SUMMARY_GROUPS = ("key", "model", "pool")
BUCKETS = ("minute", "hour", "day", "none")
FORMATS = ("json", "csv")
UNKNOWN_OUTCOME = "unknown"  # records without an outcome: no token metering, or refused before any upstream
MAX_LIMIT = 10_000
MAX_OFFSET = 1_000_000
MAX_SUMMARY_ROWS = 1_000_000
DEFAULT_SUMMARY_ROWS = 100_000
QUANTILES = (0.5, 0.95)
GROUP_COUNTS = ("requests", "errors", "metered", "prompt_tokens", "completion_tokens", "total_tokens")
FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


# ---- parameters ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Filters:
    key: str | None = None
    model: str | None = None
    pool: str | None = None
    status: str | None = None  # "200" or a class, "5xx"
    outcome: str | None = None  # one of OUTCOMES, or UNKNOWN_OUTCOME
    since: float | None = None
    until: float | None = None


def key_id(name: str, value: Any) -> str:
    value = v.require_str(name, value)
    if not KEY_ID_RE.fullmatch(value):
        raise v.ValidationError(name, "must be a key id (1-64 letters, digits, '_', '.' or '-')")
    return value


def status(name: str, value: Any) -> str:
    """An exact status (100-599) or a class like 5xx."""
    value = v.require_str(name, value).strip().lower()
    if STATUS_RE.fullmatch(value):
        return value
    if not re.fullmatch(r"\d{3}", value) or not 100 <= int(value) <= 599:
        raise v.ValidationError(name, "must be a status code (100-599) or a class like 4xx or 5xx")
    return value


def outcome(name: str, value: Any) -> str:
    return v.choice(name, value, (*OUTCOMES, UNKNOWN_OUTCOME))


def names(name: str, value: Any, allowed: Sequence[str], empty: bool = True) -> tuple[str, ...]:
    """A comma-separated list of `allowed` names, in the order given, without repeats; "none" is the empty list
    (when `empty`)."""
    text = v.require_str(name, value).strip()
    if text == "none" and empty:
        return ()
    out: list[str] = []
    for item in (part.strip() for part in text.split(",")):
        if item not in allowed:
            raise v.ValidationError(name, f"{item!r} is not one of {', '.join(allowed)} (comma-separated)")
        if item not in out:
            out.append(item)
    return tuple(out)


def cursor(name: str, value: Any) -> tuple[float, int]:
    """A position in the records' order, as `next_cursor` gave it: START_ID."""
    m = CURSOR_RE.fullmatch(v.require_str(name, value))
    if not m:
        raise v.ValidationError(name, "is not a cursor this API gave (use next_cursor of the previous page)")
    return v.epoch(name, m.group(1)), int(m.group(2))


def _get(args: Mapping[str, Any], name: str, convert: Any, default: Any = None) -> Any:
    raw = args.get(name)
    return default if raw in (None, "") else convert(name, raw)


def check_known(args: Mapping[str, Any], known: Iterable[str]) -> None:
    """A misspelt filter would silently be no filter, a repeated one half a filter: refuse both."""
    known = set(known)
    for name in args:
        if name not in known:
            raise v.ValidationError(name, f"is not a known parameter (known: {', '.join(sorted(known))})")
        if len(getattr(args, "getlist", lambda _: [None])(name)) > 1:
            raise v.ValidationError(name, "is given more than once (one value per parameter)")


def parse_filters(args: Mapping[str, Any], allowed: Iterable[str] = Filters.__dataclass_fields__) -> Filters:
    """Filters from query parameters (text), each checked; `allowed` limits which ones the caller supports."""
    allowed = set(allowed)
    given = {name for name in allowed if args.get(name) not in (None, "")}
    converters = {"key": key_id, "model": v.model, "pool": v.name, "status": status, "outcome": outcome,
                  "since": v.epoch, "until": v.epoch}
    filters = Filters(**{name: _get(args, name, converters[name]) for name in given})
    if filters.since is not None and filters.until is not None and filters.until <= filters.since:
        raise v.ValidationError("until", "must be later than since")
    return filters


def wants_csv(format_param: str | None, accept: Any = None) -> bool:
    """CSV when `?format=csv`, or without `format` when the Accept header prefers text/csv over JSON."""
    if format_param not in (None, ""):
        return v.choice("format", format_param, FORMATS) == "csv"
    return accept is not None and accept.best_match(["application/json", "text/csv"]) == "text/csv"


# ---- records ------------------------------------------------------------------------------------------------

def _condition(filters: Filters) -> pc.Expression | None:
    """The filters as an Arrow expression over records (None: every record)."""
    field = pc.field
    conditions = [field(column) == value for column in SUMMARY_GROUPS
                  if (value := getattr(filters, column)) is not None]
    if filters.since is not None:
        conditions.append(field("start") >= filters.since)
    if filters.until is not None:
        conditions.append(field("start") < filters.until)
    if filters.status is not None:
        if filters.status.endswith("xx"):
            lo = int(filters.status[0]) * 100
            conditions.append((field("status") >= lo) & (field("status") <= lo + 99))
        else:
            conditions.append(field("status") == int(filters.status))
    if filters.outcome == UNKNOWN_OUTCOME:
        conditions.append(field("outcome").is_null())
    elif filters.outcome is not None:
        conditions.append(field("outcome") == filters.outcome)
    return functools.reduce(operator.and_, conditions) if conditions else None


def _segments_of(filters: Filters, before: float | None = None) -> tuple[str, list[Any]]:
    """SQL over `segments`: those that can hold records matching `filters` (by start time and key), and started
    no later than `before`."""
    clauses, args = [], []
    for clause, value in (("max_start >= ?", filters.since), ("min_start < ?", filters.until),
                          ("min_start <= ?", before),
                          ("id IN (SELECT segment FROM segment_keys WHERE key = ?)", filters.key)):
        if value is not None:
            clauses.append(clause)
            args.append(value)
    return " AND ".join(clauses) or "true", args


def _matching_records(db: sqlite3.Connection, filters: Filters) -> pa.Table:
    """Every record matching `filters`."""
    table = segments(db, *_segments_of(filters))
    condition = _condition(filters)
    return table if condition is None else table.filter(condition)


@dataclass
class Page:
    records: list[dict[str, Any]]
    next_cursor: str | None


NEWEST_FIRST = [("start", "descending"), ("id", "descending")]


def _newest(db: sqlite3.Connection, filters: Filters, after: tuple[float, int] | None, wanted: int) -> pa.Table:
    """The `wanted` newest records matching `filters` (and older than the cursor `after`), or all of them if there
    are fewer: segments are read newest first until none of the rest can hold a newer one than those kept."""
    condition = _condition(filters)
    if after is not None:
        start, id_ = pc.field("start"), pc.field("id")
        older = (start < after[0]) | ((start == after[0]) & (id_ < after[1]))
        condition = older if condition is None else condition & older
    where, args = _segments_of(filters, None if after is None else after[0])
    found: list[pa.Table] = []
    count, threshold = 0, -math.inf
    for segment, max_start in db.execute(f"SELECT id, max_start FROM segments WHERE {where} ORDER BY max_start DESC",
                                         args).fetchall():
        if count >= wanted and max_start < threshold:
            break
        table = segments(db, "id = ?", (segment,))
        found.append(table if condition is None else table.filter(condition))
        count += len(found[-1])
        if count >= wanted:  # keep the wanted newest; a segment that starts before all of them cannot add one
            merged = pa.concat_tables(found)
            found = [merged.take(pc.select_k_unstable(merged, wanted, NEWEST_FIRST))]
            count, threshold = wanted, pc.min(found[0]["start"]).as_py()
    return pa.concat_tables(found) if found else ur.EMPTY


def records(usage: Usage, filters: Filters = Filters(), limit: int = 1000, after: tuple[float, int] | None = None,
            offset: int = 0) -> Page:
    """Records matching `filters`, newest start first (ties by id). `after` is a cursor from a previous page;
    `next_cursor` is None on the last page."""
    with usage.reader() as db:
        table = _newest(db, filters, after, offset + limit + 1)
    rows = table.sort_by(NEWEST_FIRST).slice(offset, limit + 1).to_pylist()
    more = len(rows) > limit
    rows = rows[:limit]
    return Page(rows, f"{rows[-1]['start']!r}_{rows[-1]['id']}" if more else None)


GROUP_SUMS = (("id", "count", "requests"), ("errors", "sum", "errors"), ("metered", "sum", "metered"),
              *((name, "sum", name) for name in ("prompt_tokens", "completion_tokens", "total_tokens")))


def group_counts(usage: Usage, filters: Filters, group_by: Sequence[str], limit: int = 1000,
                 offset: int = 0) -> list[dict[str, Any]]:
    """Per group of the matching records (exact, from the raw records): requests, errors (as summaries count them),
    metered requests and token sums (null when none was metered). Most requests first, then by group (absent
    values first)."""
    with usage.reader() as db:
        table = _matching_records(db, filters)
    table = table.append_column("errors", ur.failed(table)).append_column(
        "metered", pc.is_valid(table["total_tokens"]))
    sums = table.group_by(list(group_by), use_threads=False).aggregate(
        [(column, how) for column, how, _ in GROUP_SUMS])
    sums = sums.select([*(f"{column}_{how}" for column, how, _ in GROUP_SUMS), *group_by]).rename_columns(
        [*(name for _, _, name in GROUP_SUMS), *group_by])
    order = pc.sort_indices(sums, sort_keys=[("requests", "descending"),
                                             *((g, "ascending", "at_start") for g in group_by)])
    sums = sums.take(order).slice(offset, limit)
    return sums.select([*group_by, *(name for _, _, name in GROUP_SUMS)]).to_pylist()


def last_used(usage: Usage, keys: Iterable[str]) -> dict[str, float]:
    """When each key was last used: the latest end of its requests, one probe of segment_keys per key."""
    with usage.reader() as db:
        found = {}
        for key in keys:
            row = db.execute("SELECT MAX(last_end) FROM segment_keys WHERE key = ?", (key,)).fetchone()
            if row[0] is not None:
                found[key] = row[0]
        return found


# ---- summaries from the rollups -----------------------------------------------------------------------------

def _rollup_matching(filters: Filters) -> tuple[list[str], list[Any]]:
    """The WHERE clauses and arguments of the key, model, pool and time filters over the rollups."""
    clauses: list[str] = []
    args: list[Any] = []
    for column in SUMMARY_GROUPS:
        if (value := getattr(filters, column)) is not None:
            clauses.append(f"{column} = ?")
            args.append(value)
    for bound, op in ((filters.since, ">="), (filters.until, "<")):
        if bound is not None:
            clauses.append(f"bucket {op} ?")
            args.append(bound)
    return clauses, args


def _quantile_sql(q: float, prefix: str, bounds: Sequence[float], count: str) -> str:
    """histogram_quantile over the group's sums of the cumulative columns PREFIX0..PREFIXn (`count`: the +Inf
    bucket): the first bucket whose count reaches the rank, interpolated linearly between its bounds."""
    rank = f"({q!r} * {count})"
    branches, lower, below = [], 0.0, "0"
    for i, upper in enumerate(bounds):
        cum = f"SUM({prefix}{i})"
        branches.append(f"WHEN {cum} >= {rank} THEN {lower!r} + {upper - lower!r} * ({rank} - {below}) "
                        f"/ NULLIF({cum} - {below}, 0)")
        lower, below = upper, cum
    return f"CASE WHEN {count} = 0 THEN NULL {' '.join(branches)} ELSE {bounds[-1]!r} END"


def auto_span(since: float | None, until: float | None, now: float) -> int:
    """The span for a summary without buckets: the coarsest whose buckets the range's ends fall on (exact), or
    else by the range's length (minutes up to 2 days, hours up to 62, days beyond)."""
    for span in sorted(SPANS.values(), reverse=True):
        if all(t is None or t % span == 0 for t in (since, until)):
            return span
    length = (now if until is None else until) - (since or 0)
    return SPANS["minute"] if length <= 2 * 86400 else SPANS["hour"] if length <= 62 * 86400 else SPANS["day"]


@dataclass
class Summary:
    span: int
    since: float | None  # the range actually covered (widened outward to whole buckets)
    until: float | None
    group_by: tuple[str, ...]
    bucket: str
    columns: list[str]
    rows: list[dict[str, Any]] = field(default_factory=list)
    rows_json: str | None = None  # with as_json: the rows as one JSON array, built by SQLite
    truncated: bool = False


SUMMARY_COUNTS = ("requests", "errors", "client_errors", "server_errors", "upstream_cut", "client_cut", "timeout",
                  "metered", "prompt_tokens", "completion_tokens", "total_tokens", "cost", "unpriced_tokens",
                  "bytes_sent", "request_length", "avg_duration", "p50_duration", "p95_duration", "avg_ttfb",
                  "p50_ttfb", "p95_ttfb")


def summary(usage: Usage, filters: Filters = Filters(), group_by: Sequence[str] = ("key", "model"),
            bucket: str = "none", prices: Mapping[str, Mapping[str, float]] | None = None,
            limit: int = DEFAULT_SUMMARY_ROWS, now: float | None = None, as_json: bool = False,
            fields: Sequence[str] = SUMMARY_COUNTS) -> Summary:
    """Per group (any of key, model, pool) and per time bucket (minute, hour, day or none), from the rollups:
    request and error counts (`errors`: an error status, or a stream the upstream cut or that timed out; each
    request once), tokens with the number of metered requests (token sums are null when none was), cost from
    `prices` ({model: {"input",
    "output"}} in USD per 1M tokens; null when no metered request of the group has a price, `unpriced_tokens`
    says how many tokens had none), bytes, mean and p50/p95 of duration and time to first byte.

    Only the key, model, pool and time filters apply (rollups keep no status or outcome). Ordered by bucket,
    then group; at most `limit` rows (`truncated` says when there were more). `as_json` has SQLite write the
    rows as JSON text (`rows_json`): tens of thousands of rows never become Python objects. `fields` picks
    the figures (all by default); SQLite then sums only the columns those need."""
    now = time.time() if now is None else now
    span = auto_span(filters.since, filters.until, now) if bucket == "none" else SPANS[bucket]
    since = None if filters.since is None else math.floor(filters.since / span) * span
    until = None if filters.until is None else math.ceil(filters.until / span) * span
    groups = [*group_by, *(["bucket"] if bucket != "none" else [])]
    fields = [name for name in SUMMARY_COUNTS if name in fields]  # in the SELECT's order
    columns = [*groups, *fields]
    result = Summary(span, since, until, tuple(group_by), bucket, columns)
    with usage.reader() as db:
        if prices and {"cost", "unpriced_tokens"} & set(fields):  # the models of the range only: a short CASE
            present = {row[0] for row in db.execute(
                "SELECT DISTINCT model FROM rollups WHERE span = ? AND bucket >= ? AND bucket < ?",
                (span, -1 if since is None else since, 2**62 if until is None else until))}
            prices = {model: price for model, price in prices.items() if model in present}
        sql, args = _summary_sql(Filters(filters.key, filters.model, filters.pool, since=since, until=until), span,
                                 groups, prices or {}, fields)
        if as_json:
            fields = ", ".join(f"'{c}', {c}" for c in columns)
            wrap = f"SELECT json_group_array(json_object({fields})), COUNT(*) FROM ({sql} LIMIT ?)"
            text, count = db.execute(wrap, (*args, limit + 1)).fetchone()
            if count > limit:  # rare: run again without the row too many
                text, count = db.execute(wrap, (*args, limit)).fetchone()
                result.truncated = True
            result.rows_json = text
        else:
            rows = db.execute(f"{sql} LIMIT ?", (*args, limit + 1)).fetchall()
            result.truncated = len(rows) > limit
            result.rows = [dict(zip(columns, row, strict=True)) for row in rows[:limit]]
    return result


def _summary_sql(filters: Filters, span: int, groups: list[str], prices: Mapping[str, Mapping[str, float]],
                 fields: Sequence[str] = SUMMARY_COUNTS) -> tuple[str, list[Any]]:
    """The summary's SELECT (columns as Summary.columns) and its arguments, without its LIMIT. One level of
    aggregation, grouped and ordered by the bucket first: with the (span, bucket) index SQLite reads the rows
    in that order and needs no sort (SQLite computes each distinct SUM once, however often it is named)."""
    args: list[Any] = []
    priced = sorted(prices.items()) if {"cost", "unpriced_tokens"} & set(fields) else []
    cost = "NULL"
    if priced and "cost" in fields:
        cases = []
        for model, price in priced:
            cases.append("WHEN ? THEN prompt_tokens * ? + completion_tokens * ?")
            args += [model, float(price["input"]), float(price["output"])]
        cost = f"ROUND(SUM(CASE WHEN metered > 0 THEN CASE model {' '.join(cases)} END END) / 1e6, 6)"
    unpriced = (f"SUM(CASE WHEN model IN ({', '.join('?' * len(priced))}) THEN 0 ELSE total_tokens END)"
                if priced else "SUM(total_tokens)")
    if "unpriced_tokens" in fields:
        args += [model for model, _ in priced]
    matching, matching_args = _rollup_matching(filters)
    clauses = ["span = ?", *matching]
    args += [span, *matching_args]
    metered = "SUM(metered) > 0"
    select = [
        *(f"NULLIF({g}, '')" if g in SUMMARY_GROUPS else g for g in groups),
        "SUM(requests)", "SUM(failed)",
        *(f"SUM({name})" for name in ("client_errors", "server_errors", "upstream_cut", "client_cut", "timeout",
                                      "metered")),
        *(f"CASE WHEN {metered} THEN SUM({name}) END" for name in ("prompt_tokens", "completion_tokens",
                                                                  "total_tokens")),
        f"CASE WHEN {metered} THEN {cost} END", unpriced, "SUM(bytes_sent)", "SUM(request_length)",
        *(f"ROUND({expr}, 6)" for expr in (  # seconds: to the microsecond
            "SUM(duration_sum) / SUM(requests)",
            *(_quantile_sql(quantile, "d", DURATION_BOUNDS, "SUM(requests)") for quantile in QUANTILES),
            "SUM(ttfb_sum) / NULLIF(SUM(ttfb_count), 0)",
            *(_quantile_sql(quantile, "t", TTFB_BOUNDS, "SUM(ttfb_count)") for quantile in QUANTILES))),
    ]
    wanted = {*groups, *fields}
    named = zip(select, [*groups, *SUMMARY_COUNTS], strict=True)
    columns = ", ".join(f"{expr} AS {name}" for expr, name in named if name in wanted)
    # the bucket first, then the groups; qualified names are the table's columns, not the NULLIF'd outputs
    order = ", ".join(f"rollups.{g}" for g in ([groups[-1], *groups[:-1]] if "bucket" in groups else groups))
    grouping = f"GROUP BY {order} " if groups else ""
    return (f"SELECT {columns} FROM rollups WHERE {' AND '.join(clauses)} {grouping}HAVING SUM(requests) > 0"
            f"{f' ORDER BY {order}' if groups else ''}"), args


# ---- CSV ----------------------------------------------------------------------------------------------------

def _cell(value: Any) -> Any:
    """A spreadsheet must never run a value as a formula: text starting with = + - @ (or a tab or CR, which
    some strip first) gets a leading '. Numbers are ours and written as they are."""
    if value is None:
        return ""
    if isinstance(value, str) and value.startswith(FORMULA_START):
        return "'" + value
    return value


def to_csv(columns: Sequence[str], rows: Iterable[Mapping[str, Any]]) -> Iterator[str]:
    """RFC 4180 text (CRLF line ends, fields with a comma, quote or line break quoted, quotes doubled), with a
    header line; yielded a chunk of rows at a time so a large export is streamed."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\r\n", quoting=csv.QUOTE_MINIMAL)
    writer.writerow(columns)
    for i, row in enumerate(rows, 1):
        writer.writerow([_cell(row.get(c)) for c in columns])
        if i % 1000 == 0:
            yield buffer.getvalue()
            buffer.seek(0)
            buffer.truncate()
    yield buffer.getvalue()


def totals(usage: Usage) -> tuple[list[sqlite3.Row], list[sqlite3.Row]]:
    """The all-time sums for /metrics, read in one snapshot of the database: per (key, model, pool) the
    counts /metrics labels by key, and per (model, pool) every column, histograms included."""
    per_key = "key, model, pool, requests, client_errors, server_errors, metered, prompt_tokens, completion_tokens"
    sums = ", ".join(f"SUM({name}) AS {name}" for name in ROLLUP_NAMES)
    with usage.reader() as db:
        db.execute("BEGIN")  # one read snapshot: the two lists always agree
        try:
            keys = db.execute(f"SELECT {per_key} FROM rollups WHERE span = ?", (TOTAL_SPAN,)).fetchall()
            models = db.execute(f"SELECT model, pool, {sums} FROM rollups WHERE span = ? GROUP BY model, pool",
                                (TOTAL_SPAN,)).fetchall()
        finally:
            db.execute("ROLLBACK")
    return keys, models
