"""``medadapt methods``: every fine-tuning method with what it trains on a given model."""
from __future__ import annotations

import copy

from torch import nn

from medadapt.models import ModelFolder
from medadapt.tuning import make_strategy, method_names
from medadapt.utils.tables import markdown_table
from medadapt.workflows.common import total_parameter_count, trainable_parameter_count


def methods_table(folder: ModelFolder | None = None, *, network: nn.Module | None = None, label: str | None = None,
                  **options) -> tuple[list[dict], str]:
    """Per method: trainable parameters (of the model as it trains, new modules included), their share of
    the foundation model's parameter count, and how many entries one optimizer step may change. For a model
    folder, or for a ``network`` as it is (e.g. a preset's, before any training)."""
    foundation = network if network is not None else folder.load_network()
    label = label or (str(folder.path) if folder is not None else type(foundation).__name__)
    total = total_parameter_count(foundation)
    rows = []
    for name in method_names():
        strategy = make_strategy(name, **options)
        model = strategy.prepare(copy.deepcopy(foundation))
        trainable = trainable_parameter_count(model)
        rows.append({"method": name, "trainable": trainable, "share": trainable / total,
                     "updated_per_step": strategy.updated_per_step(model), "what": strategy.summary})
    table = markdown_table(
        ["method", "trainable params", "share of model", "updated per step", "what is trained"],
        [[r["method"], f"{r['trainable']:,}", f"{100 * r['share']:.2f}%", f"{r['updated_per_step']:,}", r["what"]]
         for r in rows])
    return rows, f"{table}\n\nmodel: {label} ({total:,} parameters)"
