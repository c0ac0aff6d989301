"""Tissue attenuation (HU before scanner effects), drawn per case around literature values.

Enhancement depends on the contrast phase: ``none`` (unenhanced), ``arterial`` (bright arteries and pulmonary
arteries, dense inflow in the injected veins), ``venous`` (arteries and veins alike, moderately bright, organs
and glands enhanced the most).
"""
from __future__ import annotations

import numpy as np

# name: (mean, sd) per phase (none, arterial, venous)
_PHASED = {
    "artery": ((42, 4), (330, 45), (170, 18)),
    "vein": ((40, 4), (110, 25), (165, 18)),
    "central_vein": ((40, 4), (280, 70), (165, 18)),  # SVC / brachiocephalic: contrast inflow in arterial phase
    "pulmonary": ((42, 4), (300, 45), (160, 18)),
    "heart": ((42, 4), (250, 40), (160, 18)),
    "thyroid": ((92, 8), (135, 12), (125, 10)),
    "parotid": ((25, 6), (38, 6), (45, 6)),
    "submandibular": ((40, 5), (55, 6), (62, 6)),
    "muscle": ((48, 4), (54, 4), (58, 4)),
    "soft": ((38, 4), (45, 4), (55, 5)),
}
_PHASE_INDEX = {"none": 0, "arterial": 1, "venous": 2}


def draw_tissues(rng: np.random.Generator, phase: str) -> dict[str, float]:
    """HU per tissue for one case. The number of random draws does not depend on ``phase``."""
    k = _PHASE_INDEX[phase]
    t: dict[str, float] = {}
    for name, per_phase in _PHASED.items():
        z = rng.standard_normal()
        mean, sd = per_phase[k]
        t[name] = float(mean + sd * z)
    t["air"] = -1000.0
    t["lung"] = float(rng.normal(-855, 18))
    t["fat"] = float(rng.normal(-100, 7))
    t["fat_deep"] = t["fat"] + float(rng.uniform(0, 15))
    t["skin"] = float(rng.normal(30, 5))
    t["cortex"] = float(rng.uniform(750, 1000))
    t["marrow"] = float(rng.uniform(200, 300))
    t["small_bone"] = 0.5 * (t["cortex"] + t["marrow"])
    t["disc"] = float(rng.normal(85, 8))
    t["cartilage"] = float(rng.normal(130, 20))
    t["csf"] = float(rng.normal(18, 4))
    t["table"] = float(rng.uniform(50, 200))
    t["lung_vessel"] = 0.5 * (t["pulmonary"] + t["heart"])
    return t
