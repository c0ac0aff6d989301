"""Short, stable content hashes of JSON-able values (cell keys, run identities, folder names)."""
from __future__ import annotations

import hashlib
import json
from typing import Any


def stable_hash(obj: Any, n: int = 12) -> str:
    """The first ``n`` hex digits of the SHA-1 of ``obj`` as compact JSON with sorted keys."""
    return hashlib.sha1(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()).hexdigest()[:n]
