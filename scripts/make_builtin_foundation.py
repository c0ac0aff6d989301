"""Make the built-in foundation the demo starts from (medadapt/foundations/<name>/), with the documented commands.

    python scripts/make_builtin_foundation.py [--work DIR]

Runs the two commands docs/models.md gives (``medadapt synth`` of the demo's source cohort, ``medadapt pretrain``
with the demo's settings: ``medadapt.workflows.demo``'s SOURCE_DOMAIN, SOURCE_CASES, DOWNSAMPLE, PRETRAIN and
seed 0), then copies the model folder's plans.json and weights.pt into the package with ``foundation.json``:
what it segments, the network, the data's recipe and SHA-256, the pretraining settings as ``medadapt pretrain``
resolved them (its identity), the commands, the commit, the machine and every file's SHA-256.
tests/test_builtin_models.py checks the shipped record against the settings the demo would use.
"""
from __future__ import annotations

import argparse
import datetime
import json
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=None, help="where the data and the pretraining go (default: a "
                                                                "temporary folder)")
    args = parser.parse_args()
    import torch

    from medadapt.models.builtin import INFO_FILE, package_root
    from medadapt.models.model_folder import load_model_folder
    from medadapt.synth import GENERATOR_VERSION
    from medadapt.utils.digests import dataset_digest, file_sha256
    from medadapt.workflows.common import source_commit
    from medadapt.workflows.demo import BUILTIN_FOUNDATION, DOWNSAMPLE, PRETRAIN, SOURCE_CASES, SOURCE_DOMAIN

    work = args.work or Path(tempfile.mkdtemp(prefix="medadapt-foundation-"))
    data, model = work / SOURCE_DOMAIN, work / "foundation"
    commands = [
        ["medadapt", "synth", SOURCE_DOMAIN, "--cases", str(SOURCE_CASES), "--seed", "0", "--downsample",
         *map(str, DOWNSAMPLE), "--out", "DATA"],
        ["medadapt", "pretrain", "--data", "DATA", "--preset", PRETRAIN["preset_name"], "--epochs",
         str(PRETRAIN["epochs"]), "--iterations-per-epoch", str(PRETRAIN["iterations_per_epoch"]), "--seed", "0",
         "--out", "MODEL"],
    ]
    for command in commands:
        if command[1] == "pretrain" and (model / "plans.json").is_file():
            continue  # made by an earlier run of this script into the same --work
        argv = [str(data) if a == "DATA" else str(model) if a == "MODEL" else a for a in command]
        subprocess.run([sys.executable, "-m", "medadapt", *argv[1:], "--quiet"], check=True)
    identity = json.loads((model / "training" / "identity.json").read_text())
    folder = load_model_folder(model)
    dest = package_root() / BUILTIN_FOUNDATION
    shutil.rmtree(dest, ignore_errors=True)
    dest.mkdir(parents=True)
    plans = json.loads((model / "plans.json").read_text())
    plans.setdefault("provenance", {})["builtin"] = BUILTIN_FOUNDATION  # where the data lived is in foundation.json
    (dest / "plans.json").write_text(json.dumps(plans, indent=2) + "\n")
    shutil.copyfile(model / "weights.pt", dest / "weights.pt")
    spec = folder.network
    parameters = sum(p.numel() for p in folder.load_network().parameters())
    history = json.loads((model / "training" / "history.json").read_text())
    info = {
        "format": "medadapt-builtin-foundation/1",
        "name": BUILTIN_FOUNDATION,
        "description": "The demo's foundation: lymph nodes in synthetic head-and-neck CT (the built-in hn-source "
                       "domain, standing in for RADCURE), a small PlainConvUNet sized for CPUs. Synthetic data "
                       "only: a starting point for trying medadapt, not a clinical model.",
        "segments": [n for n, v in folder.labels.items() if v],
        "network": f"{PRETRAIN['preset_name']}: {spec.network_class_name.rsplit('.', 1)[-1]} "
                   f"{'-'.join(map(str, spec.arch_kwargs['features_per_stage']))}, {parameters:,} parameters, "
                   f"patch {'x'.join(map(str, spec.patch_size))}",
        "data": {"summary": f"{SOURCE_CASES} synthetic {SOURCE_DOMAIN} scans (seed 0, downsample "
                            f"{'x'.join(map(str, DOWNSAMPLE))})",
                 "domain": SOURCE_DOMAIN, "cases": SOURCE_CASES, "seed": 0, "downsample": list(DOWNSAMPLE),
                 "generator": GENERATOR_VERSION, "sha256": dataset_digest(data)},
        "settings": identity,
        "made": {"summary": f"medadapt pretrain, {PRETRAIN['epochs']} x {PRETRAIN['iterations_per_epoch']} "
                            f"iterations (final loss {history['epoch_loss'][-1]:.3f})",
                 "commands": [" ".join(c) for c in commands], "commit": source_commit(),
                 "date": datetime.date.today().isoformat(), "machine": platform.machine(),
                 "torch": torch.__version__, "threads": torch.get_num_threads()},
        "files": {name: file_sha256(dest / name) for name in ("plans.json", "weights.pt")},
    }
    (dest / INFO_FILE).write_text(json.dumps(info, indent=2) + "\n")
    print(f"{dest}: {', '.join(sorted(p.name for p in dest.iterdir()))}")


if __name__ == "__main__":
    main()
