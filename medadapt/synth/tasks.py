"""Task sets over the synthetic domains: the partially labelled assembly (FSEFT) and the task stream (MedSeqFT).

A *task* is a domain (a built-in name or a spec file) plus the labels of that domain it uses. Two kinds of
task-set files live in ``medadapt/synth/task_sets/`` (schema and built-ins in ``docs/domains.md``):

* an **assembly** (``sources``, ``targets``): partially labelled source cohorts that together pretrain a
  foundation model, each labelling its own subset of structures, and target cohorts for few-shot adaptation;
* a **stream** (``tasks``, ``unseen``): tasks fine-tuned one after the other, in order, then unseen tasks
  that test how well the refined model transfers.

Within one file every task is on a different domain. Parsing is strict, like domain specs: a mistake raises
:class:`~medadapt.errors.MedadaptError` naming the file, the key (``tasks[2].labels[0]``) and the fix.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from medadapt.errors import MedadaptError
from medadapt.synth.spec import DomainSpec, SpecCheck, builtin_domains, load_domain
from medadapt.utils.yamlfile import DuplicateKey, UniqueKeyLoader

TASK_SETS_DIR = Path(__file__).resolve().parent / "task_sets"
_KINDS = {"assembly": ("sources", "targets"), "stream": ("tasks", "unseen")}


@dataclass(frozen=True)
class Task:
    """One task: ``domain`` (built-in name or spec path) and the names of the domain's labels it uses."""

    name: str
    domain: str
    labels: tuple[str, ...]
    description: str = ""

    def spec(self) -> DomainSpec:
        """The domain's spec with its label map cut down to this task's labels, renumbered 1..N in the task's
        order (same name, hence the same patients and images; only the label map differs)."""
        return with_labels(load_domain(self.domain), self.labels)


def with_labels(spec: DomainSpec, labels: "tuple[str, ...] | list[str]") -> DomainSpec:
    """``spec`` with its label map cut down to ``labels`` (names of its labels), renumbered 1..N in that order:
    same name, hence the same patients and images; only the label map differs. The caller checks the names
    (every one a label of ``spec``)."""
    labels = tuple(labels)
    by_name = {lab.name: lab for lab in spec.labels or ()}
    if spec.labels is None:  # a lymph-node-only domain: its one label
        return spec
    if tuple(lab.name for lab in spec.labels) == labels:
        return spec
    return spec.replace(labels={n: {"id": i, "structures": list(by_name[n].structures)}
                                for i, n in enumerate(labels, 1)})


@dataclass(frozen=True)
class TaskStream:
    """A sequential fine-tuning stream: ``tasks`` in training order, then the ``unseen`` tasks."""

    name: str
    description: str
    tasks: tuple[Task, ...]
    unseen: tuple[Task, ...]
    source: str = ""


@dataclass(frozen=True)
class Assembly:
    """Partially labelled ``sources`` (pretraining) and ``targets`` (few-shot adaptation)."""

    name: str
    description: str
    sources: tuple[Task, ...]
    targets: tuple[Task, ...]
    source: str = ""

    @property
    def classes(self) -> list[str]:
        """Every label of the sources, in order of first appearance: the foundation model's classes."""
        out: list[str] = []
        for t in self.sources:
            out += [n for n in t.labels if n not in out]
        return out

    def annotated(self, task: Task) -> list[bool]:
        """Which of :attr:`classes` ``task`` labels (FSEFT's annotation vector): the others are background in
        its label maps even where the structure is in the image."""
        return [c in task.labels for c in self.classes]


def builtin_task_sets() -> list[str]:
    """Names of the built-in task sets (``medadapt/synth/task_sets/*.yaml``), sorted."""
    return sorted(p.stem for p in TASK_SETS_DIR.glob("*.yaml")) if TASK_SETS_DIR.is_dir() else []


def load_task_stream(stream: "str | os.PathLike[str]" = "ct-stream") -> TaskStream:
    """The sequential fine-tuning stream ``stream``: a built-in name (default ``ct-stream``: five tasks and two
    unseen tasks, see docs/domains.md) or a YAML file with ``tasks`` and ``unseen``.

    Each :class:`Task` gives its domain and labels; ``task.spec()`` is the :class:`DomainSpec` to generate its
    cohort with (``medadapt.synth.write_dataset(task.spec(), out, ...)``), labels renumbered 1..N.
    """
    name, desc, groups, src = _load(stream, "stream")
    return TaskStream(name=name, description=desc, tasks=groups["tasks"], unseen=groups["unseen"], source=src)


def load_assembly(assembly: "str | os.PathLike[str]" = "partial-assembly") -> Assembly:
    """The partially labelled assembly ``assembly``: a built-in name (default ``partial-assembly``: three
    source cohorts, two targets, see docs/domains.md) or a YAML file with ``sources`` and ``targets``."""
    name, desc, groups, src = _load(assembly, "assembly")
    return Assembly(name=name, description=desc, sources=groups["sources"], targets=groups["targets"], source=src)


# ----------------------------------------------------------------------------------------------------------
def _load(which: "str | os.PathLike[str]", kind: str):
    text = os.fspath(which)
    builtins = builtin_task_sets()
    path = TASK_SETS_DIR / f"{text}.yaml" if text in builtins else Path(text).expanduser()
    if not path.is_file():
        raise MedadaptError(f"task set '{text}': not a built-in task set ({', '.join(builtins) or 'none installed'}) "
                            "and no such file; pass a built-in name or the path to a .yaml task set "
                            "(see docs/domains.md)")
    src = str(path)
    try:
        data = yaml.load(path.read_text(encoding="utf-8"), Loader=UniqueKeyLoader)  # noqa: S506 (a SafeLoader)
    except DuplicateKey as exc:
        raise MedadaptError(f"{src}: {exc}; keep one of them (a repeated key silently replaces the first)") from None
    except OSError as exc:
        raise MedadaptError(f"{src}: cannot be read ({exc.strerror}); check the path and permissions") from None
    except yaml.YAMLError as exc:
        raise MedadaptError(f"{src}: not valid YAML ({' '.join(str(exc).split())}); fix the syntax") from None
    c = SpecCheck(src)
    groups_keys = _KINDS[kind]
    if not isinstance(data, dict):
        raise MedadaptError(f"{src}: a task {kind} must be a mapping with keys name, description, "
                            f"{', '.join(groups_keys)}; see docs/domains.md")
    c.mapping(data, "", ["name", "description", *groups_keys])
    name = c.string(data.get("name", path.stem), "name")
    desc = c.string(data.get("description", ""), "description")
    groups: dict[str, tuple[Task, ...]] = {}
    seen_domains: dict[str, str] = {}
    seen_names: set[str] = set()
    for g in groups_keys:
        if g not in data:
            c.fail(g, "is missing", f"add {g}: a list of tasks (domain, labels)")
        raw = data[g]
        if not isinstance(raw, list) or (not raw and g in ("sources", "tasks")):
            c.fail(g, f"must be a non-empty list of tasks, got {raw!r}", "write one '- domain: ...' item per task")
        tasks = []
        for i, item in enumerate(raw or []):
            t = _task(c, item, f"{g}[{i}]", path.parent)
            if t.name in seen_names:
                c.fail(f"{g}[{i}].name", f"is {t.name!r}, already the name of another task", "give each task its own name")
            spec_key = os.path.abspath(t.domain) if Path(t.domain).suffix else t.domain
            if spec_key in seen_domains:
                c.fail(f"{g}[{i}].domain", f"is {t.domain!r}, already the domain of task {seen_domains[spec_key]!r}",
                       "every task of a task set is on a different domain")
            seen_names.add(t.name)
            seen_domains[spec_key] = t.name
            tasks.append(t)
        groups[g] = tuple(tasks)
    return name, desc, groups, src


def _task(c: SpecCheck, item: Any, key: str, base: Path) -> Task:
    if not isinstance(item, dict):
        c.fail(key, f"must be a mapping with domain and labels, got {item!r}", "write e.g. {domain: tgt-hn, labels: [thyroid]}")
    c.mapping(item, key, ["name", "domain", "labels", "description"])
    if "domain" not in item:
        c.fail(f"{key}.domain", "is missing", "add domain: <built-in domain name or spec file>")
    domain = c.string(item["domain"], f"{key}.domain")
    if domain not in builtin_domains() and not Path(domain).is_absolute():
        rel = base / domain
        domain = str(rel) if rel.is_file() else domain
    try:
        spec = load_domain(domain)
    except MedadaptError as exc:
        c.fail(f"{key}.domain", f"cannot be loaded ({exc})", "name a built-in domain or an existing spec file")
    available = [n for n, i in spec.dataset_labels.items() if i]
    raw = item.get("labels", available)
    if not isinstance(raw, list) or not raw:
        c.fail(f"{key}.labels", f"must be a non-empty list of label names, got {raw!r}",
               f"write e.g. labels: [{available[0]}]")
    labels: list[str] = []
    for j, n in enumerate(raw):
        if not isinstance(n, str) or n not in available:
            c.fail(f"{key}.labels[{j}]", f"is {n!r}, not a label of domain {spec.name!r}",
                   f"use some of: {', '.join(available)}")
        if n in labels:
            c.fail(f"{key}.labels[{j}]", f"repeats {n!r}", "list each label once")
        labels.append(n)
    name = c.string(item.get("name", spec.name), f"{key}.name")
    return Task(name=name, domain=domain, labels=tuple(labels), description=c.string(item.get("description", ""),
                                                                                      f"{key}.description"))
