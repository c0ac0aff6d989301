"""nnU-Net's environment: its three path variables and a quiet, optional import.

nnU-Net v2 reads ``nnUNet_raw``, ``nnUNet_preprocessed`` and ``nnUNet_results`` from the environment (2.8
resolves them lazily, older releases at import and print a notice for each one missing). medadapt sets them
explicitly from command-line options before anything of nnU-Net runs, and when one is needed but neither
given nor set it stops with one line saying which variable or option to set. nnU-Net's import-time prints
and warnings are swallowed: they concern nnU-Net's own CLI, not medadapt's user.
"""
from __future__ import annotations

import contextlib
import importlib
import io
import os
import sys
import warnings
from pathlib import Path

import torch

from medadapt.errors import MedadaptError
from medadapt.utils.environ import environment_variables

#: environment variable -> medadapt option that sets it
PATH_VARIABLES = {"nnUNet_raw": "--nnunet-raw", "nnUNet_preprocessed": "--nnunet-preprocessed",
                  "nnUNet_results": "--nnunet-results"}
INSTALL_HINT = "pip install 'medadapt[nnunet]'"


@contextlib.contextmanager
def quiet():
    """Swallow stdout and warnings (nnU-Net prints banners and notices meant for its own CLI)."""
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        yield


def import_nnunet(module: str = "nnunetv2"):
    """Import ``module`` of nnunetv2 quietly; a missing install is one MedadaptError line.

    nnunetv2 is an optional dependency (extra ``nnunet``): core medadapt never imports it.
    """
    if module in sys.modules:
        return sys.modules[module]
    try:
        with quiet():
            return importlib.import_module(module)
    except ModuleNotFoundError as exc:
        if exc.name and exc.name.split(".")[0] == "nnunetv2":
            raise MedadaptError(f"nnU-Net v2 is not installed; {INSTALL_HINT} to use nnU-Net models "
                                "and nnU-Net's trainer") from None
        raise


def set_paths(raw: str | Path | None = None, preprocessed: str | Path | None = None,
              results: str | Path | None = None) -> None:
    """Point nnU-Net's path variables at the given folders (None leaves a variable as it is)."""
    for name, value in (("nnUNet_raw", raw), ("nnUNet_preprocessed", preprocessed), ("nnUNet_results", results)):
        if value is not None:
            os.environ[name] = str(Path(value).expanduser().resolve())


def require_paths(*names: str) -> dict[str, Path]:
    """The named path variables, each of which must be set; otherwise one line naming what to set."""
    missing = [n for n in names if not os.environ.get(n)]
    if missing:
        what = " and ".join(f"{PATH_VARIABLES[n]} (or the environment variable {n})" for n in missing)
        raise MedadaptError(f"nnU-Net needs {what}: the folder nnU-Net "
                            f"{'reads and writes' if len(missing) > 1 else 'uses'} for this step")
    return {n: Path(os.environ[n]) for n in names}


@contextlib.contextmanager
def temporary_environment(values: dict[str, str]):
    """Set environment variables (nnU-Net's path variables) for the block; restore them, and torch's thread
    count (nnU-Net's planner and trainer change it), afterwards."""
    threads = torch.get_num_threads()
    try:
        with environment_variables(values):
            yield
    finally:
        torch.set_num_threads(threads)
