"""Reading the YAML files users write (grid configs, recipes): one error line naming the file on bad syntax."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from medadapt.errors import MedadaptError


def read_yaml(path: str | Path) -> Any:
    """The parsed contents of ``path`` (YAML, hence JSON too); a syntax error is a MedadaptError naming it."""
    path = Path(path)
    try:
        return yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise MedadaptError(f"{path}: not valid YAML ({str(exc).splitlines()[0]}); fix the syntax") from None
