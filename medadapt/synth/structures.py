"""Named anatomical structures that a domain's ``labels`` map can write into the label map.

The phantom builders tag every fill that draws a named structure, so a case carries a structure map
(``SyntheticCase.structures``, uint8, one structure id per voxel, 0 = none) alongside its tissue-class map. Both
follow the same rule: a voxel belongs to the last fill that covered at least half of it (a later fill that
draws something else, tagged or not, takes the voxel over). A structure's mask is therefore exactly the set of
voxels whose tissue, as seen in the image, was drawn for that structure; structures never overlap.

The ids below are internal (the structure map's values; append new structures, never renumber); a domain's
``labels`` map gives the ids written to the label map. ``lymph_node`` is special: its label follows
the domain's annotation policy (``annotation`` section), not the structure map; see :mod:`medadapt.synth.nodes`.
"""
from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace

from medadapt.synth.canvas import (
    AIRWAY, ARTERY, CARTILAGE, CORTEX, CSF, GLAND, LUNG, LUNG_VESSEL, MARROW, NODE, SOFT, VEIN,
)

HN, MED = "head_neck", "mediastinum"


@dataclass(frozen=True)
class Structure:
    """One structure: its structure-map id, the regions whose phantom draws it, the tissue classes its voxels
    have (``medadapt.synth.canvas.TISSUE_CLASSES``) and a one-line description (docs/domains.md has the HU)."""

    name: str
    id: int
    regions: tuple[str, ...]
    tissues: tuple[int, ...]
    description: str


_TABLE = [
    # name, id, regions, tissue classes, description
    ("lymph_node", 1, (HN, MED), (NODE,), "lymph nodes (labelled by the annotation policy)"),
    ("thyroid", 2, (HN,), (GLAND,), "both thyroid lobes and the isthmus"),
    ("parotid_gland", 3, (HN,), (GLAND,), "both parotid glands"),
    ("submandibular_gland", 4, (HN,), (GLAND,), "both submandibular glands"),
    ("carotid_artery", 5, (HN,), (ARTERY,), "common, internal and external carotid arteries, both sides"),
    ("vertebral_artery", 6, (HN,), (ARTERY,), "vertebral arteries in the transverse foramina"),
    ("internal_jugular_vein", 7, (HN,), (VEIN,), "internal jugular veins, both sides"),
    ("mandible", 8, (HN,), (CORTEX, MARROW), "mandibular body and rami (cortex and marrow)"),
    ("hyoid", 9, (HN,), (CORTEX,), "hyoid bone"),
    ("clavicle", 10, (HN,), (CORTEX, MARROW), "clavicles (cortex and marrow), at the bottom of the field of view"),
    ("sternum", 11, (MED,), (CORTEX, MARROW), "sternum: manubrium and body (cortex and marrow)"),
    ("vertebrae", 12, (HN, MED), (CORTEX, MARROW), "vertebral bodies, arches, spinous and transverse processes"),
    ("intervertebral_disc", 13, (HN, MED), (CORTEX, MARROW), "intervertebral discs between the vertebral bodies"),
    ("spinal_cord", 14, (HN, MED), (CSF,), "spinal cord inside the CSF-filled canal"),
    ("trachea", 15, (HN, MED), (AIRWAY,), "tracheal lumen (air): below the cricoid in the neck, above the carina "
                                          "in the chest"),
    ("upper_airway", 16, (HN,), (AIRWAY,), "laryngeal and pharyngeal lumen (air) above the cricoid"),
    ("laryngeal_cartilage", 17, (HN,), (CARTILAGE,), "laryngeal cartilage above the cricoid (often calcified)"),
    ("esophagus", 18, (HN, MED), (SOFT, AIRWAY), "oesophageal wall and, when present, its air lumen"),
    ("lung", 19, (HN, MED), (LUNG,), "lung parenchyma (apices in the neck), without the vessels"),
    ("aorta", 20, (MED,), (ARTERY,), "ascending aorta, arch and descending aorta"),
    ("supraaortic_arteries", 21, (MED,), (ARTERY,), "brachiocephalic trunk, left common carotid and left "
                                                    "subclavian arteries"),
    ("pulmonary_artery", 22, (MED,), (ARTERY,), "pulmonary trunk and the left and right pulmonary arteries"),
    ("superior_vena_cava", 23, (MED,), (VEIN,), "superior vena cava"),
    ("brachiocephalic_vein", 24, (MED,), (VEIN,), "left brachiocephalic vein"),
    ("azygos_vein", 25, (MED,), (VEIN,), "azygos vein and its arch"),
    ("bronchi", 26, (MED,), (AIRWAY,), "main and upper-lobe bronchi (lumen, air)"),
    ("pulmonary_vessels", 27, (MED,), (LUNG_VESSEL,), "intrapulmonary vessel tree and peripheral vessels"),
    ("ribs", 28, (MED,), (CORTEX, MARROW), "ribs (cortex and marrow), up to the costal cartilage"),
    ("costal_cartilage", 29, (MED,), (CARTILAGE,), "costal cartilage between the ribs and the sternum"),
]

STRUCTURES: dict[str, Structure] = {row[0]: Structure(*row) for row in _TABLE}
BY_ID: dict[int, Structure] = {s.id: s for s in STRUCTURES.values()}
assert len(BY_ID) == len(STRUCTURES) and all(0 < i < 256 for i in BY_ID)

# Structure-map ids by name, for the builders: ``canvas.fill(..., part=S.thyroid)``.
S = SimpleNamespace(**{s.name: s.id for s in STRUCTURES.values()})
LYMPH_NODE = STRUCTURES["lymph_node"].id


def structures_of(region: str) -> list[str]:
    """Names of the structures that the ``region`` phantom draws, in table order."""
    return [s.name for s in STRUCTURES.values() if region in s.regions]
