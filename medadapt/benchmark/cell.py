"""A grid cell, for every paper's grids: what it runs, the key that says what can change its result, its
folder (``cells/<id>``, the id ending in a hash of the key) and its record form.

Three kinds:

* ``finetune`` (DGST and FSEFT grids): one fine-tuning (or zero-shot) run of ``method`` with ``options`` on
  ``shots`` cases of ``dataset``; id ``<dataset>/<method><options>-<shots>shot-seed<S>-<hash>``;
* ``stream`` (MedSeqFT): one sequential fine-tuning run of ``row`` over the grid's whole task stream; id
  ``stream/<row>-seed<S>-<hash>``;
* ``unseen`` (MedSeqFT, Table VI): one fine-tuning run of ``row`` on an unseen task (``dataset``); id
  ``unseen/<task>/<row>-seed<S>-<hash>``; ``depends`` names the stream cell whose model it starts from.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from medadapt.utils.hashing import stable_hash

KINDS = ("finetune", "stream", "unseen")


@dataclass
class Cell:
    dataset: str | None               # the dataset (an unseen cell's task); None for a stream cell
    shots: int
    method: str
    options: dict[str, Any]
    seed: int
    all_shot: bool
    key: dict[str, Any]
    experiments: list[str] = field(default_factory=list)   # the tables and figures it serves
    kind: str = "finetune"
    row: str | None = None            # a MedSeqFT row
    depends: str | None = None        # cell id of the cell whose result it starts from

    @classmethod
    def stream(cls, row: str, seed: int, key: dict[str, Any], experiments: list[str]) -> "Cell":
        return cls(None, 0, "", {}, seed, False, key, list(experiments), kind="stream", row=row)

    @classmethod
    def unseen(cls, task: str, row: str, seed: int, key: dict[str, Any], depends: str | None,
               experiments: list[str]) -> "Cell":
        return cls(task, 0, key["method"], {}, seed, False, key, list(experiments), kind="unseen", row=row,
                   depends=depends)

    @property
    def task(self) -> str | None:
        """An unseen cell's task (its dataset)."""
        return self.dataset

    @property
    def hash(self) -> str:
        return stable_hash(self.key)

    @property
    def label(self) -> str:
        if self.kind != "finetune":
            return f"{self.row}-seed{self.seed}"
        opts = "".join(f"-{k}{v}" for k, v in sorted(self.options.items()) if v is not None)
        shots = f"all{self.shots}" if self.all_shot else str(self.shots)
        return f"{self.method}{opts}-{shots}shot-seed{self.seed}"

    @property
    def cell_id(self) -> str:
        where = {"finetune": self.dataset, "stream": "stream", "unseen": f"unseen/{self.dataset}"}[self.kind]
        return f"{where}/{self.label}-{self.hash}"

    def to_dict(self) -> dict[str, Any]:
        if self.kind == "finetune":
            return {"id": self.cell_id, "dataset": self.dataset, "shots": self.shots, "method": self.method,
                    "options": self.options, "seed": self.seed, "all_shot": self.all_shot, "key": self.key,
                    "experiments": self.experiments}
        return {"id": self.cell_id, "kind": self.kind, "row": self.row, "seed": self.seed, "task": self.dataset,
                "depends": self.depends, "key": self.key, "experiments": self.experiments}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Cell":
        if d.get("kind", "finetune") == "finetune":
            return cls(dataset=d["dataset"], shots=d["shots"], method=d["method"], options=d["options"],
                       seed=d["seed"], all_shot=d["all_shot"], key=d["key"], experiments=list(d["experiments"]))
        if d["kind"] == "stream":
            return cls.stream(d["row"], d["seed"], d["key"], d["experiments"])
        return cls.unseen(d["task"], d["row"], d["seed"], d["key"], d["depends"], d["experiments"])
