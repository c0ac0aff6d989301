"""What a stream did to the model: forgetting (backward transfer), forward transfer, and the encoder's change.

Continual-learning benchmarks (Lopez-Paz & Ranzato's GEM metrics, as Lifelong-nnUNet reports them) read a
matrix R[i, j]: the score on task j's test split of the model after task i. In sequential fine-tuning each
task keeps its own decoder and head, and what later tasks change is the shared encoder, so here:

* R[j, j]: task j's own model M_j on task j (its Dice right after training);
* R[n, j]: M_j's decoder and head on the *final* encoder E_n (after the whole stream of n tasks);
* **backward transfer** BWT = mean over j < n of R[n, j] - R[j, j] (negative: forgetting);
* **forward transfer** of task j: R[j, j] minus the Dice of the same task fine-tuned in parallel from the
  foundation M_0 (FFT); the benchmark computes it, as it has both runs.

:func:`encoder_change` is MedSeqFT's Fig. 4: the mean absolute change of each encoder layer's parameters between
M_0 and M_n, layer by layer from input to bottleneck.
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from medadapt.models.parts import is_conv, is_linear, model_parts
from medadapt.utils.atomic import atomic_path, atomic_write_text


def with_encoder(network: nn.Module, source: nn.Module) -> nn.Module:
    """``network`` with the encoder weights of ``source`` (same architecture), in place."""
    model_parts(network).encoder.load_state_dict(model_parts(source).encoder.state_dict())
    return network


def backward_transfer(just_after: Sequence[float], after_stream: Sequence[float]) -> float | None:
    """Mean of ``after_stream[j] - just_after[j]`` over the tasks given (the earlier tasks, j < n)."""
    pairs = [(a, b) for a, b in zip(just_after, after_stream) if a is not None and b is not None]
    return sum(b - a for a, b in pairs) / len(pairs) if pairs else None


def encoder_change(before: nn.Module, after: nn.Module) -> list[tuple[str, float]]:
    """Per encoder layer (every conv / Linear module, in module order), the mean absolute difference of its
    parameters (weight and bias together) between ``before`` and ``after`` (same architecture)."""
    enc_a, enc_b = model_parts(before).encoder, model_parts(after).encoder
    mods_b = dict(enc_b.named_modules())
    rows = []
    for name, m in enc_a.named_modules():
        if not (is_conv(m) or is_linear(m)):
            continue
        other = mods_b[name]
        diffs = [(p.detach() - q.detach()).abs().flatten() for p, q in zip(m.parameters(recurse=False),
                                                          other.parameters(recurse=False))]
        if diffs:
            rows.append((name, float(torch.cat(diffs).mean())))
    return rows


def write_encoder_change(rows: Sequence[tuple[str, float]], out_stem: Path, title: str) -> None:
    """``<stem>.csv`` and ``<stem>.png``: the per-layer change as MedSeqFT's Fig. 4 plots it."""
    atomic_write_text(out_stem.with_suffix(".csv"),
                      "layer,index,mean_abs_change\n" + "".join(f"{n},{i},{v:.6g}\n" for i, (n, v) in
                                                               enumerate(rows, 1)))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(5.0, 0.18 * len(rows) + 2), 3.2))
    ax.plot(range(1, len(rows) + 1), [v for _, v in rows], marker="o", ms=3)
    ax.set_xlabel("encoder layer n (input to bottleneck)")
    ax.set_ylabel("mean |Δθ|")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    with atomic_path(out_stem.with_suffix(".png")) as tmp:
        fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)
