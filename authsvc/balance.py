"""Model- and load-aware choice of the upstream inside a pool (docs/decisions.md, decision 38).

For a pool with `model_aware` on, the gate names the upstream nginx should try first (`X-Bastion-Upstream:
<pool>:<index>`; nginx fails over to the pool's others before the first byte, manager/balancing.py). It chooses
from memory only: the live upstreams (health checks, in the snapshot) and what the manager last polled from
them (run/ollama-ps.json, loaded off the request path by model_lists.RunningFile): the models each has loaded
(Ollama /api/ps, vLLM's model_name label) and its waiting requests (vLLM /metrics num_requests_waiting).

Order: an upstream that has the model loaded first, then the fewest waiting requests plus the requests this gate
sent it since the data last changed (stale figures must not send every request to the one that looked idle),
ties taken in turn. Between two polls the gate counts its own requests in: a model sent to an upstream is
loaded there (evicting the least recently used beyond the most models it was seen to hold), and a model loaded
nowhere stays where the gate sent it first (PLACED_TTL, also across new figures: that upstream is loading it).
No data about any live upstream of the pool: no choice, nginx balances.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

HEADER = "X-Bastion-Upstream"
PLACED_TTL = 60.0  # seconds a model sent to an upstream that had it nowhere counts as loading there
MAX_ENTRIES = 10_000  # remembered placements and per-pool counters, cleared when reached


@dataclass(frozen=True, slots=True)
class Load:
    """What the manager last polled from one upstream."""
    models: frozenset[str]  # loaded (Ollama) or served (vLLM) models
    waiting: int = 0  # requests queued (vLLM); 0 when the server does not say


@dataclass(frozen=True, slots=True)
class Choice:
    """An upstream the gate may pick: its index in the pool (nginx's block pool_<name>__<index>), its URL (the
    key of the load data) and whether the health checks hold it live."""
    index: int
    url: str
    live: bool = True


class Balancer:
    """The choices of one gate process (authsvc/server.py runs the gate in one thread)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic):
        self.clock = clock
        self.turns: dict[str, int] = {}  # pool -> requests chosen for, to take ties in turn
        self.sent: dict[str, int] = {}  # URL -> requests sent there since the figures changed
        # URL -> the models it has loaded as far as the gate can tell: the figures, then each request sent there
        # (most recent first, at most as many as the upstream was ever seen to hold), so figures that predate
        # the gate's own last requests do not send a model back where another has since replaced it
        self.believed: dict[str, list[str]] = {}
        self.capacity: dict[str, int] = {}  # URL -> the most models it was seen to hold at once
        self.placed: dict[tuple[str, str], tuple[int, float]] = {}  # (pool, model) loaded nowhere -> (index, when)
        self.generation = -1  # of the figures the counters belong to
        self.since = 0.0  # when they came

    def pick(self, pool: str, choices: tuple[Choice, ...], names: tuple[str, ...], loads: Mapping[str, Load],
             generation: int) -> int | None:
        """The index of the upstream to try first for a model known by `names` (its variants), or None."""
        now = self.clock()
        # fresh figures: what was sent before is in them; none for PLACED_TTL: the gate's guesses are too old
        if generation != self.generation or now - self.since > PLACED_TTL:
            self.generation, self.since = generation, now
            self.sent.clear()
            self.believed.clear()
        live = [c for c in choices if c.live]
        if not any(c.url in loads for c in live):
            return None
        loaded = [any(n in self.models(c.url, loads) for n in names) for c in live]
        if not any(loaded):
            mark = self.placed.get((pool, names[0]))
            if mark is not None and now - mark[1] < PLACED_TTL:
                loaded = [c.index == mark[0] for c in live]
        ranks = [(not is_loaded, (loads[c.url].waiting if c.url in loads else 0) + self.sent.get(c.url, 0))
                 for c, is_loaded in zip(live, loaded, strict=True)]
        best = min(ranks)
        tied = [c for c, rank in zip(live, ranks, strict=True) if rank == best]
        if max(len(self.turns), len(self.sent), len(self.believed), len(self.capacity)) >= MAX_ENTRIES:
            self.turns.clear()
            self.sent.clear()
            self.believed.clear()
            self.capacity.clear()
        turn = self.turns.get(pool, 0)
        self.turns[pool] = turn + 1
        chosen = tied[turn % len(tied)]
        self.sent[chosen.url] = self.sent.get(chosen.url, 0) + 1
        models = self.models(chosen.url, loads)
        models[:] = [names[0], *(m for m in models if m not in names)][: self.capacity.get(chosen.url, 1)]
        if best[0]:  # loaded nowhere: remember where it goes, that upstream loads it now
            if len(self.placed) >= MAX_ENTRIES:
                self.placed.clear()
            self.placed[(pool, names[0])] = (chosen.index, now)
        return chosen.index

    def models(self, url: str, loads: Mapping[str, Load]) -> list[str]:
        """What `url` has loaded as far as the gate can tell (see `believed`)."""
        models = self.believed.get(url)
        if models is None:
            figures = loads.get(url)
            models = self.believed[url] = sorted(figures.models) if figures else []
            self.capacity[url] = max(self.capacity.get(url, 1), len(models))
        return models
