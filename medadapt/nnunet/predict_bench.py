"""``medadapt bench-predict``: ``medadapt predict`` against nnU-Net's predictor (``nnUNetPredictor`` as
``nnUNetv2_predict_from_modelfolder`` builds it, predicting sequentially in one process) on the same exported
model and the same CT, wall time and peak memory side by side (issue 34).

A synthetic planning CT (default 512 x 512 x 200 voxels at 0.8 x 0.8 x 2.5 mm: a body ellipse in soft tissue,
bone and lung intensities with noise) is written once as NIfTI. For each head (a softmax head of 2 classes, one
of ``--many`` classes, and a sigmoid head of ``--many`` classes) a model folder is made from a network preset at
the model spacing (default 1.5 mm isotropic) with seeded random weights, exported with ``export-nnunet``, and
each tool predicts the CT in a fresh process, with and without test-time mirroring. Its peak memory is the
kernel's high-water mark of its resident memory (``ru_maxrss`` of ``wait4``: exact, and no sampling that would take
CPU from the measured run; the command is started from a small launcher process, since a child forked from the
benchmark's own process would start with, and report, that process's resident pages); its process tree is looked at every half second, and where it runs several processes
at once the largest sum of their proportional set sizes (PSS, which charges a page shared by forked processes to
each in part) is taken if larger. Both tools predict in one process here: nnU-Net is handed the case as a list, as
its Python API takes it (handed a folder, it forks a pool of file-listing workers). Time is the wall time,
imports included. nnU-Net has no sigmoid head of one label per
class (its sigmoid is region-based), so the sigmoid rows are medadapt's alone.

The network only sets the time per tile: memory grows with the number of classes and the volume (the
aggregated logits on the model's grid, the decision at the original size), which is what the command measures.
"""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from medadapt.errors import MedadaptError

HEADS = ("softmax-2", "softmax-many", "sigmoid-many")
#: nnU-Net's own predictor (nnUNetPredictor, as nnUNetv2_predict_from_modelfolder builds it: step 0.5, Gaussian
#: blending, mirroring on or off) on the CPU, predicting the files sequentially in this one process; the case is
#: named as a list (as nnU-Net's Python API takes it), since listing a folder forks a pool of file-listing workers
NNUNET_SEQUENTIAL = (
    "import sys, torch\n"
    "from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor\n"
    "model, image, out, mirror = sys.argv[1:5]\n"
    "p = nnUNetPredictor(tile_step_size=0.5, use_gaussian=True, use_mirroring=mirror == '1',\n"
    "                    perform_everything_on_device=False, device=torch.device('cpu'), allow_tqdm=False)\n"
    "p.initialize_from_trained_model_folder(model, use_folds=(0,))\n"
    "p.predict_from_files_sequential([[image]], [out], save_probabilities=False, overwrite=True)\n")


def write_ct(path: Path, shape_zyx=(200, 512, 512), spacing_zyx=(2.5, 0.8, 0.8), seed: int = 0) -> Path:
    """A synthetic CT (int16 HU) with a body ellipse, lungs, a spine and noise, in RAS-ish orientation."""
    from medadapt.data.io import write_volume

    rng = np.random.default_rng(seed)
    z, y, x = shape_zyx
    yy, xx = np.ogrid[:y, :x]
    cy, cx = y / 2, x / 2
    body = ((yy - cy) / (0.42 * y)) ** 2 + ((xx - cx) / (0.47 * x)) ** 2 <= 1
    lungs = ((((yy - cy + 0.05 * y) / (0.22 * y)) ** 2 + ((np.abs(xx - cx) - 0.2 * x) / (0.13 * x)) ** 2) <= 1)
    spine = ((yy - cy - 0.25 * y) / (0.06 * y)) ** 2 + ((xx - cx) / (0.05 * x)) ** 2 <= 1
    plane = np.full((y, x), -1000, np.int16)
    plane[body] = 40
    plane[lungs & body] = -800
    plane[spine] = 700
    volume = np.empty((z, y, x), np.int16)
    for k in range(z):
        volume[k] = plane + rng.normal(0, 20, (y, x)).astype(np.int16)
    affine = np.diag([spacing_zyx[2], spacing_zyx[1], spacing_zyx[0], 1.0])
    write_volume(volume, affine, path, dtype=np.int16)
    return path


def make_model(out: Path, preset_name: str, head: str, many: int, model_spacing: float, seed: int = 0) -> Path:
    """A model folder: ``preset_name``'s network with ``head``'s outputs and seeded random weights, planned at
    ``model_spacing`` mm for CT."""
    import torch

    from medadapt.data.preprocessing import IntensityProperties, PreprocessingPlan
    from medadapt.models import ModelFolder, preset, save_model_folder
    from medadapt.models.network import build_network

    activation = "sigmoid" if head.startswith("sigmoid") else "softmax"
    classes = 2 if head == "softmax-2" else many
    names = ["background"] + [f"structure_{i:02d}" for i in range(1, classes + (activation == "sigmoid"))]
    outputs = classes if activation == "sigmoid" else len(names)
    spec = preset(preset_name, input_channels=1, num_classes=outputs)
    torch.manual_seed(seed)
    network = build_network(spec)
    stats = IntensityProperties(mean=40.0, std=200.0, percentile_00_5=-1000.0, percentile_99_5=700.0, min=-1024.0,
                                max=1500.0, median=40.0)
    plan = PreprocessingPlan(target_spacing=(model_spacing,) * 3, normalization=["CT"], intensity_properties=[stats],
                             orientation="RAS")
    folder = ModelFolder(network=spec, preprocessing=plan.to_dict(), labels={n: i for i, n in enumerate(names)},
                         channel_names={"0": "CT"}, activation=activation,
                         provenance={"kind": "bench-predict", "seed": seed})
    save_model_folder(out, network, folder)
    return out


def _pss(pid: int) -> int:
    """Proportional set size of ``pid`` in bytes; 0 once it has gone."""
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _descendants(pid: int) -> list[int]:
    """The processes below ``pid`` (Linux /proc)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                children.setdefault(int(f.read().rsplit(")", 1)[1].split()[1]), []).append(int(entry))
        except (OSError, IndexError, ValueError):
            continue
    found, todo = [], list(children.get(pid, []))
    while todo:
        p = todo.pop()
        found.append(p)
        todo += children.get(p, [])
    return found


#: a small process that starts the measured command and reports its ``wait4`` rusage: Linux carries a process's
#: resident high-water mark across ``exec`` and a forked child starts with its parent's resident pages, so a
#: command forked from this (large) process would report at least this process's size; forked from the launcher,
#: its high-water mark is the larger of the launcher's ~10 MB and its own peak
LAUNCHER = (
    "import os, sys\n"
    "pid = os.fork()\n"
    "if pid == 0:\n"
    "    try:\n"
    "        os.execvp(sys.argv[2], sys.argv[2:])\n"
    "    except OSError as exc:\n"
    "        print(f'cannot run {sys.argv[2]}: {exc}', flush=True)\n"
    "        os._exit(127)\n"
    "_, status, usage = os.wait4(pid, 0)\n"
    "code = os.waitstatus_to_exitcode(status)\n"
    "with open(sys.argv[1], 'w') as f:\n"
    "    f.write(f'{usage.ru_maxrss} {code}')\n"
    "sys.exit(code if 0 <= code < 256 else 1)\n"
)


def measure(command: list[str], env: dict[str, str] | None = None, interval: float = 0.5) -> dict[str, Any]:
    """Run ``command``; its wall seconds, its peak memory (the kernel's resident high-water mark of the process,
    or the summed PSS of its process tree where that was larger while it ran several processes), the most
    processes seen at once, and its exit status.

    The command is started by :data:`LAUNCHER`, a fresh small interpreter, so the reading holds none of this
    process's memory."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "rusage"
        with open(Path(tmp) / "log", "w+") as log:
            started = time.perf_counter()
            proc = subprocess.Popen([sys.executable, "-I", "-S", "-c", LAUNCHER, str(report), *command], env=env,
                                    stdout=log, stderr=subprocess.STDOUT, text=True)
            tree_peak, processes = 0, 1
            while proc.poll() is None:
                below = _descendants(proc.pid)  # the command and what it starts (not the launcher)
                processes = max(processes, len(below))
                if len(below) > 1:
                    tree_peak = max(tree_peak, sum(_pss(p) for p in below))
                time.sleep(interval)
            seconds = time.perf_counter() - started
            log.seek(0)
            output = log.read()
        try:
            maxrss_kib, returncode = (int(v) for v in report.read_text().split())
        except (OSError, ValueError):  # the launcher itself failed
            maxrss_kib, returncode = 0, proc.returncode
    return {"seconds": seconds, "peak_bytes": max(maxrss_kib * 1024, tree_peak), "processes": processes,
            "returncode": returncode, "output_tail": output[-2000:]}


def run_bench_predict(out: str | Path, shape=(200, 512, 512), spacing=(2.5, 0.8, 0.8), model_spacing: float = 1.5,
                      preset_name: str = "cpu-small", many: int = 25, heads=HEADS, mirror=(False, True),
                      tools=("medadapt", "nnunet"), progress: bool = True) -> list[dict[str, Any]]:
    """Measure every (head, mirroring, tool); write ``results.json``, ``results.csv``, ``results.md`` in ``out``
    and return the rows."""
    from medadapt.nnunet.export import export_model

    out = Path(out)
    inputs = out / "input"
    inputs.mkdir(parents=True, exist_ok=True)
    ct = inputs / "ct_0000.nii.gz"
    if not ct.is_file():
        if progress:
            print(f"writing the CT ({'x'.join(map(str, shape))} voxels at {spacing} mm) -> {ct}", flush=True)
        write_ct(ct, shape, spacing)
    exe = Path(sys.executable).parent
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", str(os.cpu_count() or 1))}
    for var in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):  # nnU-Net warns without them
        env.setdefault(var, str(out / var))
    rows = []
    for head in heads:
        model = out / "models" / head
        if not (model / "plans.json").is_file():
            make_model(model, preset_name, head, many, model_spacing)
        nnunet_model = out / "models" / f"{head}-nnunet"
        softmax = not head.startswith("sigmoid")
        if softmax and "nnunet" in tools and not (nnunet_model / "dataset.json").is_file():
            export_model(model, nnunet_model)
        for mirrored in mirror:
            for tool in tools:
                if tool == "nnunet" and not softmax:
                    continue  # nnU-Net's sigmoid is region-based: no such head to compare
                pred = out / "predictions" / f"{head}-{'mirror' if mirrored else 'plain'}-{tool}"
                if tool == "medadapt":
                    command = [str(exe / "medadapt"), "predict", "--model", str(model), "--input", str(ct),
                               "--out", str(pred), "--quiet", *(["--mirror"] if mirrored else [])]
                else:  # nnU-Net's predictor in one process (its CLI's workers hang on such a volume)
                    pred.mkdir(parents=True, exist_ok=True)  # it writes into an existing folder
                    command = [sys.executable, "-c", NNUNET_SEQUENTIAL, str(nnunet_model), str(ct), str(pred / "ct"),
                               "1" if mirrored else "0"]
                result = measure(command, env)
                if result["returncode"] != 0:
                    raise MedadaptError(f"bench-predict: {tool} failed on {head} (exit {result['returncode']}): "
                                        f"{result['output_tail'].strip().splitlines()[-1:]}")
                row = {"head": head, "classes": 2 if head == "softmax-2" else many, "mirror": mirrored,
                       "tool": tool, "seconds": round(result["seconds"], 1),
                       "peak_gib": round(result["peak_bytes"] / 2**30, 2), "processes": result["processes"]}
                rows.append(row)
                if progress:
                    print(f"  {head:13s} mirror={str(mirrored):5s} {tool:8s} {row['seconds']:7.1f} s  "
                          f"{row['peak_gib']:5.2f} GiB", flush=True)
    _write(out, rows, {"shape_zyx": list(shape), "spacing_zyx": list(spacing), "model_spacing": model_spacing,
                       "preset": preset_name, "many": many, "calls": CALLS})
    return rows


#: how each tool was called (results.json's setting and results.md's footnote)
CALLS = {
    "medadapt": "medadapt predict --model MODEL --input CT --out OUT [--mirror] (its own process)",
    "nnunet": "nnUNetPredictor(tile_step_size=0.5, use_gaussian=True, use_mirroring=MIRROR, "
              "perform_everything_on_device=False, device=cpu).initialize_from_trained_model_folder(EXPORTED, "
              "use_folds=(0,)).predict_from_files_sequential([[CT]], [OUT]) in one process, as "
              "nnUNetv2_predict_from_modelfolder builds its predictor; not its CLI, whose worker pool (handed a "
              "folder it forks 12 workers) hung on the full-size CT here",
}


def _write(out: Path, rows: list[dict[str, Any]], setting: dict[str, Any]) -> None:
    import csv
    import io

    from medadapt.utils.atomic import atomic_write_json, atomic_write_text

    atomic_write_json(out / "results.json", {"setting": setting, "rows": rows})
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(out / "results.csv", buf.getvalue())
    used = {r["tool"] for r in rows}
    calls = "".join(f"\n- {tool}: {how}" for tool, how in setting.get("calls", {}).items() if tool in used)
    atomic_write_text(out / "results.md", table(rows) + "\n" + (f"\nHow each tool was called:{calls}\n" if calls else ""))


def table(rows: list[dict[str, Any]]) -> str:
    """medadapt beside nnU-Net per head and mirroring, with the ratios."""
    from medadapt.utils.tables import markdown_table

    lines = []
    for head in dict.fromkeys(r["head"] for r in rows):
        for mirrored in dict.fromkeys(r["mirror"] for r in rows):
            by_tool = {r["tool"]: r for r in rows if r["head"] == head and r["mirror"] == mirrored}
            m, n = by_tool.get("medadapt"), by_tool.get("nnunet")
            if m is None:
                continue
            lines.append([head, "yes" if mirrored else "no", f"{m['seconds']:.1f}",
                          f"{n['seconds']:.1f}" if n else "–", f"{m['seconds'] / n['seconds']:.2f}×" if n else "–",
                          f"{m['peak_gib']:.2f}", f"{n['peak_gib']:.2f}" if n else "–",
                          f"{m['peak_gib'] / n['peak_gib']:.2f}×" if n else "–"])
    return markdown_table(["head", "mirroring", "medadapt (s)", "nnU-Net (s)", "time ratio", "medadapt peak (GiB)",
                           "nnU-Net peak (GiB)", "memory ratio"], lines)


__all__ = ["run_bench_predict", "write_ct", "make_model", "measure", "table"]
