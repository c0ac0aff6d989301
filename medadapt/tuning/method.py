"""A fine-tuning method as one definition: its strategy, its typed options and what it can do.

As in HF peft, a method is a config (its options), its layers and their injection (the strategy,
:class:`medadapt.tuning.base.Strategy`), and nothing else in medadapt names it: the command-line flags, ``medadapt
methods``, a grid config's ``method_options``, the reports' labels, ``bench-speed`` and the nnU-Net trainer's
checks all read the definitions. A built-in method's definition sits in the module that implements it (its
``METHODS``); a plugin adds one with ``registry.method(definition)`` (docs/extending.md, "Adding a method")::

    class ScaledHeads(Strategy):
        name = "scaled-heads"
        ...

    METHOD = Method(ScaledHeads, summary="the heads only, their learning rate scaled",
                    options=(Option("scale", float, 1.0, "learning-rate factor of the heads", above=0),))

:func:`make_strategy` builds a method's strategy from options by name and refuses, in one line naming the
method, the option and the fix, an option the method does not take, a value of the wrong type or out of range.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

from medadapt.errors import MedadaptError

#: the types an option may have (a YAML config and the command line give these)
OPTION_TYPES = (int, float, str)


@dataclasses.dataclass(frozen=True)
class Option:
    """One typed option of a method: the keyword its strategy takes, with default, range and help.

    ``flag``: its command-line flag (default ``--<method>-<name>``); methods may share a flag when they declare
    the same option (DGST, DRST and SGST's ``--gamma``). ``minimum``/``above``: inclusive/exclusive lower bound
    of a number; ``choices``: the values a string may take. ``default_text``: how help names a default that
    depends on other things (LoRA's alpha: ``r``); ``rule``/``rule_text``: a further condition and its words. ``None`` as a value always means the default."""

    name: str
    type: type
    default: Any = None
    help: str = ""
    flag: str | None = None
    minimum: float | None = None
    above: float | None = None
    choices: tuple[str, ...] | None = None
    default_text: str | None = None
    #: a further condition on a valid value, and its words (e.g. the spatial adapter's odd kernel size)
    rule: Callable[[Any], bool] | None = None
    rule_text: str = ""

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name.isidentifier():
            raise MedadaptError(f"option {self.name!r}: not a Python keyword name; name it like rank or kernel_size")
        if self.type not in OPTION_TYPES:
            raise MedadaptError(f"option {self.name!r}: type {self.type!r} is not int, float or str")

    def cli_flag(self, method: str) -> str:
        return self.flag or f"--{method}-{self.name.replace('_', '-')}"

    def describe(self) -> str:
        """The accepted values in words, e.g. ``an integer >= 1``, ``one of instance, batch``."""
        if self.choices:
            return f"one of {', '.join(self.choices)}"
        what = {int: "an integer", float: "a number", str: "a string"}[self.type]
        if self.minimum is not None:
            what += f" >= {self.minimum:g}"
        if self.above is not None:
            what += f" > {self.above:g}"
        return what + (f", {self.rule_text}" if self.rule_text else "")

    def check(self, method: str, value: Any) -> None:
        """Refuse ``value`` (not None) in one line naming the method, the option and what it takes."""
        ok = not isinstance(value, bool)
        if ok and self.type is int:
            ok = isinstance(value, int)
        elif ok and self.type is float:
            ok = isinstance(value, (int, float))
        elif ok:
            ok = isinstance(value, str) and (not self.choices or value in self.choices)
        if ok and self.type is not str:
            ok = (self.minimum is None or value >= self.minimum) and (self.above is None or value > self.above)
        if ok and self.rule is not None:
            ok = bool(self.rule(value))
        if not ok:
            raise MedadaptError(f"method {method!r}, option {self.name} ({self.cli_flag(method)}): {value!r} is not "
                                f"{self.describe()}; give {self.describe()}"
                                + (f" ({self.help})" if self.help else ""))

    def cli_help(self, methods: list[str]) -> str:
        default = self.default_text if self.default_text is not None else self.default
        return f"{'/'.join(methods)}: {self.help} (default {default})"

    def spec(self) -> tuple:
        """What two methods sharing a flag must agree on."""
        return (self.name, self.type, self.minimum, self.above, self.choices, self.rule_text)


@dataclasses.dataclass(frozen=True)
class Method:
    """A fine-tuning method: its strategy class (whose ``name`` names the method) and everything else about it.

    ``summary``: one line of what it trains (``medadapt methods``, help texts); ``display``: its label in tables
    (default its name); ``options``: what its strategy's constructor takes, typed; ``seeded``: the strategy also
    takes the run's seed (``seed=``), for a random choice of its own (DRST). ``extension``: the type of the
    modules it leaves in the trained network, as a model folder's plans.json records them (``architecture()``'s
    ``type``), and ``rebuild(network, record)`` re-creates them when the folder is loaded; a method that leaves
    none gives nnU-Net's plain network (``exportable``). ``cacheable``: it trains only modules on the last
    feature map, so ``--feature-cache`` can train it on cached features. ``needs_pretext_head``: it uses the
    foundation's pretext (self-supervised) head, which a foundation must then have."""

    strategy: type
    summary: str
    display: str | None = None
    options: tuple[Option, ...] = ()
    seeded: bool = False
    extension: str | None = None
    rebuild: Callable[[Any, dict], None] | None = None
    cacheable: bool = False
    needs_pretext_head: bool = False

    def __post_init__(self) -> None:
        from medadapt.tuning.base import Strategy

        if not (isinstance(self.strategy, type) and issubclass(self.strategy, Strategy)):
            raise MedadaptError(f"method definition {self.strategy!r}: its strategy must be a subclass of "
                                "medadapt.tuning.Strategy")
        name = self.strategy.__dict__.get("name")
        if not isinstance(name, str) or not name or name != name.strip().lower() or " " in name:
            raise MedadaptError(f"method definition of {self.strategy.__name__}: no name; give the class its own "
                                "name = 'lower-case-name'")
        if not isinstance(self.summary, str) or not self.summary:
            raise MedadaptError(f"method {name!r}: no summary; give a one-line summary of what it trains")
        names = [o.name for o in self.options]
        if len(set(names)) != len(names) or any(not isinstance(o, Option) for o in self.options):
            raise MedadaptError(f"method {name!r}: options {names} must be Option objects with distinct names")
        if (self.extension is None) != (self.rebuild is None):
            raise MedadaptError(f"method {name!r}: an extension needs its rebuild function (and a rebuild its "
                                "extension type)")

    @property
    def name(self) -> str:
        return self.strategy.name

    @property
    def label(self) -> str:
        """Its name in tables."""
        return self.display or self.name

    @property
    def trains(self) -> bool:
        """False for a method that evaluates the foundation as it is (no training step)."""
        return bool(self.strategy.trains)

    @property
    def freezes(self) -> bool:
        """True for a method that freezes part of the network (the only ones a decoder policy concerns)."""
        return bool(self.strategy.freezes)

    @property
    def exportable(self) -> bool:
        """Whether the trained network is the plain architecture nnU-Net can load (no extension left in it)."""
        return self.extension is None

    @property
    def option_names(self) -> tuple[str, ...]:
        return tuple(o.name for o in self.options)

    def option(self, name: str) -> Option | None:
        return next((o for o in self.options if o.name == name), None)

    def check_options(self, options: Mapping[str, Any]) -> dict[str, Any]:
        """``options`` without the ones that are None, each checked; an unknown one is refused in one line."""
        given = {k: v for k, v in options.items() if v is not None}
        unknown = sorted(set(given) - set(self.option_names))
        if unknown:
            takes = (f"its options are {', '.join(self.option_names)}" if self.options else "it takes no options")
            raise MedadaptError(f"method {self.name!r} takes no option {unknown[0]!r}; {takes} ('medadapt methods "
                                "--help' lists them)")
        for k, v in given.items():
            self.option(k).check(self.name, v)
        return given

    def split_options(self, options: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
        """``options`` divided into this method's and the rest (a grid cell's run settings)."""
        mine = {k: v for k, v in options.items() if k in self.option_names}
        return mine, {k: v for k, v in options.items() if k not in mine}
