"""Reading the YAML files users write (grid configs, recipes): one error line naming the file on bad syntax."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from medadapt.errors import MedadaptError


class DuplicateKey(ValueError):
    """A key repeated in one YAML mapping."""


class UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a key repeated in one mapping (YAML itself keeps the last silently: two
    datasets of a grid under one name, a label listed twice)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            try:
                dup = key in seen
            except TypeError:  # unhashable key: the base class reports it
                break
            if dup:
                raise DuplicateKey(f"line {key_node.start_mark.line + 1}: key '{key}' appears twice in one mapping")
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def read_yaml(path: str | Path) -> Any:
    """The parsed contents of ``path`` (YAML, hence JSON too); a syntax error or a key repeated in one mapping
    is a MedadaptError naming it."""
    path = Path(path)
    try:
        return yaml.load(path.read_text(), Loader=UniqueKeyLoader)  # noqa: S506 (a SafeLoader)
    except DuplicateKey as exc:
        raise MedadaptError(f"{path}: {exc}; keep one of them (a repeated key silently replaces the first)") from None
    except yaml.YAMLError as exc:
        raise MedadaptError(f"{path}: not valid YAML ({str(exc).splitlines()[0]}); fix the syntax") from None
