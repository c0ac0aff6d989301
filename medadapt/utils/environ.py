"""Environment variables: set for a block of code and restored after it; the cache folder they name."""
from __future__ import annotations

import contextlib
import os
from pathlib import Path


def cache_root() -> Path:
    """Where preprocessed data is cached: ``$MEDADAPT_CACHE`` or ``~/.cache/medadapt``."""
    env = os.environ.get("MEDADAPT_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "medadapt"


@contextlib.contextmanager
def environment_variables(values: dict[str, str]):
    """Set ``values`` in ``os.environ`` for the block; afterwards each variable is as it was (unset if it was)."""
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
