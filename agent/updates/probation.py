"""The verdict on a new version during its probation window: a pure function of what was measured.

What the device enforces comes from the **signed** desired state (the rollout's budget) over the
device's ``updates`` settings, whose defaults only catch a broken model: NaN/Inf on the bundle's own
smoke samples (checked when it loads), crashes, a failure rate clearly above the old version's on
comparable traffic, or runs slower than the model's deadline. A new version that is slower by design
(a bigger model) commits unless the budget sets ``max_latency_ratio`` or ``max_p95_ms``.

Rates are judged only after ``min_runs`` runs, and against the old version's own rates (its errors
and NaN/Inf outputs while it served), so a client sending garbage to both does not veto the update.
Runs whose inputs lie far outside the calibration range are left out of the verdict (an input of
3e38 overflows any model to Inf; that is the request's doing, not the version's).
"""

from __future__ import annotations

from dataclasses import dataclass

#: verdicts
WAIT, COMMIT, ROLL_BACK = "wait", "commit", "roll_back"


@dataclass(frozen=True)
class Budget:
    """The limits one probation enforces (see :class:`edgepack.fleet.desired.ProbationBudget`)."""

    duration_s: float = 60.0
    min_runs: int = 20
    max_error_rate: float = 0.05
    max_nonfinite_rate: float = 0.05
    max_latency_ratio: float | None = None
    max_p95_ms: float | None = None
    deadline_ms: float | None = None

    @classmethod
    def of(cls, options, signed: dict | None, deadline_ms: float | None = None) -> "Budget":
        """The device's ``updates`` settings, overridden by the signed budget's keys that are set."""
        values = {"duration_s": options.probation_s, "min_runs": options.min_runs,
                  "max_error_rate": options.max_error_rate, "max_nonfinite_rate": options.max_nonfinite_rate,
                  "max_latency_ratio": options.max_latency_ratio, "max_p95_ms": options.max_p95_ms,
                  "deadline_ms": deadline_ms}
        values.update({k: v for k, v in (signed or {}).items() if v is not None and k in values})
        return cls(**values)


@dataclass(frozen=True)
class Verdict:
    decision: str
    reason: str | None = None
    message: str | None = None


def _rate(health: dict, key: str) -> float:
    judged = health.get("judged_runs", health.get("runs", 0))
    return health.get(key, 0) / judged if judged else 0.0


def judge(budget: Budget, new: dict, old: dict | None, elapsed_s: float, load_ratio: float | None = None) -> Verdict:
    """Commit, roll back or wait, from the new version's health summary (``new``), the old version's
    as it served before the switch (``old``, None for a first version), the seconds since the new
    version took traffic, and the new/old time per sample measured side by side at the switch."""
    judged = new.get("judged_runs", new.get("runs", 0))
    old_judged = (old or {}).get("judged_runs", (old or {}).get("runs", 0))
    enough = judged >= budget.min_runs
    for key, limit, what in (("errors", budget.max_error_rate, "failed runs"),
                             ("nonfinite", budget.max_nonfinite_rate, "runs with NaN or Inf outputs")):
        count = new.get(key, 0)
        if not enough or not count:
            continue
        # The old version's rate counts only when it was measured on enough traffic too.
        baseline = _rate(old, key) if old and old_judged >= budget.min_runs else 0.0
        if _rate(new, key) > baseline + limit:
            return Verdict(ROLL_BACK, "errors" if key == "errors" else "nonfinite",
                           f"{count} of {judged} {what} ({_rate(new, key):.1%}; the old version had {baseline:.1%}, "
                           f"the budget allows {limit:.1%} more)")
    if budget.max_latency_ratio and load_ratio and load_ratio > budget.max_latency_ratio:
        return Verdict(ROLL_BACK, "latency", f"the new version takes {load_ratio:.1f}x the old one's time per sample, "
                       f"timed side by side (the budget allows {budget.max_latency_ratio:g}x)")
    p50, old_p50 = new.get("sample_seconds_p50"), (old or {}).get("sample_seconds_p50")
    if (budget.max_latency_ratio and enough and old_judged >= budget.min_runs and p50 and old_p50
            and p50 > budget.max_latency_ratio * old_p50):
        return Verdict(ROLL_BACK, "latency", f"the new version serves at {p50 / old_p50:.1f}x the old one's time per "
                       f"sample (the budget allows {budget.max_latency_ratio:g}x)")
    p95 = new.get("run_seconds_p95")
    for limit, what in ((budget.max_p95_ms, "the budget's p95 limit"), (budget.deadline_ms, "the model's deadline")):
        if limit and enough and p95 and p95 * 1000 > limit:
            return Verdict(ROLL_BACK, "latency", f"p95 run time {p95 * 1000:.1f} ms is beyond {what} of {limit:g} ms")
    if elapsed_s >= budget.duration_s:
        return Verdict(COMMIT, None, f"healthy for {budget.duration_s:g} s: {new.get('runs', 0)} runs, "
                       f"{new.get('errors', 0)} errors, {new.get('excluded', 0)} out-of-range runs left out")
    return Verdict(WAIT)
