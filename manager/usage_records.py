"""Usage records as Arrow tables (decision 43): read from nginx's usage log, kept as compressed segments, summed
per minute for the rollups, and filtered for the queries.

Ingestion has to be cheap: every proxied request is a line. A chunk of the log is read by Arrow's CSV reader
(compiled, typed columns) and every step after it works on whole columns, so no Python code runs per line.
Chunks the fast reader does not take exactly as they are (a torn record, an escaped value, a line of the earlier
JSON format) go through the line parser of manager/usage_log.py instead; both paths meet in `_records()`, which
is the one place that says what a field becomes.

A record's fields: RECORD_SCHEMA (`id` is given by the store, in log order). Text nginx did not have is null
(key, model, pool, upstream, outcome); nginx lists every upstream tried ("gate : pool" across the
X-Accel-Redirect, "a, b" for retries): the last answered and is kept, for a request that reached a pool.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pcsv
import pyarrow.ipc as ipc

from manager.usage_log import FIELDS, MARKER, parse_lines

RECORD_SCHEMA = pa.schema([
    ("id", pa.int64()), ("request_id", pa.string()), ("start", pa.float64()), ("end", pa.float64()),
    ("key", pa.string()), ("model", pa.string()), ("pool", pa.string()), ("upstream", pa.string()),
    ("status", pa.int64()), ("upstream_status", pa.int64()), ("bytes_sent", pa.int64()),
    ("request_length", pa.int64()), ("ttfb", pa.float64()), ("duration", pa.float64()), ("method", pa.string()),
    ("uri", pa.string()), ("remote_addr", pa.string()), ("outcome", pa.string()), ("prompt_tokens", pa.int64()),
    ("completion_tokens", pa.int64()), ("total_tokens", pa.int64()),
])
RECORD_FIELDS = tuple(RECORD_SCHEMA.names)
OUTCOMES = ("completed", "upstream_cut", "client_cut", "timeout")
# upper bounds (seconds) of the histogram buckets; +Inf is the row's count
DURATION_BOUNDS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
TTFB_BOUNDS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
# the sums every rollup row keeps, in the rollups table's column order
ROLLUP_NAMES = (
    "requests", "client_errors", "server_errors", *OUTCOMES[1:], "failed", "metered", "prompt_tokens",
    "completion_tokens", "total_tokens", "bytes_sent", "request_length", "duration_sum", "ttfb_count", "ttfb_sum",
    *(f"d{i}" for i in range(len(DURATION_BOUNDS))), *(f"t{i}" for i in range(len(TTFB_BOUNDS))),
)
ROLLUP_GROUPS = ("minute", "key", "model", "pool")

_INTEGER = {"status", "bytes_sent", "request_length", "prompt_tokens", "completion_tokens", "total_tokens"}
_REAL = {"end", "duration"}
# the fast reader's column types: numbers nginx writes as plain numbers, the rest text ("" for absent numbers)
_READ = pcsv.ReadOptions(column_names=list(FIELDS), use_threads=False, block_size=1 << 24)
_PARSE = pcsv.ParseOptions(delimiter="\t", quote_char=False, escape_char=False, double_quote=False)
_CONVERT = pcsv.ConvertOptions(
    column_types={name: pa.int64() if name in _INTEGER else pa.float64() if name in _REAL else pa.string()
                  for name in FIELDS},
    null_values=[""], strings_can_be_null=False)
_NUMBER = {pa.int64(): r"^\d{1,18}$", pa.float64(): r"^\d{1,15}(\.\d{1,9})?$"}
_COMPRESSION = ipc.IpcWriteOptions(compression="lz4")
EMPTY = RECORD_SCHEMA.empty_table()
# Compute functions get Arrow scalars, made once: given a Python value (None included), pyarrow first tries to
# import pandas and dateutil (absent here), searches of sys.path that cost a third of a microsecond per line.
_NOTHING, _NULL_TEXT, _FALSE, _MARKER = pa.scalar(""), pa.scalar(None, pa.string()), pa.scalar(False), pa.scalar(MARKER)
_ONE = pa.scalar(1, pa.int32())
_MINUTE, _MINUTE_S = pa.scalar(60, pa.int64()), pa.scalar(60.0)
_STATUS_400, _STATUS_500 = pa.scalar(400, pa.int64()), pa.scalar(500, pa.int64())
_CUT = pa.array(["upstream_cut", "timeout"])
_OUTCOMES = {name: pa.scalar(name) for name in OUTCOMES}
_DURATION_BOUNDS = [pa.scalar(bound) for bound in DURATION_BOUNDS]
_TTFB_BOUNDS = [pa.scalar(bound) for bound in TTFB_BOUNDS]


# ---- reading the log ----------------------------------------------------------------------------------------

def read_chunk(chunk: bytes) -> tuple[pa.Table, int]:
    """The records of `chunk` (complete lines of the log) without ids, and how many torn or unreadable pieces
    were skipped."""
    if b"\\" not in chunk:  # escaped values need unescaping, which the line parser does
        try:
            raw = pcsv.read_csv(io.BytesIO(chunk), read_options=_READ, parse_options=_PARSE,
                                convert_options=_CONVERT)
        except (pa.ArrowInvalid, pa.ArrowTypeError):  # a torn or foreign line somewhere in the chunk
            pass
        else:
            if len(raw) == 0 or pc.all(pc.equal(raw["marker"], _MARKER)).as_py():
                return _placed(_records(raw), len(raw), 0)
    lines, skipped = parse_lines(chunk.decode(errors="replace"))
    raw = pa.table([pa.array(column, pa.string()) for column in zip(*lines, strict=True)] if lines else
                   [pa.array([], pa.string())] * len(FIELDS), names=list(FIELDS))
    return _placed(_records(raw), len(raw), skipped)


def _placed(records: pa.Table, lines: int, skipped: int) -> tuple[pa.Table, int]:
    """The records that can be placed in time (a line whose end or duration is not a number, never nginx's,
    cannot), and how many lines were skipped in all."""
    placed = records.filter(pc.and_(pc.is_valid(records["end"]), pc.is_valid(records["duration"])))
    return placed, skipped + lines - len(placed)


def _number(column: pa.ChunkedArray, type_: pa.DataType) -> pa.ChunkedArray:
    """A column of text as numbers; anything else (nginx's "-", "", a number out of range) is null."""
    if column.type == type_:
        return column
    valid = pc.match_substring_regex(column, _NUMBER[type_])
    return pc.cast(pc.if_else(valid, column, _NULL_TEXT), type_)


def _text(column: pa.ChunkedArray) -> pa.ChunkedArray:
    return pc.if_else(pc.equal(column, _NOTHING), _NULL_TEXT, column)


def _last_word(column: pa.ChunkedArray) -> pa.ChunkedArray:
    """The text after the last space of each value (the whole value without one)."""
    words = pc.split_pattern(column, " ", max_splits=1, reverse=True)
    # the last item of each list: the one before the next list's start (a regex replace costs three times more)
    return pa.chunked_array([chunk.values.take(pc.subtract(chunk.offsets[1:], _ONE)) for chunk in words.chunks],
                            pa.string())


def _records(raw: pa.Table) -> pa.Table:
    """The fields of the log as a record table (RECORD_SCHEMA without the id), from typed or text columns."""
    pool = _text(raw["pool"])
    proxied = pc.is_valid(pool)

    def answered(name: str) -> pa.ChunkedArray:  # the last of nginx's list, for a request that reached a pool
        return pc.if_else(proxied, _last_word(raw[name]), _NULL_TEXT)

    end = _number(raw["end"], pa.float64())
    duration = _number(raw["duration"], pa.float64())
    columns = {
        "request_id": raw["request_id"], "start": pc.subtract(end, duration), "end": end,
        "key": _text(raw["key"]), "model": _text(raw["model"]), "pool": pool, "upstream": _text(answered("upstream")),
        "status": _number(raw["status"], pa.int64()),
        "upstream_status": _number(answered("upstream_status"), pa.int64()),
        "bytes_sent": _number(raw["bytes_sent"], pa.int64()),
        "request_length": _number(raw["request_length"], pa.int64()),
        "ttfb": _number(answered("ttfb"), pa.float64()), "duration": duration,
        "method": raw["method"], "uri": raw["uri"], "remote_addr": raw["remote_addr"],
        "outcome": _text(raw["outcome"]),
        **{name: _number(raw[name], pa.int64()) for name in ("prompt_tokens", "completion_tokens", "total_tokens")},
    }
    return pa.table(columns)


def with_ids(records: pa.Table, first_id: int) -> pa.Table:
    """`records` numbered from `first_id` on, in order."""
    positions = pc.indices_nonzero(pc.is_valid(records["end"]))  # 0..n-1 (every record has an end), in C
    ids = pc.add(pc.cast(positions, pa.int64()), pa.scalar(first_id, pa.int64()))
    return records.add_column(0, "id", ids).cast(RECORD_SCHEMA)


def _value(type_: pa.DataType) -> Callable[[Any], Any]:
    """A cleaner of one column's values: SQLite kept whatever it was given (text that is not a number, a REAL
    too large for an integer); what does not fit the column is null."""
    if type_ == pa.string():
        return lambda value: value if value is None or isinstance(value, str) else str(value)
    if type_ == pa.float64():
        return lambda value: float(value) if isinstance(value, int | float) else None
    return lambda value: int(value) if isinstance(value, int | float) and abs(value) < 2**63 else None


def from_rows(rows: Iterable[Sequence[Any]]) -> pa.Table:
    """Records from rows of RECORD_FIELDS' values (the store's earlier SQL table, benchmarks)."""
    columns = list(zip(*rows, strict=True)) or [()] * len(RECORD_FIELDS)
    return pa.table([pa.array(map(_value(f.type), c), f.type) for c, f in zip(columns, RECORD_SCHEMA, strict=True)],
                    schema=RECORD_SCHEMA)


# ---- segments -----------------------------------------------------------------------------------------------

def encode(records: pa.Table) -> bytes:
    sink = io.BytesIO()
    with ipc.new_stream(sink, RECORD_SCHEMA, options=_COMPRESSION) as writer:
        writer.write_table(records)
    return sink.getvalue()


def decode(blobs: Iterable[bytes]) -> pa.Table:
    tables = [ipc.open_stream(blob).read_all() for blob in blobs]
    return pa.concat_tables(tables) if tables else EMPTY


# ---- rollups ------------------------------------------------------------------------------------------------

def _failed(status: pa.Expression | pa.ChunkedArray, outcome: Any) -> Any:
    """An error status, or a stream the upstream broke (a 504 that is also a timeout is one error)."""
    return pc.or_(pc.greater_equal(status, _STATUS_400), pc.fill_null(pc.is_in(outcome, _CUT), _FALSE))


def minute_sums(records: pa.Table) -> list[tuple[Any, ...]]:
    """Per (minute of the end, key, model, pool), the ROLLUP_NAMES sums of `records` (absent text as "")."""
    if len(records) == 0:
        return []
    status, outcome, duration, ttfb = (records[n] for n in ("status", "outcome", "duration", "ttfb"))
    minute = pc.multiply(pc.cast(pc.floor(pc.divide(records["end"], _MINUTE_S)), pa.int64()), _MINUTE)
    values = {
        "requests": pc.is_valid(status),  # every record has a status
        "client_errors": pc.and_(pc.greater_equal(status, _STATUS_400), pc.less(status, _STATUS_500)),
        "server_errors": pc.greater_equal(status, _STATUS_500),
        **{name: pc.equal(outcome, _OUTCOMES[name]) for name in OUTCOMES[1:]},
        "failed": _failed(status, outcome),
        "metered": pc.is_valid(records["total_tokens"]),
        **{name: records[name] for name in ("prompt_tokens", "completion_tokens", "total_tokens", "bytes_sent",
                                            "request_length")},
        "duration_sum": duration, "ttfb_count": pc.is_valid(ttfb), "ttfb_sum": ttfb,
        **{f"d{i}": pc.less_equal(duration, bound) for i, bound in enumerate(_DURATION_BOUNDS)},
        **{f"t{i}": pc.less_equal(ttfb, bound) for i, bound in enumerate(_TTFB_BOUNDS)},
    }
    groups = {"minute": minute, **{name: pc.fill_null(records[name], _NOTHING) for name in ROLLUP_GROUPS[1:]}}
    every = pc.ScalarAggregateOptions(min_count=0)  # a sum of nothing is 0
    sums = pa.table({**groups, **values}).group_by(list(ROLLUP_GROUPS), use_threads=False).aggregate(
        [(name, "sum", every) for name in ROLLUP_NAMES])
    return list(zip(*(sums[name].to_pylist() for name in (*ROLLUP_GROUPS, *(f"{n}_sum" for n in ROLLUP_NAMES))),
                    strict=True))


def last_ends(records: pa.Table) -> list[tuple[str, float]]:
    """Each key's latest end in `records` (requests without a key are left out)."""
    keyed = records.filter(pc.is_valid(records["key"]))
    latest = keyed.group_by("key", use_threads=False).aggregate([("end", "max")])
    return list(zip(latest["key"].to_pylist(), latest["end_max"].to_pylist(), strict=True))


# ---- queries ------------------------------------------------------------------------------------------------

def failed(records: pa.Table) -> pa.ChunkedArray:
    return _failed(records["status"], records["outcome"])
