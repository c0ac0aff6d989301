"""``medadapt bench-speed``: seconds per training iteration of every strategy, side by side.

All strategies train copies of the same network on the same batches in one process, interleaved iteration by
iteration (the order rotates every round), so machine noise hits them alike and the ratio to ``full`` is
meaningful even on a shared machine. An iteration is split into forward (+ loss), backward, the strategy's
selection (its optimizer pre/post hooks: top-k, masking, restoring) and the optimizer step.

Peak memory: on a GPU, ``torch.cuda.max_memory_allocated`` per strategy. On a CPU there is no allocator
statistic, so each strategy runs a few iterations in a fresh process and reports how far training raised the
process's resident memory (sampled every millisecond) above what it was before the first iteration.
"""
from __future__ import annotations

import copy
import dataclasses
import gc
import multiprocessing as mp
import os
import statistics
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from medadapt.engine.losses import DeepSupervisedDiceCE
from medadapt.models.network import NetworkSpec, build_network
from medadapt.tuning import FullFineTuning, make_strategy
from medadapt.tuning.registry import options_for
from medadapt.utils.tables import markdown_table

PHASES = ("forward", "backward", "selection", "step")
#: MedSeqFT's K&G RFT stages (medadapt.tuning.distill), timed through their own training steps: the KD-based
#: FFT (full fine-tuning + encoder distillation on a buffer batch, two optimisers) and the LoRA-based KD
#: (rank-2 encoder LoRA distilled from a frozen encoder, no decoder forward); only their totals are split out
STAGES = ("kd-fft", "lora-kd")
#: a method name with this suffix is timed on cached backbone features (finetune --feature-cache): the head's
#: forward, backward and step on the features of the batch's patches, computed once beforehand (not timed)
CACHED = "+cache"
#: the method every ratio is relative to: full fine-tuning
REFERENCE = FullFineTuning.name


class Cycle:
    """A sampler over fixed batches, in turn (the KD stage's buffer batches: ``keys=("image",)``; the engine's
    sampler in ``--against-nnunet``, whose timed steps are handed their batch directly)."""

    def __init__(self, batches, keys=None):
        self.batches, self.keys, self.i = batches, keys, 0

    def sample(self, rng):
        b = self.batches[self.i % len(self.batches)]
        self.i += 1
        return {k: b[k] for k in (self.keys or b)}


def make_batches(n: int, batch: int, channels: int, classes: int, patch: Sequence[int], seed: int = 0,
                 device: str = "cpu") -> list[dict]:
    """Random images with blob-like labels (so Dice has foreground), identical for every strategy."""
    g = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(n):
        image = torch.randn(batch, channels, *patch, generator=g)
        smooth = torch.nn.functional.avg_pool3d(torch.randn(batch, 1, *patch, generator=g), 5, 1, 2)
        label = torch.bucketize(smooth, torch.linspace(-0.2, 0.2, classes - 1)).long() if classes > 1 else \
            torch.zeros(batch, 1, *patch, dtype=torch.long)
        batches.append({"image": image.to(device), "label": label.to(device)})
    return batches


class _Timer:
    """Optimizer hooks around the strategy's own: splits ``optimizer.step()`` into selection and step."""

    def __init__(self, sync):
        self.sync = sync
        self.t = {}

    def stamp(self, key):
        def hook(*_):
            self.sync()
            self.t[key] = time.perf_counter()
        return hook


class _Run:
    def __init__(self, method: str, foundation: torch.nn.Module, options: dict, calibration: list[dict], sync,
                 precision: str = "fp32"):
        from medadapt.engine.precision import MixedPrecision

        torch.manual_seed(0)
        self.method = method
        device = next(foundation.parameters()).device
        self.amp = MixedPrecision(precision, device)  # the engine's autocast and gradient scaler
        self.stage_loss = None
        if method in STAGES:
            from medadapt.tuning.distill import (EncoderLoRADistillation, FeatureDistillation, KDFineTuning,
                                                 frozen_copy)

            teacher = frozen_copy(foundation)
            if method == "kd-fft":
                self.strategy = KDFineTuning(teacher, Cycle(calibration, keys=("image",)), seed=0)
            else:
                self.strategy = EncoderLoRADistillation(rank=2)
                self.stage_loss = FeatureDistillation(teacher)
        else:
            self.strategy = make_strategy(method.removesuffix(CACHED), **options_for(method.removesuffix(CACHED),
                                                                                     options))
        self.model = self.strategy.prepare(copy.deepcopy(foundation))
        self.model.train()
        self.tail, self.features = None, {}
        if method.endswith(CACHED):
            from medadapt.tuning.features import trainable_tail

            self.tail = trainable_tail(self.model)
        self.loss = DeepSupervisedDiceCE()
        self.optimizer = torch.optim.SGD(self.strategy.parameters(self.model), lr=1e-3, momentum=0.99,
                                         nesterov=True, weight_decay=3e-5)
        self.timer = _Timer(sync)
        # order: [a] strategy pre-hook [b] ... step ... [c] strategy post-hook [d]
        self.optimizer.register_step_pre_hook(self.timer.stamp("a"))
        self.optimizer.register_step_post_hook(self.timer.stamp("c"))
        self.strategy.attach(self.optimizer)
        self.optimizer.register_step_pre_hook(self.timer.stamp("b"))
        self.optimizer.register_step_post_hook(self.timer.stamp("d"))
        if self.strategy.needs_calibration:
            self.strategy.calibrate(self.model, lambda m, b: self.loss(m(b["image"]), b["label"]), calibration)
        self.sync = sync
        self.times: dict[str, list[float]] = {p: [] for p in (*PHASES, "total")}

    def step(self, batch: dict, record: bool) -> None:
        if self.method in STAGES:  # the stage's own training step, timed as a whole
            from medadapt.tuning.base import StepContext

            loss = self.stage_loss or (lambda m, b, o: self.loss(o, b["label"]))
            ctx = StepContext(model=self.model, forward=self.model, optimizer=self.optimizer, loss=loss,
                              grad_clip=12.0, precision=self.amp)
            self.sync()
            t0 = time.perf_counter()
            self.strategy.train_step(ctx, batch)
            self.amp.update()
            self.sync()
            if record:
                for key in PHASES:
                    self.times[key].append(float("nan"))
                self.times["total"].append(time.perf_counter() - t0)
            return
        sync = self.sync
        forward, inputs = self.model, batch["image"]
        if self.tail is not None:  # the head alone, on the patches' features computed once (untimed)
            forward, inputs = self.tail, self._features(batch)
        self.optimizer.zero_grad(set_to_none=True)
        sync()
        t0 = time.perf_counter()
        with self.amp.autocast():
            loss = self.loss(forward(inputs), batch["label"])
        sync()
        t1 = time.perf_counter()
        self.amp.backward(loss)
        sync()
        t2 = time.perf_counter()
        self.amp.step(self.optimizer, self.model.parameters(), 12.0)  # unscale, clip, step (as the engine)
        self.amp.update()
        sync()
        t3 = time.perf_counter()
        if record:
            t = self.timer.t
            for key, value in (("forward", t1 - t0), ("backward", t2 - t1),
                               ("selection", (t["b"] - t["a"]) + (t["d"] - t["c"])), ("step", t["c"] - t["b"]),
                               ("total", t3 - t0)):
                self.times[key].append(value)


    def _features(self, batch: dict) -> torch.Tensor:
        key = id(batch["image"])
        if key not in self.features:
            captured = {}
            handle = self.tail.register_forward_pre_hook(lambda m, a: captured.setdefault("x", a[0].detach()))
            try:
                with torch.no_grad():
                    self.model(batch["image"])
            finally:
                handle.remove()
            self.features[key] = captured["x"]
        return self.features[key]


def sync_for(device: torch.device):
    return torch.cuda.synchronize if device.type == "cuda" else (lambda: None)


def io_channels(network: torch.nn.Module) -> tuple[int, int]:
    """(input channels, classes) of a segmentation network: its first convolution's input, its (highest-resolution)
    head's output."""
    from medadapt.models.parts import is_conv, model_parts

    channels = next(m for m in network.modules() if is_conv(m)).in_channels
    head_convs = [m for m in model_parts(network).heads[-1].modules() if is_conv(m)]
    return channels, head_convs[-1].out_channels


def time_methods(foundation: torch.nn.Module, methods: Sequence[str], patch: Sequence[int], batch: int,
                 iterations: int = 5, warmup: int = 2, options: dict | None = None, device: str = "cpu",
                 progress: bool = True, precision: str = "fp32") -> dict[str, dict[str, float]]:
    """Median seconds per phase for each method, interleaved round-robin on identical batches."""
    device_t = torch.device(device)
    foundation = foundation.to(device_t)
    channels, classes = io_channels(foundation)
    batches = make_batches(warmup + iterations, batch, channels, classes, patch, device=device)
    sync = sync_for(device_t)
    runs = [_Run(m, foundation, options or {}, batches[:1], sync, precision) for m in methods]
    from tqdm.auto import tqdm

    bar = tqdm(total=(warmup + iterations) * len(runs), desc="bench-speed", unit="it", disable=not progress,
               leave=False)
    for i, b in enumerate(batches):
        order = runs[i % len(runs):] + runs[:i % len(runs)]  # rotate so no method always runs first
        for run in order:
            run.step(b, record=i >= warmup)
            bar.update(1)
    bar.close()
    return {r.method: {k: statistics.median(v) for k, v in r.times.items()} for r in runs}


def _memory_child(spec: dict, weights: str | None, method: str, options: dict, patch, batch: int,
                  iterations: int, queue, precision: str = "fp32") -> None:
    from medadapt.utils.allocator import keep_freed_memory

    keep_freed_memory()  # as in the parent (the CLI): the same allocator behaviour in both measurements
    foundation = build_network(NetworkSpec.from_dict(spec))
    if weights:
        foundation.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
    channels, classes = spec["input_channels"], spec["num_classes"]
    batches = make_batches(iterations, batch, channels, classes, patch)
    if method not in STAGES:
        make_strategy(method, **options_for(method, options))  # its modules imported before the window
    import monai.networks.blocks  # noqa: F401  MONAI too (strategies import it when they build a block)
    gc.collect()
    with _RssSampler() as rss:  # from before the strategy's copy of the model (and SGST's calibration pass)
        run = _Run(method, foundation, options, batches[:1], lambda: None, precision)
        for b in batches:
            run.step(b, record=False)
    queue.put(rss.peak - rss.start)


class _RssSampler:
    """Peak resident memory while the block runs, sampled every millisecond from /proc/self/statm (the
    process's lifetime high-water mark would include what importing libraries once took)."""

    def __init__(self, interval: float = 1e-3):
        self.interval = interval
        self.page = os.sysconf("SC_PAGE_SIZE")

    def _rss(self) -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * self.page

    def _watch(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._rss())
            self._stop.wait(self.interval)

    def __enter__(self):
        self.start = self.peak = self._rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._rss())


def cpu_peak_memory(spec: NetworkSpec, weights: Path | None, method: str, options: dict, patch, batch: int,
                    iterations: int = 2, precision: str = "fp32") -> int:
    """Bytes by which training ``iterations`` steps raises a fresh process's peak resident memory."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_memory_child, args=(spec.to_dict(), str(weights) if weights else None, method,
                                                   options, tuple(patch), batch, iterations, queue, precision))
    proc.start()
    value = queue.get()
    proc.join()
    return int(value)


def gpu_peak_memory(foundation: torch.nn.Module, method: str, options: dict, patch, batch: int,
                    iterations: int = 2, precision: str = "fp32") -> int:
    device = torch.device("cuda")
    channels, classes = io_channels(foundation)
    batches = make_batches(iterations, batch, channels, classes, patch, device="cuda")
    run = _Run(method, foundation.to(device), options, batches[:1], torch.cuda.synchronize, precision)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    for b in batches:
        run.step(b, record=False)
    peak = torch.cuda.max_memory_allocated()
    del run
    torch.cuda.empty_cache()
    return int(peak)


def speed_table(results: dict[str, dict[str, float]], memory: dict[str, int] | None) -> str:
    full = results.get(REFERENCE, {}).get("total")
    full_mem = (memory or {}).get(REFERENCE)
    rows = []
    for method, t in results.items():
        row = [method, f"{t['total']:.3f}", *(f"{t[p]:.3f}" if t[p] == t[p] else "-" for p in PHASES),
               f"{t['total'] / full:.3f}" if full else "-"]
        if memory is not None:
            m = memory[method]
            row += ["-", "-"] if m is None else [f"{m / 2 ** 20:.0f}", f"{m / full_mem:.2f}" if full_mem else "-"]
        rows.append(row)
    header = ["method", "s/iter", *(f"{p} s" for p in PHASES), "ratio to full"]
    if memory is not None:
        header += ["peak MiB", "mem. ratio"]
    return markdown_table(header, rows)


@dataclasses.dataclass(frozen=True)
class SpeedRequest:
    """What ``bench-speed`` measures: the network (a model folder, or a preset at ``patch`` and ``batch``), the
    ``methods`` (default: every method that trains) with their ``options``, ``iterations`` timed after
    ``warmup`` ones, peak memory (``memory``), on ``device`` at ``precision`` (auto: fp16 autocast + gradient
    scaler on CUDA, as nnU-Net's trainer; fp32 on the CPU). ``against_nnunet``: time medadapt's training step
    against nnU-Net's instead (the ``nnunet`` speed reference of :mod:`medadapt.plugins`,
    :mod:`medadapt.nnunet.speed`; full and dgst, no memory measurement)."""

    model: Path | None = None
    preset_name: str | None = None
    patch: Sequence[int] | None = None
    batch: int | None = None
    methods: Sequence[str] | None = None
    iterations: int = 5
    warmup: int = 2
    memory: bool = True
    device: str | None = None
    options: dict | None = None
    against_nnunet: bool = False
    precision: str = "auto"


def _foundation(r: SpeedRequest):
    """The network timed: ``(model folder or None, spec, weights file or None, network, label)``; with
    ``--against-nnunet``, refused in one line (before loading weights) where nnU-Net cannot train it."""
    from medadapt.models import load_model_folder, preset

    check = None
    if r.against_nnunet:
        from medadapt.plugins import speed_reference

        check = speed_reference("nnunet").check
    if r.model is not None:
        folder = load_model_folder(r.model)
        if check:
            check(folder.network, folder)
        return folder, folder.network, folder.path / "weights.pt", folder.load_network(), str(r.model)
    spec = preset(r.preset_name or "cpu-small", input_channels=1, num_classes=2)
    if check:
        check(spec)
    torch.manual_seed(0)
    return None, spec, None, build_network(spec), f"preset {r.preset_name or 'cpu-small'}"


def _methods(r: SpeedRequest) -> list[str]:
    """The methods timed, the reference (full) first where not named; unknown ones refused in one line."""
    from medadapt.errors import MedadaptError
    from medadapt.tuning import method_names
    from medadapt.tuning.registry import methods as registered

    cacheable = [name for name, d in registered().items() if d.cacheable]
    known = method_names(training_only=True) + list(STAGES) + [m + CACHED for m in cacheable]
    methods = list(r.methods or method_names(training_only=True))
    unknown = [m for m in methods if m not in known]
    if unknown:
        raise MedadaptError(f"--methods: unknown {', '.join(unknown)}; choose from {', '.join(known)}")
    if REFERENCE not in methods:
        methods.insert(0, REFERENCE)  # the reference of every ratio
    return methods


def _device(r: SpeedRequest) -> str:
    from medadapt.errors import MedadaptError

    device = r.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device not in ("cpu", "cuda") or (device == "cuda" and not torch.cuda.is_available()):
        raise MedadaptError(f"--device {device}: use cpu, or cuda on a machine with a GPU")
    if r.warmup < 0:
        raise MedadaptError(f"--warmup {r.warmup}: must be >= 0")
    return device


def _peaks(methods, foundation, spec, weights, options, patch, batch, device, precision) -> dict[str, int | None]:
    """Each method's peak memory (None for a cached-feature head: its features live in the cache)."""
    peaks: dict[str, int | None] = {}
    for m in methods:
        if m.endswith(CACHED):
            peaks[m] = None
        elif device == "cuda":
            peaks[m] = gpu_peak_memory(foundation, m, options, patch, batch, precision=precision)
        else:
            peaks[m] = cpu_peak_memory(spec, weights, m, options, patch, batch, precision=precision)
    return peaks


def run_bench_speed(request: SpeedRequest, *, as_json: bool = False, progress: bool = True) -> dict:
    """The ``bench-speed`` command: time, measure memory, print a table (or JSON), return the results."""
    import json
    import platform

    from medadapt.engine.precision import resolve_precision
    from medadapt.errors import MedadaptError

    r = request
    options = r.options or {}
    if r.against_nnunet and r.methods:
        raise MedadaptError("--methods: --against-nnunet times full and dgst; leave --methods out")
    folder, spec, weights, foundation, label = _foundation(r)
    patch = tuple(r.patch or spec.patch_size)
    batch = int(r.batch or spec.batch_size)
    methods = _methods(r)
    device = _device(r)
    precision = resolve_precision(r.precision, device)
    if r.against_nnunet:
        from medadapt.plugins import speed_reference

        return speed_reference("nnunet").run(foundation, spec, label, patch, batch, r.iterations, r.warmup, device,
                                             as_json, options, folder, progress, precision=precision)
    results = time_methods(foundation, methods, patch, batch, r.iterations, r.warmup, options, device, progress,
                           precision)
    peaks = (_peaks(methods, foundation, spec, weights, options, patch, batch, device, precision)
             if r.memory else None)
    params = sum(p.numel() for p in foundation.parameters())
    report = {"network": label, "parameters": params, "patch": list(patch), "batch": batch, "device": device,
              "gpu": torch.cuda.get_device_name() if device == "cuda" else None,
              "cpu_threads": torch.get_num_threads(), "torch": torch.__version__, "platform": platform.platform(),
              "iterations": r.iterations, "warmup": r.warmup, "options": options, "precision": precision,
              "date": time.strftime("%Y-%m-%d"), "seconds": results, "peak_memory_bytes": peaks}
    if as_json:
        print(json.dumps(report, indent=2))
    else:
        print(f"{label}: {params:,} parameters, patch {'x'.join(map(str, patch))}, batch {batch}, {device}"
              f"{' (' + report['gpu'] + ')' if report['gpu'] else ''}, {report['cpu_threads']} CPU threads; "
              f"median of {r.iterations} iterations after {r.warmup} warm-up, methods interleaved, {precision}")
        print(speed_table(results, peaks))
    return report
