"""Training recipes as data: everything the engine trains with comes from here, nothing is hard-coded there.

A recipe names the optimiser, the learning-rate schedule, the loss, the budget (epochs × iterations per
epoch), the gradient clipping, optionally the batch and patch size (the network's own otherwise), the initial
learning rate and learning rates per method. It is plain data (YAML or JSON; the built-ins live in
``medadapt/engine/recipes/``), validated on load with one error line naming the file and key, and recorded
resolved in every ``run.json``. The engine (:class:`medadapt.engine.Trainer`) builds its optimiser, schedule
and loss from the names through the registries below, and knows no method and no paper; new optimisers,
schedules or losses register a builder here.

Schedules are evaluated once per epoch, as nnU-Net does (``lr = initial_lr * factor(epoch)``):

* ``poly``: ``(1 - epoch / epochs) ** power`` (nnU-Net: power 0.9);
* ``cosine``: a linear warm-up over ``warmup_epochs`` from ``warmup_start`` × lr, then cosine decay to
  ``min_factor`` × lr at the last epoch (MONAI's ``WarmupCosineSchedule`` evaluated per epoch);
* ``constant``.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from dataclasses import replace as dataclasses_replace
from importlib import resources
from pathlib import Path
from typing import Any, Callable, Mapping

import torch

from medadapt.errors import MedadaptError
from medadapt.utils.yamlfile import read_yaml

# name -> (constructor, default options); the options a recipe may give are exactly the defaults' keys
OPTIMIZERS: dict[str, tuple[Callable[..., torch.optim.Optimizer], dict[str, Any]]] = {
    "sgd": (torch.optim.SGD, {"momentum": 0.99, "nesterov": True, "weight_decay": 3e-5}),
    "adamw": (torch.optim.AdamW, {"betas": [0.9, 0.999], "eps": 1e-8, "weight_decay": 1e-2}),
}

SCHEDULES: dict[str, dict[str, Any]] = {
    "poly": {"power": 0.9},
    "cosine": {"warmup_epochs": 0, "warmup_start": 0.0, "min_factor": 0.0},
    "constant": {},
}

# name -> default options; builders in medadapt.engine.losses.build_loss. The terms take the form of the model's
# output activation: softmax -> soft Dice + categorical CE; sigmoid -> soft Dice + binary CE, masked per case to
# the classes it annotates (partially labelled data). batch_dice: Dice sums over the batch (nnU-Net's 3d_fullres
# default) or per sample (FSEFT's Eq. 1). mae: masked-volume reconstruction (a masked autoencoder's MSE over the
# masked voxels, medadapt.ssl.mae); its options are the masking (blocks of block_size voxels, the fraction
# mask_ratio of them masked), which the workflow's sampler applies; defaults: nnssl's BaseMAETrainer.
LOSSES: dict[str, dict[str, Any]] = {
    "dice_ce": {"batch_dice": True},   # nnU-Net's Dice + CE (sigmoid: Dice + BCE) with deep supervision
    "dice": {"batch_dice": True},      # soft Dice alone, deep-supervised
    "mae": {"block_size": [16, 16, 16], "mask_ratio": 0.75},
}
#: options a loss may name beyond its defaults, recorded only when given (so recipes without them keep their
#: records and hashes): the soft Dice's smoothing (nnU-Net's 1e-5 when absent; FSEFT's code uses 1)
OPTIONAL_LOSS_OPTIONS: dict[str, tuple[str, ...]] = {"dice_ce": ("smooth",), "dice": ("smooth",), "mae": ()}

#: a recipe's augmentation presets (medadapt.data.augmentation.augmentation_preset builds them)
AUGMENTATIONS = ("nnunet", "fseft")
#: how a fresh segmentation head is initialised: nnU-Net's He-normal (slope 1e-2, zero bias), or PyTorch's
#: default for a new convolution (FSEFT's code: a new ``nn.Conv3d`` classifier)
HEAD_INITS = ("nnunet", "torch")
#: per-method settings a recipe's ``methods`` entry may replace
METHOD_KEYS = ("lr", "epochs", "iterations_per_epoch", "batch_size", "patches_per_case")
#: ``iterations_per_epoch: cases``: an epoch is one pass over the training cases (FSEFT's code: a DataLoader
#: over the k support volumes, ``drop_last``), i.e. k // (cases per batch) iterations, at least one
EPOCH_OF_CASES = "cases"


def lr_factor(schedule: Mapping[str, Any], epoch: int, epochs: int) -> float:
    """The learning-rate multiplier of ``schedule`` (a recipe's resolved schedule mapping) at ``epoch``."""
    name = schedule["name"]
    if name == "poly":
        return (1 - epoch / epochs) ** schedule["power"]
    if name == "cosine":
        warm = int(schedule["warmup_epochs"])
        if epoch < warm:
            start = float(schedule["warmup_start"])
            return start + (1 - start) * epoch / warm
        span = max(1, epochs - warm - 1)
        progress = min(1.0, (epoch - warm) / span)
        low = float(schedule["min_factor"])
        return low + (1 - low) * 0.5 * (1 + math.cos(math.pi * progress))
    return 1.0


@dataclass(frozen=True)
class Recipe:
    name: str
    optimizer: dict[str, Any]
    schedule: dict[str, Any]
    loss: dict[str, Any]
    epochs: int
    iterations_per_epoch: "int | str"  #: or "cases" (EPOCH_OF_CASES), resolved by :meth:`for_cases`
    lr: float
    method_lr: dict[str, float] = field(default_factory=dict)
    grad_clip: float | None = 12.0
    batch_size: int | None = None
    #: patches drawn from each sampled case (FSEFT: 6 patches of one volume per step); batch_size must be a multiple
    patches_per_case: int = 1
    patch_size: tuple[int, int, int] | None = None
    description: str = ""
    source: str = ""
    #: the training augmentation preset (AUGMENTATIONS): nnU-Net's pipeline, or FSEFT's code's
    augmentation: str = "nnunet"
    #: a fresh head's initialisation (HEAD_INITS)
    head_init: str = "nnunet"
    #: False: train without deep supervision (the loss on the full-resolution output only); None: the network's
    deep_supervision: bool | None = None
    #: per-method replacements of lr, epochs, iterations_per_epoch, batch_size, patches_per_case
    methods: dict[str, dict[str, Any]] = field(default_factory=dict)

    def lr_for(self, method: str) -> float:
        """The initial learning rate of ``method``: its ``methods`` entry, else ``method_lr``, else ``lr``."""
        entry = self.methods.get(method, {})
        return float(entry.get("lr", self.method_lr.get(method, self.lr)))

    def for_method(self, method: str) -> "Recipe":
        """This recipe with ``method``'s entry of ``methods`` applied (budget, batch and learning rate); the
        recipe itself where it has none, so the records of recipes without ``methods`` are unchanged."""
        entry = self.methods.get(method)
        if not entry:
            return self
        data = self.to_dict()
        data.update({k: v for k, v in entry.items() if k != "lr"})
        data["lr"] = self.lr_for(method)
        data["method_lr"] = {}
        data["methods"] = {}
        return parse_recipe(data, source=f"{self.source or self.name} (method {method})")

    def for_cases(self, cases: int) -> "Recipe":
        """This recipe with ``iterations_per_epoch: cases`` resolved for ``cases`` training cases (one pass:
        ``cases // (batch_size / patches_per_case)`` iterations, at least one); itself otherwise."""
        if self.iterations_per_epoch != EPOCH_OF_CASES:
            return self
        per_batch = (self.batch_size or self.patches_per_case) // self.patches_per_case
        return dataclasses_replace(self, iterations_per_epoch=max(1, int(cases) // max(1, per_batch)))

    def lr_factor(self, epoch: int) -> float:
        return lr_factor(self.schedule, epoch, self.epochs)

    def with_overrides(self, **changes: Any) -> "Recipe":
        """A copy with the given fields replaced (None values are ignored): the CLI's individual flags."""
        changes = {k: v for k, v in changes.items() if v is not None}
        if not changes:
            return self
        data = self.to_dict()
        data.update(changes)
        return parse_recipe(data, source=f"{self.source or self.name} + command-line options")

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "description": self.description, "optimizer": copy.deepcopy(self.optimizer),
                "schedule": copy.deepcopy(self.schedule), "loss": copy.deepcopy(self.loss),
                "epochs": self.epochs, "iterations_per_epoch": self.iterations_per_epoch, "lr": self.lr,
                "method_lr": dict(self.method_lr), "grad_clip": self.grad_clip, "batch_size": self.batch_size,
                "patches_per_case": self.patches_per_case,
                "patch_size": list(self.patch_size) if self.patch_size else None,
                # the newer settings only when they are not the defaults: older recipes keep their records
                **({"augmentation": self.augmentation} if self.augmentation != "nnunet" else {}),
                **({"head_init": self.head_init} if self.head_init != "nnunet" else {}),
                **({"deep_supervision": self.deep_supervision} if self.deep_supervision is not None else {}),
                **({"methods": copy.deepcopy(self.methods)} if self.methods else {})}


# ----------------------------------------------------------------------------------------------- loading

def builtin_recipe_names() -> list[str]:
    folder = resources.files("medadapt.engine") / "recipes"
    return sorted(p.name[:-5] for p in folder.iterdir() if p.name.endswith(".yaml"))


def load_recipe(recipe: "str | Path | Mapping[str, Any] | Recipe") -> Recipe:
    """A built-in recipe by name, a YAML/JSON recipe file, a mapping, or a Recipe (returned as is)."""
    if isinstance(recipe, Recipe):
        return recipe
    if isinstance(recipe, Mapping):
        return parse_recipe(recipe, source="<recipe>")
    text = str(recipe)
    if text in builtin_recipe_names():
        path = Path(str(resources.files("medadapt.engine") / "recipes" / f"{text}.yaml"))
    else:
        path = Path(text).expanduser()
        if not path.is_file():
            raise MedadaptError(f"--recipe {text!r}: not a built-in recipe ({', '.join(builtin_recipe_names())}) "
                                "and no such file; pass a built-in name or a recipe file (docs/recipes.md)")
    raw = read_yaml(path)
    return parse_recipe(raw, source=str(path))


def _fail(source: str, key: str, problem: str, fix: str) -> None:
    raise MedadaptError(f"{source}: {key}: {problem}; {fix}")


def _component(source: str, raw: Any, key: str, registry: Mapping[str, Any], defaults_of,
               optional: Mapping[str, tuple[str, ...]] | None = None) -> dict[str, Any]:
    if isinstance(raw, str):
        raw = {"name": raw}
    if not isinstance(raw, Mapping) or "name" not in raw:
        _fail(source, key, f"{raw!r} names no {key}", f"write e.g. '{key}: {{name: {next(iter(registry))}}}'")
    name = str(raw["name"]).lower()
    if name not in registry:
        _fail(source, f"{key}.name", f"unknown {key} {raw['name']!r}", f"choose one of {sorted(registry)}")
    defaults = defaults_of(registry[name])
    extra = set((optional or {}).get(name, ()))
    unknown = sorted(set(raw) - {"name"} - set(defaults) - extra)
    if unknown:
        _fail(source, key, f"unknown option(s) {unknown} for {name}", f"use only {sorted(set(defaults) | extra)}")
    return {"name": name, **copy.deepcopy(defaults), **{k: copy.deepcopy(v) for k, v in raw.items() if k != "name"}}


def _positive(source: str, value: Any, key: str, kind=float, allow_none: bool = False) -> Any:
    if value is None and allow_none:
        return None
    try:
        if isinstance(value, bool):
            raise TypeError
        number = kind(value)
        if kind is int and number != value:
            raise ValueError
    except (TypeError, ValueError):
        _fail(source, key, f"{value!r} is not a{'n integer' if kind is int else ' number'}", "give a positive value")
    if not number > 0:
        _fail(source, key, f"{value!r} is not positive", "give a positive value")
    return number


def parse_recipe(raw: Any, source: str = "<recipe>") -> Recipe:
    """Validate a recipe mapping; every mistake is one error line naming ``source`` and the key."""
    allowed = {"name", "description", "optimizer", "schedule", "loss", "epochs", "iterations_per_epoch", "lr",
               "method_lr", "grad_clip", "batch_size", "patch_size", "patches_per_case", "augmentation",
               "head_init", "deep_supervision", "methods"}
    if not isinstance(raw, Mapping):
        _fail(source, "recipe", f"expected a mapping, got {type(raw).__name__}", "write it as 'key: value' lines")
    unknown = sorted(set(raw) - allowed)
    if unknown:
        _fail(source, "recipe", f"unknown key(s) {unknown}", f"use only {sorted(allowed)}")
    missing = [k for k in ("optimizer", "schedule", "loss", "epochs", "iterations_per_epoch", "lr") if k not in raw]
    if missing:
        _fail(source, "recipe", f"missing {missing}", "add them (docs/recipes.md)")
    method_lr = raw.get("method_lr") or {}
    if not isinstance(method_lr, Mapping):
        _fail(source, "method_lr", f"{method_lr!r} is not a mapping", "write e.g. 'method_lr: {scratch: 0.01}'")
    patch = raw.get("patch_size")
    if patch is not None:
        if not isinstance(patch, (list, tuple)) or len(patch) != 3:
            _fail(source, "patch_size", f"{patch!r} is not three sizes", "write e.g. [64, 128, 128]")
        patch = tuple(_positive(source, v, f"patch_size[{i}]", int) for i, v in enumerate(patch))
    recipe = Recipe(
        name=str(raw.get("name") or Path(source).stem),
        description=str(raw.get("description") or "").strip(),
        optimizer=_component(source, raw["optimizer"], "optimizer", OPTIMIZERS, lambda entry: entry[1]),
        schedule=_component(source, raw["schedule"], "schedule", SCHEDULES, lambda entry: entry),
        loss=_component(source, raw["loss"], "loss", LOSSES, lambda entry: entry, OPTIONAL_LOSS_OPTIONS),
        epochs=_positive(source, raw["epochs"], "epochs", int),
        iterations_per_epoch=_iterations(source, raw["iterations_per_epoch"], "iterations_per_epoch"),
        lr=_positive(source, raw["lr"], "lr"),
        method_lr={str(k): _positive(source, v, f"method_lr.{k}") for k, v in method_lr.items()},
        grad_clip=_positive(source, raw.get("grad_clip", 12.0), "grad_clip", allow_none=True),
        batch_size=_positive(source, raw.get("batch_size"), "batch_size", int, allow_none=True),
        patches_per_case=_positive(source, raw.get("patches_per_case", 1), "patches_per_case", int),
        patch_size=patch,
        source=source,
        augmentation=_choice(source, raw.get("augmentation", "nnunet"), "augmentation", AUGMENTATIONS),
        head_init=_choice(source, raw.get("head_init", "nnunet"), "head_init", HEAD_INITS),
        deep_supervision=_flag(source, raw.get("deep_supervision"), "deep_supervision"),
        methods=_methods(source, raw.get("methods") or {}),
    )
    if "smooth" in recipe.loss:
        recipe.loss["smooth"] = _positive(source, recipe.loss["smooth"], "loss.smooth")
    if recipe.batch_size is not None and recipe.batch_size % recipe.patches_per_case:
        _fail(source, "patches_per_case", f"{recipe.patches_per_case} does not divide batch_size {recipe.batch_size}",
              "make the batch a whole number of cases")
    if recipe.loss["name"] == "mae":  # the masking is checked here, so a bad value is one line naming the file
        from medadapt.engine.reconstruction import MaskConfig

        try:
            MaskConfig.from_dict(recipe.loss)
        except MedadaptError as exc:
            _fail(source, "loss", str(exc), "see docs/ssl.md")
    if recipe.schedule["name"] == "cosine" and recipe.schedule["warmup_epochs"] >= recipe.epochs:
        _fail(source, "schedule.warmup_epochs", f"{recipe.schedule['warmup_epochs']} warm-up epochs leave none of "
              f"the {recipe.epochs} epochs to decay", "use fewer warm-up epochs")
    return recipe


def _iterations(source: str, value: Any, key: str) -> "int | str":
    if value == EPOCH_OF_CASES:
        return EPOCH_OF_CASES
    if isinstance(value, str):
        _fail(source, key, f"{value!r} is neither a number nor {EPOCH_OF_CASES!r}",
              f"give a positive integer or '{EPOCH_OF_CASES}' (one pass over the training cases)")
    return _positive(source, value, key, int)


def _choice(source: str, value: Any, key: str, choices: tuple[str, ...]) -> str:
    if value not in choices:
        _fail(source, key, f"unknown {key} {value!r}", f"choose one of {list(choices)}")
    return str(value)


def _flag(source: str, value: Any, key: str) -> bool | None:
    if value is not None and not isinstance(value, bool):
        _fail(source, key, f"{value!r} is not true or false", "write true or false (or leave it out)")
    return value


def _methods(source: str, raw: Any) -> dict[str, dict[str, Any]]:
    """``methods: {name: {lr, epochs, iterations_per_epoch, batch_size, patches_per_case}}``, validated."""
    if not isinstance(raw, Mapping):
        _fail(source, "methods", f"{raw!r} is not a mapping", "write e.g. 'methods: {linear-probe: {lr: 0.1}}'")
    out = {}
    for method, entry in raw.items():
        key = f"methods.{method}"
        if not isinstance(entry, Mapping):
            _fail(source, key, f"{entry!r} is not a mapping", f"give some of {list(METHOD_KEYS)}")
        unknown = sorted(set(entry) - set(METHOD_KEYS))
        if unknown:
            _fail(source, key, f"unknown key(s) {unknown}", f"use only {list(METHOD_KEYS)}")
        checked = {}
        for k, v in entry.items():
            if k == "lr":
                checked[k] = _positive(source, v, f"{key}.lr")
            elif k == "iterations_per_epoch":
                checked[k] = _iterations(source, v, f"{key}.{k}")
            else:
                checked[k] = _positive(source, v, f"{key}.{k}", int)
        out[str(method)] = checked
    return out


def build_optimizer(optimizer: Mapping[str, Any], params, lr: float) -> torch.optim.Optimizer:
    """The optimiser a recipe names, over ``params``."""
    cls, _ = OPTIMIZERS[optimizer["name"]]
    options = {k: (tuple(v) if isinstance(v, list) else v) for k, v in optimizer.items() if k != "name"}
    return cls(params, lr=lr, **options)
