"""Fine-tuning strategies: what each method trains, enforced around any optimizer."""
from __future__ import annotations

from medadapt.errors import MedadaptError
from medadapt.tuning.base import Strategy
from medadapt.tuning.dense import FromScratch, FullFineTuning
from medadapt.tuning.sparse import DGST, SparseUpdateStrategy, kernel_topk_mask

STRATEGIES: dict[str, type[Strategy]] = {
    cls.name: cls for cls in (FromScratch, FullFineTuning, DGST)
}


def make_strategy(name: str, **options) -> Strategy:
    """Create a strategy by name; options a strategy does not take (e.g. gamma for 'full') are ignored."""
    if name not in STRATEGIES:
        raise MedadaptError(f"--method {name!r} is unknown; choose one of: {', '.join(STRATEGIES)}")
    cls = STRATEGIES[name]
    if issubclass(cls, SparseUpdateStrategy):
        return cls(**{k: v for k, v in options.items() if k == "gamma" and v is not None})
    return cls()


__all__ = ["Strategy", "STRATEGIES", "make_strategy", "FromScratch", "FullFineTuning", "DGST",
           "SparseUpdateStrategy", "kernel_topk_mask"]
