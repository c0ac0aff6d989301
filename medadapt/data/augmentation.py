"""nnU-Net v2's default 3D training augmentation, in plain torch on the CPU, driven by a numpy Generator.

Order and parameters follow ``nnUNetTrainer.get_training_transforms`` (batchgeneratorsv2), applied per sample:

1. spatial: rotation (p=0.2, +-30 deg about each axis) and scaling (p=0.2, 0.7-1.4, same factor on all axes),
   one affine ``grid_sample`` (image trilinear, label nearest); no elastic deformation (nnU-Net v2 default);
2. Gaussian noise (p=0.1, std drawn from U(0, 0.1), one noise field shared by all channels);
3. Gaussian blur (p=0.2; each channel with p=0.5; sigma U(0.5, 1) drawn per axis);
4. multiplicative brightness (p=0.15, factor 0.75-1.25 per channel);
5. contrast (p=0.15, factor 0.75-1.25 per channel, value range preserved);
6. low-resolution simulation (p=0.25; each channel with p=0.5; zoom U(0.5, 1), nearest down, trilinear up);
7. inverted gamma (p=0.1) then gamma (p=0.3), gamma 0.7-1.5, mean and std retained;
8. mirroring along each of ``mirror_axes`` with p=0.5.

Factors "0.75-1.25" etc. are drawn as nnU-Net's ``BGContrast`` does: with p=0.5 from [low, 1), else from [1, high].
MONAI's random transforms keep their own RandomState; these take every random number from the Generator
passed in, so a seeded run is reproducible, and avoid MONAI's per-call overhead on small patches.
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from medadapt.errors import MedadaptError

ANISO_THRESHOLD = 3.0


def _pair(v, name: str) -> tuple[float, float]:
    try:
        lo, hi = (float(v[0]), float(v[1]))
    except (TypeError, IndexError, ValueError):
        raise MedadaptError(f"augmentation {name}: expected a (low, high) pair, got {v!r}") from None
    if lo > hi:
        raise MedadaptError(f"augmentation {name}: low {lo} > high {hi}; swap them")
    return lo, hi


def _bg_contrast(rng: np.random.Generator, lo: float, hi: float) -> float:
    """nnU-Net's BGContrast: half of the draws below 1, half above (if the range straddles 1)."""
    if rng.random() < 0.5 and lo < 1:
        return float(rng.uniform(lo, 1.0))
    return float(rng.uniform(max(lo, 1.0), hi))


def _rot(axis: int, a: float) -> np.ndarray:
    c, s = math.cos(a), math.sin(a)
    if axis == 0:  # about z: rotates the (y, x) plane
        return np.array([[1, 0, 0], [0, c, -s], [0, s, c]])
    if axis == 1:  # about y: rotates the (z, x) plane
        return np.array([[c, 0, s], [0, 1, 0], [-s, 0, c]])
    return np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]])  # about x: rotates the (z, y) plane


def _gauss_kernel(sigma: float) -> torch.Tensor:
    radius = max(1, int(math.ceil(3.0 * sigma)))
    x = torch.arange(-radius, radius + 1, dtype=torch.float32)
    k = torch.exp(-0.5 * (x / sigma) ** 2)
    return k / k.sum()


def _blur(x: torch.Tensor, sigmas: Sequence[float]) -> torch.Tensor:
    """Separable Gaussian blur of one channel ``[z, y, x]`` (reflect padding, edge for tiny axes).

    Written as weighted sums of shifted views: on small CPU patches this is several times faster and steadier
    than ``conv3d``, which re-plans for every new kernel size.
    """
    for ax, s in enumerate(sigmas):
        k = _gauss_kernel(float(s)).tolist()
        r = len(k) // 2
        n = x.shape[ax]
        i = np.arange(-r, n + r)
        if n > r:
            i = np.abs(i)
            i = np.where(i > n - 1, 2 * (n - 1) - i, i)
        i = np.clip(i, 0, n - 1)
        padded = x.index_select(ax, torch.from_numpy(i))
        out = padded.narrow(ax, 0, n) * k[0]
        for t in range(1, len(k)):
            out.add_(padded.narrow(ax, t, n), alpha=k[t])
        x = out
    return x


def _crop_pad(t: torch.Tensor, start: Sequence[int], size: Sequence[int], value) -> torch.Tensor:
    """Crop ``[C, z, y, x]`` at ``start`` (may be negative / beyond the end), filling outside with ``value``
    (a scalar or one value per channel)."""
    spatial = t.shape[1:]
    if all(s >= 0 and s + n <= d for s, n, d in zip(start, size, spatial)):
        return t[(slice(None),) + tuple(slice(s, s + n) for s, n in zip(start, size))].clone()
    out = torch.empty((t.shape[0], *size), dtype=t.dtype)
    if torch.is_tensor(value) or isinstance(value, (list, tuple, np.ndarray)):
        out[:] = torch.as_tensor(value, dtype=t.dtype).reshape(-1, 1, 1, 1)
    else:
        out.fill_(value)
    src, dst = [], []
    for s, n, d in zip(start, size, spatial):
        lo, hi = max(s, 0), min(s + n, d)
        if hi <= lo:
            return out
        src.append(slice(lo, hi))
        dst.append(slice(lo - s, hi - s))
    out[(slice(None), *dst)] = t[(slice(None), *src)]
    return out


def rotation_scaling_patch_size(patch_size: Sequence[int], max_angle: float, min_scale: float,
                                dummy_2d: bool = False) -> tuple[int, ...]:
    """A region large enough to hold a patch rotated by up to ``max_angle`` rad about any one axis and scaled by
    ``min_scale`` (nnU-Net's ``get_patch_size`` idea, with the rotated box's full bounding box)."""
    p = np.asarray(patch_size, float)
    a = min(abs(max_angle), math.pi / 2)
    c, s = math.cos(a), math.sin(a)
    out = p.copy()
    planes = [(1, 2)] if dummy_2d else [(1, 2), (0, 2), (0, 1)]
    for i, j in planes:
        out[i] = max(out[i], p[i] * c + p[j] * s)
        out[j] = max(out[j], p[j] * c + p[i] * s)
    scale = np.full(3, 1.0 / min(min_scale, 1.0))
    if dummy_2d:
        scale[0] = 1.0
    return tuple(int(math.ceil(v - 1e-6)) for v in out * scale)


class Augmentation:
    """nnU-Net v2's default 3D augmentation for one sample at a time (see the module docstring and docs/data.md).

    ``aug(image [C, *S], label [1, *S] or [*S], rng)`` returns the final ``patch_size`` patch taken from the centre
    of the input; :class:`~medadapt.data.sampling.PatchSampler` instead calls :meth:`draw_spatial`, crops just the
    region that transform reads (:meth:`source_half_extent`) and calls :meth:`apply`.
    """

    def __init__(self, patch_size: Sequence[int], *,
                 rotation_deg: float | None = None, p_rotation: float = 0.2,
                 scaling: tuple[float, float] = (0.7, 1.4), p_scaling: float = 0.2,
                 noise_variance: tuple[float, float] = (0.0, 0.1), p_noise: float = 0.1,
                 blur_sigma: tuple[float, float] = (0.5, 1.0), p_blur: float = 0.2, p_blur_per_channel: float = 0.5,
                 brightness: tuple[float, float] = (0.75, 1.25), p_brightness: float = 0.15,
                 contrast: tuple[float, float] = (0.75, 1.25), p_contrast: float = 0.15,
                 lowres_zoom: tuple[float, float] = (0.5, 1.0), p_lowres: float = 0.25,
                 p_lowres_per_channel: float = 0.5,
                 gamma: tuple[float, float] = (0.7, 1.5), p_gamma: float = 0.3, p_inverted_gamma: float = 0.1,
                 mirror_axes: Sequence[int] = (0, 1, 2), p_mirror: float = 0.5,
                 dummy_2d: bool | None = None, label_interpolation: str = "nearest"):
        self.patch_size = tuple(int(p) for p in patch_size)
        if len(self.patch_size) != 3 or min(self.patch_size) < 1:
            raise MedadaptError(f"patch_size: {tuple(patch_size)} must be three positive integers (z, y, x)")
        if dummy_2d is None:  # nnU-Net: in-plane-only spatial augmentation for strongly anisotropic patches
            dummy_2d = max(self.patch_size) / self.patch_size[0] > ANISO_THRESHOLD
        self.dummy_2d = bool(dummy_2d)
        if rotation_deg is None:
            rotation_deg = 180.0 if self.dummy_2d else 30.0
        self.rotation = math.radians(float(rotation_deg))
        self.scaling = _pair(scaling, "scaling")
        if self.scaling[0] <= 0:
            raise MedadaptError(f"augmentation scaling: {scaling} must be positive")
        self.noise_variance = _pair(noise_variance, "noise_variance")
        self.blur_sigma = _pair(blur_sigma, "blur_sigma")
        self.brightness = _pair(brightness, "brightness")
        self.contrast = _pair(contrast, "contrast")
        self.lowres_zoom = _pair(lowres_zoom, "lowres_zoom")
        self.gamma = _pair(gamma, "gamma")
        self.p_rotation, self.p_scaling = float(p_rotation), float(p_scaling)
        self.p_noise, self.p_blur, self.p_blur_per_channel = float(p_noise), float(p_blur), float(p_blur_per_channel)
        self.p_brightness, self.p_contrast = float(p_brightness), float(p_contrast)
        self.p_lowres, self.p_lowres_per_channel = float(p_lowres), float(p_lowres_per_channel)
        self.p_gamma, self.p_inverted_gamma = float(p_gamma), float(p_inverted_gamma)
        self.mirror_axes = tuple(int(a) for a in mirror_axes)
        if any(a not in (0, 1, 2) for a in self.mirror_axes):
            raise MedadaptError(f"mirror_axes: {tuple(mirror_axes)} must be spatial axes 0, 1, 2")
        self.p_mirror = float(p_mirror)
        if label_interpolation not in ("nearest", "linear"):
            raise MedadaptError(f"label_interpolation: {label_interpolation!r}; use 'nearest' or 'linear'")
        self.label_interpolation = label_interpolation
        half = [(p - 1) / 2.0 for p in self.patch_size]
        grids = torch.meshgrid(*[torch.arange(p, dtype=torch.float64) - h for p, h in zip(self.patch_size, half)],
                               indexing="ij")
        self._offsets = torch.stack(grids, dim=-1).reshape(-1, 3)  # (N, 3) offsets from the patch centre, zyx

    @classmethod
    def identity(cls, patch_size: Sequence[int]) -> "Augmentation":
        """All probabilities 0: a centre crop to ``patch_size`` and nothing else."""
        return cls(patch_size, p_rotation=0, p_scaling=0, p_noise=0, p_blur=0, p_brightness=0, p_contrast=0,
                   p_lowres=0, p_gamma=0, p_inverted_gamma=0, p_mirror=0)

    @property
    def input_size(self) -> tuple[int, ...]:
        """A crop size that holds every rotated/scaled patch (for callers that crop before :meth:`__call__`)."""
        angle = self.rotation if self.p_rotation > 0 else 0.0
        min_scale = self.scaling[0] if self.p_scaling > 0 else 1.0
        return rotation_scaling_patch_size(self.patch_size, angle, min_scale, self.dummy_2d)

    def __repr__(self) -> str:
        return (f"Augmentation(patch_size={self.patch_size}, rotation=+-{math.degrees(self.rotation):g}deg "
                f"p={self.p_rotation}, scaling={self.scaling} p={self.p_scaling}, dummy_2d={self.dummy_2d})")

    # ------------------------------------------------------------------ spatial
    def draw_spatial(self, rng: np.random.Generator) -> np.ndarray | None:
        """A 3x3 matrix mapping output offsets (voxels, zyx) to input offsets, or None (no spatial change).

        Scale factors > 1 read a larger region, i.e. make objects smaller (batchgenerators' convention).
        """
        do_rot = rng.random() < self.p_rotation
        do_scale = rng.random() < self.p_scaling
        if not (do_rot or do_scale):
            return None
        m = np.eye(3)
        if do_rot:
            if self.dummy_2d:
                m = _rot(0, rng.uniform(-self.rotation, self.rotation))
            else:
                ax, ay, az = rng.uniform(-self.rotation, self.rotation, size=3)
                m = _rot(2, az) @ _rot(1, ay) @ _rot(0, ax)
        if do_scale:
            s = float(rng.uniform(*self.scaling))
            m = m @ np.diag([1.0 if self.dummy_2d else s, s, s])
        return m

    def source_half_extent(self, matrix: np.ndarray | None) -> np.ndarray:
        """Half size (voxels, zyx) of the input region read around the patch centre."""
        half = (np.asarray(self.patch_size, float) - 1) / 2.0
        if matrix is None:
            return half
        return np.abs(matrix) @ half

    def _spatial(self, image: torch.Tensor, label: torch.Tensor | None, matrix: np.ndarray | None,
                 center: Sequence[float]) -> tuple[torch.Tensor, torch.Tensor | None]:
        P = self.patch_size
        if matrix is None:
            start = [int(round(c - (p - 1) / 2.0)) for c, p in zip(center, P)]
            mins = image.reshape(image.shape[0], -1).amin(dim=1)
            img = _crop_pad(image, start, P, mins)
            lab = _crop_pad(label, start, P, 0) if label is not None else None
            return img, lab
        S = image.shape[1:]
        src = self._offsets @ torch.from_numpy(np.asarray(matrix, float)).T + torch.tensor(list(center), dtype=torch.float64)
        denom = torch.tensor([max(s - 1, 1) for s in S], dtype=torch.float64)
        grid = (src * (2.0 / denom) - 1.0).flip(-1).to(torch.float32).reshape(1, *P, 3)
        mins = image.reshape(image.shape[0], -1).amin(dim=1).reshape(-1, 1, 1, 1)
        img = F.grid_sample((image - mins)[None], grid, mode="bilinear", padding_mode="zeros", align_corners=True)[0]
        img += mins  # outside the input: the minimum (as the sampler pads), not 0
        lab = None
        if label is not None:
            if self.label_interpolation == "nearest":
                lab = F.grid_sample(label[None].float(), grid, mode="nearest", padding_mode="zeros",
                                    align_corners=True)[0].round().to(label.dtype)
            else:
                values = torch.unique(label)
                probs = torch.stack([F.grid_sample((label == v).float()[None], grid, mode="bilinear",
                                                   padding_mode="zeros", align_corners=True)[0, 0] for v in values])
                lab = values[probs.argmax(0)][None].to(label.dtype)
        return img, lab

    # ------------------------------------------------------------------ intensity
    def _intensity(self, img: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
        C = img.shape[0]
        if rng.random() < self.p_noise:
            sigma = float(rng.uniform(*self.noise_variance))
            noise = rng.standard_normal(size=img.shape[1:], dtype=np.float32)
            img += torch.from_numpy(noise).mul_(sigma)[None]
        if rng.random() < self.p_blur:
            for c in range(C):
                if rng.random() < self.p_blur_per_channel:
                    img[c] = _blur(img[c], rng.uniform(*self.blur_sigma, size=3))
        if rng.random() < self.p_brightness:
            for c in range(C):
                img[c] *= _bg_contrast(rng, *self.brightness)
        if rng.random() < self.p_contrast:
            for c in range(C):
                f = _bg_contrast(rng, *self.contrast)
                mn, mx, mean = img[c].min(), img[c].max(), img[c].mean()
                img[c] = ((img[c] - mean) * f + mean).clamp_(mn, mx)
        if rng.random() < self.p_lowres:
            shape = img.shape[1:]
            for c in range(C):
                if rng.random() < self.p_lowres_per_channel:
                    z = float(rng.uniform(*self.lowres_zoom))
                    small = [s if (self.dummy_2d and i == 0) else max(1, int(round(s * z))) for i, s in enumerate(shape)]
                    down = F.interpolate(img[c][None, None], size=small, mode="nearest-exact")
                    img[c] = F.interpolate(down, size=tuple(shape), mode="trilinear", align_corners=False)[0, 0]
        if rng.random() < self.p_inverted_gamma:
            for c in range(C):
                img[c] = self._gamma(img[c], _bg_contrast(rng, *self.gamma), invert=True)
        if rng.random() < self.p_gamma:
            for c in range(C):
                img[c] = self._gamma(img[c], _bg_contrast(rng, *self.gamma), invert=False)
        return img

    @staticmethod
    def _gamma(x: torch.Tensor, g: float, invert: bool) -> torch.Tensor:
        if invert:
            x = -x
        mean, std = x.mean(), x.std(correction=0)
        mn = x.min()
        rng_ = (x.max() - mn).clamp(min=1e-7)
        x = ((x - mn) / rng_).pow(g) * rng_ + mn
        x = (x - x.mean()) * (std / x.std(correction=0).clamp(min=1e-7)) + mean
        return -x if invert else x

    # ------------------------------------------------------------------ entry points
    def apply(self, image: torch.Tensor, label: torch.Tensor | None, matrix: np.ndarray | None,
              center: Sequence[float], rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Spatial transform ``matrix`` about ``center`` (voxel coordinates in ``image``), then intensity and
        mirroring. ``image`` float ``[C, *S]``, ``label`` integer ``[1, *S]`` (or None). Returns patch-size tensors."""
        squeeze = label is not None and label.ndim == 3
        if squeeze:
            label = label[None]
        if not image.is_floating_point():
            image = image.float()
        img, lab = self._spatial(image, label, matrix, center)
        img = self._intensity(img, rng)
        flips = [a + 1 for a in self.mirror_axes if rng.random() < self.p_mirror]
        if flips:
            img = img.flip(flips)
            lab = lab.flip(flips) if lab is not None else None
        if squeeze:
            lab = lab[0]
        return img.contiguous(), (lab.contiguous() if lab is not None else None)

    def __call__(self, image: torch.Tensor, label: torch.Tensor | None,
                 rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Augment and take the ``patch_size`` patch centred in ``image`` (pad value: the minimum / label 0)."""
        S = image.shape[1:]
        center = [(s - p) // 2 + (p - 1) / 2.0 for s, p in zip(S, self.patch_size)]
        return self.apply(image, label, self.draw_spatial(rng), center, rng)


class IntensityShift(Augmentation):
    """FSEFT's released code's only training augmentation: MONAI's ``RandShiftIntensityd(offsets=0.1,
    prob=0.2)``, one offset drawn from U(−0.1, 0.1) added to the whole patch with probability 0.2; nothing
    spatial, no mirroring. The offset is in the model's input units (the authors' inputs are CT windowed to
    [−175, 250] HU and scaled to [0, 1], so 0.1 is 42.5 HU there; medadapt's CT normalisation is nnU-Net's
    z-score, where 0.1 is a tenth of the foreground's standard deviation)."""

    def __init__(self, patch_size: Sequence[int], offset: float = 0.1, p: float = 0.2):
        super().__init__(patch_size, p_rotation=0, p_scaling=0, p_noise=0, p_blur=0, p_brightness=0, p_contrast=0,
                         p_lowres=0, p_gamma=0, p_inverted_gamma=0, p_mirror=0, mirror_axes=())
        if not offset >= 0 or not 0 <= p <= 1:
            raise MedadaptError(f"intensity shift: offset {offset} must be >= 0 and p {p} within [0, 1]")
        self.offset, self.p_shift = float(offset), float(p)

    def __repr__(self) -> str:
        return f"IntensityShift(patch_size={self.patch_size}, offset={self.offset}, p={self.p_shift})"

    def draw_spatial(self, rng: np.random.Generator) -> None:
        return None

    def _intensity(self, img: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
        shift = rng.random() < self.p_shift
        offset = float(rng.uniform(-self.offset, self.offset))  # drawn either way: crops do not depend on p
        if shift:
            img += offset
        return img


#: a recipe's ``augmentation`` -> (the augmentation, the sampler's crop policy). ``nnunet``: nnU-Net v2's
#: pipeline with its foreground oversampling (a third of each batch forced onto foreground); ``fseft``: the
#: authors' code of FSEFT, an intensity shift and MONAI's ``RandCropByPosNegLabeld(pos=1, neg=1)``: each patch
#: centred on a foreground voxel with probability 1/2, else on a background voxel.
AUGMENTATION_PRESETS = ("nnunet", "fseft")


def augmentation_preset(name: str, patch_size: Sequence[int]) -> tuple[Augmentation, dict]:
    """The augmentation of preset ``name`` and the keyword arguments it gives the patch sampler."""
    if name == "nnunet":
        return Augmentation(patch_size), {"oversample_foreground": 0.33}
    if name == "fseft":
        return IntensityShift(patch_size), {"positive_fraction": 0.5}
    raise MedadaptError(f"augmentation {name!r}: unknown; choose one of {', '.join(AUGMENTATION_PRESETS)}")

