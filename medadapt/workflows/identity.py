"""What makes a run this run: its identity record, checked on every re-run or ``--resume`` into its folder.

A workflow resolves everything that decides its result into one settings object (recipe contents, not only its
name; batch and patch; sampling; post-processing; seeds), and its identity is that object as data with the
inputs' fingerprints, and the digest of the settings (``settings_digest``). The identity is written once every
input has been checked, before the first output (:func:`record_identity`), and any later run into the folder
with other settings stops with one line naming the first difference (:func:`check_identity`). A folder written
by an older layout of the record (another ``format``) is refused with one line as well.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from medadapt.errors import MedadaptError
from medadapt.utils.atomic import atomic_write_json
from medadapt.utils.hashing import stable_hash

IDENTITY_FILE = "identity.json"


def settings_digest(settings: dict[str, Any]) -> str:
    """The digest of a run's resolved settings (as stored: tuples become lists)."""
    return stable_hash(json.loads(json.dumps(settings)), 16)


#: what names where an input lies rather than what it is: a run whose data or foundation folder was moved or
#: cloned elsewhere is the same run (what they hold is compared: cases, labels, weights, a split file's SHA-256)
LOCATION_KEYS = ("model", "data")


def without_locations(identity: dict[str, Any]) -> dict[str, Any]:
    """``identity`` as compared: no ``path`` entry and no ``data`` folder (of the record or of any record in it,
    lists included: a stream's tasks), no top-level ``model`` path, and no ``settings_digest`` where the settings it digests are in the record
    themselves (it folds those paths in; a record without them, e.g. cross-validation's, keeps it)."""
    def strip(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: strip(v) for k, v in value.items() if k != "path" and not (k == "data" and _is_location(v))}
        if isinstance(value, list):
            return [strip(v) for v in value]
        return value

    inline = "training" in identity
    return {k: strip(v) for k, v in identity.items()
            if k != "path" and not (k in LOCATION_KEYS and _is_location(v)) and not (inline and k == "settings_digest")}


def _is_location(value: Any) -> bool:
    return isinstance(value, str) or (isinstance(value, list) and all(isinstance(v, str) for v in value))


def check_identity(out: Path, identity: dict[str, Any]) -> None:
    """Refuse a run folder made for another run, with one line naming the first difference (where the inputs lie
    does not count: :func:`without_locations`)."""
    path = Path(out) / IDENTITY_FILE
    if not path.is_file():
        if (Path(out) / "run.json").is_file() or (Path(out) / "training" / "checkpoint_latest.pt").is_file():
            raise MedadaptError(f"{out}: holds a run without an identity record (made by an older medadapt); "
                                "use a new --out folder")
        return
    stored = json.loads(path.read_text())
    if "format" in identity and stored.get("format") != identity["format"]:
        raise MedadaptError(f"{out}: holds a run recorded as {stored.get('format') or 'an older format'} by an "
                            f"older medadapt (this one writes {identity['format']}); use a new --out folder")
    current = json.loads(json.dumps(identity))  # as stored: tuples become lists
    diff = first_difference(without_locations(stored), without_locations(current))
    if diff is not None:
        key, old, new = diff
        raise MedadaptError(f"{out}: holds a run with {key} = {json.dumps(old)}, this one has "
                            f"{json.dumps(new)}; use a new --out folder or the run's own settings")


def record_identity(out: Path, identity: dict[str, Any]) -> None:
    """Write ``identity.json`` (once every input has been checked, right before the first output)."""
    if not (Path(out) / IDENTITY_FILE).is_file():
        atomic_write_json(Path(out) / IDENTITY_FILE, identity)


def first_difference(old: Any, new: Any, prefix: str = "") -> tuple[str, Any, Any] | None:
    if isinstance(old, dict) and isinstance(new, dict):
        for key in list(old) + [k for k in new if k not in old]:
            name = f"{prefix}.{key}" if prefix else str(key)
            if key not in old or key not in new:
                return name, old.get(key), new.get(key)
            diff = first_difference(old[key], new[key], name)
            if diff is not None:
                return diff
        return None
    return None if old == new else (prefix, old, new)
