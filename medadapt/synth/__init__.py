"""Synthetic CT cohorts: procedural phantoms in HU, written as nnU-Net v2 raw datasets.

A *domain* (``DomainSpec``, a YAML/JSON file; schema in ``docs/domains.md``) fixes the body region, the scanner,
node statistics, the annotation policy and, optionally, which anatomical structures the label map holds
(``labels``; lymph nodes only without it). ``generate_case`` draws one deterministic case; ``write_dataset``
writes a whole cohort (resumable). ``load_assembly`` and ``load_task_stream`` read the built-in task sets
(partially labelled sources and targets; a sequential fine-tuning stream with unseen tasks).
"""
from medadapt.synth.dataset import write_dataset
from medadapt.synth.phantom import GENERATOR_VERSION, SyntheticCase, generate_case
from medadapt.synth.spec import (
    AnnotationSpec, DomainSpec, LabelSpec, NodeSpec, PatientSpec, ScannerSpec, builtin_domains, load_domain,
)
from medadapt.synth.structures import STRUCTURES, Structure, structures_of
from medadapt.synth.tasks import Assembly, Task, TaskStream, builtin_task_sets, load_assembly, load_task_stream

__all__ = [
    "DomainSpec", "ScannerSpec", "PatientSpec", "NodeSpec", "AnnotationSpec", "LabelSpec", "SyntheticCase",
    "GENERATOR_VERSION", "load_domain", "builtin_domains", "generate_case", "write_dataset",
    "STRUCTURES", "Structure", "structures_of",
    "Task", "TaskStream", "Assembly", "builtin_task_sets", "load_task_stream", "load_assembly",
]
