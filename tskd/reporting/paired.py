"""Paired comparison of two methods over seeds, and how many seeds a comparison needs.

Seed s gives every method of a pair the same student initialisation and the same data order (the
trainer seeds the student before the method builds its own modules, and replays the data order from
(seed, epoch): tests/test_seed_pairing.py). So the runs of two methods pair by seed, and the
difference within a seed cancels that seed's share of luck: the paired t-test, on the per-seed
differences, is the test of "is A better than B here" that the seeds allow.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

LEVEL = 0.95  # the confidence level of every interval
POWER = 0.8  # the seed planner's power
PLANNER_MAX = 10_000  # seeds beyond this are reported as "more than"


def _t():
    from scipy import stats  # deferred: only the report imports this module's users

    return stats


@dataclass(frozen=True)
class Difference:
    """The per-seed differences (a − b) over the seeds both have: their mean, sample std, the
    ``LEVEL`` confidence interval of the mean (Student's t, n − 1 degrees of freedom) and the
    two-sided paired t-test's p-value. With fewer than two seeds there is no spread: no interval."""

    n: int
    mean: float | None
    sd: float | None
    low: float | None
    high: float | None
    p: float | None

    @property
    def outcome(self) -> str:
        """``win`` / ``loss`` when the interval excludes 0 above / below, ``tie`` when it holds 0,
        ``untested`` with fewer than two paired seeds."""
        if self.low is None or self.high is None:
            return "untested"
        return "win" if self.low > 0 else "loss" if self.high < 0 else "tie"

    @property
    def significant(self) -> bool:
        return self.outcome in ("win", "loss")

    def cell(self) -> str:
        """``+0.42 [−0.10, +0.94]``, bold where the interval excludes 0; ``+0.42 (n=1)`` untested."""
        if self.mean is None:
            return ""
        if self.low is None:
            return f"{self.mean:+.2f} (n={self.n})"
        text = f"{self.mean:+.2f} [{self.low:+.2f}, {self.high:+.2f}]"
        return f"**{text}**" if self.significant else text

    def p_cell(self) -> str:
        if self.p is None:
            return ""
        return "< 0.001" if self.p < 0.001 else f"{self.p:.3f}"

    def as_dict(self) -> dict[str, float | int | None]:
        return {"n": self.n, "diff": _round(self.mean), "low": _round(self.low), "high": _round(self.high),
                "p": _round(self.p, 6), "sd": _round(self.sd)}


def _round(x: float | None, digits: int = 4) -> float | None:
    return None if x is None else round(x, digits)


def paired_difference(a: Mapping[int, float], b: Mapping[int, float], level: float = LEVEL) -> Difference:
    """``a`` and ``b`` map seed -> figure; seeds in one only are left out (they have no pair)."""
    diffs = [a[s] - b[s] for s in sorted(a.keys() & b.keys())]
    n = len(diffs)
    if n == 0:
        return Difference(0, None, None, None, None, None)
    mean = statistics.fmean(diffs)
    if n == 1:
        return Difference(1, mean, None, None, None, None)
    sd = statistics.stdev(diffs)
    if sd == 0:  # every seed moved by exactly the same amount (identical runs: 0)
        return Difference(n, mean, 0.0, mean, mean, 1.0 if mean == 0 else 0.0)
    se = sd / math.sqrt(n)
    stats = _t()
    half = float(stats.t.ppf(0.5 + level / 2, n - 1)) * se
    p = float(2 * stats.t.sf(abs(mean / se), n - 1))
    return Difference(n, mean, sd, mean - half, mean + half, p)


def pooled_sd(diffs: Iterable[Difference]) -> tuple[float | None, int]:
    """The spread of a per-seed difference pooled over comparisons (pairs) that each have one:
    sqrt(sum (n_i - 1) sd_i^2 / sum (n_i - 1)), and its degrees of freedom."""
    parts = [(d.n - 1, d.sd) for d in diffs if d.sd is not None and d.n > 1]
    df = sum(k for k, _ in parts)
    if df == 0:
        return None, 0
    return math.sqrt(sum(k * sd * sd for k, sd in parts) / df), df


def power(n: int, sd: float, delta: float, alpha: float = 1 - LEVEL) -> float:
    """The two-sided paired t-test's power with n seeds against a true mean difference ``delta``
    when the per-seed difference has spread ``sd`` (noncentral t)."""
    stats = _t()
    df = n - 1
    crit = float(stats.t.ppf(1 - alpha / 2, df))
    nc = delta / sd * math.sqrt(n)
    return float(stats.nct.sf(crit, df, nc) + stats.nct.cdf(-crit, df, nc))


def seeds_needed(sd: float | None, delta: float, target: float = POWER, alpha: float = 1 - LEVEL,
                 limit: int = PLANNER_MAX) -> int | None:
    """The fewest seeds (≥ 2) whose paired t-test detects a difference of ``delta`` with power
    ``target``; None when the spread is unknown, ``limit + 1`` when more than ``limit`` are needed."""
    if sd is None:
        return None
    if sd == 0:
        return 2
    lo, hi = 2, 2
    while power(hi, sd, delta, alpha) < target:  # doubling, then bisection: power grows with n
        if hi > limit:
            return limit + 1
        lo, hi = hi, hi * 2
    while lo < hi:
        mid = (lo + hi) // 2
        if power(mid, sd, delta, alpha) >= target:
            hi = mid
        else:
            lo = mid + 1
    return hi


def seeds_cell(n: int | None) -> str:
    if n is None:
        return ""
    return f"> {PLANNER_MAX}" if n > PLANNER_MAX else str(n)
