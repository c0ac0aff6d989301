"""The methods medadapt knows: the built-in definitions (each module's ``METHODS``) and those plugins add.

Everything that lists, checks or builds a method asks here: :func:`methods`, :func:`get_method`,
:func:`make_strategy`, the command line's flags (:func:`cli_options`) and the model folder's extensions
(:func:`rebuild_extension`). A plugin's method that is not a :class:`~medadapt.tuning.method.Method`, or whose
name is a built-in method's, is skipped with a warning naming the plugin; the rest works.
"""
from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Any

from medadapt.errors import MedadaptError
from medadapt.tuning.method import Method, Option

_builtin: dict[str, Method] | None = None
_plugin_checked: dict[tuple[int, int], dict[str, Method]] = {}

#: the order of the built-in families in tables (after the methods that train nothing): every parameter,
#: subsets, low-rank and adapter methods, the spatial adapter, sparse training
_FAMILY_ORDER = ("medadapt.tuning.dense", "medadapt.tuning.subset", "medadapt.tuning.lowrank",
                 "medadapt.tuning.spatial", "medadapt.tuning.sparse")


def _builtin_methods() -> dict[str, Method]:
    global _builtin
    if _builtin is None:
        from medadapt.tuning import dense, lowrank, sparse, spatial, subset

        found = [d for module in (dense, subset, lowrank, spatial, sparse) for d in module.METHODS]
        found.sort(key=lambda d: (d.trains, _FAMILY_ORDER.index(d.strategy.__module__)))
        _builtin = {d.name: d for d in found}
    return _builtin


def _plugin_methods() -> dict[str, Method]:
    """The plugins' methods that are complete and do not clash with a built-in one (checked once)."""
    from medadapt.plugins import load_plugins

    registry = load_plugins()
    key = (id(registry), len(registry.methods))
    if key not in _plugin_checked:
        builtin, good = _builtin_methods(), {}
        for plugin, definition in registry.methods:
            if not isinstance(definition, Method):
                warnings.warn(f"medadapt plugin {plugin!r} registers a method that is not a "
                              f"medadapt.tuning.Method ({definition!r}); it is skipped", stacklevel=2)
            elif definition.name in builtin or definition.name in good:
                warnings.warn(f"medadapt plugin {plugin!r}: method {definition.name!r} is already a method of "
                              "medadapt or of another plugin; it is skipped (rename it)", stacklevel=2)
            else:
                good[definition.name] = definition
        _plugin_checked[key] = good
    return _plugin_checked[key]


def methods() -> dict[str, Method]:
    """Every method by name: the built-in ones, then those plugins register (``medadapt.plugins``)."""
    return {**_builtin_methods(), **_plugin_methods()}


def builtin_method_names() -> list[str]:
    return list(_builtin_methods())


def get_method(name: str) -> Method:
    """The definition of method ``name``; one line listing the methods if there is none."""
    table = methods()
    if name not in table:
        raise MedadaptError(f"method {name!r} is unknown; choose one of: {', '.join(table)} ('medadapt methods' "
                            "lists them)")
    return table[name]


def method_names(training_only: bool = False, exportable_only: bool = False) -> list[str]:
    """Every method name, in the order tables list them (``training_only``: without the methods that evaluate
    the foundation as it is, such as ``generalization``; ``exportable_only``: the methods that train and leave
    the plain network, which nnU-Net can load and its trainer can run)."""
    return [name for name, m in methods().items()
            if (m.trains or not (training_only or exportable_only)) and (m.exportable or not exportable_only)]


def make_strategy(name: str, decoder: str | None = None, seed: int | None = None, **options):
    """Create method ``name``'s strategy with ``options`` (each checked against its definition; None means the
    default). ``decoder``: the decoder policy (:data:`medadapt.tuning.base.DECODER_POLICIES`) of a method that
    freezes part of the network, ignored by the others (full fine-tuning trains the decoder anyway); ``seed``:
    the run's seed, for a method that draws at random (its definition's ``seeded``)."""
    from medadapt.tuning.base import DECODER_POLICIES

    definition = get_method(name)
    given = definition.check_options(options)
    if decoder is not None and decoder not in DECODER_POLICIES:
        raise MedadaptError(f"--pretext-decoder {decoder!r}: choose one of {', '.join(DECODER_POLICIES)}")
    if definition.seeded:
        given["seed"] = 0 if seed is None else seed
    strategy = definition.strategy(**given)
    if decoder is not None and definition.freezes and definition.trains:
        strategy.decoder = decoder
    return strategy


def methods_with(option: str) -> list[str]:
    """The methods that take an option named ``option``."""
    return [name for name, d in methods().items() if d.option(option) is not None]


def options_for(name: str, options: Mapping[str, Any]) -> dict[str, Any]:
    """Of one set of options given for many methods (``bench-speed``'s, ``medadapt methods``'), those method
    ``name`` takes, without None."""
    return {k: v for k, v in get_method(name).split_options(options)[0].items() if v is not None}


def strategy_from_record(record: Mapping[str, Any]):
    """A strategy rebuilt from what its ``config()`` recorded (name, options, decoder policy, seed)."""
    rest = {k: v for k, v in record.items() if k not in ("name", "decoder", "seed")}
    return make_strategy(record["name"], decoder=record.get("decoder"), seed=record.get("seed"), **rest)


def options_record(name: str, options: Mapping[str, Any]) -> dict[str, Any]:
    """Method ``name``'s options as its strategy records them (defaults filled in), without seed and decoder
    policy: the canonical form a grid cell is keyed by."""
    strategy = make_strategy(name, seed=0, **options)
    return {k: v for k, v in strategy.config().items() if k not in ("name", "seed")}


def rebuild_extension(network, record: dict[str, Any]) -> None:
    """Re-create in ``network`` the modules a method left (a model folder's ``extensions`` entry)."""
    kind = record.get("type") if isinstance(record, dict) else None
    for definition in methods().values():
        if definition.extension is not None and definition.extension == kind:
            definition.rebuild(network, record)
            return
    raise MedadaptError(f"plans.json: unknown network extension {record!r}; upgrade medadapt or install the "
                        "plugin whose method made this model")


def cli_options() -> dict[str, tuple[Option, list[str]]]:
    """Every method option's command-line flag with its option and the methods that take it, in table order."""
    flags: dict[str, tuple[Option, list[str]]] = {}
    for name, definition in methods().items():
        for option in definition.options:
            flag = option.cli_flag(name)
            if flag in flags and flags[flag][0].spec() != option.spec():
                warnings.warn(f"method {name!r}: its option {option.name} has the flag {flag} of another method's "
                              "different option; it is left off the command line (give it its own flag)",
                              stacklevel=2)
            elif flag in flags:
                flags[flag][1].append(name)
            else:
                flags[flag] = (option, [name])
    return flags
