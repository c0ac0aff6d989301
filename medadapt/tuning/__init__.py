"""Fine-tuning methods: what each trains, enforced around any optimizer.

A method is one definition (:class:`Method`: its strategy, typed options and capabilities), in the module that
implements it; :func:`make_strategy` builds one by name (see :class:`medadapt.tuning.base.Strategy` for the
interface and README's "Python API" for a plain PyTorch loop); plugins add methods (docs/extending.md).
"""
from __future__ import annotations

from medadapt.tuning.base import DECODER_POLICIES, Strategy
from medadapt.tuning.dense import FromScratch, FullFineTuning
from medadapt.tuning.method import Method, Option
from medadapt.tuning.registry import get_method, make_strategy, method_names, methods
from medadapt.tuning.sparse import DGST, DRST, SGST, SparseUpdateStrategy, kernel_topk_indices
from medadapt.tuning.subset import (AffineNorm, BiasNorm, BiasOnly, DecoderOnly, EncoderOnly, FineTuneLast,
                                    Generalization, LinearProbe, SubsetStrategy)

__all__ = ["Strategy", "Method", "Option", "make_strategy", "method_names", "methods", "get_method",
           "DECODER_POLICIES", "FromScratch", "FullFineTuning", "DGST", "DRST", "SGST", "SparseUpdateStrategy",
           "SubsetStrategy", "LinearProbe", "BiasOnly", "AffineNorm", "BiasNorm", "EncoderOnly", "DecoderOnly",
           "FineTuneLast", "Generalization", "kernel_topk_indices"]
