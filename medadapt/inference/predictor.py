"""Sliding-window prediction as nnU-Net does it, on MONAI's inferer.

Each case is preprocessed with the model folder's own plan (orientation, spacing, normalisation), tiled with
patches of the training patch size at 50% overlap, the tiles' logits blended with a Gaussian importance map
(sigma = 1/8 of the patch size, nnU-Net's choice), optionally averaged over mirrored copies (nnU-Net's
test-time mirroring; off by default because it costs 8x on a CPU), turned into probabilities, resampled to
the original geometry and decided by the model's output activation: softmax models take the argmax; sigmoid
models (one independent output per class) give a voxel the most probable class among those at or above their
thresholds (0.5 unless the model folder says otherwise), else background. (nnU-Net's region-based inference
instead lets later classes overwrite earlier ones where both pass 0.5; the two agree wherever at most one
class passes.) A model from nnU-Net (its plan carries nnU-Net plans) is preprocessed and reverted with
nnunetv2's own code instead (the nnU-Net plugin's case backend: medadapt.plugins).

Classes (``classes``): by default every class of the model, written with the model's label ids. A mapping
``{name: id}`` of some of the model's class names predicts only those, written with the given ids (e.g. a
target dataset's own ids): a sigmoid model evaluates only their outputs (its classes are independent); a
softmax model takes the argmax over all its labels and keeps the selected ones (a voxel won by another class
is background).

Post-processing (``postprocess``): ``"none"`` (default) or ``"lcc"``, which keeps each foreground class's
largest connected component in the final label map (MONAI's ``KeepLargestConnectedComponent``, per class,
full 26-connectivity), as FSEFT post-processes its predictions. It suits single-organ classes, not classes
with several separate instances such as lymph nodes.
"""
from __future__ import annotations

import itertools
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from monai.inferers import sliding_window_inference
from torch import nn
from tqdm.auto import tqdm

from medadapt.data.io import Volume, read_image, write_label
from medadapt.errors import MedadaptError
from medadapt.models.model_folder import ModelFolder
from medadapt.models.network import set_deep_supervision


POSTPROCESSING = ("none", "lcc")
#: the sliding window's tile overlap: nnU-Net's 0.5 (MONAI's sliding_window_inference defaults to 0.25)
DEFAULT_OVERLAP = 0.5


def keep_largest_components(seg: np.ndarray, labels: Sequence[int]) -> np.ndarray:
    """The label map with only the largest connected component (26-connectivity) of each label in ``labels``."""
    from monai.transforms import KeepLargestConnectedComponent

    present = [int(v) for v in labels if v != 0 and np.any(seg == v)]
    if not present:
        return seg
    keep = KeepLargestConnectedComponent(applied_labels=present, is_onehot=False, independent=True,
                                         connectivity=seg.ndim)
    out = keep(torch.from_numpy(np.ascontiguousarray(seg, dtype=np.int64))[None])[0]
    return np.asarray(out.numpy() if hasattr(out, "numpy") else out).astype(seg.dtype)


def select_classes(folder: ModelFolder, classes: dict[str, int] | None) -> dict[str, int]:
    """The output labelling ``{model class name: output id}``: the model's foreground labels, or the given
    subset of them (one clear error naming unknown names)."""
    if classes is None:
        return dict(folder.foreground)
    unknown = [n for n in classes if n not in folder.foreground]
    if unknown:
        raise MedadaptError(f"--classes: {unknown} are not classes of the model in {folder.path} "
                            f"({', '.join(folder.foreground)}); choose among those")
    ids = [int(v) for v in classes.values()]
    if any(v <= 0 for v in ids) or len(set(ids)) != len(ids):
        raise MedadaptError(f"--classes: output ids {ids} must be distinct positive integers")
    return {n: int(v) for n, v in classes.items()}


def parse_classes(text: str | None) -> dict[str, int] | None:
    """``--classes liver,spleen`` (ids 1, 2, ... in the order given) or ``liver=3,spleen=1``."""
    if not text:
        return None
    out: dict[str, int] = {}
    for i, item in enumerate(t.strip() for t in text.split(",")):
        if not item:
            raise MedadaptError(f"--classes {text!r}: empty class name; write e.g. liver,spleen or liver=1,spleen=2")
        name, _, value = item.partition("=")
        try:
            out[name.strip()] = int(value) if value else i + 1
        except ValueError:
            raise MedadaptError(f"--classes {text!r}: {value!r} is not a label id; write e.g. liver=1") from None
    return out


def _nifti_header(path) -> tuple[tuple[int, ...], tuple[float, ...]] | None:
    """A NIfTI file's shape and voxel size from its header (no voxels read), or None for anything else."""
    import nibabel as nib

    if not str(path).endswith((".nii", ".nii.gz")):
        return None
    try:
        header = nib.load(str(path)).header
        return tuple(int(v) for v in header.get_data_shape()[:3]), tuple(float(v) for v in header.get_zooms()[:3])
    except Exception:  # a broken file: read_image names it, with its cause, when its turn comes
        return None


def available_memory() -> int | None:
    """Bytes of memory available to a new allocation (Linux: MemAvailable, capped by a cgroup limit), or None
    where it cannot be told."""
    try:
        with open("/proc/meminfo") as f:
            info = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in f if line.strip()}
        available = info["MemAvailable"]
    except (OSError, KeyError, ValueError, IndexError):
        return None
    for limit_file, usage_file in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                                   ("/sys/fs/cgroup/memory/memory.limit_in_bytes",
                                    "/sys/fs/cgroup/memory/memory.usage_in_bytes")):
        try:
            limit = open(limit_file).read().strip()
            if limit != "max" and int(limit) < 1 << 60:
                available = min(available, int(limit) - int(open(usage_file).read().strip()))
            break
        except (OSError, ValueError):
            continue
    return max(0, available)


def softmax_(logits: torch.Tensor, voxels: int = 1 << 22) -> torch.Tensor:
    """Softmax over the channels of ``logits`` [K, z, y, x], in place, a slab of z-slices (about ``voxels``
    voxels) at a time: no second K-channel volume. Per voxel it is torch.softmax's computation; its vectorised
    kernel may round a voxel's last bit differently with another tensor size (up to ~1e-7), which can move the
    argmax only where two classes' probabilities tie to that precision (tests/test_predict_memory.py)."""
    step = max(1, voxels // max(1, int(np.prod(logits.shape[2:]))))
    for z0 in range(0, logits.shape[1], step):
        logits[:, z0:z0 + step] = torch.softmax(logits[:, z0:z0 + step], dim=0)
    return logits


class Predictor:
    def __init__(self, folder: ModelFolder, network: nn.Module | None = None, overlap: float = DEFAULT_OVERLAP,
                 mirror: bool = False, sw_batch_size: int = 2, device: str | torch.device | None = None,
                 postprocess: str = "none", classes: dict[str, int] | None = None):
        from medadapt.engine.distributed import default_device

        if postprocess not in POSTPROCESSING:
            raise MedadaptError(f"--postprocess {postprocess!r}: unknown; choose one of {', '.join(POSTPROCESSING)}")
        self.postprocess = postprocess
        folder.require_segmentation_head("predict", "fine-tune it first (medadapt finetune --head fresh)")
        self.classes = select_classes(folder, classes)

        self.folder = folder
        self.plan = folder.plan()
        self.device = torch.device(device) if device is not None else default_device()
        self.network = (network if network is not None else folder.load_network(deep_supervision=False))
        set_deep_supervision(self.network, False)
        self.network.to(self.device).eval()
        self.overlap = overlap
        self.mirror = mirror
        self.sw_batch_size = sw_batch_size
        self.patch_size = tuple(folder.network.patch_size)
        # a sigmoid model's outputs are independent: only the asked-for classes are aggregated (channel k of the
        # network is model label k + 1); a softmax model needs every output for its argmax
        self.outputs = None
        if folder.activation == "sigmoid":
            self.outputs = [folder.labels[n] - 1 for n in folder.foreground if n in self.classes]
            if len(self.outputs) == folder.network.num_classes:
                self.outputs = None

    @property
    def aggregated_channels(self) -> int:
        """How many output channels the sliding window aggregates over the whole volume."""
        return self.folder.network.num_classes if self.outputs is None else len(self.outputs)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.network(x)
        out = out[0] if isinstance(out, (list, tuple)) else out
        return out if self.outputs is None else out[:, self.outputs]

    @torch.no_grad()
    def predict_logits(self, data: np.ndarray) -> torch.Tensor:
        """Logits [K, z, y, x] for one preprocessed case ``data`` [C, z, y, x].

        Memory: one float32 logits volume (MONAI's sliding-window buffer, divided in place) and, with mirroring,
        a second one for each mirrored pass, added into the first channel by channel (never a third copy)."""
        x = torch.from_numpy(np.ascontiguousarray(data, dtype=np.float32))[None].to(self.device)
        flips: list[tuple[int, ...]] = [()]
        if self.mirror:
            flips = [axes for r in range(4) for axes in itertools.combinations((2, 3, 4), r)]
        total = None
        for axes in flips:
            xi = torch.flip(x, axes) if axes else x
            logits = sliding_window_inference(
                xi, roi_size=self.patch_size, sw_batch_size=self.sw_batch_size, predictor=self._forward,
                overlap=self.overlap, mode="gaussian", sigma_scale=0.125, padding_mode="constant", cval=0.0)
            del xi
            if total is None:
                total = torch.flip(logits, axes) if axes else logits
            else:  # total += flip(logits), a channel at a time: the same sums, one channel of extra memory
                spatial = tuple(a - 2 for a in axes)  # [z, y, x] of one channel
                for k in range(logits.shape[1]):
                    total[0, k] += torch.flip(logits[0, k], spatial) if axes else logits[0, k]
            del logits
        if len(flips) > 1:
            total /= len(flips)
        return total[0].float().cpu()

    def predict_case(self, images: Sequence[Volume]) -> np.ndarray:
        """Label map (z, y, x) in the geometry of ``images[0]``."""
        from medadapt.data.preprocessing import preprocess_case, revert_prediction

        case = preprocess_case(list(images), None, self.plan)
        logits = self.predict_logits(case.data)
        names = {v: k for k, v in self.folder.labels.items()}
        if self.plan.nnunet is not None:  # an nnU-Net model: nnU-Net's own export (resample logits, uncrop)
            from medadapt.plugins import case_backend

            revert = case_backend("nnunet", "a model with nnU-Net plans").revert_logits
            seg = revert(logits, case.properties, self.plan, self.folder.labels)
            lut = np.zeros(max(self.folder.labels.values()) + 1, dtype=np.int16)
            for v, name in names.items():
                lut[v] = self.classes.get(name, 0)
            seg = lut[seg]
        elif self.folder.activation == "sigmoid":
            # only the asked-for classes' outputs, each turned into probabilities when it is resampled
            order = [n for n in self.folder.foreground if n in self.classes]  # channel k = model label k + 1
            channels = ([self.folder.labels[n] - 1 for n in order] if self.outputs is None
                        else list(range(len(order))))  # the sliding window kept only these, in this order
            seg = revert_prediction(logits, case.properties, thresholds=[self.folder.threshold(n) for n in order],
                                    label_ids=[self.classes[n] for n in order], channels=channels,
                                    transform=torch.sigmoid)
        else:
            ids = [self.classes.get(names[k], 0) if k != 0 else 0 for k in range(logits.shape[0])]
            seg = revert_prediction(softmax_(logits), case.properties, label_ids=ids)
        if self.postprocess == "lcc":
            seg = keep_largest_components(seg, list(self.classes.values()))
        return seg

    def memory_estimate(self, shape: Sequence[int], spacing: Sequence[float], channels: int = 1) -> int:
        """Bytes the prediction of a case needs at its peak, from its shape and spacing alone: the aggregated
        logits on the model's grid (twice with mirroring: a mirrored pass beside the sum), the input there, and
        the decision's float volumes at the original size (the running best, a resampled channel, the
        comparison) with the label maps; plus the ``channels`` images themselves."""
        original = int(np.prod(shape))
        model_grid = int(original * float(np.prod(spacing)) / float(np.prod(self.plan.target_spacing)))
        logits = 4 * self.aggregated_channels * model_grid * (2 if self.mirror else 1)
        inputs = 4 * model_grid * (channels + 2)  # the resampled input, MONAI's weight map and padding
        decision = 16 * original  # running best, a resampled channel, a mask, the int16 label map and its copy
        return logits + inputs + decision + 4 * original * channels

    def check_memory(self, case_id: str, shape: Sequence[int], spacing: Sequence[float], channels: int = 1) -> None:
        """One line, before any work, when ``case_id``'s prediction cannot fit the memory available."""
        available = available_memory()
        need = self.memory_estimate(shape, spacing, channels)
        if available is not None and need > available:
            hints = ["without --mirror"] if self.mirror else []
            if self.folder.activation == "sigmoid" and len(self.classes) > 1:
                hints.append("fewer --classes (a sigmoid model aggregates only the classes asked for)")
            hints.append("a machine with more memory")
            raise MedadaptError(f"{case_id} ({'x'.join(map(str, shape))} voxels): its prediction "
                                f"needs about {need / 2**30:.1f} GiB at its peak ({self.aggregated_channels} "
                                f"output channels on the model's grid), but {available / 2**30:.1f} GiB are "
                                f"available; try {', or '.join(hints)}")

    def predict_files(self, cases: Sequence[tuple[str, Sequence[Path]]], out_dir: str | Path,
                      progress: bool = True) -> list[Path]:
        """Predict ``(case_id, channel paths)`` pairs into ``out_dir/<case_id><ending>``, each written atomically.
        A case whose prediction cannot fit the memory available stops the run before its work starts."""
        out_dir = Path(out_dir)
        for case_id, paths in cases:  # every case that a file header describes, before the first is predicted
            header = _nifti_header(paths[0])
            if header is not None:
                self.check_memory(case_id, *header, channels=len(paths))
        written = []
        for case_id, paths in tqdm(cases, desc="predict", disable=not progress, unit="case", leave=False):
            images = [read_image(p) for p in paths]
            self.check_memory(case_id, images[0].array.shape, images[0].spacing, channels=len(images))
            seg = self.predict_case(images)
            target = out_dir / f"{case_id}{self.folder.file_ending}"
            write_label(seg.astype(np.int16), images[0], target)
            written.append(target)
        return written
