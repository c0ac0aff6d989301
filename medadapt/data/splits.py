"""Deterministic train/test splits and nested few-shot draws.

Both depend only on the *sorted* case ids and the seed, never on file-system order, so a run can be
reproduced anywhere from its seed. Each has its own random stream (:mod:`medadapt.utils.seeds`: ``split`` from
the split seed, ``shots`` from the run's seed), so a split seed and a run seed of the same value do not draw
the same permutation.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from medadapt.errors import MedadaptError
from medadapt.utils import seeds


def _sorted_unique(case_ids: Sequence[str], what: str) -> list[str]:
    ids = sorted(str(c) for c in case_ids)
    dupes = sorted({c for i, c in enumerate(ids) if i and ids[i - 1] == c})
    if dupes:
        raise MedadaptError(f"{what}: case ids {dupes[:5]} appear more than once; give each case once")
    return ids


def train_test_split(case_ids: Sequence[str], test_fraction: float = 0.2, seed: int = 0) -> tuple[list[str], list[str]]:
    """Split case ids into (train, test), both sorted.

    The test set has round(test_fraction * N) cases (half rounds up), at least 1 when N >= 2 and
    test_fraction > 0, and never all of them; which cases is a seeded permutation of the sorted ids.
    """
    if not 0.0 <= float(test_fraction) < 1.0:
        raise MedadaptError(f"test_fraction: {test_fraction} is outside [0, 1); use e.g. 0.2 for an 80/20 split")
    ids = _sorted_unique(case_ids, "train_test_split")
    n = len(ids)
    n_test = int(math.floor(test_fraction * n + 0.5))
    if n >= 2 and test_fraction > 0:
        n_test = min(max(n_test, 1), n - 1)
    else:
        n_test = 0
    perm = seeds.numpy_rng(seed, "split").permutation(n)
    test_idx = set(int(i) for i in perm[:n_test])
    train = [c for i, c in enumerate(ids) if i not in test_idx]
    test = [c for i, c in enumerate(ids) if i in test_idx]
    return train, test


def draw_shots(train_ids: Sequence[str], k: int, seed: int) -> list[str]:
    """The k annotated cases of a k-shot run: the first k of a seeded permutation of the sorted train ids.

    Draws are nested for one seed (the 3-shot cases are the first 3 of the 5-shot cases, and so on).
    """
    ids = _sorted_unique(train_ids, "draw_shots")
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)):
        raise MedadaptError(f"--shots: {k!r} is not an integer; give the number of annotated training cases")
    k = int(k)
    if k < 1 or k > len(ids):
        if not ids:
            raise MedadaptError(f"--shots: {k} requested but the train split is empty; add labelled cases")
        raise MedadaptError(f"--shots: {k} is outside 1..{len(ids)} (the train split has {len(ids)} cases); "
                            f"choose --shots between 1 and {len(ids)} or add labelled cases")
    perm = seeds.numpy_rng(seed, "shots").permutation(len(ids))
    return [ids[int(i)] for i in perm[:k]]


#: the kinds of :class:`Split`
SPLIT_KINDS = ("random", "file", "none", "folds")


@dataclasses.dataclass(frozen=True)
class Split:
    """How a dataset's annotated cases divide into training and test cases.

    - ``random``: the fixed random split (``test_fraction`` of the cases, seeded by ``seed``): today's default,
      the papers' 80/20 protocol;
    - ``file``: the test cases a file names: nnU-Net's ``splits_final.json`` (fold ``fold``'s ``val`` cases are
      the test cases, its ``train`` cases the training cases) or a plain list of test case ids, one per line (as
      the FSEFT authors' partition files are); every other case trains;
    - ``none``: every case trains and nothing is evaluated (a clinic's final model);
    - ``folds``: fold ``fold`` of a ``folds``-fold cross-validation over every case (a seeded permutation of
      the sorted ids (the split stream of ``seed``, keyed by the fold count) cut into ``folds`` near-equal parts,
      the first ``N % folds`` one case larger, as scikit-learn's ``KFold`` cuts them); the fold's part is the
      test part.
    """

    kind: str = "random"
    seed: int = 0
    test_fraction: float = 0.2
    path: str | None = None
    fold: int | None = None
    folds: int | None = None
    #: a ``file`` split's bytes and their SHA-256, read once: every use in a run (the split, the identity, the
    #: records) sees the same file, read and hashed once (not an init argument: ``dataclasses.replace`` rereads)
    _loaded: "tuple[bytes, str] | None" = dataclasses.field(default=None, init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        if self.kind not in SPLIT_KINDS:
            raise MedadaptError(f"split: unknown kind {self.kind!r}; one of {', '.join(SPLIT_KINDS)}")

    @classmethod
    def random(cls, seed: int = 0) -> "Split":
        return cls("random", seed=int(seed))

    @classmethod
    def parse(cls, value: "str | Path | None", fold: int | None = None, split_seed: int = 0,
              option: str = "--split") -> "Split":
        """A split from the command line: ``None`` (the fixed random split by ``split_seed``), ``none``, or a
        file (``fold``: the fold of an nnU-Net ``splits_final.json``)."""
        if value is None:
            if fold is not None:
                raise MedadaptError("--fold: names a fold of a splits file; give it with --split splits_final.json")
            return cls.random(split_seed)
        if str(value) == "none":
            if fold is not None:
                raise MedadaptError("--fold: --split none has no folds; give a splits file or drop --fold")
            return cls("none")
        path = Path(value).expanduser()
        if not path.is_file():
            raise MedadaptError(f"{option} {value}: no such file; give nnU-Net's splits_final.json (with --fold), a "
                                "file of test case ids (one per line) or none")
        split = cls("file", path=str(path.resolve()), fold=fold)
        split.read()  # a malformed file or a missing fold: one line now
        return split

    @classmethod
    def cross_validation(cls, folds: int, fold: int, seed: int = 0) -> "Split":
        return cls("folds", seed=int(seed), fold=int(fold), folds=int(folds))

    @property
    def evaluates(self) -> bool:
        """Whether the split has a test part."""
        return self.kind != "none"

    def read(self) -> dict[str, Any]:
        """A ``file`` split's contents: ``{"test": [...]}`` or ``{"train": [...], "test": [...]}`` (a fold of
        splits_final.json)."""
        path = Path(self.path or "")
        try:
            text = self._file()[0].decode("utf-8")
        except UnicodeDecodeError as exc:
            raise MedadaptError(f"--split {path}: cannot be read ({exc}); give a readable text or JSON file") from None
        if path.suffix == ".json":
            try:
                folds = json.loads(text)
            except json.JSONDecodeError as exc:
                raise MedadaptError(f"--split {path}: not valid JSON ({exc.msg}, line {exc.lineno}); give nnU-Net's "
                                    "splits_final.json (a list of {\"train\": [...], \"val\": [...]})") from None
            if not (isinstance(folds, list) and folds and all(isinstance(f, dict) and isinstance(f.get("train"), list)
                                                              and isinstance(f.get("val"), list) for f in folds)):
                raise MedadaptError(f"--split {path}: not an nnU-Net splits file (a list of {{\"train\": [...], "
                                    "\"val\": [...]}} per fold); give splits_final.json or a list of test cases")
            if self.fold is None:
                raise MedadaptError(f"--split {path}: holds {len(folds)} fold(s); choose one with --fold 0.."
                                    f"{len(folds) - 1}")
            if not 0 <= self.fold < len(folds):
                raise MedadaptError(f"--fold {self.fold}: {path} has folds 0..{len(folds) - 1}; choose one of them")
            chosen = folds[self.fold]
            return {"train": [str(c) for c in chosen["train"]], "test": [str(c) for c in chosen["val"]]}
        if self.fold is not None:
            raise MedadaptError(f"--fold {self.fold}: {path} is a list of test cases, which has no folds; drop "
                                "--fold or give nnU-Net's splits_final.json")
        test = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
        if not test:
            raise MedadaptError(f"--split {path}: names no test case; give one case id per line")
        return {"test": test}

    def _file(self) -> tuple[bytes, str]:
        """The file's bytes and SHA-256, read on first use and kept."""
        if self._loaded is None:
            path = Path(self.path or "")
            try:
                data = path.read_bytes()
            except OSError as exc:
                raise MedadaptError(f"--split {path}: cannot be read ({exc}); give a readable text or JSON file") \
                    from None
            object.__setattr__(self, "_loaded", (data, hashlib.sha256(data).hexdigest()))
        return self._loaded

    def apply(self, case_ids: Sequence[str]) -> tuple[list[str], list[str]]:
        """(train, test) case ids, both sorted; a file naming cases the dataset lacks is one error."""
        ids = _sorted_unique(case_ids, "split")
        if self.kind == "random":
            return train_test_split(ids, self.test_fraction, self.seed)
        if self.kind == "none":
            return ids, []
        if self.kind == "folds":
            return _fold(ids, int(self.folds or 0), int(self.fold or 0), self.seed)
        content = self.read()
        named = set(content["test"]) | set(content.get("train", []))
        missing = sorted(named - set(ids))
        if missing:
            raise MedadaptError(f"--split {self.path}: names case(s) {missing[:5]}{' ...' if len(missing) > 5 else ''} "
                                f"that the dataset does not have (its cases: {', '.join(ids[:5])}"
                                f"{' ...' if len(ids) > 5 else ''}); fix the file or the --data")
        test = sorted(set(content["test"]))
        train = sorted(set(content["train"]) - set(test)) if "train" in content else \
            [c for c in ids if c not in set(test)]
        return train, test

    def record(self) -> dict[str, Any]:
        """The split as data for a run's identity and record (a file split names its file's SHA-256, so an
        edited file is another split)."""
        if self.kind == "random":
            return {"kind": "random", "seed": self.seed, "test_fraction": self.test_fraction}
        if self.kind == "none":
            return {"kind": "none"}
        if self.kind == "folds":
            return {"kind": "folds", "folds": self.folds, "fold": self.fold, "seed": self.seed}
        return {"kind": "file", "path": self.path, "fold": self.fold, "sha256": self._file()[1]}

    def describe(self) -> str:
        if self.kind == "random":
            return f"the fixed {round(100 * (1 - self.test_fraction))}/{round(100 * self.test_fraction)} split (seed {self.seed})"
        if self.kind == "none":
            return "every case trains (no test part)"
        if self.kind == "folds":
            return f"fold {self.fold} of {self.folds}-fold cross-validation (seed {self.seed})"
        return f"the test cases of {self.path}" + (f" (fold {self.fold})" if self.fold is not None else "")


def _fold(ids: list[str], folds: int, fold: int, seed: int) -> tuple[list[str], list[str]]:
    if folds < 2 or folds > len(ids):
        raise MedadaptError(f"--folds {folds}: the dataset has {len(ids)} case(s); choose 2..{len(ids)} folds "
                            f"({len(ids)} is leave-one-out)")
    if not 0 <= fold < folds:
        raise MedadaptError(f"fold {fold}: outside 0..{folds - 1}")
    perm = [int(i) for i in seeds.numpy_rng(seed, "split", "folds", folds).permutation(len(ids))]
    sizes = [len(ids) // folds + (1 if k < len(ids) % folds else 0) for k in range(folds)]
    start = sum(sizes[:fold])
    test_idx = set(perm[start:start + sizes[fold]])
    return ([c for i, c in enumerate(ids) if i not in test_idx], [c for i, c in enumerate(ids) if i in test_idx])


def cross_validation_folds(case_ids: Sequence[str], folds: int, seed: int = 0) -> list[tuple[list[str], list[str]]]:
    """Every fold's (train, test) of a ``folds``-fold cross-validation; each case is tested exactly once."""
    return [Split.cross_validation(folds, k, seed).apply(case_ids) for k in range(folds)]
