"""The few-shot benchmark grid as data: a validated config and the unique cells it asks for.

A config (YAML; built-ins in ``medadapt/benchmark/configs``) names a foundation recipe, target datasets with
their shot counts, seeds, the fine-tuning budget, and three experiments from the DGST paper (Sec. 3):

* ``table1`` — every Table 1 method at every shot count of every dataset, plus the all-shot from-scratch row
  and the zero-shot row (the foundation model with its own heads, no fine-tuning);
* ``table2`` — the sparsification ablations at the smallest and largest shot count of each dataset;
* ``gamma``  — DGST's γ at the largest shot count of each dataset, with ``full`` as the reference (Fig. 3).

A *cell* is one fine-tuning run: (dataset, shots, method, method options, seed). Its key holds everything that
can change its result — the dataset recipe, split seed, training budget (``training``, or the row's entry in
``budgets``: from scratch and all-shot get a schedule of their own), head policy, method options and the
foundation recipe — and the cell's folder name ends in a hash of that key, so editing the config re-runs exactly the cells
it changes. Cells shared by experiments (e.g. DGST γ=1 at the largest shot count) run once.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any


from medadapt.errors import MedadaptError
from medadapt.utils.hashing import stable_hash
from medadapt.utils.yamlfile import read_yaml

CELL_FORMAT = "medadapt-bench-cell/2"
ZERO_SHOT = "zero-shot"  # the reference row: the foundation model with its own heads, no fine-tuning
HEAD_POLICIES = ("fresh", "keep")
BUILTIN_CONFIGS = ("default", "quick", "paper")


def builtin_config_path(name: str) -> Path:
    return Path(str(resources.files("medadapt.benchmark") / "configs" / f"{name}.yaml"))


@dataclass(frozen=True)
class DatasetConfig:
    name: str
    domain: dict[str, Any]           # the synthetic domain spec (DomainSpec.to_dict, after downsampling)
    cases: int
    shots: tuple[int, ...]
    train_cases: int                  # size of the 80% train split: the all-shot row's shot count

    def key(self, data_seed: int) -> dict[str, Any]:
        from medadapt.synth import GENERATOR_VERSION

        return {"domain": self.domain, "cases": self.cases, "data_seed": data_seed,
                "generator": GENERATOR_VERSION}


@dataclass
class GridConfig:
    name: str
    description: str
    source: str
    foundation: dict[str, Any]
    datasets: list[DatasetConfig]
    seeds: tuple[int, ...]
    data_seed: int
    split_seed: int
    training: dict[str, Any]
    table1: dict[str, Any]
    budgets: dict[str, dict[str, Any]] = field(default_factory=dict)
    head: str = "fresh"
    table2: dict[str, Any] | None = None
    gamma: dict[str, Any] | None = None
    method_options: dict[str, dict[str, Any]] = field(default_factory=dict)
    ray: dict[str, Any] = field(default_factory=dict)
    raw: dict[str, Any] = field(default_factory=dict)

    @property
    def cli_argument(self) -> str:
        """What to pass to ``medadapt bench`` for this config: a built-in's name, otherwise its file."""
        builtin = self.name in BUILTIN_CONFIGS and Path(self.source) == builtin_config_path(self.name)
        return self.name if builtin else self.source

    def budget(self, method: str, all_shot: bool = False) -> dict[str, Any]:
        """The training settings of a cell: the all-shot row's, else the method's, else ``training``."""
        if all_shot and "all_shot" in self.budgets:
            return self.budgets["all_shot"]
        return self.budgets.get(method, self.training)

    def dataset(self, name: str) -> DatasetConfig:
        return next(d for d in self.datasets if d.name == name)

    def foundation_key(self) -> dict[str, Any]:
        from medadapt.synth import GENERATOR_VERSION

        f = self.foundation
        return {"domain": f["domain"], "cases": f["cases"], "data_seed": self.data_seed,
                "generator": GENERATOR_VERSION, "preset": f["preset"], "epochs": f["epochs"],
                "iterations_per_epoch": f["iterations_per_epoch"], "seed": f["seed"]}


@dataclass
class Cell:
    dataset: str
    shots: int
    method: str
    options: dict[str, Any]
    seed: int
    all_shot: bool
    key: dict[str, Any]
    experiments: list[str] = field(default_factory=list)

    @property
    def hash(self) -> str:
        return stable_hash(self.key)

    @property
    def label(self) -> str:
        opts = "".join(f"-{k}{v}" for k, v in sorted(self.options.items()))
        shots = f"all{self.shots}" if self.all_shot else str(self.shots)
        return f"{self.method}{opts}-{shots}shot-seed{self.seed}"

    @property
    def cell_id(self) -> str:
        return f"{self.dataset}/{self.label}-{self.hash}"

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.cell_id, "dataset": self.dataset, "shots": self.shots, "method": self.method,
                "options": self.options, "seed": self.seed, "all_shot": self.all_shot, "key": self.key,
                "experiments": self.experiments}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Cell":
        return cls(dataset=d["dataset"], shots=d["shots"], method=d["method"], options=d["options"],
                   seed=d["seed"], all_shot=d["all_shot"], key=d["key"], experiments=list(d["experiments"]))


# ---------------------------------------------------------------------------------------------- config parsing

class _Check:
    def __init__(self, source: str):
        self.source = source

    def fail(self, key: str, problem: str, fix: str) -> None:
        raise MedadaptError(f"{self.source}: {key}: {problem}; {fix}")

    def mapping(self, v: Any, key: str, allowed: tuple[str, ...], required: tuple[str, ...] = ()) -> dict:
        if not isinstance(v, dict):
            self.fail(key, f"expected a mapping, got {type(v).__name__}", f"write it as 'key: value' lines")
        unknown = sorted(set(v) - set(allowed))
        if unknown:
            self.fail(key, f"unknown key(s) {unknown}", f"use only {list(allowed)}")
        missing = [k for k in required if k not in v]
        if missing:
            self.fail(key, f"missing {missing}", "add them (see docs/benchmark.md)")
        return v

    def integer(self, v: Any, key: str, lo: int = 0) -> int:
        if isinstance(v, bool) or not isinstance(v, int) or v < lo:
            self.fail(key, f"{v!r} is not an integer >= {lo}", f"give an integer >= {lo}")
        return int(v)

    def int_list(self, v: Any, key: str, lo: int = 0) -> tuple[int, ...]:
        if not isinstance(v, list) or not v:
            self.fail(key, f"{v!r} is not a non-empty list", "write e.g. [3, 5, 10]")
        values = tuple(self.integer(x, f"{key}[{i}]", lo) for i, x in enumerate(v))
        if len(set(values)) != len(values):
            self.fail(key, f"{list(values)} has repeated values", "list each value once")
        return values

    def methods(self, v: Any, key: str) -> list[str]:
        from medadapt.tuning import method_names

        names = method_names()
        if not isinstance(v, list) or not v:
            self.fail(key, f"{v!r} is not a non-empty list of methods", f"choose from {names}")
        for m in v:
            if m not in names:
                self.fail(key, f"unknown method {m!r}", f"choose from {names}")
        return list(v)


def load_config(config: str | Path) -> GridConfig:
    """A built-in config name (default, quick, paper) or a YAML file; validated, with datasets resolved."""
    text = str(config)
    path = builtin_config_path(text) if text in BUILTIN_CONFIGS else Path(text).expanduser()
    if not path.is_file():
        raise MedadaptError(f"config {text!r}: not a built-in config ({', '.join(BUILTIN_CONFIGS)}) and no such "
                            "file; pass a built-in name or the path to a YAML grid config (docs/benchmark.md)")
    raw = read_yaml(path)
    return parse_config(raw, source=str(path), base_dir=path.parent)


def _resolve_domain(c: _Check, entry: dict, key: str, base_dir: Path) -> dict[str, Any]:
    from medadapt.synth import load_domain

    domain = entry["domain"]
    if not isinstance(domain, str):
        c.fail(f"{key}.domain", f"{domain!r} is not a name or path", "give a built-in domain or a spec file")
    candidate = base_dir / domain
    spec = load_domain(str(candidate) if candidate.is_file() else domain)
    factors = _downsample_factors(c, entry.get("downsample", 1), f"{key}.downsample")
    spec = spec.downsampled(factors)  # same field of view, fewer voxels (quick runs, CPU-sized benchmarks)
    return spec.to_dict()


def _method_names() -> list[str]:
    from medadapt.tuning import method_names

    return method_names()


def _training(c: _Check, value: Any, key: str) -> dict[str, Any]:
    t = c.mapping(value, key, ("epochs", "iterations_per_epoch", "lr"), required=("epochs", "iterations_per_epoch"))
    training = {"epochs": c.integer(t["epochs"], f"{key}.epochs", 1),
                "iterations_per_epoch": c.integer(t["iterations_per_epoch"], f"{key}.iterations_per_epoch", 1)}
    if t.get("lr") is not None:
        try:
            training["lr"] = float(t["lr"])
        except (TypeError, ValueError):
            c.fail(f"{key}.lr", f"{t['lr']!r} is not a number", "give e.g. 1e-3")
        if not training["lr"] > 0:
            c.fail(f"{key}.lr", f"{t['lr']!r} is not positive", "give e.g. 1e-3")
    return training


def _downsample_factors(c: _Check, value: Any, key: str) -> tuple[int, int, int]:
    """``downsample``: one integer for every axis, or ``[z, y, x]`` (e.g. ``[1, 2, 2]``: in-plane only)."""
    if isinstance(value, list):
        if len(value) != 3:
            c.fail(key, f"{value!r} has {len(value)} values", "give one integer or three ([z, y, x])")
        return tuple(c.integer(v, f"{key}[{i}]", 1) for i, v in enumerate(value))
    f = c.integer(value, key, 1)
    return (f, f, f)


def parse_config(raw: Any, source: str = "<config>", base_dir: Path | None = None) -> GridConfig:
    from medadapt.data.splits import train_test_split
    from medadapt.models.network import PRESETS
    from medadapt.synth import DomainSpec
    from medadapt.tuning import make_strategy

    c = _Check(source)
    base_dir = base_dir or Path.cwd()
    top = c.mapping(raw, "config", ("name", "description", "foundation", "datasets", "seeds", "data_seed",
                                    "split_seed", "training", "budgets", "head", "table1", "table2", "gamma",
                                    "method_options", "ray"),
                    required=("name", "foundation", "datasets", "training", "table1"))
    name = str(top["name"])
    split_seed = c.integer(top.get("split_seed", 0), "split_seed")
    data_seed = c.integer(top.get("data_seed", 0), "data_seed")
    seeds = c.int_list(top.get("seeds", [0]), "seeds")

    f = c.mapping(top["foundation"], "foundation",
                  ("domain", "cases", "preset", "epochs", "iterations_per_epoch", "seed", "downsample"),
                  required=("domain", "cases", "preset", "epochs", "iterations_per_epoch"))
    if f["preset"] not in PRESETS:
        c.fail("foundation.preset", f"unknown preset {f['preset']!r}", f"choose from {list(PRESETS)}")
    foundation = {"domain": _resolve_domain(c, f, "foundation", base_dir),
                  "cases": c.integer(f["cases"], "foundation.cases", 2), "preset": f["preset"],
                  "epochs": c.integer(f["epochs"], "foundation.epochs", 1),
                  "iterations_per_epoch": c.integer(f["iterations_per_epoch"], "foundation.iterations_per_epoch", 1),
                  "seed": c.integer(f.get("seed", 0), "foundation.seed")}

    if not isinstance(top["datasets"], dict) or not top["datasets"]:
        c.fail("datasets", "expected a mapping of dataset names", "write e.g. 'hn-center-b: {domain: ..., ...}'")
    datasets = []
    for dname, entry in top["datasets"].items():
        key = f"datasets.{dname}"
        c.mapping(entry, key, ("domain", "cases", "shots", "downsample"), required=("domain", "cases", "shots"))
        domain = _resolve_domain(c, entry, key, base_dir)
        cases = c.integer(entry["cases"], f"{key}.cases", 2)
        spec = DomainSpec.from_dict(domain)
        train, _ = train_test_split([spec.case_id(i) for i in range(cases)], 0.2, split_seed)
        shots = c.int_list(entry["shots"], f"{key}.shots", 1)
        if max(shots) > len(train):
            c.fail(f"{key}.shots", f"{max(shots)} shots but the 80% train split has {len(train)} of {cases} cases",
                   "raise cases or lower the shot counts")
        datasets.append(DatasetConfig(str(dname), domain, cases, tuple(sorted(shots)), len(train)))

    training = _training(c, top["training"], "training")
    budgets = {}
    for row, entry in (c.mapping(top.get("budgets") or {}, "budgets", (*_method_names(), "all_shot"))).items():
        budgets[row] = _training(c, entry, f"budgets.{row}")
    head = str(top.get("head", "fresh"))
    if head not in HEAD_POLICIES:
        c.fail("head", f"unknown head policy {head!r}", f"use one of {list(HEAD_POLICIES)}")

    method_options = {}
    for m, opts in (top.get("method_options") or {}).items():
        c.methods([m], "method_options")
        method_options[m] = dict(c.mapping(opts, f"method_options.{m}", ("gamma", "rank", "alpha", "reduction")))

    t1 = c.mapping(top["table1"], "table1", ("methods", "all_shot", "zero_shot"), required=("methods",))
    table1 = {"methods": c.methods(t1["methods"], "table1.methods"), "all_shot": t1.get("all_shot"),
              "zero_shot": bool(t1.get("zero_shot", True))}
    if table1["all_shot"] is not None:
        c.methods([table1["all_shot"]], "table1.all_shot")
    table2 = None
    if top.get("table2") is not None:
        t2 = c.mapping(top["table2"], "table2", ("methods", "reference"), required=("methods",))
        table2 = {"methods": c.methods(t2["methods"], "table2.methods"), "reference": t2.get("reference", "full")}
        c.methods([table2["reference"]], "table2.reference")
    gamma = None
    if top.get("gamma") is not None:
        g = c.mapping(top["gamma"], "gamma", ("method", "values", "reference"), required=("values",))
        gamma = {"method": g.get("method", "dgst"), "values": c.int_list(g["values"], "gamma.values", 1),
                 "reference": g.get("reference", "full")}
        c.methods([gamma["method"], gamma["reference"]], "gamma")
        if "gamma" not in type(make_strategy(gamma["method"])).options:
            c.fail("gamma.method", f"{gamma['method']!r} has no γ", "use dgst, sgst or drst")
    ray = c.mapping(top.get("ray") or {}, "ray", ("cpus_per_cell", "gpus_per_cell"))
    ray = {"cpus_per_cell": c.integer(ray.get("cpus_per_cell", 1), "ray.cpus_per_cell", 1),
           "gpus_per_cell": float(ray.get("gpus_per_cell", 0))}
    config = GridConfig(name=name, description=str(top.get("description", "")).strip(), source=source,
                        foundation=foundation, datasets=datasets, seeds=seeds, data_seed=data_seed,
                        split_seed=split_seed, training=training, budgets=budgets, head=head, table1=table1, table2=table2, gamma=gamma,
                        method_options=method_options, ray=ray, raw=copy.deepcopy(raw))
    enumerate_cells(config)  # validates method options
    return config


# ---------------------------------------------------------------------------------------------- cells

def method_options(config: GridConfig, method: str, gamma: int | None = None) -> dict[str, Any]:
    """The canonical options of ``method`` as the strategy records them (defaults filled in), seed excluded."""
    from medadapt.tuning import make_strategy

    opts = dict(config.method_options.get(method, {}))
    if gamma is not None:
        opts["gamma"] = gamma
    try:
        strategy = make_strategy(method, seed=0, **opts)
    except MedadaptError as exc:
        raise MedadaptError(f"{config.source}: method_options.{method}: {exc}") from None
    return {k: v for k, v in strategy.config().items() if k not in ("name", "seed")}


def enumerate_cells(config: GridConfig) -> list[Cell]:
    """Every unique cell of the grid, in a stable order (dataset, experiment, shots, method, seed)."""
    foundation = config.foundation_key()
    cells: dict[str, Cell] = {}

    def add(ds: DatasetConfig, shots: int, method: str, experiment: str, gamma: int | None = None,
            all_shot: bool = False) -> None:
        opts = method_options(config, method, gamma)
        for seed in config.seeds:
            key = {"format": CELL_FORMAT, "dataset": ds.key(config.data_seed), "split_seed": config.split_seed,
                   "shots": shots, "method": method, "options": opts, "seed": seed,
                   "training": config.budget(method, all_shot), "head": config.head, "foundation": foundation}
            cell = Cell(ds.name, shots, method, opts, seed, all_shot, key)
            cell = cells.setdefault(cell.cell_id, cell)
            if experiment not in cell.experiments:
                cell.experiments.append(experiment)

    for ds in config.datasets:
        if config.table1.get("zero_shot"):  # no training: one cell per dataset, whatever the seeds
            key = {"format": CELL_FORMAT, "dataset": ds.key(config.data_seed), "split_seed": config.split_seed,
                   "method": ZERO_SHOT, "foundation": foundation}
            cell = Cell(ds.name, 0, ZERO_SHOT, {}, 0, False, key, ["table1"])
            cells[cell.cell_id] = cell
        for shots in ds.shots:
            for method in config.table1["methods"]:
                add(ds, shots, method, "table1")
        if config.table1["all_shot"]:
            add(ds, ds.train_cases, config.table1["all_shot"], "all_shot", all_shot=True)
        if config.table2:
            for shots in sorted({min(ds.shots), max(ds.shots)}):
                for method in config.table2["methods"]:
                    add(ds, shots, method, "table2")
        if config.gamma:
            add(ds, max(ds.shots), config.gamma["reference"], "gamma")
            for g in config.gamma["values"]:
                add(ds, max(ds.shots), config.gamma["method"], "gamma", gamma=g)
    return list(cells.values())
