"""Seed statistics of the benchmark: mean and spread, the ratio to vanilla paired by seed with a t-interval, FLOPs to a target loss."""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from typing import Mapping, Sequence

# Student's t, 97.5% quantile (two-sided 95%), df = 1..30 (standard tables, 6 digits). A table rather
# than scipy: this is the only distribution function the benchmark needs.
_T975 = (12.706205, 4.302653, 3.182446, 2.776445, 2.570582, 2.446912, 2.364624, 2.306004, 2.262157, 2.228139,
         2.200985, 2.178813, 2.160369, 2.144787, 2.131450, 2.119905, 2.109816, 2.100922, 2.093024, 2.085963,
         2.079614, 2.073873, 2.068658, 2.063899, 2.059539, 2.055529, 2.051831, 2.048407, 2.045230, 2.042272)


def t975(df: int) -> float:
    """97.5% quantile of Student's t with ``df`` degrees of freedom (Cornish-Fisher expansion above 30: < 1e-5 off)."""
    if df < 1:
        raise ValueError(f"degrees of freedom must be >= 1, got {df}")
    if df <= len(_T975):
        return _T975[df - 1]
    z = 1.959963985
    return (z + (z**3 + z) / (4 * df) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * df**2)
            + (3 * z**7 + 19 * z**5 + 17 * z**3 - 15 * z) / (384 * df**3))


def mean_sd(values: Sequence[float]) -> tuple[float, float | None]:
    """Mean and sample standard deviation (n - 1); the deviation is None for a single value."""
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else None)


@dataclass
class PairedRatio:
    """A recipe's final loss over vanilla's, seed by seed: the mean ratio and its 95% t-interval over seeds."""

    seeds: list[int]
    ratios: list[float]
    mean: float
    low: float | None  # None with fewer than two paired seeds
    high: float | None

    @property
    def no_difference(self) -> bool:
        """The interval contains 1.0: this benchmark cannot tell the recipe from vanilla."""
        return self.low is not None and self.high is not None and self.low <= 1.0 <= self.high


def paired_ratio(recipe: Mapping[int, float], vanilla: Mapping[int, float]) -> PairedRatio | None:
    """Per seed ``recipe[s] / vanilla[s]`` over the seeds both have; mean +- t(0.975, n-1) * sd / sqrt(n).

    Pairing by seed removes what the seed does to both runs alike (data order, initialisation of the
    shared first stage), so the interval is about the recipe, not about the seeds.
    """
    seeds = sorted(set(recipe) & set(vanilla))
    if not seeds:
        return None
    ratios = [recipe[s] / vanilla[s] for s in seeds]
    mean, sd = mean_sd(ratios)
    if sd is None:
        return PairedRatio(seeds, ratios, mean, None, None)
    half = t975(len(ratios) - 1) * sd / math.sqrt(len(ratios))
    return PairedRatio(seeds, ratios, mean, mean - half, mean + half)


def mean_curve(curves: Sequence[Sequence[tuple[float, float]]]) -> list[tuple[float, float]]:
    """Point-wise mean of validation curves of the same schedule (one per seed: the same eval points)."""
    n = min((len(c) for c in curves), default=0)
    return [(statistics.fmean(c[i][0] for c in curves), statistics.fmean(c[i][1] for c in curves)) for i in range(n)]


def flops_to_reach(curve: Sequence[tuple[float, float]], target: float) -> float | None:
    """Training FLOPs at the first evaluation whose loss is <= ``target``; None when none is."""
    return next((flops for flops, loss in curve if loss <= target), None)
