"""ROI names to dataset labels: ``--roi NAME=PATTERN[,PATTERN...]`` plus a small AAPM TG-263 alias table.

Matching ignores case, spaces, underscores and hyphens: names and patterns are compared after
:func:`normalise` ("LN_IIa_L", "ln iia l" and "LN-IIa-L" are one name). Patterns are shell globs (``*``, ``?``,
``[...]``) over the normalised name. A label (or a literal pattern) that is a TG-263 standard name, or one of
the aliases listed for it below, also matches every other spelling of that entry: ``--roi Parotid_L`` matches
"Lt Parotid" and "PAROTID_LEFT". The table is small on purpose: the structures head-and-neck and thorax/pelvis
planning contours most often, with the spellings that TPS exports commonly carry; anything else is a pattern.

An ROI that matches the patterns of several labels goes to the first of them in ``--roi`` order (recorded in
the import's mapping file).
"""
from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass, field

from medadapt.errors import MedadaptError

#: TG-263 standard name -> common other spellings (normalised on use)
TG263_ALIASES: dict[str, tuple[str, ...]] = {
    "Brain": ("Cerebrum_and_Cerebellum",),
    "Brainstem": ("Brain_Stem", "BrainStem", "Tronc"),
    "SpinalCord": ("Spinal_Cord", "Cord", "Medulla_Spinalis"),
    "OpticChiasm": ("Chiasm", "Optic_Chiasm", "Chiasma"),
    "OpticNrv_L": ("Optic_Nerve_L", "OpticNerve_L", "L_Optic_Nerve", "Optic_Nerve_Left", "Lt_Optic_Nerve"),
    "OpticNrv_R": ("Optic_Nerve_R", "OpticNerve_R", "R_Optic_Nerve", "Optic_Nerve_Right", "Rt_Optic_Nerve"),
    "Eye_L": ("Globe_L", "L_Eye", "Eye_Left", "Lt_Eye"),
    "Eye_R": ("Globe_R", "R_Eye", "Eye_Right", "Rt_Eye"),
    "Lens_L": ("L_Lens", "Lens_Left", "Lt_Lens"),
    "Lens_R": ("R_Lens", "Lens_Right", "Rt_Lens"),
    "Cochlea_L": ("L_Cochlea", "Cochlea_Left", "Lt_Cochlea"),
    "Cochlea_R": ("R_Cochlea", "Cochlea_Right", "Rt_Cochlea"),
    "Parotid_L": ("L_Parotid", "Lt_Parotid", "Parotid_Lt", "Parotid_Left", "LParotid"),
    "Parotid_R": ("R_Parotid", "Rt_Parotid", "Parotid_Rt", "Parotid_Right", "RParotid"),
    "Glnd_Submand_L": ("Submandibular_L", "L_Submandibular", "Submand_L", "SMG_L", "Submandibular_Left"),
    "Glnd_Submand_R": ("Submandibular_R", "R_Submandibular", "Submand_R", "SMG_R", "Submandibular_Right"),
    "Glnd_Thyroid": ("Thyroid", "Thyroid_Gland", "ThyroidGland"),
    "Bone_Mandible": ("Mandible", "Jaw"),
    "Cavity_Oral": ("Oral_Cavity", "OralCavity", "Mouth"),
    "Larynx": ("Larynx_Total",),
    "Esophagus": ("Oesophagus", "Esoph"),
    "Trachea": (),
    "Heart": ("Cor",),
    "Lung_L": ("L_Lung", "Lung_Left", "Lt_Lung", "LLung"),
    "Lung_R": ("R_Lung", "Lung_Right", "Rt_Lung", "RLung"),
    "Lungs": ("Lung_Total", "Lungs_Total", "Total_Lung", "Both_Lungs"),
    "Liver": (),
    "Spleen": (),
    "Stomach": (),
    "Pancreas": (),
    "Kidney_L": ("L_Kidney", "Kidney_Left", "Lt_Kidney"),
    "Kidney_R": ("R_Kidney", "Kidney_Right", "Rt_Kidney"),
    "Bladder": ("Urinary_Bladder", "UrinaryBladder", "Blad"),
    "Rectum": (),
    "Prostate": (),
    "Bowel_Small": ("Small_Bowel", "SmallBowel", "Bowel_Sm"),
    "Femur_Head_L": ("FemoralHead_L", "Femoral_Head_L", "Fem_Head_L", "L_Femoral_Head"),
    "Femur_Head_R": ("FemoralHead_R", "Femoral_Head_R", "Fem_Head_R", "R_Femoral_Head"),
    "External": ("Body", "Skin", "Outline", "BODY_Contour"),
}

_SEP = re.compile(r"[\s_\-]+")
_GLOB = re.compile(r"[*?\[]")


def normalise(name: str) -> str:
    """Lower case without spaces, underscores or hyphens: the form names are compared in."""
    return _SEP.sub("", str(name)).lower()


def _alias_index() -> dict[str, str]:
    index = {}
    for standard, aliases in TG263_ALIASES.items():
        for n in (standard, *aliases):
            index[normalise(n)] = standard
    return index


_ALIASES = _alias_index()


def tg263_names(name: str) -> tuple[str, ...]:
    """Every spelling of the TG-263 entry ``name`` belongs to (standard name first); () if none."""
    standard = _ALIASES.get(normalise(name))
    return (standard, *TG263_ALIASES[standard]) if standard else ()


@dataclass
class RoiRule:
    """One ``--roi``: a dataset label, the user's patterns, and the TG-263 spellings they bring along."""

    label: str
    patterns: list[str]
    aliases: list[str] = field(default_factory=list)
    text: str = ""

    def matches(self, roi_name: str) -> str | None:
        """The pattern (or alias) ``roi_name`` matches, or None."""
        n = normalise(roi_name)
        for p in self.patterns:
            if fnmatch.fnmatchcase(n, normalise(p)):
                return p
        for a in self.aliases:
            if n == normalise(a):
                return f"TG-263 {a}"
        return None

    def pattern_matches(self, pattern: str, roi_name: str) -> bool:
        """Whether ``pattern`` (with its TG-263 spellings, if it is a literal name) matches ``roi_name``."""
        n = normalise(roi_name)
        if fnmatch.fnmatchcase(n, normalise(pattern)):
            return True
        return not _GLOB.search(pattern) and n in {normalise(a) for a in tg263_names(pattern)}


_LABEL_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")


def parse_roi_options(values: list[str]) -> list[RoiRule]:
    """``["lymph_node=LN*,Lnn*,GTVn*", "Parotid_L"]`` -> rules; a bare NAME is its own pattern."""
    if not values:
        raise MedadaptError("--roi: give at least one, e.g. --roi \"lymph_node=LN*,Lnn*,GTVn*\" (label=ROI name "
                            "patterns)")
    rules: list[RoiRule] = []
    for text in values:
        label, sep, rest = text.partition("=")
        label = label.strip()
        patterns = [p.strip() for p in (rest.split(",") if sep else [label])]
        if not _LABEL_RE.match(label):
            raise MedadaptError(f"--roi {text!r}: {label!r} is not a label name (letters, digits, _ . -; "
                                "e.g. lymph_node); write --roi LABEL=PATTERN[,PATTERN...]")
        if label.lower() == "background":
            raise MedadaptError(f"--roi {text!r}: 'background' is label 0 of every dataset; name the label "
                                "otherwise")
        if any(not p for p in patterns):
            raise MedadaptError(f"--roi {text!r}: empty pattern; write e.g. --roi \"{label}=LN*,GTVn*\"")
        if any(r.label == label for r in rules):
            raise MedadaptError(f"--roi {text!r}: label {label!r} is given twice; list all its patterns in one "
                                f"--roi \"{label}=A,B\"")
        aliases: list[str] = []
        for literal in [label] + [p for p in patterns if not _GLOB.search(p)]:
            for a in tg263_names(literal):
                if a not in aliases:
                    aliases.append(a)
        rules.append(RoiRule(label=label, patterns=patterns, aliases=aliases, text=text))
    return rules


def assign(rules: list[RoiRule], roi_name: str) -> tuple[int | None, str | None, list[str]]:
    """(index of the rule ``roi_name`` goes to, the pattern that matched, labels of other matching rules)."""
    hits = [(i, m) for i, r in enumerate(rules) if (m := r.matches(roi_name)) is not None]
    if not hits:
        return None, None, []
    return hits[0][0], hits[0][1], [rules[i].label for i, _ in hits[1:]]
