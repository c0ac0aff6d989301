"""``medadapt bench-speed --against-nnunet``: medadapt's training step side by side with nnU-Net's.

Four runs train copies of the same network in one process: medadapt's engine step
(:meth:`medadapt.engine.trainer.Trainer.train_step`, which hands a ``StepContext`` to the strategy) and nnU-Net
v2's own ``nnUNetTrainer.train_step`` (:class:`medadapt.nnunet.trainer.nnUNetTrainerMedadapt`, the strategy
plugged in through ``configure_optimizers``), each for ``full`` and ``dgst``. What is the same on both sides:

* the network: nnU-Net's trainer builds it from plans whose configuration's ``architecture`` is medadapt's
  network spec (an nnU-Net model's own plans when ``--model`` is one), and it starts from medadapt's weights
  (loaded by the trainer's ``configure_optimizers`` with ``head="keep"``, before ``strategy.prepare``); the
  weights are compared tensor by tensor before timing;
* the batches (random images, blob labels), the patch, the batch size, the device; nnU-Net gets them as its
  data loader gives them: ``{'data', 'target'}`` with the target list of deep-supervision label maps (int16)
  that nnU-Net's ``DownsampleSegForDSTransform`` makes from the label map, computed once before timing (in
  nnU-Net they come from the data-loader workers); medadapt's step gets ``{'image', 'label'}`` and its loss
  downsamples the label map to each output itself, inside the step, as it does in training (with ``nearest``,
  voxel 2i, where nnU-Net's transform takes ``nearest-exact``, voxel 2i+1: the losses agree to about 1e-3,
  not exactly);
* the loss (Dice + CE, nnU-Net's deep-supervision weights, the same ``batch_dice``), SGD (Nesterov momentum
  0.99, weight decay 3e-5) at the same learning rate, gradient clipping at 12.

The runs are interleaved step by step (the order rotates every round), warm-up steps are dropped, and the
median seconds per step are reported with the ratios medadapt / nnU-Net per method and dgst / full per
framework. nnU-Net's step runs under autocast with a gradient scaler on CUDA (left as it is); medadapt's
step runs at the engine's precision. On CUDA cuDNN's autotuner is on for all runs, as nnU-Net's
``run_training`` sets it.
"""
from __future__ import annotations

import copy
import statistics
import tempfile
import time
from pathlib import Path

import torch

from medadapt.errors import MedadaptError
from medadapt.tuning import DGST, FullFineTuning
from medadapt.utils.tables import markdown_table

#: full fine-tuning and DGST, the DGST paper's speed claim (its sparse step against the dense one)
METHODS = (FullFineTuning.name, DGST.name)
FRAMEWORKS = ("medadapt", "nnunet")
#: the network classes nnU-Net's trainer builds from plans (PlainConvUNet, the residual-encoder U-Nets)
NNUNET_NETWORK_PACKAGE = "dynamic_network_architectures."
DATASET_NAME = "Dataset999_medadaptspeed"  # the temporary plans' dataset (nothing is read from it)


def check_network(spec, folder=None) -> None:
    """One line if nnU-Net's trainer cannot build or train this network as medadapt does."""
    if not spec.network_class_name.startswith(NNUNET_NETWORK_PACKAGE):
        raise MedadaptError(f"--against-nnunet: the network is {spec.network_class_name}, which nnU-Net's trainer "
                            f"does not build (it builds {NNUNET_NETWORK_PACKAGE}* networks such as PlainConvUNet); "
                            "use an nnU-Net preset (e.g. --preset nnunet-3d-fullres or cpu-small) or an nnU-Net model")
    if folder is not None:
        folder.require_segmentation_head("--against-nnunet", "time a model with a segmentation head")
        if folder.extensions:
            raise MedadaptError(f"--against-nnunet: {folder.path} holds adapters ({folder.extensions}), which "
                                "nnU-Net's plain network does not have")
        if folder.activation != "softmax":
            raise MedadaptError(f"--against-nnunet: {folder.path} is a {folder.activation} model; nnU-Net's trainer "
                                "trains a softmax output (Dice + CE)")
    if len(spec.patch_size) != 3:
        raise MedadaptError("--against-nnunet: medadapt times 3D networks")


def nnunet_plans(spec, patch, batch: int, folder=None) -> tuple[dict, str, dict, bool]:
    """nnU-Net plans, configuration name and dataset.json for ``spec`` at ``patch`` and ``batch``, plus the
    configuration's ``batch_dice`` (an nnU-Net model's own plans keep theirs; else medadapt's default, True).
    Built with :func:`medadapt.nnunet.export.build_plans`, as ``medadapt export-nnunet`` builds them."""
    from medadapt.models.model_folder import ModelFolder
    from medadapt.nnunet.export import build_plans

    channels, classes = spec.input_channels, spec.num_classes
    from_nnunet = folder is not None and folder.preprocessing.get("nnunet") is not None
    if not from_nnunet:  # the preprocessing fields only fill in the plans; a training step never reads them
        folder = ModelFolder(network=spec, labels={}, channel_names={},
                             preprocessing={"target_spacing": [1.0, 1.0, 1.0], "normalization": ["ZScore"] * channels,
                                            "intensity_properties": [None] * channels})
    plans, configuration = build_plans(folder, DATASET_NAME)
    config = plans["configurations"][configuration]
    config["architecture"]["network_class_name"] = spec.network_class_name
    config["architecture"]["arch_kwargs"] = copy.deepcopy(spec.arch_kwargs)
    config["architecture"]["_kw_requires_import"] = list(spec.kw_requires_import)
    config["patch_size"] = [int(p) for p in patch]
    config["batch_size"] = int(batch)
    config.pop("previous_stage", None)  # no cascade: the network takes the image channels only
    config.pop("next_stage", None)
    batch_dice = bool(config.get("batch_dice", True)) if from_nnunet else True
    config["batch_dice"] = batch_dice
    config["data_identifier"] = "medadapt_speed"
    dataset_json = {"channel_names": {str(c): f"channel{c}" for c in range(channels)},
                    "labels": {"background": 0, **{f"class{k}": k for k in range(1, classes)}},
                    "numTraining": 0, "file_ending": ".nii.gz"}
    return plans, configuration, dataset_json, batch_dice


class _MedadaptRun:
    """medadapt's engine, one strategy: the timed call is ``Trainer.train_step(batch)``."""

    framework = "medadapt"

    def __init__(self, method, foundation, batches, options, lr, batch_dice, device, workdir: Path,
                 precision: str = "fp32"):
        from medadapt.benchmark.speed import Cycle
        from medadapt.engine.trainer import Trainer, TrainingConfig
        from medadapt.tuning import make_strategy
        from medadapt.tuning.registry import options_for

        self.method = method
        torch.manual_seed(0)
        strategy = make_strategy(method, **options_for(method, options))
        model = strategy.prepare(copy.deepcopy(foundation))
        # the engine's defaults are nnU-Net's: SGD (Nesterov 0.99, weight decay 3e-5), poly schedule, clip 12
        config = TrainingConfig(epochs=1, iterations_per_epoch=1, initial_lr=lr,
                                loss={"name": "dice_ce", "batch_dice": batch_dice}, precision=precision)
        self.trainer = Trainer(model, strategy, Cycle(batches), config, workdir / f"medadapt_{method}",
                               progress=False, description=f"medadapt {method}", device=device)
        self.trainer.model.train()
        self.batches = batches

    @property
    def network(self) -> torch.nn.Module:
        return self.trainer.model

    def step(self, i: int) -> float:
        return self.trainer.train_step(self.batches[i])


class _NNUNetRun:
    """nnU-Net's trainer, one strategy: the timed call is ``nnUNetTrainer.train_step({'data', 'target'})``."""

    framework = "nnunet"

    def __init__(self, method, foundation, plans, configuration, dataset_json, options, lr, device):
        from medadapt.nnunet.env import quiet
        from medadapt.nnunet.trainer import trainer_class
        from medadapt.tuning import make_strategy
        from medadapt.tuning.registry import options_for

        self.method = method
        plans = copy.deepcopy(plans)
        plans["continue_training"] = False  # nnUNetTrainer.__init__ pops it
        with quiet():  # nnU-Net's device line and citation banner
            trainer = trainer_class(method)(plans=plans, configuration=configuration, fold=0,
                                            dataset_json=dataset_json, device=torch.device(device))
        labels = {k: int(v) for k, v in dataset_json["labels"].items()}
        weights = {k: v.detach().cpu().clone() for k, v in foundation.state_dict().items()}
        # head="keep": every weight of medadapt's network, the heads too, goes in before strategy.prepare
        strategy = make_strategy(method, **options_for(method, options))
        trainer.medadapt_setup(strategy, [], [], pretrained=weights, pretrained_labels=labels,
                               pretrained_source="medadapt's network", seed=0, initial_lr=lr, head="keep")
        with quiet():
            trainer.initialize()
        trainer.network.train()  # as nnU-Net's on_train_epoch_start
        trainer.lr_scheduler.step(0)  # the learning rate of epoch 0, as nnU-Net's on_train_epoch_start
        self.trainer = trainer
        self.batches: list[dict] = []

    @property
    def network(self) -> torch.nn.Module:
        from medadapt.nnunet.trainer import unwrap_network

        return unwrap_network(self.trainer.network)

    def set_batches(self, batches: list[dict]) -> None:
        self.batches = batches

    def step(self, i: int) -> float:
        return float(self.trainer.train_step(self.batches[i])["loss"])


def nnunet_batches(trainer, batches: list[dict], device: str) -> list[dict]:
    """The batches as nnU-Net's data loader gives them: ``data`` and the ``target`` list of DownsampleSegForDS
    label maps (int16, one per deep-supervision output, highest resolution first), each sample transformed on
    its own and stacked, as nnU-Net's dataloader does; placed on ``device`` (so are medadapt's)."""
    from batchgeneratorsv2.transforms.utils.deep_supervision_downsampling import DownsampleSegForDSTransform

    transform = DownsampleSegForDSTransform(trainer._get_deep_supervision_scales())
    out = []
    with torch.no_grad():
        for b in batches:
            per_sample = [transform(segmentation=s.to("cpu", torch.int16))["segmentation"] for s in b["label"]]
            target = [torch.stack(t).to(device) for t in zip(*per_sample)]
            out.append({"data": b["image"], "target": target, "keys": [f"sample{j}" for j in range(len(per_sample))]})
    return out


def same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    """Whether two networks hold exactly the same tensors under the same names."""
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k].cpu(), sb[k].cpu()) for k in sa)


def time_against_nnunet(foundation: torch.nn.Module, spec, patch, batch: int, iterations: int = 5,
                        warmup: int = 2, options: dict | None = None, device: str = "cpu", folder=None,
                        progress: bool = True, precision: str = "auto") -> dict:
    """Median seconds per training step of medadapt's engine and nnU-Net's trainer, for full and dgst,
    interleaved on identical batches from identical weights. Returns the measurement as data."""
    from medadapt.benchmark.speed import sync_for, make_batches
    from medadapt.nnunet.env import import_nnunet, temporary_environment

    import_nnunet("nnunetv2.training.nnUNetTrainer.nnUNetTrainer")  # one line if nnunetv2 is not installed
    from medadapt.nnunet.trainer import FINETUNE_LR
    from medadapt.tuning import make_strategy
    from medadapt.tuning.registry import options_for

    check_network(spec, folder)
    options = dict(options or {})
    device_t = torch.device(device)
    from medadapt.engine.precision import resolve_precision

    precision = resolve_precision(precision, device_t)  # auto: fp16 + scaler on CUDA, as nnU-Net's train_step
    foundation = foundation.to(device_t)
    plans, configuration, dataset_json, batch_dice = nnunet_plans(spec, patch, batch, folder)
    data = make_batches(warmup + iterations, batch, spec.input_channels, spec.num_classes, patch, device=device)
    # the learning rate medadapt_setup gives each method (nnU-Net's trainer and medadapt's engine alike)
    lrs = {m: make_strategy(m, **options_for(m, options)).default_lr or FINETUNE_LR for m in METHODS}
    sync = sync_for(device_t)
    cudnn = torch.backends.cudnn.benchmark
    with tempfile.TemporaryDirectory(prefix="medadapt-speed-") as tmp:
        root = Path(tmp)
        pre = root / "nnUNet_preprocessed" / DATASET_NAME / plans["configurations"][configuration]["data_identifier"]
        pre.mkdir(parents=True)
        (pre / "placeholder.b2nd").touch()  # initialize() infers the dataset class from the file endings only
        env = {"nnUNet_preprocessed": str(root / "nnUNet_preprocessed"), "nnUNet_results": str(root / "nnUNet_results"),
               "nnUNet_raw": str(root / "nnUNet_raw")}
        with temporary_environment(env):
            runs = []
            for m in METHODS:
                runs.append(_MedadaptRun(m, foundation, data, options, lrs[m], batch_dice, device, root, precision))
                runs.append(_NNUNetRun(m, foundation, plans, configuration, dataset_json, options, lrs[m], device))
        nn_data = nnunet_batches(runs[1].trainer, data, device)
        for run in runs:
            if run.framework == "nnunet":
                run.set_batches(nn_data)
        identical = all(same_weights(a.network, b.network) for a, b in zip(runs[::2], runs[1::2]))
        if not identical:
            raise RuntimeError("medadapt's and nnU-Net's networks do not start from the same weights")
        times = {f: {m: [] for m in METHODS} for f in FRAMEWORKS}
        losses = {f: {m: [] for m in METHODS} for f in FRAMEWORKS}
        from tqdm.auto import tqdm

        bar = tqdm(total=(warmup + iterations) * len(runs), desc="bench-speed vs nnU-Net", unit="it",
                   disable=not progress, leave=False)
        if device_t.type == "cuda":
            torch.backends.cudnn.benchmark = True  # as nnU-Net's run_training sets it
        try:
            for i in range(warmup + iterations):
                k = i % len(runs)
                for run in runs[k:] + runs[:k]:  # rotate so no run always comes first
                    sync()
                    t0 = time.perf_counter()
                    loss = run.step(i)
                    sync()
                    dt = time.perf_counter() - t0
                    losses[run.framework][run.method].append(loss)
                    if i >= warmup:
                        times[run.framework][run.method].append(dt)
                    bar.update(1)
        finally:
            torch.backends.cudnn.benchmark = cudnn
            bar.close()
    seconds = {f: {m: statistics.median(times[f][m]) for m in METHODS} for f in FRAMEWORKS}
    # nnU-Net's Dice term is -Dice, medadapt's 1 - Dice (the deep-supervision weights sum to 1): the same
    # gradients, losses 1 apart. Step after step the gap stays 1 when both sides train the same way (up to the
    # half-voxel shift of the downsampled targets and summation order).
    gap = max(abs(a - b - 1.0) for m in METHODS for a, b in zip(losses["medadapt"][m], losses["nnunet"][m]))
    return {
        "seconds": seconds,
        "ratio_to_nnunet": {m: seconds["medadapt"][m] / seconds["nnunet"][m] for m in METHODS},
        "dgst_to_full": {f: seconds[f][DGST.name] / seconds[f][FullFineTuning.name] for f in FRAMEWORKS},
        "iteration_seconds": times,
        "losses": losses,
        "identical_initial_weights": identical,
        "max_loss_gap": gap,
        "lr": lrs,
        "batch_dice": batch_dice,
        "nnunet_autocast": device_t.type == "cuda",
        "medadapt_precision": precision,
        "cudnn_benchmark": device_t.type == "cuda",
    }


def against_nnunet_table(result: dict) -> str:
    s, r, d = result["seconds"], result["ratio_to_nnunet"], result["dgst_to_full"]
    rows = [[m, f"{s['medadapt'][m]:.4f}", f"{s['nnunet'][m]:.4f}", f"{r[m]:.3f}"] for m in METHODS]
    rows.append(["dgst / full", f"{d['medadapt']:.3f}", f"{d['nnunet']:.3f}", "-"])
    return markdown_table(["method", "medadapt s/iter", "nnU-Net s/iter", "medadapt / nnU-Net"], rows)


def run_against_nnunet(foundation, spec, label: str, patch, batch: int, iterations: int, warmup: int,
                       device: str, as_json: bool, options: dict, folder=None, progress: bool = True,
                       precision: str = "auto") -> dict:
    """``bench-speed --against-nnunet``: measure, print a table (or JSON), return the report."""
    import json
    import platform
    from importlib.metadata import version

    result = time_against_nnunet(foundation, spec, patch, batch, iterations, warmup, options, device, folder,
                                 progress, precision)
    params = sum(p.numel() for p in foundation.parameters())
    report = {"network": label, "parameters": params, "patch": list(patch), "batch": batch, "device": device,
              "gpu": torch.cuda.get_device_name() if device == "cuda" else None,
              "cpu_threads": torch.get_num_threads(), "torch": torch.__version__, "nnunetv2": version("nnunetv2"),
              "platform": platform.platform(), "iterations": iterations, "warmup": warmup, "options": options,
              "date": time.strftime("%Y-%m-%d"), **result}
    if as_json:
        print(json.dumps(report, indent=2))
    else:
        print(f"{label}: {params:,} parameters, patch {'x'.join(map(str, patch))}, batch {batch}, {device}"
              f"{' (' + report['gpu'] + ')' if report['gpu'] else ''}, {report['cpu_threads']} CPU threads; "
              f"medadapt's Trainer.train_step against nnU-Net {report['nnunetv2']}'s nnUNetTrainer.train_step, "
              f"median of {iterations} steps after {warmup} warm-up, interleaved, same weights and batches"
              f"{'; nnU-Net under fp16 autocast (its CUDA default)' if result['nnunet_autocast'] else ''}; "
              f"medadapt {result['medadapt_precision']}")
        print(f"losses: medadapt's = nnU-Net's + 1 (its Dice term is 1 - Dice, nnU-Net's -Dice) at every step, "
              f"to within {result['max_loss_gap']:.1e} (the deep-supervision targets: nnU-Net downsamples with "
              "nearest-exact, medadapt with nearest)")
        print(against_nnunet_table(result))
    return report
