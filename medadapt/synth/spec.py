"""Domain specs: the declarative description of one synthetic CT cohort (region, scanner, nodes, annotation,
and which structures the label map holds).

A spec is a YAML or JSON file; ``docs/domains.md`` documents every field. Parsing is strict: an unknown key, a
wrong type or an out-of-range value raises :class:`~medadapt.errors.MedadaptError` naming the file, the key
(``scanner.spacing_mm``) and the fix. Built-in domains live in ``medadapt/synth/domains/<name>.yaml``.
"""
from __future__ import annotations

import difflib
import json
import math
import os
import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from medadapt.utils.yamlfile import DuplicateKey as _DuplicateKey
from medadapt.utils.yamlfile import UniqueKeyLoader as _UniqueKeyLoader
from medadapt.errors import MedadaptError
from medadapt.synth.structures import STRUCTURES, structures_of

REGIONS = ("head_neck", "mediastinum")
CONTRAST_PHASES = ("none", "arterial", "venous")
SIZE_DISTRIBUTIONS = ("log_uniform", "uniform")
SPEC_SUFFIXES = (".yaml", ".yml", ".json")
DOMAINS_DIR = Path(__file__).resolve().parent / "domains"
_PREFIX_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]*$")
_LABEL_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_-]*$")
MAX_LABEL_ID = 255  # uint8 label maps
DEFAULT_LABELS = {"background": 0, "lymph_node": 1}


# --------------------------------------------------------------------------------------------------------------
# Sections
# --------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ScannerSpec:
    """Acquisition and reconstruction: voxel grid, resolution, noise, HU calibration, contrast timing."""

    spacing_mm: tuple[float, float, float] = (3.0, 2.0, 2.0)
    slice_thickness_mm: float = 3.0
    blur_sigma_mm: float = 0.7
    noise_std_hu: float = 15.0
    hu_offset: float = 0.0
    hu_scale: float = 1.0
    contrast_phase: str = "arterial"


@dataclass(frozen=True)
class PatientSpec:
    """Between-patient anatomical variability."""

    scale: tuple[float, float] = (0.9, 1.1)
    fat_thickness_mm: tuple[float, float] = (4.0, 14.0)
    shift_mm: float = 6.0
    rotation_deg: float = 5.0


@dataclass(frozen=True)
class NodeSpec:
    """Lymph-node statistics, per scan."""

    count: tuple[int, int] = (2, 30)
    long_axis_mm: tuple[float, float] = (3.0, 30.0)
    size_distribution: str = "log_uniform"
    short_to_long: tuple[float, float] = (0.4, 1.0)
    hu: tuple[float, float] = (20.0, 60.0)
    necrotic_fraction: float = 0.15
    necrotic_min_long_axis_mm: float = 10.0
    necrotic_hu: tuple[float, float] = (10.0, 20.0)
    cluster_fraction: float = 0.5


@dataclass(frozen=True)
class AnnotationSpec:
    """Which nodes are labelled: the rest are in the image but not in the label map."""

    min_annotated_diameter_mm: float = 0.0
    annotated_fraction: float = 1.0


@dataclass(frozen=True)
class LabelSpec:
    """One class of the label map: its name in ``dataset.json``, its id, and the structures it holds (see
    :mod:`medadapt.synth.structures`; usually just one, the structure the label is named after)."""

    name: str
    id: int
    structures: tuple[str, ...]


@dataclass(frozen=True)
class DomainSpec:
    """One synthetic cohort. Build it with :func:`load_domain` or :meth:`from_dict` (both validate)."""

    name: str
    region: str
    description: str = ""
    case_prefix: str = ""
    shape: tuple[int, int, int] = (48, 112, 112)
    scanner: ScannerSpec = field(default_factory=ScannerSpec)
    patient: PatientSpec = field(default_factory=PatientSpec)
    nodes: NodeSpec = field(default_factory=NodeSpec)
    annotation: AnnotationSpec = field(default_factory=AnnotationSpec)
    labels: tuple[LabelSpec, ...] | None = None
    source: str | None = field(default=None, compare=False, repr=False)

    @property
    def spacing(self) -> tuple[float, float, float]:
        return self.scanner.spacing_mm

    @property
    def field_of_view_mm(self) -> tuple[float, float, float]:
        return tuple(float(n * s) for n, s in zip(self.shape, self.scanner.spacing_mm))  # type: ignore[return-value]

    def case_id(self, index: int) -> str:
        return f"{self.case_prefix}_{index:03d}"

    @property
    def dataset_labels(self) -> dict[str, int]:
        """The ``labels`` entry of ``dataset.json`` (nnU-Net v2: name -> id, background 0, ids 1..N in order)."""
        if self.labels is None:
            return dict(DEFAULT_LABELS)
        return {"background": 0, **{lab.name: lab.id for lab in sorted(self.labels, key=lambda lab: lab.id)}}

    @property
    def labelled_structures(self) -> list[str]:
        """Every structure written into the label map (``["lymph_node"]`` without a ``labels`` map)."""
        if self.labels is None:
            return ["lymph_node"]
        return [s for lab in sorted(self.labels, key=lambda lab: lab.id) for s in lab.structures]

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict; ``DomainSpec.from_dict(spec.to_dict())`` gives back an equal spec."""
        out: dict[str, Any] = {
            "name": self.name,
            "description": self.description,
            "region": self.region,
            "case_prefix": self.case_prefix,
            "shape": list(self.shape),
        }
        for section in ("scanner", "patient", "nodes", "annotation"):
            obj = getattr(self, section)
            out[section] = {f.name: _plain(getattr(obj, f.name)) for f in fields(obj)}
        if self.labels is not None:  # absent when not set: a lymph-node-only domain's dict is what it always was
            out["labels"] = {lab.name: (lab.id if lab.structures == (lab.name,) else
                                        {"id": lab.id, "structures": list(lab.structures)})
                             for lab in sorted(self.labels, key=lambda lab: lab.id)}
        return out

    @classmethod
    def from_dict(cls, data: Any, source: str = "<domain spec>", default_name: str | None = None) -> "DomainSpec":
        return _parse_domain(data, source, default_name)

    def downsampled(self, factors: "int | tuple[int, int, int]") -> "DomainSpec":
        """The same field of view with ``factors`` (one per axis z, y, x, or one for all) times fewer voxels:
        coarser voxels and thicker slices, for CPU-sized runs (the demo and the default benchmark grid)."""
        f = (factors,) * 3 if isinstance(factors, int) else tuple(int(v) for v in factors)
        if all(v == 1 for v in f):
            return self
        return self.replace(shape=[max(8, s // v) for s, v in zip(self.shape, f)],
                            scanner={"spacing_mm": [v * k for v, k in zip(self.scanner.spacing_mm, f)],
                                     "slice_thickness_mm": self.scanner.slice_thickness_mm * f[0]})

    def replace(self, **changes: Any) -> "DomainSpec":
        """A validated copy with top-level fields or whole sections (as dicts) replaced. ``labels`` is replaced
        as a whole (a ``labels`` map as in a spec file; ``None`` goes back to lymph nodes only)."""
        data = self.to_dict()
        for key, value in changes.items():
            if key == "labels":
                if value is None:
                    data.pop("labels", None)
                else:
                    data["labels"] = value
            elif isinstance(value, dict) and isinstance(data.get(key), dict):
                data[key] = {**data[key], **value}
            else:
                data[key] = _plain(value)
        return _parse_domain(data, self.source or f"<domain {self.name}>", None)


def _plain(v: Any) -> Any:
    if isinstance(v, tuple):
        return [_plain(x) for x in v]
    if isinstance(v, (ScannerSpec, PatientSpec, NodeSpec, AnnotationSpec)):
        return {f.name: _plain(getattr(v, f.name)) for f in fields(v)}
    return v


# --------------------------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------------------------
def builtin_domains() -> list[str]:
    """Names of the built-in domains (``medadapt/synth/domains/*.yaml``), sorted."""
    if not DOMAINS_DIR.is_dir():
        return []
    return sorted(p.stem for p in DOMAINS_DIR.glob("*.yaml"))


def load_domain(domain: "str | os.PathLike[str] | DomainSpec") -> DomainSpec:
    """A built-in domain name (see :func:`builtin_domains`) or a path to a .yaml/.yml/.json spec file."""
    if isinstance(domain, DomainSpec):
        return domain
    text = os.fspath(domain)
    builtins = builtin_domains()
    if text in builtins:
        return load_spec_file(DOMAINS_DIR / f"{text}.yaml")
    path = Path(text).expanduser()
    if not path.is_file():
        raise MedadaptError(
            f"domain '{text}': not a built-in domain ({', '.join(builtins) or 'none installed'}) and no such file; "
            "pass a built-in name or the path to a .yaml/.yml/.json domain spec (see docs/domains.md)"
        )
    return load_spec_file(path)


def load_spec_file(path: "str | os.PathLike[str]") -> DomainSpec:
    path = Path(path)
    src = str(path)
    if path.suffix.lower() not in SPEC_SUFFIXES:
        raise MedadaptError(f"{src}: a domain spec must be a .yaml, .yml or .json file; rename it or convert it")
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise MedadaptError(f"{src}: cannot be read ({exc.strerror}); check the path and permissions") from None
    try:
        data = json.loads(text, object_pairs_hook=_unique_json) if path.suffix.lower() == ".json" else \
            yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 (a SafeLoader)
    except _DuplicateKey as exc:
        raise MedadaptError(f"{src}: {exc}; keep one of them (a repeated key silently replaces the first)") from None
    except (yaml.YAMLError, json.JSONDecodeError, ValueError) as exc:
        msg = " ".join(str(exc).split())
        raise MedadaptError(f"{src}: not valid {'JSON' if path.suffix.lower() == '.json' else 'YAML'} ({msg}); fix the syntax") from None
    return _parse_domain(data, src, path.stem)


def _unique_json(pairs: list) -> dict:
    out: dict = {}
    for k, v in pairs:
        if k in out:
            raise _DuplicateKey(f"key '{k}' appears twice in one object")
        out[k] = v
    return out




# --------------------------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------------------------
class SpecCheck:
    def __init__(self, source: str):
        self.source = source

    def fail(self, key: str, problem: str, fix: str) -> None:
        raise MedadaptError(f"{self.source}: '{key}' {problem}; {fix} (see docs/domains.md)")

    # scalar checks ------------------------------------------------------------------------------------------
    def number(self, v: Any, key: str, lo: float | None = None, hi: float | None = None, *, lo_open: bool = False,
               integer: bool = False) -> float:
        kind = "an integer" if integer else "a number"
        ok_type = isinstance(v, int) if integer else isinstance(v, (int, float))
        if isinstance(v, bool) or not ok_type or (isinstance(v, float) and not math.isfinite(v)):
            self.fail(key, f"must be {kind}, got {v!r}", f"write {kind}{self._bounds(lo, hi, lo_open)}")
        if lo is not None and (v <= lo if lo_open else v < lo):
            self.fail(key, f"is {v!r}, too small", f"use {kind}{self._bounds(lo, hi, lo_open)}")
        if hi is not None and v > hi:
            self.fail(key, f"is {v!r}, too large", f"use {kind}{self._bounds(lo, hi, lo_open)}")
        return int(v) if integer else float(v)

    @staticmethod
    def _bounds(lo: float | None, hi: float | None, lo_open: bool) -> str:
        if lo is not None and hi is not None:
            return f" {'>' if lo_open else '>='} {lo:g} and <= {hi:g}"
        if lo is not None:
            return f" {'>' if lo_open else '>='} {lo:g}"
        if hi is not None:
            return f" <= {hi:g}"
        return ""

    def vector(self, v: Any, key: str, n: int, lo: float | None, hi: float | None, *, lo_open: bool = False,
               integer: bool = False, what: str = "") -> tuple:
        if not isinstance(v, (list, tuple)) or len(v) != n:
            self.fail(key, f"must be a list of {n} {'integers' if integer else 'numbers'}{what}, got {v!r}",
                      f"write it as [{', '.join(['...'] * n)}]")
        return tuple(self.number(x, f"{key}[{i}]", lo, hi, lo_open=lo_open, integer=integer) for i, x in enumerate(v))

    def span(self, v: Any, key: str, lo: float | None, hi: float | None, *, lo_open: bool = False,
             integer: bool = False) -> tuple:
        pair = self.vector(v, key, 2, lo, hi, lo_open=lo_open, integer=integer, what=" [min, max]")
        if pair[0] > pair[1]:
            self.fail(key, f"has min {pair[0]!r} > max {pair[1]!r}", "write it as [min, max]")
        return pair

    def choice(self, v: Any, key: str, options: tuple[str, ...]) -> str:
        if not isinstance(v, str) or v not in options:
            self.fail(key, f"is {v!r}", f"use one of: {', '.join(options)}")
        return v

    def string(self, v: Any, key: str) -> str:
        if not isinstance(v, str):
            self.fail(key, f"must be a string, got {v!r}", "quote it")
        return v

    def mapping(self, v: Any, key: str, allowed: list[str]) -> dict:
        if v is None:
            return {}
        if not isinstance(v, dict):
            self.fail(key, f"must be a mapping (key: value lines), got {type(v).__name__}",
                      f"give it the keys {', '.join(allowed)}")
        for k in v:
            if k not in allowed:
                where = f"{key}.{k}" if key else str(k)
                self.fail(where, "is not a known key", f"remove it or use one of: {', '.join(allowed)}")
        return v


def _names(cls: type) -> list[str]:
    return [f.name for f in fields(cls)]


def _parse_domain(data: Any, source: str, default_name: str | None) -> DomainSpec:
    c = SpecCheck(source)
    top_keys = [k for k in _names(DomainSpec) if k != "source"]
    if not isinstance(data, dict):
        raise MedadaptError(
            f"{source}: a domain spec must be a mapping with keys such as name, region, shape, scanner, nodes, "
            f"annotation, got {type(data).__name__}; see docs/domains.md"
        )
    c.mapping(data, "", top_keys)

    name = data.get("name", default_name)
    if name is None:
        c.fail("name", "is missing", "add name: <domain-name>")
    name = c.string(name, "name")
    if not name.strip():
        c.fail("name", "is empty", "give the domain a name")
    if "region" not in data:
        c.fail("region", "is missing", f"add region: one of {', '.join(REGIONS)}")
    region = c.choice(data["region"], "region", REGIONS)
    description = c.string(data.get("description", ""), "description")
    prefix = data.get("case_prefix")
    if prefix is None:
        prefix = re.sub(r"[^A-Za-z0-9]", "", name) or "case"
    prefix = c.string(prefix, "case_prefix")
    if not _PREFIX_RE.match(prefix):
        c.fail("case_prefix", f"is {prefix!r}", "use letters, digits, '-' and '_' only, starting with a letter or digit")
    shape = c.vector(data.get("shape", [48, 112, 112]), "shape", 3, 8, 1024, integer=True, what=" [z, y, x] in voxels")

    sc_raw = c.mapping(data.get("scanner"), "scanner", _names(ScannerSpec))
    spacing = c.vector(sc_raw.get("spacing_mm", [3.0, 2.0, 2.0]), "scanner.spacing_mm", 3, 0.0, 20.0, lo_open=True,
                       what=" [z, y, x] in mm")
    scanner = ScannerSpec(
        spacing_mm=spacing,
        slice_thickness_mm=c.number(sc_raw.get("slice_thickness_mm", spacing[0]), "scanner.slice_thickness_mm",
                                    0.0, 20.0, lo_open=True),
        blur_sigma_mm=c.number(sc_raw.get("blur_sigma_mm", 0.7), "scanner.blur_sigma_mm", 0.0, 10.0),
        noise_std_hu=c.number(sc_raw.get("noise_std_hu", 15.0), "scanner.noise_std_hu", 0.0, 500.0),
        hu_offset=c.number(sc_raw.get("hu_offset", 0.0), "scanner.hu_offset", -500.0, 500.0),
        hu_scale=c.number(sc_raw.get("hu_scale", 1.0), "scanner.hu_scale", 0.5, 2.0),
        contrast_phase=c.choice(sc_raw.get("contrast_phase", "arterial"), "scanner.contrast_phase", CONTRAST_PHASES),
    )

    pa_raw = c.mapping(data.get("patient"), "patient", _names(PatientSpec))
    patient = PatientSpec(
        scale=c.span(pa_raw.get("scale", [0.9, 1.1]), "patient.scale", 0.6, 1.4),
        fat_thickness_mm=c.span(pa_raw.get("fat_thickness_mm", [4.0, 14.0]), "patient.fat_thickness_mm", 0.0, 40.0),
        shift_mm=c.number(pa_raw.get("shift_mm", 6.0), "patient.shift_mm", 0.0, 50.0),
        rotation_deg=c.number(pa_raw.get("rotation_deg", 5.0), "patient.rotation_deg", 0.0, 30.0),
    )

    no_raw = c.mapping(data.get("nodes"), "nodes", _names(NodeSpec))
    nodes = NodeSpec(
        count=c.span(no_raw.get("count", [2, 30]), "nodes.count", 0, 60, integer=True),
        long_axis_mm=c.span(no_raw.get("long_axis_mm", [3.0, 30.0]), "nodes.long_axis_mm", 1.0, 60.0),
        size_distribution=c.choice(no_raw.get("size_distribution", "log_uniform"), "nodes.size_distribution",
                                   SIZE_DISTRIBUTIONS),
        short_to_long=c.span(no_raw.get("short_to_long", [0.4, 1.0]), "nodes.short_to_long", 0.1, 1.0),
        hu=c.span(no_raw.get("hu", [20.0, 60.0]), "nodes.hu", -200.0, 300.0),
        necrotic_fraction=c.number(no_raw.get("necrotic_fraction", 0.15), "nodes.necrotic_fraction", 0.0, 1.0),
        necrotic_min_long_axis_mm=c.number(no_raw.get("necrotic_min_long_axis_mm", 10.0),
                                           "nodes.necrotic_min_long_axis_mm", 0.0, 60.0),
        necrotic_hu=c.span(no_raw.get("necrotic_hu", [10.0, 20.0]), "nodes.necrotic_hu", -200.0, 300.0),
        cluster_fraction=c.number(no_raw.get("cluster_fraction", 0.5), "nodes.cluster_fraction", 0.0, 1.0),
    )

    an_raw = c.mapping(data.get("annotation"), "annotation", _names(AnnotationSpec))
    annotation = AnnotationSpec(
        min_annotated_diameter_mm=c.number(an_raw.get("min_annotated_diameter_mm", 0.0),
                                           "annotation.min_annotated_diameter_mm", 0.0, 100.0),
        annotated_fraction=c.number(an_raw.get("annotated_fraction", 1.0), "annotation.annotated_fraction", 0.0, 1.0),
    )
    labels = _parse_labels(c, data["labels"], region) if "labels" in data else None
    return DomainSpec(name=name, region=region, description=description, case_prefix=prefix, shape=shape,
                      scanner=scanner, patient=patient, nodes=nodes, annotation=annotation, labels=labels,
                      source=source)


def _structure(c: SpecCheck, value: Any, key: str, region: str) -> str:
    """A structure name drawn in ``region``, or a one-line error at ``key``."""
    if not isinstance(value, str):
        c.fail(key, f"must be a structure name, got {value!r}", "write a name such as thyroid or aorta")
    if value not in STRUCTURES:
        close = difflib.get_close_matches(value, list(STRUCTURES), n=1)
        hint = f"did you mean {close[0]}? " if close else ""
        c.fail(key, f"names {value!r}, which is not a known structure",
               f"{hint}use one of the {region} structures: {', '.join(structures_of(region))}")
    if region not in STRUCTURES[value].regions:
        c.fail(key, f"names {value!r}, which the {region} phantom does not draw",
               f"use one of the {region} structures: {', '.join(structures_of(region))}")
    return value


def _parse_labels(c: SpecCheck, raw: Any, region: str) -> tuple[LabelSpec, ...]:
    """``labels``: ``name: id`` (the structure of that name) or ``name: {id: N, structures: [a, b]}`` (one class
    holding several structures). Ids must be 1..N, each used once; a structure may be in one label only."""
    example = "e.g. labels: {thyroid: 1, carotid_artery: 2}"
    if not isinstance(raw, dict):
        c.fail("labels", f"must be a mapping of label name -> id, got {type(raw).__name__}", example)
    if not raw:
        c.fail("labels", "is empty", f"name at least one structure ({example}), or remove the key to label lymph "
                                     "nodes only")
    out: list[LabelSpec] = []
    by_id: dict[int, str] = {}
    owner: dict[str, str] = {}
    for name, value in raw.items():
        key = f"labels.{name}"
        if isinstance(name, int) and not isinstance(name, bool) and isinstance(value, str):
            c.fail(key, f"maps the id {name} to the name {value!r}",
                   f"write name: id ({value}: {name}), as nnU-Net v2's dataset.json does")
        if not isinstance(name, str) or not _LABEL_RE.match(name):
            c.fail(key, f"is not a usable label name ({name!r})",
                   "use letters, digits, '_' and '-', starting with a letter")
        if name.lower() in ("background", "ignore"):
            c.fail(key, f"is reserved ({name.lower()} is not a structure)",
                   "remove it: background is always 0 and every other voxel is labelled by its structure")
        if isinstance(value, dict):
            c.mapping(value, key, ["id", "structures"])
            if "id" not in value:
                c.fail(f"{key}.id", "is missing", f"add id: <1..N> ({example})")
            ident = value["id"]
            id_key = f"{key}.id"
            raw_structs = value.get("structures", [name])
            if not isinstance(raw_structs, (list, tuple)) or not raw_structs:
                c.fail(f"{key}.structures", f"must be a non-empty list of structure names, got {raw_structs!r}",
                       f"write e.g. structures: [{name if name in STRUCTURES else 'aorta'}]")
            structs = tuple(_structure(c, v, f"{key}.structures[{i}]", region) for i, v in enumerate(raw_structs))
            if name in STRUCTURES and name not in structs:
                c.fail(f"{key}.structures", f"does not hold {name!r}, the structure this label is named after",
                       f"add {name} to the list, or give the label another name")
        else:
            ident, id_key = value, key
            structs = (_structure(c, name, key, region),)
        if isinstance(ident, int) and not isinstance(ident, bool) and ident == 0:
            c.fail(id_key, "is 0, which nnU-Net reserves for background",
                   f"give every label its own id from 1 to N ({example})")
        ident = int(c.number(ident, id_key, 1, MAX_LABEL_ID, integer=True))
        if ident in by_id:
            c.fail(id_key, f"is {ident}, already the id of label {by_id[ident]!r}",
                   "give every label its own id from 1 to N")
        for i, st in enumerate(structs):
            if st in owner:
                where = f"{key}.structures[{i}]" if isinstance(value, dict) else key
                c.fail(where, f"puts {st!r} in a second label (it is already in {owner[st]!r})",
                       "a voxel holds one class: list each structure in one label only")
            owner[st] = name
        by_id[ident] = name
        out.append(LabelSpec(name=name, id=ident, structures=structs))
    ids = sorted(by_id)
    if ids != list(range(1, len(ids) + 1)):
        c.fail("labels", f"has the ids {ids}", f"nnU-Net v2 needs consecutive ids 1..{len(ids)}; renumber them")
    return tuple(sorted(out, key=lambda lab: lab.id))
