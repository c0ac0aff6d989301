"""``medadapt methods``: every fine-tuning method with what it trains on a given model."""
from __future__ import annotations

import copy

from torch import nn

from medadapt.models import ModelFolder
from medadapt.tuning import make_strategy, methods
from medadapt.utils.tables import markdown_table
from medadapt.workflows.common import total_parameter_count, trainable_parameter_count


def definitions_table() -> str:
    """Every method's definition as a table: name, what it trains, its options (flag=default; their values in
    the commands' --help) and what it can do; built-in methods first, then the plugins'."""
    rows = []
    for name, d in methods().items():
        options = ", ".join(f"{o.cli_flag(name)}={o.default_text if o.default_text is not None else o.default}"
                            for o in d.options)
        can = [w for w, yes in (("trains", d.trains), ("cached features", d.cacheable),
                                ("nnU-Net export", d.exportable and d.trains),
                                ("needs a pretext head", d.needs_pretext_head)) if yes]
        rows.append([name, d.summary, options or "–", ", ".join(can) or "–"])
    table = markdown_table(["method", "what is trained", "options", "capabilities"], rows)
    return (f"{table}\n\noptions: flag=default ('medadapt finetune --help' gives their values); with --model or "
            "--preset: every method's trainable parameters on that network")


def methods_table(folder: ModelFolder | None = None, *, network: nn.Module | None = None, label: str | None = None,
                  options: dict[str, dict] | None = None) -> tuple[list[dict], str]:
    """Per method: trainable parameters (of the model as it trains, new modules included), their share of
    the foundation model's parameter count, and how many entries one optimizer step may change. For a model
    folder, or for a ``network`` as it is (e.g. a preset's, before any training); ``options``: per method, the
    options to build it with (default its defaults)."""
    foundation = network if network is not None else folder.load_network()
    label = label or (str(folder.path) if folder is not None else type(foundation).__name__)
    total = total_parameter_count(foundation)
    rows = []
    for name, definition in methods().items():
        strategy = make_strategy(name, **(options or {}).get(name, {}))
        model = strategy.prepare(copy.deepcopy(foundation))
        trainable = trainable_parameter_count(model)
        rows.append({"method": name, "trainable": trainable, "share": trainable / total,
                     "updated_per_step": strategy.updated_per_step(model), "what": definition.summary})
    table = markdown_table(
        ["method", "trainable params", "share of model", "updated per step", "what is trained"],
        [[r["method"], f"{r['trainable']:,}", f"{100 * r['share']:.2f}%", f"{r['updated_per_step']:,}", r["what"]]
         for r in rows])
    return rows, f"{table}\n\nmodel: {label} ({total:,} parameters)"
