"""The search both mixed-precision recipes share: keep the worst-ranked 1, 2, 4, ... layers float until
the candidate meets the gate, or stop at the recipe's limit."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable


@dataclass
class SearchResult:
    """The last candidate built: how many ranked layers it keeps float, its file, gate and latency."""

    count: int
    path: Path
    gate: object
    latency: object
    tried: list[dict] = field(default_factory=list)


def kept_tag(names: list[str]) -> str:
    """A short hash of the layers a candidate keeps float, for its file name: two searches (other
    budgets, same options) that reach the same count with other layers write other files."""
    return hashlib.sha256("\n".join(names).encode()).hexdigest()[:8]


def search_float_layers(ranked: list, limit: int, build: Callable[[int, list[str]], Path],
                        evaluate: Callable[[Path], tuple], refine: int = 2) -> SearchResult:
    """``ranked``: items with a ``group`` of node names, worst first. ``build(count, names)`` writes the
    candidate keeping ``names`` (the groups of the first ``count`` items) float; ``evaluate(path)``
    returns (gate, latency). Doubling keeps the number of candidates logarithmic in the limit; once a
    count passes, up to ``refine`` bisection steps look for a smaller one between it and the last
    failure (16 failing and 32 passing: 24, then 20 or 28), so no more layers than needed stay float."""
    tried: list[dict] = []

    def attempt(count: int):
        keep = list(dict.fromkeys(name for item in ranked[:count] for name in item.group))
        path = build(count, keep)
        gate, latency = evaluate(path)
        tried.append({"float_layers": count, "passed": gate.passed, "failures": gate.failures[:2]})
        return SearchResult(count, path, gate, latency, tried)

    failed, count = 0, 1
    while True:
        count = min(count, limit)
        result = attempt(count)
        if result.gate.passed or count >= limit:
            break
        failed, count = count, count * 2
    best = result
    while best.gate.passed and refine > 0 and best.count - failed > 1:
        refine -= 1
        middle = (failed + best.count) // 2
        result = attempt(middle)
        if result.gate.passed:
            best = result
        else:
            failed = middle
    if best is not result:
        # Each candidate has its own file (count and kept layers), so the best one's is still there.
        best.tried = tried
    return best
