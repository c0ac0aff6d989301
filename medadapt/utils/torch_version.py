"""Which PyTorch medadapt works with: the range the package declares, and the versions its tests ran on.

``pyproject.toml`` declares ``torch>=2.4,<3`` (MONAI 1.5's floor, and every torch API medadapt calls:
``weights_only`` loading, ``torch.amp``, parametrisations, optimiser step hooks), so that ``pip install medadapt``
keeps a GPU user's own CUDA build instead of replacing it. The suite runs on :data:`TESTED` (this machine's CPU
wheel, pinned for the README's install by ``constraints/cpu.txt``). A torch outside the declared range is named
in one line (the CLI refuses it, exit 2); one inside it but untested is a warning, not an error.
Read from the installed package's metadata: importing medadapt does not import torch for this.
"""
from __future__ import annotations

import re
from importlib import metadata

#: the declared range [lowest, highest) as (major, minor): pyproject's torch>=2.4,<3
SUPPORTED = ((2, 4), (3, 0))
#: the (major, minor) versions the test suite ran on (CI on this machine: 2.13.0+cpu)
TESTED = ((2, 13),)


def installed() -> str | None:
    """The installed torch's version string (``2.13.0+cpu``), or None if torch is not installed."""
    try:
        return metadata.version("torch")
    except metadata.PackageNotFoundError:
        return None


def _minor(version: str) -> tuple[int, int] | None:
    m = re.match(r"(\d+)\.(\d+)", version)
    return (int(m.group(1)), int(m.group(2))) if m else None


def _range() -> str:
    (a, b), (c, d) = SUPPORTED
    return f">={a}.{b},<{c}" + (f".{d}" if d else "")


def check(version: str | None = None) -> tuple[str, str] | None:
    """``("unsupported" | "untested", one-line message)`` for ``version`` (default: the installed torch), or None
    when it is one the suite ran on."""
    version = installed() if version is None else version
    if version is None:
        return "unsupported", f"PyTorch is not installed; medadapt needs torch {_range()} (pip install torch, or " \
                              "the CUDA build for your driver from pytorch.org)"
    minor = _minor(version)
    tested = ", ".join(f"{a}.{b}" for a, b in TESTED)
    if minor is None or not SUPPORTED[0] <= minor < SUPPORTED[1]:
        return "unsupported", (f"torch {version} is installed; medadapt supports torch {_range()} (tested on "
                               f"{tested}): install a torch in that range")
    if minor not in TESTED:
        return "untested", (f"torch {version} is inside medadapt's supported range {_range()} but untested (the suite "
                            f"ran on {tested}); please report what fails")
    return None
