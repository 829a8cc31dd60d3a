"""A strict reader of Prometheus' text exposition format 0.0.4, for tests: anything Prometheus would reject, or
that breaks the format's rules (families in one group, HELP/TYPE before samples, escaping, unique series,
cumulative histograms ending in +Inf == _count), raises ValueError naming the line."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

NAME = r"[a-zA-Z_:][a-zA-Z0-9_:]*"
LABEL = r"[a-zA-Z_][a-zA-Z0-9_]*"
SAMPLE_RE = re.compile(rf"^({NAME})(?:\{{(.*)\}})? (\S+)(?: (-?\d+))?$")
LABEL_RE = re.compile(rf'({LABEL})="((?:[^"\\\n]|\\[\\"n])*)"(,|$)')
TYPES = ("counter", "gauge", "histogram", "summary", "untyped")
SUFFIXES = {"histogram": ("_bucket", "_sum", "_count"), "summary": ("_sum", "_count", "")}


@dataclass
class Family:
    name: str
    type: str = "untyped"
    help: str | None = None
    samples: list[tuple[str, dict[str, str], float]] = field(default_factory=list)

    def value(self, name: str | None = None, **labels: str) -> float:
        """The one sample with exactly these labels."""
        found = [v for n, lab, v in self.samples if n == (name or self.name) and lab == labels]
        if len(found) != 1:
            raise KeyError(f"{name or self.name}{labels}: {len(found)} samples")
        return found[0]

    def total(self, **labels: str) -> float:
        """The sum of the samples (of the family's own name) whose labels include these."""
        return sum(v for n, lab, v in self.samples if n == self.name and labels.items() <= lab.items())


def _unescape(value: str) -> str:
    return re.sub(r"\\(.)", lambda m: {"n": "\n", "\\": "\\", '"': '"'}[m.group(1)], value)


def _labels(text: str, line: str) -> dict[str, str]:
    labels: dict[str, str] = {}
    pos = 0
    while pos < len(text):
        m = LABEL_RE.match(text, pos)
        if not m:
            raise ValueError(f"bad labels in {line!r}")
        if m.group(1) in labels:
            raise ValueError(f"label {m.group(1)} twice in {line!r}")
        labels[m.group(1)] = _unescape(m.group(2))
        pos = m.end()
        if m.group(3) == "," and pos == len(text):
            raise ValueError(f"trailing comma in {line!r}")
    return labels


def _value(text: str, line: str) -> float:
    if text in ("+Inf", "-Inf", "NaN"):
        return float(text.replace("Inf", "inf").replace("NaN", "nan"))
    if not re.fullmatch(r"-?(\d+(\.\d*)?|\.\d+)([eE][-+]?\d+)?", text):
        raise ValueError(f"bad value in {line!r}")
    return float(text)


def _family_of(sample: str, families: dict[str, Family]) -> Family | None:
    if sample in families:
        return families[sample]
    for suffix in ("_bucket", "_sum", "_count"):
        base = sample[: -len(suffix)]
        if sample.endswith(suffix) and base in families and suffix in SUFFIXES.get(families[base].type, ()):
            return families[base]
    return None


def parse(text: str) -> dict[str, Family]:
    if not text.endswith("\n"):
        raise ValueError("the exposition must end with a newline")
    families: dict[str, Family] = {}
    done: set[str] = set()  # families whose group has ended
    current: Family | None = None
    seen: set[tuple[str, tuple[tuple[str, str], ...]]] = set()
    for line in text[:-1].split("\n"):
        if line.startswith("#"):
            m = re.fullmatch(rf"# (HELP|TYPE) ({NAME}) ?(.*)", line)
            if not m:
                raise ValueError(f"bad comment line {line!r}")
            kind, name, rest = m.groups()
            if name in done or (current is not None and current.name != name and name in families):
                raise ValueError(f"{name}: its lines are not in one group ({line!r})")
            if current is not None and current.name != name:
                done.add(current.name)
            family = families.setdefault(name, Family(name))
            if family.samples:
                raise ValueError(f"{kind} after samples of {name}")
            if kind == "TYPE":
                if rest not in TYPES or family.type != "untyped":
                    raise ValueError(f"bad or repeated TYPE {line!r}")
                family.type = rest
            else:
                if family.help is not None or not re.fullmatch(r"(?:[^\\]|\\[\\n])*", rest):
                    raise ValueError(f"repeated HELP or bad escape {line!r}")
                family.help = rest
            current = family
            continue
        m = SAMPLE_RE.match(line)
        if not m:
            raise ValueError(f"bad sample line {line!r}")
        name, label_text, value_text, _ = m.groups()
        labels = _labels(label_text or "", line)
        family = _family_of(name, families)
        if family is None or family.name in done or (current is not None and family is not current):
            raise ValueError(f"{name}: sample outside its family's group ({line!r})")
        key = (name, tuple(sorted(labels.items())))
        if key in seen:
            raise ValueError(f"duplicate series {line!r}")
        seen.add(key)
        value = _value(value_text, line)
        if family.type == "counter" and not (value >= 0 and name.endswith("_total")):
            raise ValueError(f"a counter must be named *_total and be >= 0: {line!r}")
        family.samples.append((name, labels, value))
    for family in families.values():
        if family.type == "histogram":
            _check_histogram(family)
    return families


def _check_histogram(family: Family) -> None:
    """Per series: `le` bounds increasing, counts cumulative, the last bucket +Inf, equal to _count."""
    series: dict[tuple[tuple[str, str], ...], list[tuple[float, float]]] = {}
    for name, labels, value in family.samples:
        if name == family.name + "_bucket":
            rest = tuple(sorted((k, v) for k, v in labels.items() if k != "le"))
            series.setdefault(rest, []).append((_value(labels["le"], labels["le"]), value))
    for rest, buckets in series.items():
        bounds = [b for b, _ in buckets]
        counts = [c for _, c in buckets]
        if bounds != sorted(bounds) or len(set(bounds)) != len(bounds) or not math.isinf(bounds[-1]):
            raise ValueError(f"{family.name}{dict(rest)}: buckets not increasing or no +Inf: {bounds}")
        if counts != sorted(counts):
            raise ValueError(f"{family.name}{dict(rest)}: bucket counts not cumulative: {counts}")
        if counts[-1] != family.value(family.name + "_count", **dict(rest)):
            raise ValueError(f"{family.name}{dict(rest)}: +Inf bucket differs from _count")
        family.value(family.name + "_sum", **dict(rest))  # present, once
