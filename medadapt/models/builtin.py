"""Foundation models that ship inside the package, by name (``medadapt models`` lists them).

Each is a medadapt model folder under ``medadapt/foundations/<name>/`` (``plans.json``, ``weights.pt``) with
``foundation.json``: what it segments, how it was made (the data's recipe and digest, the pretraining settings
as ``medadapt pretrain`` resolved them, the commands, the commit, the machine) and the SHA-256 of every file of
the folder, checked whenever the model is used, so a damaged installation is one clear error instead of a
model that silently differs. Every ``--model`` option takes a built-in name where it takes a folder
(:func:`resolve_model`); so does :func:`medadapt.models.load_model_folder`.
"""
from __future__ import annotations

import json
from importlib import resources
from pathlib import Path
from typing import Any

from medadapt.errors import MedadaptError
from medadapt.utils.digests import file_sha256

INFO_FILE = "foundation.json"
#: the files of a built-in folder whose digests foundation.json records
FILES = ("plans.json", "weights.pt")


def package_root() -> Path:
    """Where the package's built-in foundations are: ``medadapt/foundations/``."""
    return Path(str(resources.files("medadapt") / "foundations"))


def builtin_names(root: Path | None = None) -> list[str]:
    """The built-in foundations' names, sorted (``root``: another folder of them, default the package's)."""
    root = root or package_root()
    return sorted(p.parent.name for p in root.glob(f"*/{INFO_FILE}")) if root.is_dir() else []


def builtin_info(name: str, root: Path | None = None) -> dict[str, Any]:
    """A built-in foundation's ``foundation.json``."""
    path = (root or package_root()) / name / INFO_FILE
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise MedadaptError(f"built-in foundation {name!r}: {path} cannot be read ({exc}); reinstall medadapt "
                            "(pip install --force-reinstall medadapt, or pip install -e . in a clone)") from None


def builtin_path(name: str, root: Path | None = None) -> Path:
    """The folder of built-in foundation ``name``, its files checked against the digests it ships with."""
    info = builtin_info(name, root)
    folder = (root or package_root()) / name
    for file, digest in info["files"].items():
        path = folder / file
        if not path.is_file() or file_sha256(path) != digest:
            raise MedadaptError(f"built-in foundation {name!r}: {path} is missing or damaged (its SHA-256 is not the "
                                "one the package ships); reinstall medadapt (pip install --force-reinstall "
                                "medadapt, or pip install -e . in a clone)")
    return folder


def is_builtin_name(value: str | Path) -> bool:
    text = str(value)
    return "/" not in text and text in builtin_names()


def resolve_model(value: str | Path) -> Path:
    """What a ``--model`` value names: an existing folder or file (a model folder, an nnU-Net model or zip), else
    a built-in foundation by name; otherwise one error listing the built-in names."""
    path = Path(value).expanduser()
    if path.exists():
        return path
    if is_builtin_name(value):
        return builtin_path(str(value))
    names = builtin_names()
    raise MedadaptError(f"--model {value}: no such model folder and not a built-in foundation ("
                        f"{', '.join(names) or 'none installed'}); pass a model folder (medadapt pretrain, "
                        "finetune, import-monai or an nnU-Net results folder) or one of those names "
                        "('medadapt models' describes them)")


def describe(name: str) -> dict[str, Any]:
    """One built-in foundation for ``medadapt models``: name, what it segments, network, data, how it was made."""
    info = builtin_info(name)
    return {"name": name, "description": info["description"], "segments": info["segments"],
            "network": info["network"], "data": info["data"], "made": info["made"]}
