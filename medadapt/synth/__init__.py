"""Synthetic CT lymph-node cohorts: procedural phantoms in HU, written as nnU-Net v2 raw datasets.

A *domain* (``DomainSpec``, a YAML/JSON file; schema in ``docs/domains.md``) fixes the body region, the scanner,
node statistics and the annotation policy. ``generate_case`` draws one deterministic case; ``write_dataset``
writes a whole cohort (resumable).
"""
from medadapt.synth.dataset import write_dataset
from medadapt.synth.phantom import GENERATOR_VERSION, SyntheticCase, generate_case
from medadapt.synth.spec import (
    AnnotationSpec, DomainSpec, NodeSpec, PatientSpec, ScannerSpec, builtin_domains, load_domain,
)

__all__ = [
    "DomainSpec", "ScannerSpec", "PatientSpec", "NodeSpec", "AnnotationSpec", "SyntheticCase",
    "GENERATOR_VERSION", "load_domain", "builtin_domains", "generate_case", "write_dataset",
]
