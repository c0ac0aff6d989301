"""Lymph-node stations: where a region's builder says nodes may sit, and how to draw a candidate centre."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np


@dataclass
class Station:
    """A nodal station. ``sample(rng, radius_mm, side)`` gives a candidate centre (patient z, y, x in mm) for a
    node of the given in-plane radius on side +1 (patient right) or -1 (left); ``bilateral`` stations use it."""

    name: str
    weight: float
    sample: Callable[[np.random.Generator, float, int], np.ndarray]
    bilateral: bool = True
    muscle_tol: float = 0.25
    lung_tol: float = 0.0
    gland_tol: float = 0.15
    meta: dict = field(default_factory=dict)
