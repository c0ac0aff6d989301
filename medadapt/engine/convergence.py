"""When has a training run levelled off? One criterion for every benchmark row and every stage that trains
"until convergence" (defined once here, used by the grids' cells and reports).

A loss curve (one value per epoch) of n points has *levelled off* when the mean of its last tenth differs from
the mean of the tenth before it by at most 1% of the curve's range (max − min of the curve smoothed by a
moving average over a tenth) plus twice the standard error of that difference (the curve's own noise: a
flat but noisy curve is levelled off, a curve still falling faster than its noise is not). With fewer than
``MIN_POINTS`` points the question is not decided (``None``): a window of one point says nothing.

The 1% and the tenth are the criterion's defaults (``tolerance``, ``tail``), recorded with every verdict so
that a report states what it tested.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

TAIL = 0.1
TOLERANCE = 0.01
MIN_POINTS = 10


def levelled_off(curve: Sequence[float], tail: float = TAIL, tolerance: float = TOLERANCE) -> dict:
    """The verdict on ``curve`` (e.g. a run's epoch losses): ``levelled_off`` (True, False, or None when the
    curve is shorter than ``MIN_POINTS``), the change between the last two windows, the allowed change, the
    window length and the criterion's parameters."""
    values = np.asarray([float(v) for v in curve if v is not None and math.isfinite(float(v))], dtype=np.float64)
    n = int(values.size)
    verdict = {"levelled_off": None, "points": n, "window": None, "change": None, "allowed": None,
               "tail": tail, "tolerance": tolerance}
    if n < MIN_POINTS:
        return verdict
    m = max(2, int(math.ceil(tail * n)))
    m = min(m, n // 2)
    last, before = values[-m:], values[-2 * m:-m]
    smoothed = np.convolve(values, np.ones(m) / m, mode="valid")
    spread = float(smoothed.max() - smoothed.min())
    noise = math.sqrt(float(last.var(ddof=1)) / m + float(before.var(ddof=1)) / m)
    change = abs(float(last.mean() - before.mean()))
    allowed = tolerance * spread + 2 * noise
    verdict.update(levelled_off=bool(change <= allowed), window=m, change=change, allowed=allowed)
    return verdict
