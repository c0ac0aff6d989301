"""When has a training run levelled off? One criterion for every benchmark row and every stage that trains
"until convergence" (defined once here, used by the grids' cells and reports).

**Time is measured in learning rate.** With a decaying schedule (cosine, poly) every loss curve flattens at
its end because the steps shrink, not because there is nothing left to learn: a run at too small a rate for
its budget looks as flat in its last epochs as a converged one. So the curve's axis is the cumulative
learning rate (the distance the optimiser was allowed to travel; with a constant rate, the epochs), and the
question is where along that axis the improvement came.

A loss curve (one value per epoch, ``lr`` the learning rate of each epoch) is smoothed by a moving average over
a tenth of its epochs. Its improvement is the smoothed loss at the start minus at the end; its late
improvement the smoothed loss where half the cumulative learning rate had been spent minus at the end. It has
**not levelled off** when the late improvement exceeds ``LATE_SHARE`` (a quarter) of the improvement and
twice the noise of the smoothed values (the residual spread over the square root of the window): a run that
was still improving, per unit of learning rate, in the second half as it did in the first (a steady decline
has half its improvement there) is still learning; a converged run made most of its progress early. With
fewer than ``MIN_POINTS`` points, or no improvement larger than the noise, the question is not decided
(``None``; a flat curve is reported as such, not as converged).

The parameters are recorded with every verdict, and the reports recompute the verdict from the stored curve
and the recorded schedule, so a report states what it tested.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

TAIL = 0.1          # the smoothing window: a tenth of the epochs
LATE_SHARE = 0.25   # of the improvement, at most, in the second half of the learning-rate budget
MIN_POINTS = 10


def levelled_off(curve: Sequence[float], lr: Sequence[float] | None = None, tail: float = TAIL,
                 late_share: float = LATE_SHARE) -> dict:
    """The verdict on ``curve`` (see the module docstring): ``levelled_off`` (True, False or None), the
    improvement, the late improvement, the noise, and the parameters."""
    steps_in = lr if lr is not None else [1.0] * len(curve)
    pairs = [(float(v), float(r)) for v, r in zip(curve, steps_in) if v is not None and math.isfinite(float(v))]
    values = np.asarray([v for v, _ in pairs], dtype=np.float64)
    steps = np.asarray([max(r, 0.0) for _, r in pairs], dtype=np.float64)
    n = int(values.size)
    verdict = {"levelled_off": None, "points": n, "improvement": None, "late_improvement": None, "noise": None,
               "tail": tail, "late_share": late_share, "axis": "epochs" if lr is None else "cumulative lr"}
    if n < MIN_POINTS or not steps.sum() > 0:
        return verdict
    w = max(2, int(math.ceil(tail * n)))
    smoothed = np.convolve(values, np.ones(w) / w, mode="valid")          # smoothed[i]: epochs i .. i+w-1
    position = (np.cumsum(steps) - steps / 2) / steps.sum()               # each epoch's midpoint in [0, 1]
    centres = np.convolve(position, np.ones(w) / w, mode="valid")
    residual = values[w // 2: w // 2 + smoothed.size] - smoothed
    noise = float(residual.std(ddof=1)) / math.sqrt(w) if residual.size > 1 else 0.0
    start, end = float(smoothed[0]), float(smoothed[-1])
    middle = float(np.interp(0.5, centres, smoothed))
    improvement, late = start - end, middle - end
    verdict.update(improvement=improvement, late_improvement=late, noise=noise)
    if not improvement > 2 * noise:
        return verdict  # no improvement beyond the noise: nothing to tell
    verdict["levelled_off"] = not (late > late_share * improvement and late > 2 * noise)
    return verdict
