"""The gate's fast JSON path (orjson, authsvc.bodies._request_body) against the strict parser (`bodies.loads`):
the same bodies refused with the same errors, the same values where the gate reads them."""

from __future__ import annotations

import random

import pytest

from authsvc import bodies

TRICKY = [
    b'{"model":"x","messages":[]}', b' {"model":"x"} ', b'{"model":"x"}x', b'{"model":"x",}', b"NaN", b"Infinity",
    b"-Infinity", b'{"a":NaN}', b"1e400", b'{"stream":1e400}', b'"\\ud800"', b'"\\ud83d\\ude00"', b"\xef\xbb\xbf{}",
    b'"\xff"', b'"\xed\xa0\x80"', b'"a\tb"', b"01", b"-", b"1.", b".5", b"+1", b"", b" ", b'{"a":1,"a":2,"b":3}',
    b'{"model":"a","model":"b"}', b"[" * 128 + b"]" * 128, b"[" * 129 + b"]" * 129, b"[" * 1100 + b"]" * 1100,
    b"18446744073709551615", b"-9223372036854775808", b'{"stream":99999999999999999999}', b'{"stream":1.0}',
    b'{"model":"x","stream":true,"stream_options":{}}', b'"\\u0000"', b'{"\\u006dodel":"x"}', b"\x0c[]",
]
SEEDS = [b'{"model":"x","messages":[{"role":"user","content":"hi \\u00e9"}],"stream":true,"n":1,"t":0.5,"z":null}',
         b'[1,-2,3.25e-3,"a\\"b\\\\c",{"k":[[]],"":{}}]', b'{"stream":12,"stream_options":{"include_usage":false}}']
NOISE = b'{}[]",:0123456789.eE+-\\/ubfnrt \t\n\r\x00\x7f\xc3\xa9\xff\xefNaIfinity'


def outcome(parse, raw: bytes) -> tuple:
    try:
        return ("ok", repr(parse(raw)))
    except ValueError as e:
        return ("refused", type(e).__name__, str(e))


def big_int(value) -> bool:
    """An integer orjson cannot hold (it makes it a float: the one known difference, see _request_body)."""
    if isinstance(value, dict):
        return any(big_int(v) for v in value.values())
    if isinstance(value, list):
        return any(big_int(v) for v in value)
    return type(value) is int and not -(2**63) <= value < 2**64


def check_agrees(raw: bytes) -> None:
    strict, fast = outcome(bodies.loads, raw), outcome(bodies._request_body, raw)
    if strict[0] == "ok" and fast[0] == "ok" and strict != fast and big_int(bodies.loads(raw)):
        body, fast_body = bodies.loads(raw), bodies._request_body(raw)
        if isinstance(body, dict):  # `stream` is read with its type: it must be the strict parser's
            assert repr(body.get("stream")) == repr(fast_body.get("stream"))
        return
    assert strict == fast, raw


@pytest.mark.parametrize("raw", TRICKY)
def test_fast_path_refuses_and_reads_like_the_strict_parser(raw: bytes) -> None:
    check_agrees(raw)


def test_fast_path_agrees_on_mutated_bodies() -> None:
    rnd = random.Random(13)
    for _ in range(20_000):
        raw = bytearray(rnd.choice(SEEDS))
        for _ in range(rnd.randint(1, 3)):
            at = rnd.randrange(len(raw) + 1)
            if rnd.random() < 0.4 and raw:
                del raw[min(at, len(raw) - 1)]
            else:
                raw[at:at] = rnd.choice([bytes([rnd.choice(NOISE)]), b"99999999999999999999", b"1e999", b"\\ud800",
                                         b'"a":1,"a":2,', b'"stream":99999999999999999999,'])
        check_agrees(bytes(raw))


def test_a_huge_integer_stream_is_named_an_integer() -> None:
    """orjson would read it as a float ("a number"): the strict parser's reading is kept."""
    model, body = bodies.json_document(b'{"model":"x","stream":99999999999999999999}', ollama=False)
    assert model == "x" and type(body["stream"]) is int
