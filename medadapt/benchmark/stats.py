"""Statistics of a benchmark grid: means over seeds, spreads, and paired comparisons between methods.

Every number of a table comes from per-case rows of finished cells (``cell.json``'s ``per_case``):

* **mean over seeds** of each seed's mean over test cases, with the **spread over seeds** (sample standard
  deviation of the per-seed means, ``ddof=1``; 0 with one seed) next to the **spread over test cases** (population
  standard deviation over every (seed, test case) value, ``ddof=0``, as ``medadapt evaluate`` reports it);
* **paired differences** between two methods of one setting (dataset, shots): the test cases are the same for
  every method (the split is fixed), and the seed fixes the K training cases and the training randomness, so
  the pairs are (seed, test case). A method run without seeds (the zero-shot row) pairs each of its cases
  with that case under every seed of the other method. The mean paired difference gets a percentile bootstrap
  95% interval (resampling pairs, seeded, 10,000 resamples) and a two-sided Wilcoxon signed-rank p-value
  (``scipy.stats.wilcoxon``, zero differences dropped as Wilcoxon's original method does; p = 1 when every
  difference is 0).
* **ranking marks**: a column's best method and every method whose paired difference to it is not
  significant (p ≥ ``ALPHA``) are bold; of the rest, the best and those indistinguishable from it are
  underlined. So a mark never separates two methods the test cannot tell apart. No correction for multiple
  comparisons is applied; the paired table gives the p-values.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

ALPHA = 0.05
BOOTSTRAP_RESAMPLES = 10_000
BOOTSTRAP_SEED = 0


def case_values(records: Sequence[dict], cls: str, metric: str) -> dict[tuple[Any, str], float]:
    """``{(seed, case): value}`` of one class and metric over some cells (NaN where undefined)."""
    out: dict[tuple[Any, str], float] = {}
    for rec in records:
        for row in rec["per_case"]:
            if row["class"] != cls:
                continue
            value = row.get(metric)
            out[(rec.get("seed"), str(row["case"]))] = math.nan if value is None else float(value)
    return out


@dataclass
class SeedSummary:
    mean: float | None          # mean over seeds of the per-seed mean over test cases
    seed_std: float | None      # sample std of the per-seed means (0 with one seed)
    case_std: float | None      # population std over all (seed, test case) values
    n_seeds: int
    n_values: int               # defined (seed, case) values
    n_undefined: int            # (seed, case) values that are undefined (NaN), e.g. HD95 with one mask empty


def by_seed(values: dict[tuple[Any, str], float]) -> dict[Any, list[float]]:
    """``{seed: its defined values}`` of ``{(seed, case): value}`` (NaN: undefined, left out)."""
    grouped: dict[Any, list[float]] = {}
    for (seed, _), v in values.items():
        if not math.isnan(v):
            grouped.setdefault(seed, []).append(v)
    return grouped


def per_seed_means(values: dict[tuple[Any, str], float]) -> dict[Any, float]:
    """Per seed, the mean over its defined values."""
    return {s: float(np.mean(v)) for s, v in by_seed(values).items()}


def mean_spread(per_seed: dict[Any, float]) -> tuple[float | None, float | None, int]:
    """(mean over seeds, sample std over seeds or 0 with one seed, number of seeds)."""
    if not per_seed:
        return None, None, 0
    v = np.asarray(list(per_seed.values()), dtype=np.float64)
    return float(v.mean()), (float(v.std(ddof=1)) if len(v) > 1 else 0.0), len(v)


def seed_summary(values: dict[tuple[Any, str], float]) -> SeedSummary:
    grouped = by_seed(values)
    undefined = sum(1 for v in values.values() if math.isnan(v))
    if not grouped:
        return SeedSummary(None, None, None, 0, 0, undefined)
    mean, seed_std, n_seeds = mean_spread(per_seed_means(values))
    pooled = np.asarray([x for v in grouped.values() for x in v], dtype=np.float64)
    return SeedSummary(mean, seed_std, float(pooled.std(ddof=0)), n_seeds, len(pooled), undefined)


@dataclass
class PairedComparison:
    mean_difference: float      # mean of (a - b) over the pairs
    ci_low: float               # bootstrap 95% interval of the mean difference
    ci_high: float
    p_value: float              # two-sided Wilcoxon signed-rank
    n_pairs: int

    @property
    def significant(self) -> bool:
        return self.p_value < ALPHA


def pair(a: dict[tuple[Any, str], float], b: dict[tuple[Any, str], float]) -> list[tuple[float, float]]:
    """Matched (a, b) values: same (seed, case); a side without seeds (seed None) matches every seed."""
    pairs = []
    for (seed, case), va in sorted(a.items(), key=lambda kv: (str(kv[0][0]), kv[0][1])):
        vb = b.get((seed, case), b.get((None, case)))
        if vb is None and seed is None:  # a has no seeds: match each seed of b
            for (sb, cb), v in sorted(b.items(), key=lambda kv: (str(kv[0][0]), kv[0][1])):
                if cb == case and not (math.isnan(va) or math.isnan(v)):
                    pairs.append((va, v))
            continue
        if vb is not None and not (math.isnan(va) or math.isnan(vb)):
            pairs.append((va, vb))
    return pairs


def paired_comparison(a: dict[tuple[Any, str], float], b: dict[tuple[Any, str], float]) -> PairedComparison | None:
    """Method a against method b on matched (seed, case) pairs; None without pairs."""
    from scipy.stats import wilcoxon

    pairs = pair(a, b)
    if not pairs:
        return None
    diff = np.asarray([x - y for x, y in pairs], dtype=np.float64)
    rng = np.random.default_rng(BOOTSTRAP_SEED)
    idx = rng.integers(0, len(diff), size=(BOOTSTRAP_RESAMPLES, len(diff)))
    boot = diff[idx].mean(axis=1)
    low, high = np.percentile(boot, [2.5, 97.5])
    if np.all(diff == 0):
        p = 1.0
    else:
        p = float(wilcoxon(diff, zero_method="wilcox", alternative="two-sided").pvalue)
    return PairedComparison(float(diff.mean()), float(low), float(high), p, len(diff))


def rank_marks(names: Sequence[str], values: dict[str, dict[tuple[Any, str], float]],
               higher_is_better: bool = True) -> dict[str, str]:
    """``{name: "bold" | "underline" | ""}`` for one table column (see the module docstring)."""
    means = {n: seed_summary(values[n]).mean for n in names if n in values}
    sign = -1.0 if higher_is_better else 1.0
    ranked = sorted((n for n in means if means[n] is not None), key=lambda n: sign * means[n])
    marks = {n: "" for n in names}

    def tied(x: str, y: str) -> bool:
        if x == y:
            return True
        comp = paired_comparison(values[x], values[y])
        return comp is None or not comp.significant

    remaining = list(ranked)
    for mark in ("bold", "underline"):
        if not remaining:
            break
        top = remaining[0]
        group = [n for n in remaining if tied(top, n)]
        for n in group:
            marks[n] = mark
        remaining = [n for n in remaining if n not in group]
    return marks
