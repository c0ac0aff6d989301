"""Figures: contours on axial slices per method (like the DGST paper's Fig. 2) and training-loss curves."""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from medadapt.utils.atomic import atomic_path

GT_COLOR = "lime"      # the paper's Fig. 2: ground truth green, prediction yellow
PRED_COLOR = "yellow"


def ct_window(image: np.ndarray, level: float = 40.0, width: float = 400.0) -> np.ndarray:
    lo, hi = level - width / 2, level + width / 2
    return np.clip((image - lo) / (hi - lo), 0, 1)


def pick_slices(gt: np.ndarray, n: int = 2) -> list[int]:
    """Axial slices (first axis) with the most foreground, spread apart; the middle slice if none."""
    area = (gt > 0).reshape(gt.shape[0], -1).sum(1)
    if area.max() == 0:
        return [gt.shape[0] // 2]
    order = np.argsort(-area, kind="stable")
    chosen: list[int] = []
    for z in order:
        if area[z] == 0:
            break
        if all(abs(int(z) - c) >= 3 for c in chosen):
            chosen.append(int(z))
        if len(chosen) == n:
            break
    return sorted(chosen)


def _smooth(values: Sequence[float], window: int = 10) -> np.ndarray:
    v = np.asarray(values, dtype=float)
    if len(v) < window:
        return v
    kernel = np.ones(window) / window
    return np.convolve(v, kernel, mode="valid")


def radiological_view(slice_yx: np.ndarray) -> np.ndarray:
    """An axial slice of a RAS-ordered volume as radiologists view it: anterior up, patient's right on the left."""
    return slice_yx[::-1, ::-1]


def contour_figure(path: str | Path, image: np.ndarray, gt: np.ndarray, predictions: Mapping[str, np.ndarray],
                   losses: Mapping[str, Sequence[float]] | None = None, title: str = "",
                   scores: Mapping[str, str] | None = None, spacing: Sequence[float] | None = None) -> Path:
    """Rows: chosen axial slices; columns: one per method (GT green, prediction yellow); last row: losses.

    Volumes are (z, y, x) arrays of RAS-ordered files (as the synthetic cohorts are); slices are shown in the
    radiological convention.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    slices = pick_slices(gt)
    methods = list(predictions)
    n_rows = len(slices) + (1 if losses else 0)
    fig, axes = plt.subplots(n_rows, len(methods), figsize=(3.2 * len(methods), 3.2 * n_rows), squeeze=False)
    aspect = (spacing[1] / spacing[2]) if spacing is not None else 1.0
    for r, z in enumerate(slices):
        for c, method in enumerate(methods):
            ax = axes[r][c]
            view = radiological_view
            ax.imshow(ct_window(view(image[z])), cmap="gray", aspect=aspect, interpolation="nearest")
            if (gt[z] > 0).any():
                ax.contour(view(gt[z] > 0), levels=[0.5], colors=GT_COLOR, linewidths=1.0)
            if (predictions[method][z] > 0).any():
                ax.contour(view(predictions[method][z] > 0), levels=[0.5], colors=PRED_COLOR, linewidths=1.0)
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                label = method if not scores else f"{method}\n{scores.get(method, '')}"
                ax.set_title(label, fontsize=9)
            if c == 0:
                ax.set_ylabel(f"slice {z}", fontsize=8)
    if losses:
        row = axes[-1]
        for ax in row[1:]:
            ax.remove()
        ax = row[0]
        gs = ax.get_gridspec()
        ax.remove()
        ax = fig.add_subplot(gs[-1, :])
        for method, values in losses.items():
            ax.plot(_smooth(values), label=method, linewidth=1.2)
        ax.set_xlabel("iteration")
        ax.set_ylabel("training loss (Dice+CE, moving avg. 10)")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title + f"   (ground truth {GT_COLOR}, prediction {PRED_COLOR})", fontsize=10)
    fig.tight_layout()
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=90, format="png")
    plt.close(fig)
    return Path(path)
