"""The few-shot benchmark grid as data: a validated config and the unique cells it asks for.

A config (YAML; built-ins in ``medadapt/benchmark/configs``) names a foundation recipe, target datasets with
their shot counts, seeds, the fine-tuning budget, and three experiments from the DGST paper (Sec. 3):

* ``table1`` — every Table 1 method at every shot count of every dataset, plus the all-shot from-scratch row
  and the zero-shot row (the foundation model with its own heads, no fine-tuning);
* ``table2`` — the sparsification ablations at the smallest and largest shot count of each dataset;
* ``gamma``  — DGST's γ at the largest shot count of each dataset, with ``full`` as the reference (Fig. 3).

Or, instead of the three, an ``fseft`` section: the FSEFT paper's Table 1 (methods x shots, the all-shot rows,
Generalization, the spatial adapter with transductive inference), Fig. 2a (spatial vs 1x1 adapter) and Fig. 2b
(TI margin sweep); see :func:`_fseft` and docs/benchmark.md. Generic settings any grid may use: a foundation
pretrained on several partially labelled sources (``foundation.domains``), a task cut to some structures of a
domain (a dataset's ``labels``), a training ``recipe``, ``postprocess``, ``head: match`` and per-method
``heads``; each enters a cell's key only when set, so grids without them keep their cells.

A *cell* is one fine-tuning run: (dataset, shots, method, method options, seed). Its key holds everything that
can change its result — the dataset recipe, split seed, training budget (``training``, or the row's entry in
``budgets``: from scratch and all-shot get a schedule of their own), head policy, method options and the
foundation recipe — and the cell's folder name ends in a hash of that key, so editing the config re-runs exactly the cells
it changes. Cells shared by experiments (e.g. DGST γ=1 at the largest shot count) run once.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from medadapt.benchmark.cell import Cell
from medadapt.benchmark.config import (Check, Dataset, Foundation, GridPaths, check_channels, check_unique_names,
                                       cli_argument, parse_common, parse_datasets, parse_foundation, parse_recipe,
                                       read_config)
from medadapt.benchmark.config import grid_paths as config_grid_paths
from medadapt.errors import MedadaptError

CELL_FORMAT = "medadapt-bench-cell/2"
#: the version of the code's numbers: bumped by a change that changes any cell's results (it enters every key,
#: so every committed record made before it turns stale; a change that moves no number leaves it)
NUMERICS = 1
ZERO_SHOT = "zero-shot"  # the reference row: the foundation model with its own heads, no fine-tuning
HEAD_POLICIES = ("fresh", "keep", "match")
GENERALIZATION = "generalization"  # FSEFT's no-adaptation row: like zero-shot, one cell per dataset
NO_TRAINING = (ZERO_SHOT, GENERALIZATION)
TI_PREFIX = "ti_"  # transductive options in a cell's options: ti_mode, ti_margin, ti_weight, ti_error, ti_step
VARIANT = "variant"  # a cell option naming an extra row of an fseft grid (fseft.variants), not a method option


@dataclass
class GridConfig:
    name: str
    description: str
    source: str
    foundation: dict[str, Any]       # its settings (pretrained in the grid) or {"model": path}
    datasets: list[Dataset]
    seeds: tuple[int, ...]
    data_seed: int
    split_seed: int
    training: dict[str, Any]
    table1: dict[str, Any] | None
    budgets: dict[str, dict[str, Any]] = field(default_factory=dict)
    head: str = "fresh"
    table2: dict[str, Any] | None = None
    gamma: dict[str, Any] | None = None
    method_options: dict[str, dict[str, Any]] = field(default_factory=dict)
    ray: dict[str, Any] = field(default_factory=dict)
    raw: dict[str, Any] = field(default_factory=dict)
    recipe: dict[str, Any] | None = None        # resolved training recipe (Recipe.to_dict, no description)
    postprocess: str = "none"
    overlap: float = 0.5                         # the test predictions' tile overlap (key only when not the
    #                                              predictor's DEFAULT_OVERLAP, nnU-Net's 0.5)
    heads: dict[str, str] = field(default_factory=dict)   # per-method head policy, overriding ``head``
    fseft: dict[str, Any] | None = None
    training_from_recipe: bool = False          # no ``training`` section: the recipe's budgets per method
    foundation_spec: Foundation | None = None
    trust: bool = False                          # load a given foundation that needs more than plain data

    @property
    def all_datasets(self) -> list[Dataset]:
        return self.datasets

    @property
    def foundation_classes(self) -> tuple[str, ...]:
        """The structures the foundation labels (its sources', or a given model's)."""
        return self.foundation_spec.classes

    def head_for(self, method: str) -> str:
        return self.heads.get(method, self.head)

    def knows(self, ds: Dataset) -> bool:
        """Whether the foundation labels every structure of ``ds`` (so it can segment it without training)."""
        return set(ds.labels) <= set(self.foundation_classes)

    @property
    def cli_argument(self) -> str:
        """What to pass to ``medadapt bench`` for this config: a built-in's name, otherwise its file."""
        return cli_argument(self.name, self.source)

    def budget(self, method: str, all_shot: bool = False) -> dict[str, Any]:
        """The training settings of a cell: the all-shot row's, else the method's, else ``training`` (where the
        config gives none, the recipe's budget for the method: its ``methods`` entry, else its own)."""
        if all_shot and "all_shot" in self.budgets:
            return self.budgets["all_shot"]
        if method in self.budgets:
            return self.budgets[method]
        entry = (self.recipe or {}).get("methods", {}).get(method, {})
        if self.training_from_recipe and entry:
            return {k: entry.get(k, self.training[k]) for k in ("epochs", "iterations_per_epoch")}
        return self.training

    def dataset(self, name: str) -> Dataset:
        return next(d for d in self.datasets if d.name == name)

    # the shot counts each experiment runs at: every count of the dataset (Table 1), its smallest and largest
    # (Table 2), its largest (the γ sweep), unless the config cuts them (``shots``; Table 1's ``every_shot``
    # methods keep every count)
    def table1_shots(self, ds: Dataset, method: str | None = None) -> list[int]:
        chosen = self.table1.get("shots")
        if chosen is None or (method is not None and method in self.table1.get("every_shot", ())):
            return list(ds.shots)
        return [s for s in ds.shots if s in chosen]

    def table2_shots(self, ds: Dataset) -> list[int]:
        chosen = (self.table2 or {}).get("shots")
        if chosen is None:
            return sorted({min(ds.shots), max(ds.shots)})
        return [s for s in ds.shots if s in chosen]

    def gamma_shots(self, ds: Dataset) -> int:
        return (self.gamma or {}).get("shots") or max(ds.shots)

    def focus_shots(self, ds: Dataset) -> int:
        """The shot count the figures show (every Table 1 row ran there)."""
        return max(self.table1_shots(ds))

    def foundation_key(self) -> dict[str, Any]:
        return self.foundation_spec.key(self.data_seed)


# ---------------------------------------------------------------------------------------------- config parsing

def load_config(config: str | Path) -> GridConfig:
    """A built-in DGST/FSEFT config name or a YAML file; validated, with datasets resolved."""
    path, raw = read_config(config)
    return parse_config(raw, source=str(path), base_dir=path.parent)


def _method_names() -> list[str]:
    from medadapt.tuning import method_names

    return method_names()


def _training(c: Check, value: Any, key: str) -> dict[str, Any]:
    from medadapt.engine.recipe import EPOCH_OF_CASES

    t = c.mapping(value, key, ("epochs", "iterations_per_epoch", "lr"), required=("epochs", "iterations_per_epoch"))
    ipe = t["iterations_per_epoch"]
    training = {"epochs": c.integer(t["epochs"], f"{key}.epochs", 1),
                "iterations_per_epoch": ipe if ipe == EPOCH_OF_CASES
                else c.integer(ipe, f"{key}.iterations_per_epoch", 1)}
    if t.get("lr") is not None:
        try:
            training["lr"] = float(t["lr"])
        except (TypeError, ValueError):
            c.fail(f"{key}.lr", f"{t['lr']!r} is not a number", "give e.g. 1e-3")
        if not training["lr"] > 0:
            c.fail(f"{key}.lr", f"{t['lr']!r} is not positive", "give e.g. 1e-3")
    return training


def parse_config(raw: Any, source: str = "<config>", base_dir: Path | None = None) -> GridConfig:
    """A DGST/FSEFT grid: the shared schema (:mod:`.config`: datasets, foundation, seeds, splits, training, Ray)
    and the experiments (``table1``/``table2``/``gamma`` or ``fseft``)."""
    c = Check(source)
    base_dir = base_dir or Path.cwd()
    top = c.mapping(raw, "config", ("name", "description", "foundation", "datasets", "seeds", "data_seed",
                                    "split_seed", "training", "budgets", "head", "heads", "table1", "table2",
                                    "gamma", "fseft", "method_options", "recipe", "postprocess", "ray", "trust",
                                    "overlap"),
                    required=("name", "foundation", "datasets"))
    if ("table1" in top) == ("fseft" in top):
        c.fail("config", "needs exactly one of table1 (the DGST experiments) and fseft (the FSEFT experiments)",
               "keep one of them (docs/benchmark.md)")
    for key in ("table2", "gamma"):
        if "fseft" in top and top.get(key) is not None:
            c.fail(key, "belongs to the DGST experiments (table1), not to an fseft grid", f"remove {key}")
    common = parse_common(c, top)
    foundation = parse_foundation(c, top["foundation"], base_dir, common.trust)
    datasets = parse_datasets(c, top["datasets"], base_dir, common.split_seed)
    check_unique_names(c, datasets, "datasets")
    check_channels(c, foundation, datasets, "datasets")
    recipe = parse_recipe(c, top["recipe"], base_dir) if top.get("recipe") is not None else None
    training, budgets = _budgets(c, top, recipe)
    head, heads = _heads(c, top)
    method_options = _method_options(c, top, source)
    table1 = _table1(c, top["table1"], datasets) if top.get("table1") is not None else None
    table2 = _table2(c, top["table2"]) if top.get("table2") is not None else None
    gamma = _gamma(c, top["gamma"], datasets) if top.get("gamma") is not None else None
    fseft = _fseft(c, top["fseft"], datasets) if top.get("fseft") is not None else None
    config = GridConfig(name=common.name, description=common.description, source=source,
                        foundation=foundation.settings if not foundation.given else {"model": foundation.model},
                        datasets=datasets, seeds=common.seeds, data_seed=common.data_seed,
                        split_seed=common.split_seed, training=training, budgets=budgets, head=head, table1=table1,
                        table2=table2, gamma=gamma, method_options=method_options, ray=common.ray,
                        raw=copy.deepcopy(raw), recipe=recipe, postprocess=common.postprocess, overlap=common.overlap,
                        heads=heads, fseft=fseft, training_from_recipe=top.get("training") is None and recipe is not None,
                        foundation_spec=foundation, trust=common.trust)
    enumerate_cells(config)  # validates method options
    return config


def _budgets(c: Check, top: dict, recipe: dict | None) -> tuple[dict, dict]:
    """``training`` (or the recipe's own budget) and the per-row ``budgets``."""
    if top.get("training") is not None:
        training = _training(c, top["training"], "training")
    elif recipe is not None:  # the recipe's own budget
        training = {"epochs": recipe["epochs"], "iterations_per_epoch": recipe["iterations_per_epoch"]}
    else:
        c.fail("config", "missing ['training']", "add training: {epochs: ..., iterations_per_epoch: ...} or a recipe")
    budgets = {}
    for row, entry in (c.mapping(top.get("budgets") or {}, "budgets", (*_method_names(), "all_shot"))).items():
        budgets[row] = _training(c, entry, f"budgets.{row}")
    return training, budgets


def _heads(c: Check, top: dict) -> tuple[str, dict[str, str]]:
    """``head`` (every cell's head policy) and ``heads`` (per method)."""
    head = str(top.get("head", "fresh"))
    if head not in HEAD_POLICIES:
        c.fail("head", f"unknown head policy {head!r}", f"use one of {list(HEAD_POLICIES)}")
    heads = {}
    for m, policy in (c.mapping(top.get("heads") or {}, "heads", tuple(_method_names()))).items():
        if policy not in HEAD_POLICIES:
            c.fail(f"heads.{m}", f"unknown head policy {policy!r}", f"use one of {list(HEAD_POLICIES)}")
        heads[m] = str(policy)
    return head, heads


def _method_options(c: Check, top: dict, source: str) -> dict[str, dict]:
    """``method_options``: each value checked by the method's definition, before any cell."""
    from medadapt.tuning import get_method
    from medadapt.tuning.registry import options_record

    method_options = {}
    for m, opts in (top.get("method_options") or {}).items():
        c.methods([m], "method_options")
        method_options[m] = dict(c.mapping(opts, f"method_options.{m}", get_method(m).option_names))
        try:
            options_record(m, method_options[m])
        except MedadaptError as exc:
            raise MedadaptError(f"{source}: method_options.{m}: {exc}") from None
    return method_options


def _table1(c: Check, value: Any, datasets: list[Dataset]) -> dict[str, Any]:
    """``table1``: its methods, the all-shot row, the zero-shot row, and a cut to some shot counts."""
    t1 = c.mapping(value, "table1", ("methods", "all_shot", "zero_shot", "shots", "every_shot"), required=("methods",))
    table1 = {"methods": c.methods(t1["methods"], "table1.methods"), "all_shot": t1.get("all_shot"),
              "zero_shot": bool(t1.get("zero_shot", True))}
    if "shots" in t1:  # a cut: Table 1 at these shot counts only, but for its every_shot methods
        table1["shots"] = c.int_list(t1["shots"], "table1.shots", 1)
        table1["every_shot"] = c.methods(t1.get("every_shot") or table1["methods"][:1], "table1.every_shot")
        for ds in datasets:
            if not set(table1["shots"]) & set(ds.shots):
                c.fail("table1.shots", f"{list(table1['shots'])} shares no shot count with dataset {ds.name} "
                       f"({list(ds.shots)})", "list shot counts the datasets have")
    elif "every_shot" in t1:
        c.fail("table1.every_shot", "names the methods that keep every shot count when table1.shots cuts them",
               "add table1.shots or drop every_shot")
    if table1["all_shot"] is not None:
        c.methods([table1["all_shot"]], "table1.all_shot")
    return table1


def _table2(c: Check, value: Any) -> dict[str, Any]:
    t2 = c.mapping(value, "table2", ("methods", "reference", "shots"), required=("methods",))
    table2 = {"methods": c.methods(t2["methods"], "table2.methods"), "reference": t2.get("reference", "full")}
    if "shots" in t2:
        table2["shots"] = c.int_list(t2["shots"], "table2.shots", 1)
    c.methods([table2["reference"]], "table2.reference")
    return table2


def _gamma(c: Check, value: Any, datasets: list[Dataset]) -> dict[str, Any]:
    """``gamma``: the γ sweep's method, values, reference and shot count."""
    from medadapt.tuning import get_method
    from medadapt.tuning.registry import methods_with

    g = c.mapping(value, "gamma", ("method", "values", "reference", "shots"), required=("values",))
    gamma = {"method": g.get("method", "dgst"), "values": c.int_list(g["values"], "gamma.values", 1),
             "reference": g.get("reference", "full")}
    if "shots" in g:
        gamma["shots"] = c.integer(g["shots"], "gamma.shots", 1)
        for ds in datasets:
            if gamma["shots"] not in ds.shots:
                c.fail("gamma.shots", f"{gamma['shots']} is not a shot count of dataset {ds.name} "
                       f"({list(ds.shots)})", "choose one the datasets have")
    c.methods([gamma["method"], gamma["reference"]], "gamma")
    if get_method(gamma["method"]).option("gamma") is None:
        c.fail("gamma.method", f"{gamma['method']!r} has no γ", f"use {' or '.join(methods_with('gamma'))}")
    return gamma


def _fseft(c: Check, value: Any, datasets: list[Dataset]) -> dict[str, Any]:
    """The ``fseft`` section (FSEFT, Sec. 4): Table 1, Fig. 2a and Fig. 2b as lists of cells.

    ``methods`` run at every shot count of every dataset (``generalization``: once per dataset whose structures
    the foundation knows); ``adapter`` (default spatial-adapter) is the proposed method, with ``transductive``
    (mode, margin, weight) its "+ TI" row; ``all_shot`` methods run on the whole train split; ``fig2a`` runs
    the adapter inductively with each kernel size at every shot count; ``fig2b`` runs the adapter with TI at
    each margin at one shot count on some datasets (the no-TI line: the inductive adapter there)."""
    from medadapt.tuning import get_method
    from medadapt.tuning.registry import methods_with

    fs = c.mapping(value, "fseft", ("methods", "adapter", "transductive", "all_shot", "fig2a", "fig2b", "variants"),
                   required=("methods",))
    out: dict[str, Any] = {"methods": c.methods(fs["methods"], "fseft.methods"),
                           "adapter": str(fs.get("adapter", "spatial-adapter")), "transductive": None,
                           "all_shot": [], "fig2a": None, "fig2b": None, "variants": []}
    c.methods([out["adapter"]], "fseft.adapter")
    if fs.get("transductive") is not None:
        out["transductive"] = _transductive(c, fs["transductive"], "fseft.transductive")
    if fs.get("all_shot") is not None:
        out["all_shot"] = c.methods(fs["all_shot"], "fseft.all_shot")
        for m in out["all_shot"]:
            if not get_method(m).trains:
                c.fail("fseft.all_shot", f"{m!r} trains nothing, so it has no all-shot row",
                       "list methods that train")
    if fs.get("fig2a") is not None:
        a = c.mapping(fs["fig2a"], "fseft.fig2a", ("kernel_sizes",), required=("kernel_sizes",))
        if get_method(out["adapter"]).option("kernel_size") is None:
            c.fail("fseft.fig2a", f"{out['adapter']!r} has no kernel size",
                   f"use adapter: {' or '.join(methods_with('kernel_size'))}")
        out["fig2a"] = {"kernel_sizes": c.int_list(a["kernel_sizes"], "fseft.fig2a.kernel_sizes", 1)}
    if fs.get("fig2b") is not None:
        out["fig2b"] = _fig2b(c, fs["fig2b"], out["transductive"], datasets)
    out["variants"] = _variants(c, fs.get("variants") or [], out["transductive"])
    return out


def _transductive(c: Check, value: Any, key: str, base: dict[str, Any] | None = None) -> dict[str, Any]:
    """A transductive-inference setting (mode, margin, weight, error, step) over ``base``, checked."""
    from medadapt.tuning.transductive import Transductive

    t = c.mapping(value, key, ("mode", "margin", "weight", "error", "step"))
    d = Transductive()
    t = {**(base or {}), **t}
    ti = Transductive(mode=str(t.get("mode", d.mode)), margin=t.get("margin", d.margin),
                      weight=t.get("weight", d.weight), error=str(t.get("error", d.error)),
                      step=str(t.get("step", d.step)))
    try:
        if isinstance(ti.margin, bool) or isinstance(ti.weight, bool):
            raise TypeError("not a number")
        ti.margin, ti.weight = float(ti.margin), float(ti.weight)
        ti.check()
    except (TypeError, ValueError, MedadaptError) as exc:
        c.fail(key, str(exc), "mode query|batch, margin in [0, 1), weight > 0, error max|prior|proportion, "
                              "step epoch|every")
    return {"mode": ti.mode, "margin": ti.margin, "weight": ti.weight, "error": ti.error, "step": ti.step}


def _fig2b(c: Check, value: Any, transductive: dict[str, Any] | None, datasets: list[Dataset]) -> dict[str, Any]:
    """``fseft.fig2b``: the adapter with TI at each margin (and λ), at one shot count, on some datasets."""
    if transductive is None:
        c.fail("fseft.fig2b", "sweeps the transductive margin, but fseft.transductive is not set",
               "add transductive: {mode: query, margin: 0.1}")
    b = c.mapping(value, "fseft.fig2b", ("margins", "shots", "datasets", "weights"), required=("margins", "shots"))
    margins = b["margins"]
    if not isinstance(margins, list) or not margins:
        c.fail("fseft.fig2b.margins", f"{margins!r} is not a non-empty list", "write e.g. [0.05, 0.1, 0.2, 0.3]")
    for i, m in enumerate(margins):
        if isinstance(m, bool) or not isinstance(m, (int, float)) or not 0 <= m < 1:
            c.fail(f"fseft.fig2b.margins[{i}]", f"{m!r} is not a number in [0, 1)", "give e.g. 0.1")
    if len(set(margins)) != len(margins):
        c.fail("fseft.fig2b.margins", f"{margins} has repeated values", "list each margin once")
    shots = c.integer(b["shots"], "fseft.fig2b.shots", 1)
    names = [d.name for d in datasets]
    chosen = b.get("datasets", names)
    if not isinstance(chosen, list) or not chosen:
        c.fail("fseft.fig2b.datasets", f"{chosen!r} is not a non-empty list", f"choose from {names}")
    for i, d in enumerate(chosen):
        if d not in names:
            c.fail(f"fseft.fig2b.datasets[{i}]", f"unknown dataset {d!r}", f"choose from {names}")
        ds = next(x for x in datasets if x.name == d)
        if shots > ds.train_cases:
            c.fail("fseft.fig2b.shots", f"{shots} shots but {d}'s train split has {ds.train_cases} cases",
                   "lower the shot count")
    weights = b.get("weights") or [transductive["weight"]]
    if not isinstance(weights, list) or any(isinstance(w, bool) or not isinstance(w, (int, float)) or not w > 0
                                            for w in weights) or len(set(weights)) != len(weights):
        c.fail("fseft.fig2b.weights", f"{weights!r} is not a list of distinct positive numbers",
               "write e.g. [0.1, 1.0] (the commands' λ and the text's)")
    return {"margins": [float(m) for m in margins], "shots": shots, "datasets": list(chosen),
            **({"weights": [float(w) for w in weights]} if b.get("weights") else {})}


def _variants(c: Check, variants: Any, transductive: dict[str, Any] | None) -> list[dict[str, Any]]:
    """``fseft.variants``: extra rows (another reading, budget or option of a method), each named."""
    from medadapt.tuning import get_method

    if not isinstance(variants, list):
        c.fail("fseft.variants", f"{variants!r} is not a list", "write e.g. [{name: text-lr, method: ..., lr: 0.5}]")
    out, names = [], set()
    for i, v in enumerate(variants):
        key = f"fseft.variants[{i}]"
        v = c.mapping(v, key, ("name", "label", "method", "options", "transductive", "lr", "epochs", "shots",
                               "all_shot", "feature_cache"), required=("name", "method"))
        name = str(v["name"])
        if name in names:
            c.fail(f"{key}.name", f"{name!r} is used twice", "give every variant its own name")
        names.add(name)
        c.methods([v["method"]], f"{key}.method")
        opts = c.mapping(v.get("options") or {}, f"{key}.options", get_method(v["method"]).option_names)
        entry = {"name": name, "label": str(v.get("label", name)), "method": v["method"], "options": dict(opts),
                 "transductive": None, "budget": {}, "shots": None, "all_shot": bool(v.get("all_shot", False)),
                 "feature_cache": bool(v.get("feature_cache", False))}
        if v.get("transductive") is not None:
            entry["transductive"] = _transductive(c, v["transductive"], f"{key}.transductive", transductive)
        for b in ("lr", "epochs"):
            if v.get(b) is not None:
                entry["budget"][b] = float(v[b]) if b == "lr" else c.integer(v[b], f"{key}.{b}", 1)
        if v.get("shots") is not None:
            entry["shots"] = list(c.int_list(v["shots"], f"{key}.shots", 1))
        out.append(entry)
    return out


# ---------------------------------------------------------------------------------------------- cells

def method_options(config: GridConfig, method: str, gamma: int | None = None,
                   overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """The canonical options of ``method`` as the strategy records them (defaults filled in), seed excluded;
    ``overrides`` replace the config's ``method_options`` (e.g. Fig. 2a's kernel sizes); ``gamma``: Fig. 3's γ."""
    from medadapt.tuning.registry import options_record

    opts = {**config.method_options.get(method, {}), **(overrides or {})}
    if gamma is not None:
        opts["gamma"] = gamma
    try:
        return options_record(method, opts)
    except MedadaptError as exc:
        raise MedadaptError(f"{config.source}: method_options.{method}: {exc}") from None


def ti_options(transductive: dict[str, Any], margin: float | None = None) -> dict[str, Any]:
    """A cell's transductive options (``ti_mode``, ``ti_margin``, ``ti_weight``), ``margin`` replacing the
    section's."""
    t = {**transductive, **({"margin": float(margin)} if margin is not None else {})}
    return {f"{TI_PREFIX}{k}": t[k] for k in ("mode", "margin", "weight", "error", "step") if k in t}


def cell_inputs(digests: dict[str, Any] | None, dataset: str) -> dict[str, Any]:
    """What a cell's key names by digest (:func:`medadapt.benchmark.harness.input_digests`): the foundation's
    weights and the dataset it trains and tests on (None: not made yet)."""
    digests = digests or {}
    return {"foundation": digests.get("foundation"), "data": (digests.get("data") or {}).get(dataset)}


def variant_options(config: GridConfig, variant: dict[str, Any]) -> dict[str, Any]:
    """The cell options of an fseft grid's extra row (``fseft.variants``): its method's options with the variant's
    overrides, the variant's name, its transductive options and its feature cache (the report's rows use the
    same)."""
    return {**method_options(config, variant["method"], overrides=variant["options"]), VARIANT: variant["name"],
            **(ti_options(variant["transductive"]) if variant["transductive"] else {}),
            **({"feature_cache": True} if variant["feature_cache"] else {})}


def enumerate_cells(config: GridConfig, digests: dict[str, Any] | None = None) -> list[Cell]:
    """Every unique cell of the grid, in a stable order (dataset, experiment, shots, method, seed); their keys
    name the inputs' ``digests`` (the harness's) and the code's :data:`NUMERICS` version."""
    from medadapt.inference.predictor import DEFAULT_OVERLAP  # (not at import: it loads MONAI)

    foundation = config.foundation_key()
    cells: dict[str, Cell] = {}

    def add(ds: Dataset, shots: int, method: str, experiment: str, gamma: int | None = None,
            all_shot: bool = False, overrides: dict[str, Any] | None = None,
            extra: dict[str, Any] | None = None, budget: dict[str, Any] | None = None,
            options: dict[str, Any] | None = None) -> None:
        opts = options if options is not None else {**method_options(config, method, gamma, overrides), **(extra or {})}
        for seed in config.seeds:
            key = {"format": CELL_FORMAT, "dataset": ds.key(config.data_seed), "split_seed": config.split_seed,
                   "shots": shots, "method": method, "options": opts, "seed": seed,
                   "training": {**config.budget(method, all_shot), **(budget or {})},
                   "head": config.head_for(method), "foundation": foundation,
                   "inputs": cell_inputs(digests, ds.name), "numerics": NUMERICS}
            if config.recipe is not None:  # generic settings enter the key only when set
                key["recipe"] = config.recipe
            if config.postprocess != "none":
                key["postprocess"] = config.postprocess
            if config.overlap != DEFAULT_OVERLAP:
                key["overlap"] = config.overlap
            cell = Cell(ds.name, shots, method, opts, seed, all_shot, key)
            cell = cells.setdefault(cell.cell_id, cell)
            if experiment not in cell.experiments:
                cell.experiments.append(experiment)

    def untrained(ds: Dataset, method: str, experiment: str) -> None:
        """No training: one cell per dataset, whatever the seeds and shot counts."""
        key = {"format": CELL_FORMAT, "dataset": ds.key(config.data_seed), "split_seed": config.split_seed,
               "method": method, "foundation": foundation, "inputs": cell_inputs(digests, ds.name),
               "numerics": NUMERICS}
        if config.postprocess != "none":
            key["postprocess"] = config.postprocess
        if config.overlap != DEFAULT_OVERLAP:
            key["overlap"] = config.overlap
        cell = Cell(ds.name, 0, method, {}, 0, False, key, [experiment])
        cells[cell.cell_id] = cell

    for ds in config.datasets:
        (_fseft_cells if config.fseft else _dgst_cells)(config, ds, add, untrained)
    return list(cells.values())


def _dgst_cells(config: GridConfig, ds: Dataset, add, untrained) -> None:
    """The DGST experiments' cells of one dataset: Table 1 (zero-shot, every method at its shot counts, the
    all-shot row), Table 2 and the γ sweep."""
    if config.table1.get("zero_shot") and config.knows(ds):  # the foundation's own outputs, by name
        untrained(ds, ZERO_SHOT, "table1")
    for shots in ds.shots:
        for method in config.table1["methods"]:
            if shots in config.table1_shots(ds, method):
                add(ds, shots, method, "table1")
    if config.table1["all_shot"]:
        add(ds, ds.train_cases, config.table1["all_shot"], "all_shot", all_shot=True)
    if config.table2:
        for shots in config.table2_shots(ds):
            for method in config.table2["methods"]:
                add(ds, shots, method, "table2")
    if config.gamma:
        add(ds, config.gamma_shots(ds), config.gamma["reference"], "gamma")
        for g in config.gamma["values"]:
            add(ds, config.gamma_shots(ds), config.gamma["method"], "gamma", gamma=g)


def _fseft_cells(config: GridConfig, ds: Dataset, add, untrained) -> None:
    fs = config.fseft
    adapter, ti = fs["adapter"], fs["transductive"]
    if GENERALIZATION in fs["methods"] and config.knows(ds):  # a new structure: no foundation output to show
        untrained(ds, GENERALIZATION, "table1")
    for shots in ds.shots:
        for method in fs["methods"]:
            if method != GENERALIZATION:
                add(ds, shots, method, "table1")
        if ti:
            add(ds, shots, adapter, "table1", extra=ti_options(ti))
    for method in fs["all_shot"]:
        add(ds, ds.train_cases, method, "all_shot", all_shot=True)
    if fs["fig2a"]:
        for shots in ds.shots:
            for k in fs["fig2a"]["kernel_sizes"]:
                add(ds, shots, adapter, "fig2a", overrides={"kernel_size": k})
    if fs["fig2b"] and ds.name in fs["fig2b"]["datasets"]:
        shots = fs["fig2b"]["shots"]
        add(ds, shots, adapter, "fig2b")  # the dashed no-TI line
        for weight in fs["fig2b"].get("weights", [ti["weight"]]):  # a line per λ (the commands' and the text's)
            for margin in fs["fig2b"]["margins"]:
                add(ds, shots, adapter, "fig2b", extra=ti_options({**ti, "weight": float(weight)}, margin))
    for v in fs.get("variants", []):  # extra rows: the text's readings, longer budgets, cached features
        options = variant_options(config, v)
        if v["all_shot"]:
            add(ds, ds.train_cases, v["method"], "variants", all_shot=True, options=options, budget=v["budget"])
            continue
        for shots in ds.shots:
            if v["shots"] is None or shots in v["shots"]:
                add(ds, shots, v["method"], "variants", options=options, budget=v["budget"])


# ---------------------------------------------------------------------------------------------- work folder

def grid_paths(config: GridConfig, workdir: str | Path) -> GridPaths:
    """The work folder's layout (:func:`medadapt.benchmark.config.grid_paths`)."""
    return config_grid_paths(config, workdir)
