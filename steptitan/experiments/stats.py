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


# Student's t, 95% quantile (one-sided 95%), df = 1..30 (standard tables, 6 digits): the non-inferiority bound.
_T95 = (6.313752, 2.919986, 2.353363, 2.131847, 2.015048, 1.943180, 1.894579, 1.859548, 1.833113, 1.812461,
        1.795885, 1.782288, 1.770933, 1.761310, 1.753050, 1.745884, 1.739607, 1.734064, 1.729133, 1.724718,
        1.720743, 1.717144, 1.713872, 1.710882, 1.708141, 1.705618, 1.703288, 1.701131, 1.699127, 1.697261)


def _cornish_fisher(z: float, df: int) -> float:
    """Student's t quantile from the normal one for df > 30 (< 1e-5 off there)."""
    return (z + (z**3 + z) / (4 * df) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * df**2)
            + (3 * z**7 + 19 * z**5 + 17 * z**3 - 15 * z) / (384 * df**3))


def t95(df: int) -> float:
    """95% quantile of Student's t with ``df`` degrees of freedom (one-sided 95% bounds)."""
    if df < 1:
        raise ValueError(f"degrees of freedom must be >= 1, got {df}")
    return _T95[df - 1] if df <= len(_T95) else _cornish_fisher(1.644853627, df)


def t975(df: int) -> float:
    """97.5% quantile of Student's t with ``df`` degrees of freedom (Cornish-Fisher expansion above 30: < 1e-5 off)."""
    if df < 1:
        raise ValueError(f"degrees of freedom must be >= 1, got {df}")
    return _T975[df - 1] if df <= len(_T975) else _cornish_fisher(1.959963985, df)


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


MARGIN = 0.01  # non-inferiority margin, pre-registered in docs/benchmark.md ("Protocol")
MIN_SEEDS, MAX_SEEDS = 6, 12  # report seeds: at least, and the cap of "more until the bound resolves"


@dataclass
class NonInferiority:
    """A row against vanilla, seed by seed: "within 1%" only when the one-sided 95% upper bound of the
    mean per-seed loss ratio is <= 1 + MARGIN (docs/benchmark.md, "Protocol")."""

    seeds: list[int]
    ratios: list[float]
    mean: float  # mean per-seed ratio recipe / vanilla
    upper: float | None  # one-sided 95% upper bound of it (None with one seed)
    diff_nats: float  # mean per-seed difference recipe - vanilla, in nats
    diff_upper: float | None  # its one-sided 95% upper bound
    diff_ppl: float  # mean per-seed perplexity difference exp(recipe) - exp(vanilla)

    @property
    def within(self) -> bool:
        return self.upper is not None and self.upper <= 1 + MARGIN

    def verdict(self) -> str:
        """``within 1%``; ``unresolved`` while more seeds could still show it (fewer than MAX_SEEDS, mean
        below the margin or fewer than MIN_SEEDS); ``not shown`` otherwise."""
        if len(self.seeds) >= MIN_SEEDS and self.within:
            return "within 1%"
        if len(self.seeds) < MIN_SEEDS or (len(self.seeds) < MAX_SEEDS and self.mean < 1 + MARGIN):
            return "unresolved"
        return "not shown"


def non_inferiority(recipe: Mapping[int, float], vanilla: Mapping[int, float]) -> NonInferiority | None:
    """Per-seed ratios and differences over the seeds both have; one-sided 95% t bounds over seeds."""
    seeds = sorted(set(recipe) & set(vanilla))
    if not seeds:
        return None
    ratios = [recipe[s] / vanilla[s] for s in seeds]
    diffs = [recipe[s] - vanilla[s] for s in seeds]
    mean, sd = mean_sd(ratios)
    dmean, dsd = mean_sd(diffs)
    n = len(seeds)
    upper = mean + t95(n - 1) * sd / math.sqrt(n) if sd is not None else None
    dupper = dmean + t95(n - 1) * dsd / math.sqrt(n) if dsd is not None else None
    ppl = statistics.fmean(math.exp(recipe[s]) - math.exp(vanilla[s]) for s in seeds)
    return NonInferiority(seeds, ratios, mean, upper, dmean, dupper, ppl)


def bootstrap_upper(recipe_blocks: Mapping[int, Sequence[float]], vanilla_blocks: Mapping[int, Sequence[float]],
                    n_boot: int = 2000, seed: int = 0, level: float = 0.95) -> float | None:
    """One-sided ``level`` upper bound of the mean per-seed loss ratio by a two-level bootstrap: seeds
    resampled with replacement, and blocks (the same block indices for both rows and every seed, since
    every run is evaluated on the same blocks) resampled with replacement. It adds the uncertainty of the
    report text (which blocks) to that of the seeds."""
    import numpy as np

    seeds = sorted(set(recipe_blocks) & set(vanilla_blocks))
    if len(seeds) < 2:
        return None
    r = np.array([recipe_blocks[s] for s in seeds], dtype=np.float64)  # seeds x blocks
    v = np.array([vanilla_blocks[s] for s in seeds], dtype=np.float64)
    if r.shape != v.shape:
        raise ValueError(f"block losses differ in shape: {r.shape} vs {v.shape} (not the same evaluation blocks)")
    rng = np.random.default_rng(seed)
    n_seeds, n_blocks = r.shape
    stats = np.empty(n_boot)
    for b in range(n_boot):
        si = rng.integers(0, n_seeds, n_seeds)
        bi = rng.integers(0, n_blocks, n_blocks)
        stats[b] = np.mean(r[np.ix_(si, bi)].mean(axis=1) / v[np.ix_(si, bi)].mean(axis=1))
    return float(np.quantile(stats, level))
