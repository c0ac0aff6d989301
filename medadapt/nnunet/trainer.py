"""nnU-Net v2's own training loop with a medadapt fine-tuning strategy applied.

:class:`nnUNetTrainerMedadapt` subclasses nnunetv2's ``nnUNetTrainer`` here, in medadapt (nothing is copied
into the nnunetv2 package), and is constructed and run directly, as ``nnunetv2.run.run_training`` does, so
nnU-Net's trainer-name lookup is not needed. Everything else is nnU-Net's: its dataloaders and data
augmentation, deep supervision, Dice+CE loss, poly learning rate, per-epoch pseudo-Dice validation, final
validation and checkpoint format. What medadapt changes:

* ``do_split``: the training cases are the few-shot draw of ``medadapt finetune`` (the fixed 80/20 split by
  ``split_seed``, or ``split``: a splits file or none; then ``shots`` cases drawn with ``seed``); the
  validation cases are that split's test part (with no test part, the training cases, as nnU-Net's fold
  ``all`` validates);
* ``configure_optimizers`` (called by ``initialize`` right after the network is built, before any DDP
  wrapper): loads the pretrained weights with nnU-Net's ``load_pretrained_weights`` rules — every weight must
  fit, the segmentation heads (``seg_layers``) are never transferred, so every method starts from nnU-Net's
  freshly initialised head (``head="keep"`` keeps the foundation's heads where the label sets are the same
  and is refused where they are not) — then ``strategy.prepare``, SGD over
  ``strategy.parameters`` and ``strategy.attach`` (the update masks are optimizer step hooks, so nnU-Net's
  ``train_step`` with its clipping and AMP grad scaler needs no change), exactly as medadapt's own engine;
* ``on_train_start``: SGST's one-time calibration, on the patches ``medadapt.data.sampling.calibration_plan``
  defines (one unaugmented foreground patch per few-shot case), as medadapt's engine calibrates;
* ``save_checkpoint``: nnU-Net's checkpoint, with the network in its plain architecture (LoRA merged into a
  copy) and ``trainer_name`` ``nnUNetTrainer``, so nnU-Net's predictor loads the output folder unchanged;
* no ``torch.compile``: strategies change the modules after they are built.

Each method trains into its own folder, ``nnUNetTrainerMedadapt_<method>__<plans>__<configuration>/fold_<f>``.
Adapters are refused (they cannot be saved in nnU-Net's plain architecture); continuing a killed run is not
supported (the strategy's state is not part of nnU-Net's checkpoint).
"""
from __future__ import annotations

import copy
import json
import re
from pathlib import Path
from typing import Any, Callable

import torch
from nnunetv2.training.lr_scheduler.polylr import PolyLRScheduler
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from torch._dynamo import OptimizedModule

from medadapt.data.splits import Split, draw_shots
from medadapt.errors import MedadaptError
from medadapt.tuning import Strategy, get_method, make_strategy, method_names
from medadapt.utils import seeds
from medadapt.utils.atomic import atomic_torch_save, atomic_write_json

FINETUNE_LR = 1e-3  # DGST paper, Sec. 3.1; as medadapt finetune


def unwrap_network(network: torch.nn.Module) -> torch.nn.Module:
    mod = getattr(network, "module", network)  # DDP
    return mod._orig_mod if isinstance(mod, OptimizedModule) else mod


class nnUNetTrainerMedadapt(nnUNetTrainer):
    """nnU-Net's trainer with a medadapt strategy; configure with :meth:`medadapt_setup` before training."""

    strategy: Strategy | None = None
    medadapt_split: tuple[list[str], list[str]] | None = None
    medadapt_pretrained: dict[str, torch.Tensor] | None = None
    medadapt_pretrained_labels: dict[str, int] | None = None
    medadapt_pretrained_source: str | None = None
    medadapt_seed: int = 0
    medadapt_head: str = "fresh"
    medadapt_record: dict[str, Any] | None = None

    def medadapt_setup(self, strategy: Strategy, train_ids: list[str], val_ids: list[str],
                       pretrained: dict[str, torch.Tensor] | None = None,
                       pretrained_labels: dict[str, int] | None = None, pretrained_source: str | None = None,
                       seed: int = 0, initial_lr: float | None = None, record: dict[str, Any] | None = None,
                       head: str = "fresh") -> None:
        if self.was_initialized:
            raise RuntimeError("medadapt_setup must come before initialize()")
        self.strategy = strategy
        self.medadapt_split = (list(train_ids), list(val_ids))
        self.medadapt_pretrained = pretrained
        self.medadapt_pretrained_labels = pretrained_labels
        self.medadapt_pretrained_source = pretrained_source
        self.medadapt_seed = seed
        self.medadapt_head = head
        self.initial_lr = initial_lr or strategy.default_lr or FINETUNE_LR
        self.medadapt_record = record or {}

    def _do_i_compile(self) -> bool:
        return False  # strategies parametrize / hook the modules after they are built

    def do_split(self):
        if self.medadapt_split is None:
            return super().do_split()
        self.print_to_log_file(f"medadapt: {len(self.medadapt_split[0])} few-shot training cases "
                               f"{self.medadapt_split[0]}, {len(self.medadapt_split[1])} validation cases")
        return self.medadapt_split

    def _load_pretrained(self) -> None:
        """nnU-Net's load_pretrained_weights rules: every weight but the heads; ``keep``: the heads too."""
        own = unwrap_network(self.network).state_dict()
        weights = self.medadapt_pretrained
        labels = {k: int(v) for k, v in self.dataset_json["labels"].items()}
        keep = self.medadapt_head == "keep"
        if keep and labels != self.medadapt_pretrained_labels:
            raise MedadaptError(f"--head keep: the dataset's labels {labels} are not those of "
                                f"{self.medadapt_pretrained_source} ({self.medadapt_pretrained_labels}), so its "
                                "heads cannot be kept; use --head fresh")
        heads_misfit = [k for k, v in own.items() if ".seg_layers." in k
                        and (k not in weights or tuple(weights[k].shape) != tuple(v.shape))]
        if keep and heads_misfit:  # e.g. a sigmoid (partially labelled) foundation: one output per class, no
            raise MedadaptError(  # background output, where this dataset's nnU-Net configuration is softmax
                f"--head keep: the heads of {self.medadapt_pretrained_source} do not fit this configuration's "
                f"output ({heads_misfit[0]}: a sigmoid model's heads cannot serve a softmax configuration); use "
                "--head fresh")
        misfit = [k for k, v in own.items() if ".seg_layers." not in k
                  and (k not in weights or tuple(weights[k].shape) != tuple(v.shape))]
        if misfit:
            raise MedadaptError(f"{self.medadapt_pretrained_source}: the pretrained weights do not fit the network "
                                f"of these plans (first: {misfit[0]}); preprocess the dataset with the "
                                "foundation's plans (nnUNetv2_move_plans_between_datasets)")
        take = {k: v for k, v in weights.items() if k in own and tuple(v.shape) == tuple(own[k].shape)
                and (keep or ".seg_layers." not in k)}
        own.update(take)
        unwrap_network(self.network).load_state_dict(own)
        self.print_to_log_file(f"medadapt: loaded pretrained weights from {self.medadapt_pretrained_source} "
                               f"({'heads kept (--head keep)' if keep else 'new, freshly initialised heads'})")

    def configure_optimizers(self):
        # initialize() calls this right after building the network: the one place where the foundation's
        # weights go in and the strategy prepares the network before the optimizer is created
        if self.strategy is None:
            return super().configure_optimizers()
        if self.medadapt_pretrained is not None:
            self._load_pretrained()
            self.medadapt_pretrained = None  # loaded: not kept (nor dumped into nnU-Net's debug.json)
        seeds.seed_global(self.medadapt_seed, "extension")  # strategies that initialise weights (scratch, LoRA)
        self.network = self.strategy.prepare(self.network).to(self.device)
        optimizer = torch.optim.SGD(self.strategy.parameters(self.network), self.initial_lr,
                                    weight_decay=self.weight_decay, momentum=0.99, nesterov=True)
        self.strategy.attach(optimizer)
        return optimizer, PolyLRScheduler(optimizer, self.initial_lr, self.num_epochs)

    def on_train_start(self):
        super().on_train_start()
        if self.strategy is not None and self.strategy.needs_calibration:
            # the calibration medadapt's engine runs too (medadapt.data.sampling.calibration_plan): train mode,
            # fp32 (no autocast, no grad scaler), nnU-Net's deep-supervision loss, unclipped gradients
            self.network.train()

            def loss_fn(model, batch):
                target = batch["target"]
                target = [t.to(self.device) for t in target] if isinstance(target, list) else target.to(self.device)
                return self.loss(model(batch["data"].to(self.device)), target)

            self.strategy.calibrate(self.network, loss_fn, self.medadapt_calibration_batches())
            self.print_to_log_file(f"medadapt: {self.strategy.name} calibrated on one foreground patch per training "
                                   f"case ({len(self.medadapt_split[0])} cases, batch size {self.batch_size})")

    def medadapt_calibration_batches(self):
        """SGST's calibration batches, as nnU-Net's dataloader would give them: the patches of
        :func:`medadapt.data.sampling.calibration_plan` (one per few-shot training case, centred on a foreground
        voxel of the case's stored ``class_locations``, picked with the calibration's own stream of
        ``medadapt_seed``; batches of ``self.batch_size``), read from nnU-Net's preprocessed dataset with
        ``dataset_class(...).load_case``, cropped as nnU-Net's dataloader crops (data padded with 0, segmentation
        with -1) and given nnU-Net's validation transforms only — no augmentation: -1 to 0, the cascade and
        region conversions, and ``DownsampleSegForDSTransform``'s deep-supervision target list. Yields
        ``{"data", "target", "keys"}``."""
        import numpy as np
        from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class

        from medadapt.data.sampling import calibration_plan, crop_calibration_patch, crop_with_padding

        ids = list(self.medadapt_split[0]) if self.medadapt_split is not None else list(self.do_split()[0])
        dataset_class = self.dataset_class or infer_dataset_class(self.preprocessed_dataset_folder)
        dataset = dataset_class(self.preprocessed_dataset_folder, list(ids),
                                folder_with_segs_from_previous_stage=self.folder_with_segs_from_previous_stage)
        cases = {i: dataset.load_case(i) for i in ids}  # blosc2 / memory-mapped: read where cropped
        patch = [int(p) for p in self.configuration_manager.patch_size]
        two_d = len(patch) == 2
        if two_d:  # nnU-Net's dataloader: a 2D patch is a one-slice 3D patch
            patch = [1, *patch]
        plan = calibration_plan([(i, c[0].shape[1:], c[3]["class_locations"]) for i, c in cases.items()],
                                patch, self.batch_size, self.medadapt_seed)
        lm = self.label_manager
        transforms = self.get_validation_transforms(
            self._get_deep_supervision_scales(), is_cascaded=self.is_cascaded,
            foreground_labels=lm.foreground_labels, regions=lm.foreground_regions if lm.has_regions else None,
            ignore_label=lm.ignore_label)
        for group in plan:
            images, targets = [], []
            for p in group:
                data, seg, seg_prev, _ = cases[p.case_id]
                img, lab = crop_calibration_patch(data, seg, p, patch, 0, -1)
                img = torch.from_numpy(np.asarray(img, dtype=np.float32))
                lab = torch.from_numpy(np.asarray(lab).astype(np.int16))
                if seg_prev is not None:
                    prev = np.asarray(crop_with_padding(seg_prev, p.start, patch, -1)).astype(np.int16)
                    prev = torch.from_numpy(prev)
                    lab = torch.cat((lab, prev if prev.ndim == lab.ndim else prev[None]), dim=0)
                if two_d:
                    img, lab = img[:, 0], lab[:, 0]
                with torch.no_grad():
                    out = transforms(image=img, segmentation=lab)
                images.append(out["image"])
                targets.append(out["segmentation"])
            target = ([torch.stack(t) for t in zip(*targets)] if isinstance(targets[0], (list, tuple))
                      else torch.stack(targets))
            yield {"data": torch.stack(images), "target": target, "keys": [p.case_id for p in group]}

    def save_checkpoint(self, filename: str) -> None:
        if self.strategy is None or self.local_rank != 0 or self.disable_checkpointing:
            return super().save_checkpoint(filename)
        plain = self.strategy.finalized_state_dict(unwrap_network(self.network))
        atomic_torch_save(filename, {
            "network_weights": {k: v.detach().cpu() for k, v in plain.items()},
            "optimizer_state": self.optimizer.state_dict(),
            "grad_scaler_state": self.grad_scaler.state_dict() if self.grad_scaler is not None else None,
            "logging": self.logger.get_checkpoint(),
            "_best_ema": self._best_ema,
            "current_epoch": self.current_epoch + 1,
            "init_args": self.my_init_kwargs,
            # the network is nnU-Net's plain one: nnU-Net's predictor builds it with its default trainer
            "trainer_name": "nnUNetTrainer",
            "inference_allowed_mirroring_axes": self.inference_allowed_mirroring_axes,
            "medadapt": self.medadapt_record,
        })


def trainer_class(method: str) -> type[nnUNetTrainerMedadapt]:
    """``nnUNetTrainerMedadapt_<method>``: one class name, hence one output folder, per method."""
    name = "nnUNetTrainerMedadapt_" + re.sub(r"\W", "_", method)
    cls = globals().get(name)
    if cls is None:
        cls = type(name, (nnUNetTrainerMedadapt,), {"__module__": __name__})
        globals()[name] = cls  # importable by name, so it pickles like a class defined here
    return cls


def _pretrained_weights(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, int] | None]:
    """Weights and labels of a checkpoint file (.pth), an nnU-Net model folder/zip or a medadapt model folder."""
    from medadapt.models.model_folder import load_model_folder
    from medadapt.nnunet.model import clean_state_dict, load_checkpoint

    if path.is_file() and path.suffix == ".pth":
        ckpt = load_checkpoint(path)
        if "network_weights" not in ckpt:
            raise MedadaptError(f"--pretrained {path}: not an nnU-Net checkpoint (no network_weights)")
        labels = (ckpt.get("init_args") or {}).get("dataset_json", {}).get("labels")
        if labels is None and (path.parent.parent / "dataset.json").is_file():
            labels = json.loads((path.parent.parent / "dataset.json").read_text()).get("labels")
        return clean_state_dict(ckpt["network_weights"]), \
            ({k: int(v) for k, v in labels.items()} if labels is not None else None)
    folder = load_model_folder(path)
    if folder.extensions:
        raise MedadaptError(f"--pretrained {path}: holds adapters, which nnU-Net's network cannot take")
    return folder.load_network().state_dict(), dict(folder.labels)


def build_trainer(dataset: str, configuration: str, fold: int | str, method: str, shots: int,
                  pretrained: str | Path | None = None, seed: int = 0, split_seed: int = 0,
                  method_options: dict[str, Any] | None = None, epochs: int = 12,
                  iterations_per_epoch: int = 25, val_iterations: int = 5, lr: float | None = None,
                  plans_identifier: str = "nnUNetPlans", device: str = "cpu",
                  head: str = "fresh", split: Split | None = None) -> nnUNetTrainerMedadapt:
    """The configured trainer, not yet initialized (nnU-Net paths must be set: see medadapt.nnunet.env)."""
    from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class
    from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name

    from medadapt.nnunet.env import quiet, require_paths

    paths = require_paths("nnUNet_preprocessed", "nnUNet_results")
    fold = int(fold) if str(fold).isdigit() else str(fold)
    if not isinstance(fold, int) and fold != "all":
        raise MedadaptError(f"FOLD {fold!r}: must be a number or 'all' (it names the output fold_<FOLD> folder)")
    try:
        torch_device = torch.device(device)
    except RuntimeError:
        raise MedadaptError(f"--device {device!r}: not a device; use cpu or cuda") from None
    if torch_device.type == "cuda" and not torch.cuda.is_available():
        raise MedadaptError("--device cuda: no CUDA GPU is available here; use --device cpu")
    if head not in ("fresh", "keep"):
        raise MedadaptError(f"--head {head!r}: unknown; choose fresh or keep")
    if head == "keep" and pretrained is None:
        raise MedadaptError("--head keep: needs --pretrained (there is no foundation head to keep)")
    definition = get_method(method)
    if not definition.trains or not definition.exportable:
        why = ("trains nothing" if not definition.trains else
               f"leaves modules ({definition.extension}) that nnU-Net's plain network cannot hold, so nnU-Net could "
               "not load the result")
        raise MedadaptError(f"--method {method}: {why}; use one of {', '.join(method_names(exportable_only=True))}")
    strategy = make_strategy(method, seed=seed, **(method_options or {}))
    try:
        name = maybe_convert_to_dataset_name(dataset)
    except (RuntimeError, ValueError):  # no such id / neither an id nor a DatasetXXX_Name
        raise MedadaptError(f"DATASET {dataset!r}: no such dataset in {paths['nnUNet_preprocessed']}; run "
                            "nnUNetv2_plan_and_preprocess for it first") from None
    base = paths["nnUNet_preprocessed"] / name
    plans_file = base / f"{plans_identifier}.json"
    if not plans_file.is_file():
        raise MedadaptError(f"{plans_file}: missing; run nnUNetv2_plan_and_preprocess -d {dataset} "
                            f"(or pass --plans)")
    plans = json.loads(plans_file.read_text())
    if configuration not in plans["configurations"]:
        raise MedadaptError(f"CONFIGURATION {configuration!r}: not in {plans_file}; choose one of "
                            f"{', '.join(plans['configurations'])}")
    dataset_json = json.loads((base / "dataset.json").read_text())
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    with quiet():  # resolves inherits_from
        data_folder = base / PlansManager(copy.deepcopy(plans)).get_configuration(configuration).data_identifier
    if not data_folder.is_dir():
        raise MedadaptError(f"{data_folder}: missing; run nnUNetv2_preprocess -d {dataset} -c {configuration}")
    case_ids = sorted(infer_dataset_class(str(data_folder)).get_identifiers(str(data_folder)))
    the_split = split if split is not None else Split.random(split_seed)
    train_ids, test_ids = the_split.apply(case_ids)
    if shots == "all":
        shots = len(train_ids)
    shot_ids = draw_shots(train_ids, shots, seed)
    weights = labels = None
    if pretrained is not None:
        weights, labels = _pretrained_weights(Path(pretrained))

    plans["continue_training"] = False  # nnUNetTrainer.__init__ pops it
    with quiet():  # nnU-Net's device line and citation banner (they still go to its log file)
        trainer = trainer_class(method)(plans=plans, configuration=configuration, fold=fold,
                                        dataset_json=dataset_json, device=torch_device)
    trainer.num_epochs = epochs
    trainer.num_iterations_per_epoch = iterations_per_epoch
    trainer.num_val_iterations_per_epoch = val_iterations
    record = {"method": strategy.config(), "shots": shots, "seed": seed, "split_seed": split_seed,
              "shot_cases": shot_ids, "split": {"train": train_ids, "test": test_ids,
                                                **({"how": split.record()} if split is not None else {})},
              "pretrained": str(pretrained) if pretrained is not None else None, "head": head}
    trainer.medadapt_setup(strategy, shot_ids, test_ids or shot_ids, pretrained=weights, pretrained_labels=labels,
                           pretrained_source=str(pretrained), seed=seed, initial_lr=lr, record=record, head=head)
    # nnU-Net's network initialisation is reproducible: the new heads' stream (a network from scratch: the network's)
    seeds.seed_global(seed, "head" if pretrained is not None else "network")
    return trainer


def nnunet_train(*args, final_validation: bool = True,
                 on_initialized: Callable[[nnUNetTrainerMedadapt], None] | None = None,
                 **kwargs) -> Path:
    """Build the trainer (:func:`build_trainer` arguments), train, validate; returns the fold's output folder.

    ``on_initialized(trainer)`` runs after nnU-Net's ``initialize`` (network, strategy, optimizer ready).
    """
    trainer = build_trainer(*args, **kwargs)
    trainer.initialize()
    if on_initialized is not None:
        on_initialized(trainer)
    trainer.run_training()
    if final_validation:
        trainer.perform_actual_validation(False)
    out = Path(trainer.output_folder)
    atomic_write_json(out / "medadapt_run.json", trainer.medadapt_record)
    return out
