"""The MedSeqFT benchmark grid as data: a validated config and the cells it asks for.

A config (YAML; built-ins ``medseqft`` and ``medseqft-quick`` in ``medadapt/benchmark/configs``) has a
``medseqft`` section instead of the DGST grid's ``table1`` or the FSEFT grid's ``fseft``; ``medadapt bench``
dispatches on it (:func:`medadapt.benchmark.benchmarks.load`). It names a task stream, a foundation,
the fine-tuning recipe, seeds, and the rows of MedSeqFT's tables (Ye et al., Sec. IV-V):

* ``parallel``: fine-tuning methods run on every task from the foundation M_0 alone (Table II: TFS = ``scratch``,
  FFT = ``full``, head fine-tuning = ``linear-probe``, ``lora`` with each ``rank``, ``adapter`` with each
  ``reduction``);
* ``joint``: joint multi-task training with a head per task (the upper reference);
* ``sequential``: the ablation ladder of Table III, ``seq-ft`` (vanilla sequential fine-tuning),
  ``seq-ft-random`` / ``seq-ft-mds`` (KD-based FFT on a random / MDS buffer), ``seq-ft-kgrft`` (LoRA-based KD
  and merge, no buffer) and ``medseqft`` (MDS + K&G RFT);
* ``unseen``: Table VI on the stream's unseen tasks, ``tfs`` (from scratch), ``fft-m0`` (FFT from M_0) and
  ``fft-mn`` (FFT from the encoder and decoder of the refined M_n that the ``refined_by`` row left after the
  last task, with a fresh head).

Two kinds of cell: a **stream cell** is one :func:`medadapt.workflows.seqft.seqft` run (row, seed) over the
whole stream; an **unseen cell** is one :func:`medadapt.workflows.finetune.finetune` run (unseen task, row,
seed). An ``fft-mn`` cell depends on the ``refined_by`` stream cell of its seed. A cell's key holds everything
that can change its result (the stream's domain specs, cases, data and split seeds, the row's settings, the seed,
the recipe(s), post-processing and the foundation's recipe; an ``fft-mn`` cell also the key hash of the cell it
starts from), and its folder name ends in a hash of that key, so an edited config re-runs exactly the cells it
changes. Only settings a row uses enter its key (the buffer size only where there is a buffer, the MDS
repeats only with MDS, the KD rank and recipe only with LoRA-based KD).
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from medadapt.benchmark.cell import Cell
from medadapt.benchmark.config import (Check, Dataset, Foundation, GridPaths, check_channels, check_unique_names,
                                       cli_argument, downsample_factors, parse_common, parse_foundation,
                                       parse_recipe, read_config, real_dataset, synthetic_dataset)
from medadapt.benchmark.config import grid_paths as config_grid_paths
from medadapt.errors import MedadaptError
from medadapt.utils.hashing import stable_hash

CELL_FORMAT = "medadapt-bench-medseqft-cell/1"
#: the version of the code's numbers (as the DGST/FSEFT grid's :data:`medadapt.benchmark.grid.NUMERICS`)
NUMERICS = 1
#: the sequential rows: (seqft method, buffer, retention), in Table III's order
SEQUENTIAL = {
    "seq-ft": ("seq-ft", "none", "none"),
    "seq-ft-random": ("seq-ft", "random", "none"),
    "seq-ft-mds": ("seq-ft", "mds", "none"),
    "seq-ft-kgrft": ("seq-ft", "none", "lora-kd"),
    "medseqft": ("medseqft", "mds", "lora-kd"),
}
#: Table III's check-mark columns per row
ABLATION_MARKS = {  # FFT, Seq. FT, MDS, Random, K&G RFT
    "full": (True, False, False, False, False),
    "seq-ft": (False, True, False, False, False),
    "seq-ft-random": (False, True, False, True, False),
    "seq-ft-mds": (False, True, True, False, False),
    "seq-ft-kgrft": (False, True, False, False, True),
    "medseqft": (False, True, True, False, True),
}
UNSEEN_ROWS = {"tfs": ("scratch", "foundation"), "fft-m0": ("full", "foundation"), "fft-mn": ("full", "refined")}
JOINT = "joint"
#: names in the tables where the paper has its own (other methods: their definition's label)
DISPLAY = {"scratch": "TFS", "full": "FFT", "linear-probe": "Head fine-tuning", JOINT: "Joint multi-task (task heads)",
           "seq-ft": "Seq. FT", "seq-ft-random": "Seq. FT + Random",
           "seq-ft-mds": "Seq. FT + MDS", "seq-ft-kgrft": "Seq. FT + K&G RFT", "medseqft": "MedSeqFT",
           "tfs": "TFS", "fft-m0": "FFT (from M0)", "fft-mn": "FFT w/ {refined} (from its M_n)"}
OPTION_SYMBOLS = {"rank": "r", "reduction": "γ"}


def display_name(name: str, options: dict[str, Any] | None = None) -> str:
    """A row's name in the tables, e.g. ``LoRA (r=4)``, ``Adapter (γ=2)``, ``Seq. FT + MDS``."""
    from medadapt.tuning import methods

    definition = methods().get(name)
    text = DISPLAY.get(name) or (definition.label if definition is not None else name)
    opts = ", ".join(f"{OPTION_SYMBOLS.get(k, k)}={v}" for k, v in sorted((options or {}).items()))
    return f"{text} ({opts})" if opts else text


@dataclass(frozen=True)
class Row:
    """A row of the stream tables: one seqft method with its settings."""

    name: str                         # folder label, e.g. lora-rank4, seq-ft-mds
    kind: str                         # parallel | joint | sequential
    method: str                       # the seqft method
    options: tuple[tuple[str, Any], ...] = ()   # a parallel method's options as the strategy records them
    buffer: str = "none"
    retention: str = "none"
    display: str = ""


@dataclass
class MedseqftConfig:
    name: str
    description: str
    source: str
    stream: dict[str, Any]            # name, cases, downsample (the resolved task lists are below)
    tasks: list[Dataset]
    unseen: list[Dataset]
    foundation: dict[str, Any]        # its settings (pretrained in the grid) or {"model": path}
    seeds: tuple[int, ...]
    data_seed: int
    split_seed: int
    shots: "int | str"
    recipe: dict[str, Any]            # resolved fine-tuning recipe (Recipe.to_dict, no description)
    kd_recipe: dict[str, Any]         # resolved LoRA-based KD recipe
    postprocess: str
    rows: list[Row]
    unseen_rows: list[str]
    refined_by: str | None
    buffer_size: int
    mds_repeats: int
    kd_rank: int
    ray: dict[str, Any]
    kd_until: str = "ceiling"
    raw: dict[str, Any] = field(default_factory=dict)
    foundation_spec: Foundation | None = None
    trust: bool = False
    overlap: float = 0.5              # the sliding window's tile overlap of every test prediction
    kd_fft: str = "joint"             # the KD-based FFT's reading (rows with a buffer)

    @property
    def cli_argument(self) -> str:
        return cli_argument(self.name, self.source)

    @property
    def all_datasets(self) -> list[Dataset]:
        """The stream's tasks and the unseen tasks."""
        return self.tasks + self.unseen

    def row(self, name: str) -> Row:
        return next(r for r in self.rows if r.name == name)

    def dataset_key(self, task: Dataset) -> dict[str, Any]:
        """What a task's cohort is (its folder name ends in a hash of it)."""
        return task.key(self.data_seed)

    def stream_key(self) -> dict[str, Any]:
        """The stream a stream cell runs: its tasks' cohorts, in order (the unseen tasks are not part of it)."""
        return {"stream": self.stream["name"], "tasks": [self.dataset_key(t) for t in self.tasks]}

    def foundation_key(self) -> dict[str, Any]:
        return self.foundation_spec.key(self.data_seed)


# ---------------------------------------------------------------------------------------------- loading

def load_config(config: str | Path) -> MedseqftConfig:
    """A built-in MedSeqFT config name or a YAML file; validated."""
    path, raw = read_config(config)
    return parse_config(raw, source=str(path), base_dir=path.parent)


STREAM_KEYS = ("name", "tasks", "unseen", "cases", "downsample", "file")
TASK_KEYS = ("name", "data", "labels", "split", "fold", "import")


def _stream(c: Check, value: Any, split_seed: int, base_dir: Path
            ) -> tuple[dict[str, Any], list[Dataset], list[Dataset]]:
    """The task stream: a built-in stream or task-set file (``name``, its ``tasks``/``unseen`` by name, ``cases``,
    ``downsample``: generated), a stream file of real datasets (``file``: as ``medadapt seqft --stream`` reads),
    or ``tasks``/``unseen`` listed here as real datasets (``{name, data, labels, split, fold}``)."""
    s = c.mapping(value, "stream", STREAM_KEYS)
    if "file" in s:
        return _stream_file(c, s, split_seed, base_dir)
    tasks = s.get("tasks")
    if isinstance(tasks, list) and tasks and all(isinstance(t, dict) for t in tasks):
        return _real_stream(c, s, split_seed, base_dir)
    return _synthetic_stream(c, s, split_seed)


def _real_tasks(c: Check, items: Any, key: str, split_seed: int, base_dir: Path, required: bool) -> list[Dataset]:
    if items is None and not required:
        return []
    if not isinstance(items, list) or (required and not items):
        c.fail(key, f"{items!r} is not a {'non-empty ' if required else ''}list of tasks",
               "write e.g. [{name: liver, data: path/to/Dataset003_Liver}]")
    out = []
    for i, item in enumerate(items):
        where = f"{key}[{i}]"
        c.mapping(item, where, TASK_KEYS, required=("name", "data"))
        out.append(real_dataset(c, str(item["name"]), item, where, base_dir, split_seed))
    return out


def _real_stream(c: Check, s: dict, split_seed: int, base_dir: Path
                 ) -> tuple[dict[str, Any], list[Dataset], list[Dataset]]:
    for k in ("cases", "downsample"):
        if k in s:
            c.fail(f"stream.{k}", "applies to a generated stream, not to tasks with data", f"remove {k}")
    tasks = _real_tasks(c, s.get("tasks"), "stream.tasks", split_seed, base_dir, True)
    unseen = _real_tasks(c, s.get("unseen"), "stream.unseen", split_seed, base_dir, False)
    check_unique_names(c, tasks + unseen, "stream")
    return {"name": str(s.get("name", "stream"))}, tasks, unseen


def _stream_file(c: Check, s: dict, split_seed: int, base_dir: Path
                 ) -> tuple[dict[str, Any], list[Dataset], list[Dataset]]:
    from medadapt.sequential.stream import load_stream

    extra = sorted(set(s) - {"file", "name"})
    if extra:
        c.fail("stream", f"{extra} do not go with file (the stream file lists its tasks)", f"remove {extra}")
    path = c.path(s["file"], "stream.file", base_dir, "a stream file (docs/sequential.md)")
    try:
        stream = load_stream(path)
    except MedadaptError as exc:
        c.fail("stream.file", str(exc), "fix the stream file")

    def entries(tasks) -> list[dict[str, Any]]:
        out = []
        for t in tasks:
            entry: dict[str, Any] = {"name": t.name, "data": str(t.data)}
            if t.split is not None and t.split.kind == "file":
                entry.update(split=t.split.path, fold=t.split.fold)
            elif t.split is not None:
                c.fail("stream.file", f"task {t.name!r}: split {t.split.describe()} has no test part",
                       "give the task a split file or the fixed random split")
            out.append(entry)
        return out

    tasks = _real_tasks(c, entries(stream.tasks), "stream.file tasks", split_seed, base_dir, True)
    unseen = _real_tasks(c, entries(stream.unseen), "stream.file unseen", split_seed, base_dir, False)
    return {"name": str(s.get("name", stream.name))}, tasks, unseen


def _synthetic_stream(c: Check, s: dict, split_seed: int) -> tuple[dict[str, Any], list[Dataset], list[Dataset]]:
    from medadapt.synth.tasks import load_task_stream

    c.mapping(s, "stream", STREAM_KEYS, required=("name", "cases"))
    if not isinstance(s["name"], str):
        c.fail("stream.name", f"{s['name']!r} is not a name", "give a built-in stream (ct-stream) or a task-set file")
    try:
        stream = load_task_stream(s["name"])
    except MedadaptError as exc:
        c.fail("stream.name", str(exc), "see docs/domains.md")
    cases = c.integer(s["cases"], "stream.cases", 5)
    factors = downsample_factors(c, s.get("downsample", 1), "stream.downsample")

    def pick(key: str, available: tuple) -> list:
        names = [t.name for t in available]
        chosen = s.get(key, names)
        if not isinstance(chosen, list) or (key == "tasks" and not chosen):
            c.fail(f"stream.{key}", f"{chosen!r} is not a {'non-empty ' if key == 'tasks' else ''}list of task "
                   "names", f"choose from {names}")
        for i, n in enumerate(chosen):
            if n not in names:
                c.fail(f"stream.{key}[{i}]", f"{n!r} is not a {key[:-1] if key == 'tasks' else 'unseen'} task of "
                       f"stream {stream.name!r}", f"choose from {names}")
        if len(set(chosen)) != len(chosen):
            c.fail(f"stream.{key}", f"{chosen} names a task twice", "list each task once, in training order")
        return [next(t for t in available if t.name == n) for n in chosen]

    out = []
    for group in (pick("tasks", stream.tasks), pick("unseen", stream.unseen)):
        out.append([synthetic_dataset(c, task.name, task.spec().downsampled(factors).to_dict(), cases, (), split_seed,
                                      f"stream.{task.name}", labels=tuple(task.labels)) for task in group])
    return {"name": stream.name, "cases": cases, "downsample": list(factors)}, out[0], out[1]


def _parallel_rows(c: Check, value: Any, decoder: str = "pretrained") -> list[Row]:
    """The parallel rows; ``decoder``: the decoder policy of the methods that freeze part of the network
    (``new`` on a self-supervised foundation, MedSeqFT's reading; an entry's ``decoder`` overrides it: the other
    reading as an extra row)."""
    from medadapt.tuning import get_method, make_strategy, method_names
    from medadapt.tuning.base import DECODER_POLICIES

    names = method_names(training_only=True)
    if not isinstance(value, list):
        c.fail("medseqft.parallel", f"{value!r} is not a list",
               "write e.g. [scratch, full, {method: lora, rank: [2, 4]}]")
    rows: list[Row] = []
    for i, entry in enumerate(value):
        key = f"medseqft.parallel[{i}]"
        if isinstance(entry, str):
            entry = {"method": entry}
        if not isinstance(entry, dict) or "method" not in entry:
            c.fail(key, f"{entry!r} is not a method", "write a method name or {method: lora, rank: [2, 4]}")
        method = entry["method"]
        if method not in names:
            c.fail(f"{key}.method", f"unknown or untrained method {method!r}", f"choose from {names}")
        options = {k: v for k, v in entry.items() if k not in ("method", "decoder")}
        policy = entry.get("decoder", decoder)
        if policy not in DECODER_POLICIES:
            c.fail(f"{key}.decoder", f"unknown decoder policy {policy!r}", f"choose from {list(DECODER_POLICIES)}")
        allowed = get_method(method).option_names
        unknown = sorted(set(options) - set(allowed))
        if unknown:
            c.fail(key, f"unknown option(s) {unknown} of {method}", f"use only {list(allowed)}")
        listed = [k for k, v in options.items() if isinstance(v, list)]  # one option may list its values
        if len(listed) > 1:
            c.fail(key, f"lists values of {listed}", "list the values of one option per entry (another entry for "
                                                     "the other)")
        variants = [options]
        if listed:
            values = options[listed[0]]
            if not values or len(set(map(str, values))) != len(values):
                c.fail(f"{key}.{listed[0]}", f"{values!r} is empty or repeats a value", "list each value once")
            variants = [{**options, listed[0]: v} for v in values]
        for opts in variants:
            try:
                strategy = make_strategy(method, seed=0, decoder=policy, **opts)
            except MedadaptError as exc:
                c.fail(key, str(exc), "fix the option")
            except (TypeError, ValueError) as exc:  # e.g. a list where a number belongs
                c.fail(key, f"bad option value(s) {opts} ({exc})", "give numbers")
            canonical = tuple(sorted((k, v) for k, v in strategy.config().items() if k not in ("name", "seed")))
            label = method + "".join(f"-{k}{v}" for k, v in sorted(opts.items())) + \
                (f"-decoder{policy}" if "decoder" in entry else "")
            if any(r.name == label for r in rows):
                c.fail(key, f"{label} is listed twice", "list each method and option once")
            display = display_name(method, dict(opts)) + (f" (decoder {policy})" if "decoder" in entry else "")
            rows.append(Row(label, "parallel", method, canonical, display=display))
    return rows


def parse_config(raw: Any, source: str = "<config>", base_dir: Path | None = None) -> MedseqftConfig:
    c = Check(source)
    base_dir = base_dir or Path.cwd()
    top = c.mapping(raw, "config", ("name", "description", "stream", "foundation", "seeds", "data_seed", "split_seed",
                                    "shots", "recipe", "kd_recipe", "postprocess", "medseqft", "ray", "trust",
                                    "overlap"),
                    required=("name", "stream", "foundation", "recipe", "medseqft"))
    common = parse_common(c, top)
    stream, tasks, unseen = _stream(c, top["stream"], common.split_seed, base_dir)
    foundation = parse_foundation(c, top["foundation"], base_dir, common.trust, objective_required=True)
    check_channels(c, foundation, tasks + unseen, "stream")
    shots = _shots(c, top.get("shots", "all"), tasks + unseen)
    recipe = parse_recipe(c, top["recipe"], base_dir)
    kd_until, kd_recipe = _kd_stage(c, top, recipe, base_dir)
    m = c.mapping(top["medseqft"], "medseqft", ("parallel", "joint", "sequential", "unseen", "refined_by",
                                                "buffer_size", "mds_repeats", "kd_rank", "kd_until",
                                                "kd_max_epochs", "kd_lr_fraction", "kd_fft"))
    rows = _stream_rows(c, m, foundation)
    buffer_size = c.integer(m.get("buffer_size", 4), "medseqft.buffer_size", 1)
    if any(r.buffer != "none" for r in rows):
        small = min(tasks, key=lambda t: t.train_cases)
        k = small.train_cases if shots == "all" else shots
        if buffer_size > k:
            c.fail("medseqft.buffer_size", f"{buffer_size} but task {small.name!r} trains on {k} cases",
                   f"use at most {k}")
    unseen_rows, refined_by = _unseen_rows(c, m, rows, unseen)
    kd_fft = _kd_fft(c, m)
    return MedseqftConfig(name=common.name, description=common.description, source=source, stream=stream,
                          tasks=tasks, unseen=unseen,
                          foundation=foundation.settings if not foundation.given else {"model": foundation.model},
                          seeds=common.seeds, data_seed=common.data_seed, split_seed=common.split_seed, shots=shots,
                          recipe=recipe, kd_recipe=kd_recipe, postprocess=common.postprocess, rows=rows,
                          unseen_rows=list(unseen_rows), refined_by=refined_by, buffer_size=buffer_size,
                          mds_repeats=c.integer(m.get("mds_repeats", 16), "medseqft.mds_repeats", 1),
                          kd_rank=c.integer(m.get("kd_rank", 2), "medseqft.kd_rank", 1), kd_until=kd_until,
                          ray=common.ray, raw=copy.deepcopy(raw), foundation_spec=foundation, trust=common.trust,
                          overlap=common.overlap, kd_fft=kd_fft)


def _kd_fft(c: Check, m: dict) -> str:
    """``medseqft.kd_fft``: the KD-based FFT's reading (default: medadapt's, KD_FFT_DEFAULT)."""
    from medadapt.tuning.distill import KD_FFT_MODES
    from medadapt.workflows.seqft import KD_FFT_DEFAULT

    kd_fft = str(m.get("kd_fft", KD_FFT_DEFAULT))
    if kd_fft not in KD_FFT_MODES:
        c.fail("medseqft.kd_fft", f"unknown {kd_fft!r}", f"use one of {list(KD_FFT_MODES)}")
    return kd_fft


def _shots(c: Check, shots: Any, tasks: list[Dataset]) -> "int | str":
    """``shots``: all, or K training cases per task (at most the smallest task's)."""
    if shots == "all":
        return shots
    shots = c.integer(shots, "shots", 1)
    small = min(tasks, key=lambda t: t.train_cases)
    if shots > small.train_cases:
        c.fail("shots", f"{shots} but task {small.name!r} has {small.train_cases} training cases",
               f"use all or at most {small.train_cases}")
    return shots


def _kd_stage(c: Check, top: dict, recipe: dict, base_dir: Path) -> tuple[str, dict]:
    """The LoRA-based KD stage: ``medseqft.kd_until`` and its recipe (``kd_recipe``, or derived from the
    fine-tuning recipe with ``medseqft.kd_max_epochs`` and ``kd_lr_fraction``)."""
    from medadapt.engine.recipe import load_recipe
    from medadapt.workflows.seqft import (KD_UNTIL, KD_UNTIL_DEFAULT, check_kd_ceiling, check_kd_lr_fraction,
                                          kd_recipe_from)

    m_raw = top["medseqft"] if isinstance(top.get("medseqft"), dict) else {}
    kd_until = str(m_raw.get("kd_until", KD_UNTIL_DEFAULT))
    if kd_until not in KD_UNTIL:
        c.fail("medseqft.kd_until", f"unknown {kd_until!r}", f"use one of {list(KD_UNTIL)}")
    kd_max_epochs = m_raw.get("kd_max_epochs")
    if kd_max_epochs is not None:
        kd_max_epochs = c.integer(kd_max_epochs, "medseqft.kd_max_epochs", 1)
    kd_lr_fraction = m_raw.get("kd_lr_fraction")
    if kd_lr_fraction is not None:
        try:
            check_kd_lr_fraction(kd_lr_fraction)
        except MedadaptError as exc:
            c.fail("medseqft.kd_lr_fraction", str(exc).split(": ", 1)[1], "write e.g. kd_lr_fraction: 1.0")
        if top.get("kd_recipe") is not None:
            c.fail("medseqft.kd_lr_fraction", "does not go with kd_recipe (its lr is the recipe's)",
                   "drop one of them")
    if top.get("kd_recipe") is not None:
        kd_recipe = parse_recipe(c, top["kd_recipe"], base_dir, "kd_recipe")
        if kd_max_epochs is not None:
            kd_recipe["epochs"] = kd_max_epochs
        if kd_until == "levelled":
            try:
                check_kd_ceiling(int(kd_recipe["epochs"]), "kd_recipe.epochs")
            except MedadaptError as exc:
                c.fail("kd_recipe", str(exc), "give it at least 10 epochs")
        return kd_until, kd_recipe
    try:
        kd = kd_recipe_from(load_recipe(recipe), kd_until, kd_max_epochs, kd_lr_fraction)
    except MedadaptError as exc:
        c.fail("medseqft.kd_max_epochs" if kd_max_epochs is not None else "recipe",
               f"the LoRA-based KD recipe derived from it is invalid ({exc})",
               "give medseqft.kd_max_epochs, kd_recipe, or more epochs")
    kd_recipe = kd.to_dict()
    kd_recipe.pop("description")
    return kd_until, kd_recipe


def _stream_rows(c: Check, m: dict, foundation: Foundation) -> list[Row]:
    """The stream tables' rows: the parallel ones, joint training, the sequential ones in Table III's order."""
    rows = _parallel_rows(c, m.get("parallel", []), "new" if foundation.pretext else "pretrained")
    if m.get("joint", False):
        rows.append(Row(JOINT, "joint", JOINT, display=display_name(JOINT)))
    sequential = m.get("sequential", [])
    if not isinstance(sequential, list):
        c.fail("medseqft.sequential", f"{sequential!r} is not a list", f"choose from {list(SEQUENTIAL)}")
    for i, s in enumerate(sequential):
        if s not in SEQUENTIAL:
            c.fail(f"medseqft.sequential[{i}]", f"unknown sequential row {s!r}", f"choose from {list(SEQUENTIAL)}")
        if sequential.count(s) > 1:
            c.fail("medseqft.sequential", f"{s!r} is listed twice", "list each row once")
    for s in SEQUENTIAL:  # Table III's order
        if s in sequential:
            method, buffer, retention = SEQUENTIAL[s]
            rows.append(Row(s, "sequential", method, buffer=buffer, retention=retention, display=display_name(s)))
    if not rows:
        c.fail("medseqft", "no rows", "list parallel, joint or sequential rows")
    if not foundation.pretext:
        mds = [r.name for r in rows if r.buffer == "mds"]
        if mds:
            c.fail("medseqft.sequential", f"{mds} select the buffer by MDS, which needs the foundation's pretext head",
                   "use a self-supervised foundation (objective: mae, or a model with a pretext head) or drop "
                   "those rows")
        decoder = [r.name for r in rows if r.kind == "parallel" and "-decoder" in r.name]
        if decoder:
            c.fail("medseqft.parallel", f"{decoder} choose what to do with a pretext decoder, which this foundation "
                   "does not have", "drop their decoder setting")
    return rows


def _unseen_rows(c: Check, m: dict, rows: list[Row], unseen: list[Dataset]) -> tuple[list[str], str | None]:
    """Table VI's rows on the unseen tasks, and the sequential row whose final model ``fft-mn`` starts from."""
    unseen_rows = m.get("unseen", [])
    if not isinstance(unseen_rows, list):
        c.fail("medseqft.unseen", f"{unseen_rows!r} is not a list", f"choose from {list(UNSEEN_ROWS)}")
    for i, u in enumerate(unseen_rows):
        if u not in UNSEEN_ROWS:
            c.fail(f"medseqft.unseen[{i}]", f"unknown unseen row {u!r}", f"choose from {list(UNSEEN_ROWS)}")
        if unseen_rows.count(u) > 1:
            c.fail("medseqft.unseen", f"{u!r} is listed twice", "list each row once")
    if unseen_rows and not unseen:
        c.fail("medseqft.unseen", "rows for unseen tasks, but stream.unseen selects none",
               "list unseen tasks in stream.unseen or drop medseqft.unseen")
    refined_by = None
    if "fft-mn" in unseen_rows:
        refined_by = m.get("refined_by", "medseqft")
        seq_rows = [r.name for r in rows if r.kind == "sequential"]
        if refined_by not in seq_rows:
            c.fail("medseqft.refined_by", f"{refined_by!r} is not a sequential row of this grid",
                   f"choose from {seq_rows} (fft-mn fine-tunes the model that row leaves after the last task)")
    elif m.get("refined_by") is not None:
        c.fail("medseqft.refined_by", "is set but medseqft.unseen has no fft-mn row", "remove it or add fft-mn")
    return unseen_rows, refined_by


# ---------------------------------------------------------------------------------------------- cells

def row_settings(config: MedseqftConfig, row: Row) -> dict[str, Any]:
    """What of ``row`` can change its result: the seqft method and only the settings it uses."""
    if row.kind == "parallel":
        return {"method": row.method, "options": dict(row.options)}
    if row.kind == "joint":
        return {"method": JOINT}
    out: dict[str, Any] = {"method": row.method, "buffer": row.buffer, "retention": row.retention}
    if row.buffer != "none":
        out["buffer_size"] = config.buffer_size
    if row.buffer == "mds":
        out["mds_repeats"] = config.mds_repeats
    if row.buffer != "none" and config.kd_fft != "separate":  # named where not the earlier reading (keys stay)
        out["kd_fft"] = config.kd_fft
        if config.kd_fft == "joint":
            out["kd_weight"] = 1.0
    if row.retention == "lora-kd":
        out["kd_rank"] = config.kd_rank
        out["kd_recipe"] = config.kd_recipe
        out["kd_until"] = config.kd_until
    return out


def experiments(config: MedseqftConfig, row: Row) -> list[str]:
    """The report parts a stream row's cells serve."""
    out = []
    if row.kind in ("parallel", "joint") or row.name == "medseqft":
        out.append("table2")
    if row.name in ABLATION_MARKS:
        out.append("table3")
    if row.name == config.refined_by:
        out.append("table6")
    if row.name == "full" or row.kind in ("joint", "sequential"):
        out.append("table7")
    if row.kind == "sequential":
        out += ["fig4", "transfer"]
    elif row.name == "full":
        out.append("transfer")
    return out


def enumerate_cells(config: MedseqftConfig, digests: dict[str, Any] | None = None) -> list[Cell]:
    """Every cell: the stream cells (row, seed) in row order, then the unseen cells (task, row, seed); their
    keys name the inputs' ``digests`` (the harness's: the foundation's weights, each task's data) and the code's
    :data:`NUMERICS` version."""
    from medadapt.inference.predictor import DEFAULT_OVERLAP  # (not at import: it loads MONAI)

    common = {"format": CELL_FORMAT, "split_seed": config.split_seed, "shots": config.shots,
              "recipe": config.recipe, "postprocess": config.postprocess, "foundation": config.foundation_key(),
              "numerics": NUMERICS}
    if config.overlap != DEFAULT_OVERLAP:  # in the key only when set (the committed cells' keys stay)
        common["overlap"] = config.overlap
    digests = digests or {}
    data = digests.get("data") or {}
    stream_key = config.stream_key()
    cells: list[Cell] = []
    by_row_seed: dict[tuple[str, int], Cell] = {}
    for row in config.rows:
        for seed in config.seeds:
            key = {**common, "kind": "stream", "stream": stream_key, "row": row_settings(config, row), "seed": seed,
                   "inputs": {"foundation": digests.get("foundation"),
                              "data": {t.name: data.get(t.name) for t in config.tasks}}}
            cell = Cell.stream(row.name, seed, key, experiments(config, row))
            cells.append(cell)
            by_row_seed[(row.name, seed)] = cell
    for task in config.unseen:
        dataset = config.dataset_key(task)
        for name in config.unseen_rows:
            method, start = UNSEEN_ROWS[name]
            for seed in config.seeds:
                key = {**common, "kind": "unseen", "dataset": dataset, "method": method, "seed": seed,
                       "inputs": {"foundation": digests.get("foundation"), "data": data.get(task.name)}}
                depends = None
                if start == "refined":
                    source = by_row_seed[(config.refined_by, seed)]
                    key["refined_from"] = {"row": config.refined_by, "cell": source.hash}
                    depends = source.cell_id
                cells.append(Cell.unseen(task.name, name, seed, key, depends, ["table6"]))
    return cells


# ---------------------------------------------------------------------------------------------- work folder

def grid_paths(config: MedseqftConfig, workdir: str | Path) -> GridPaths:
    """The work folder's layout (:func:`medadapt.benchmark.config.grid_paths`) with the stream's folder."""
    data = Path(workdir).resolve() / "data"
    stream_dir = data / f"{config.stream['name']}-{stable_hash(config.stream_key(), 8)}"
    return config_grid_paths(config, workdir, str(stream_dir))
