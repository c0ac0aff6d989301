"""Fine-tuning strategies: what each method trains, enforced around any optimizer.

``make_strategy(name, **options)`` builds one; see :class:`medadapt.tuning.base.Strategy` for the interface
and README's "Python API" for a plain PyTorch loop.
"""
from __future__ import annotations

from medadapt.errors import MedadaptError
from medadapt.tuning.base import DECODER_POLICIES, Strategy
from medadapt.tuning.dense import FromScratch, FullFineTuning
from medadapt.tuning.sparse import DGST, DRST, SGST, SparseUpdateStrategy, kernel_topk_indices
from medadapt.tuning.subset import (AffineNorm, BiasNorm, BiasOnly, DecoderOnly, EncoderOnly, FineTuneLast,
                                    Generalization, LinearProbe, SubsetStrategy)

_ORDER = (Generalization, FromScratch, FullFineTuning, LinearProbe, BiasOnly, AffineNorm, BiasNorm, EncoderOnly, DecoderOnly,
          FineTuneLast, "lora", "adapter", "spatial-adapter", DRST, SGST, DGST)


def _registry() -> dict[str, type[Strategy]]:
    from medadapt.tuning.lowrank import LoRA, Adapter
    from medadapt.tuning.spatial import SpatialAdapter

    named = {"lora": LoRA, "adapter": Adapter, "spatial-adapter": SpatialAdapter}
    return {(named[c] if isinstance(c, str) else c).name: (named[c] if isinstance(c, str) else c) for c in _ORDER}


def method_names(training_only: bool = False) -> list[str]:
    """Every method name, in the order tables list them (``training_only``: without the methods that evaluate
    the foundation as it is, such as ``generalization``)."""
    return [name for name, cls in _registry().items() if cls.trains or not training_only]


def make_strategy(name: str, decoder: str | None = None, **options) -> Strategy:
    """Create a strategy by name. Options it does not take (e.g. ``gamma`` for ``full``) or that are None are
    ignored, so one set of CLI options serves every method. ``decoder``: the decoder policy
    (:data:`medadapt.tuning.base.DECODER_POLICIES`) of a method that freezes part of the network; ignored by
    the others (full fine-tuning trains the decoder anyway)."""
    registry = _registry()
    if name not in registry:
        raise MedadaptError(f"--method {name!r} is unknown; choose one of: {', '.join(registry)}")
    if decoder is not None and decoder not in DECODER_POLICIES:
        raise MedadaptError(f"--pretext-decoder {decoder!r}: choose one of {', '.join(DECODER_POLICIES)}")
    cls = registry[name]
    strategy = cls(**{k: v for k, v in options.items() if k in cls.options and v is not None})
    if decoder is not None and cls.freezes and cls.trains:
        strategy.decoder = decoder
    return strategy


__all__ = ["Strategy", "make_strategy", "method_names", "FromScratch", "FullFineTuning", "DGST", "DRST", "SGST",
           "SparseUpdateStrategy", "SubsetStrategy", "LinearProbe", "BiasOnly", "AffineNorm", "BiasNorm",
           "EncoderOnly", "DecoderOnly", "FineTuneLast", "kernel_topk_indices"]
