"""What optional packages add to medadapt, found through entry points: the core never imports them.

An optional package (``medadapt.nnunet``, or a third party's) declares a function ``register(registry)`` as an
entry point of the group :data:`ENTRY_POINT_GROUP` (``medadapt.plugins`` in its ``pyproject.toml``). On first use
the core calls every such function once with the :data:`registry`, which then holds:

* **model loaders** (:meth:`Registry.model_loader`): a model format ``load_model_folder`` recognises besides
  medadapt's own folder (nnU-Net v2 trained model folders and zips). ``detect(path)`` must be cheap and must not
  import the package's heavy dependencies; ``load(path)`` returns a :class:`medadapt.models.ModelFolder`;
* **case backends** (:meth:`Registry.case_backend`): a preprocessing plan that carries a section named like the
  backend (``plan.nnunet``) is preprocessed, and its logits turned back into a label map, by that backend's
  ``preprocess_case(images, label, plan)`` and ``revert_logits(logits, properties, plan, labels)`` (nnunetv2's
  own preprocessor and export);
* **commands** (:meth:`Registry.command`): ``medadapt`` subcommands: a one-line help, and ``add(subparsers)``
  adds the parser with its handler as ``func`` (``export-nnunet``, ``nnunet-train``);
* **speed references** (:meth:`Registry.speed_reference`): another framework's training step that ``bench-speed
  --against-<name>`` times medadapt's against, ``check(spec, folder)`` and ``run(...)``;
* **methods** (:meth:`Registry.method`): a fine-tuning method's definition (:class:`medadapt.tuning.Method`),
  which then appears in ``medadapt methods``, trains with ``--method NAME`` and runs in grid configs
  (docs/extending.md, "Adding a method").

A plugin that fails to load (or whose method definition is incomplete, or named like a built-in method) is
reported once, as a warning naming it, and skipped: the rest of medadapt works
without it. Asking for a part no plugin provides is one :class:`~medadapt.errors.MedadaptError` naming the
package to install (:data:`PROVIDERS`).
"""
from __future__ import annotations

import dataclasses
import threading
import warnings
from importlib.metadata import entry_points
from typing import Any, Callable

from medadapt.errors import MedadaptError

ENTRY_POINT_GROUP = "medadapt.plugins"
#: who provides the parts medadapt's own files name, for the error when none is registered
PROVIDERS = {"nnunet": "pip install 'medadapt[nnunet]' (or pip install -e '.[nnunet]' in a clone)"}


@dataclasses.dataclass(frozen=True)
class ModelLoader:
    name: str
    detect: Callable[[Any], bool]
    load: Callable[..., Any]


@dataclasses.dataclass(frozen=True)
class CaseBackend:
    name: str
    preprocess_case: Callable[..., Any]
    revert_logits: Callable[..., Any]


@dataclasses.dataclass(frozen=True)
class Command:
    name: str
    help: str                  #: its one line in ``medadapt --help``
    add: Callable[[Any], Any]  #: add(subparsers): adds the subcommand's parser, its handler set as ``func``


@dataclasses.dataclass(frozen=True)
class SpeedReference:
    name: str
    check: Callable[..., None]
    run: Callable[..., Any]


class PluginClash(MedadaptError):
    """Two plugins register one part under one name: the user must uninstall one."""


class Registry:
    """The parts optional packages provide (module docstring); filled by :func:`load_plugins`."""

    def __init__(self) -> None:
        self.model_loaders: dict[str, ModelLoader] = {}
        self.case_backends: dict[str, CaseBackend] = {}
        self.commands: dict[str, Command] = {}
        self.speed_references: dict[str, SpeedReference] = {}
        #: (plugin, definition) in registration order; medadapt.tuning.registry checks them
        self.methods: list[tuple[str, Any]] = []
        self.loading: str = "?"  #: the plugin whose register() is running

    def _add(self, table: dict, item) -> None:
        if item.name in table and table[item.name] != item:
            raise PluginClash(f"two medadapt plugins register {type(item).__name__} {item.name!r}; uninstall one")
        table[item.name] = item

    def model_loader(self, name: str, detect: Callable[[Any], bool], load: Callable[..., Any]) -> None:
        self._add(self.model_loaders, ModelLoader(name, detect, load))

    def case_backend(self, name: str, preprocess_case: Callable[..., Any], revert_logits: Callable[..., Any]) -> None:
        self._add(self.case_backends, CaseBackend(name, preprocess_case, revert_logits))

    def command(self, name: str, help: str, add: Callable[[Any], Any]) -> None:
        self._add(self.commands, Command(name, help, add))

    def speed_reference(self, name: str, check: Callable[..., None], run: Callable[..., Any]) -> None:
        self._add(self.speed_references, SpeedReference(name, check, run))

    def method(self, definition: Any) -> None:
        """Add a fine-tuning method (a :class:`medadapt.tuning.Method`)."""
        self.methods.append((self.loading, definition))


registry = Registry()
_loaded = False
_lock = threading.Lock()


def load_plugins() -> Registry:
    """Call every installed plugin's ``register`` once (thread-safe); returns :data:`registry`."""
    global _loaded
    with _lock:
        if not _loaded:
            _loaded = True
            for ep in sorted(entry_points(group=ENTRY_POINT_GROUP), key=lambda e: e.name):
                registry.loading = ep.name
                try:
                    ep.load()(registry)
                except PluginClash:
                    raise
                except MedadaptError as exc:  # e.g. an incomplete method definition: that plugin is skipped
                    warnings.warn(f"medadapt plugin {ep.name!r} ({ep.value}) could not be loaded and is skipped: "
                                  f"{exc}", stacklevel=2)
                except Exception as exc:  # a broken optional package must not take the core down with it
                    warnings.warn(f"medadapt plugin {ep.name!r} ({ep.value}) could not be loaded and is skipped: "
                                  f"{type(exc).__name__}: {exc}", stacklevel=2)
    return registry


def _missing(kind: str, name: str, what: str) -> MedadaptError:
    fix = PROVIDERS.get(name, f"install the package that provides the medadapt {kind} {name!r}")
    return MedadaptError(f"{what} needs medadapt's {name!r} {kind}, which is not installed: {fix}")


def case_backend(name: str, what: str) -> CaseBackend:
    """The registered case backend ``name``; ``what`` names the thing that needs it in the error."""
    backend = load_plugins().case_backends.get(name)
    if backend is None:
        raise _missing("case backend", name, what)
    return backend


def speed_reference(name: str) -> SpeedReference:
    reference = load_plugins().speed_references.get(name)
    if reference is None:
        raise _missing("speed reference", name, f"bench-speed --against-{name}")
    return reference


def detect_model(path) -> ModelLoader | None:
    """The loader of the first plugin format ``path`` is in (by name order), or None."""
    for name in sorted(load_plugins().model_loaders):
        loader = registry.model_loaders[name]
        if loader.detect(path):
            return loader
    return None
