"""nnU-Net v2 raw datasets: ``dataset.json``, ``imagesTr/<case>_<XXXX><ending>``, ``labelsTr/<case><ending>``.

Everything a user can get wrong here (a missing file, a malformed ``dataset.json``, a label map that does not
match its image) is raised as one-line :class:`~medadapt.errors.MedadaptError` naming the file and the fix.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np

from medadapt.data.io import NIFTI_ENDINGS, Volume, read_image, read_label, strip_nifti_ending
from medadapt.errors import MedadaptError

SPACING_RTOL = 1e-3  # relative tolerance on voxel spacing between image channels / label
ORIGIN_ATOL_MM = 1e-3  # absolute tolerance on the origin, in mm
DIRECTION_ATOL = 1e-3  # absolute tolerance on the direction cosines

_CHANNEL_RE = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})$")


def _visible_files(folder: Path, ending: str | None) -> list[Path]:
    """Plain files in ``folder`` (no hidden/temporary ones) ending with ``ending`` (any NIfTI ending if None)."""
    endings = (ending,) if ending else NIFTI_ENDINGS
    return sorted(
        p for p in folder.iterdir()
        if p.is_file() and not p.name.startswith(".") and p.name.endswith(endings)
    )


def _strip(name: str, ending: str | None) -> str:
    if ending and name.endswith(ending):
        return name[: -len(ending)]
    return strip_nifti_ending(name)


class RawDataset:
    """A dataset in nnU-Net v2 raw format. Build it with :meth:`RawDataset.load`."""

    def __init__(self, root: Path, name: str, channel_names: dict[str, str], labels: dict[str, int],
                 file_ending: str, case_ids: list[str], _images: dict[str, list[Path]],
                 _labels: dict[str, Path]):
        self.root = root
        self.name = name
        self.channel_names = channel_names
        self.labels = labels
        self.file_ending = file_ending
        self.case_ids = case_ids
        self._image_paths = _images
        self._label_paths = _labels

    # ------------------------------------------------------------------ properties
    @property
    def num_classes(self) -> int:
        """Number of labels including background (the network's output channels)."""
        return len(self.labels)

    @property
    def num_channels(self) -> int:
        return len(self.channel_names)

    def __len__(self) -> int:
        return len(self.case_ids)

    def __repr__(self) -> str:
        return (f"RawDataset({self.name!r}, root={str(self.root)!r}, cases={len(self.case_ids)}, "
                f"channels={list(self.channel_names.values())}, labels={self.labels})")

    def _check_case(self, case_id: str) -> None:
        if case_id not in self._label_paths:
            raise MedadaptError(
                f"case {case_id!r} is not in {self.root}; known cases look like {self.case_ids[:3]} "
                "(check the case id)")

    def image_paths(self, case_id: str) -> list[Path]:
        """One path per channel, in channel order (``_0000``, ``_0001``, ...)."""
        self._check_case(case_id)
        return list(self._image_paths[case_id])

    def label_path(self, case_id: str) -> Path:
        self._check_case(case_id)
        return self._label_paths[case_id]

    # ------------------------------------------------------------------ loading
    @classmethod
    def load(cls, root: str | Path) -> "RawDataset":
        root = Path(root)
        if not root.is_dir():
            raise MedadaptError(f"{root}: dataset folder not found; pass the folder that holds dataset.json, "
                                "imagesTr and labelsTr (nnU-Net v2 raw format)")
        djson = root / "dataset.json"
        if not djson.is_file():
            raise MedadaptError(f"{djson}: not found; every nnU-Net v2 raw dataset needs a dataset.json "
                                "(channel_names, labels, numTraining, file_ending)")
        try:
            meta = json.loads(djson.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise MedadaptError(f"{djson}: not valid JSON ({exc}); fix the syntax") from None
        if not isinstance(meta, dict):
            raise MedadaptError(f"{djson}: must hold a JSON object with channel_names, labels, numTraining "
                                "and file_ending")

        channel_names = _parse_channel_names(meta, djson)
        labels = _parse_labels(meta, djson)
        file_ending = meta.get("file_ending")
        if not isinstance(file_ending, str) or not file_ending:
            raise MedadaptError(f'{djson}: "file_ending" is missing; add e.g. "file_ending": ".nii.gz"')
        if file_ending not in NIFTI_ENDINGS:
            raise MedadaptError(
                f'{djson}: file_ending {file_ending!r} is not supported; medadapt reads NIfTI only '
                '(".nii.gz" or ".nii"): convert the images and set "file_ending": ".nii.gz"')
        if "dataset" in meta:
            raise MedadaptError(
                f'{djson}: the "dataset" key (explicit file lists) is not supported yet; place the files in '
                f"imagesTr/labelsTr and remove the key")

        images_dir, labels_dir = root / "imagesTr", root / "labelsTr"
        for d in (images_dir, labels_dir):
            if not d.is_dir():
                raise MedadaptError(f"{d}: folder not found; an nnU-Net v2 raw dataset keeps training images in "
                                    "imagesTr/<case>_0000<ending> and labels in labelsTr/<case><ending>")

        n_ch = len(channel_names)
        images: dict[str, dict[int, Path]] = {}
        for p in _visible_files(images_dir, file_ending):
            stem = p.name[: -len(file_ending)]
            m = _CHANNEL_RE.match(stem)
            if m is None:
                raise MedadaptError(
                    f"{p}: image file names must end in a 4-digit channel index; rename it to "
                    f"{stem}_0000{file_ending}")
            ch = int(m.group("channel"))
            if ch >= n_ch:
                raise MedadaptError(
                    f"{p}: channel {ch:04d} but dataset.json channel_names lists {n_ch} channel(s); "
                    f"add the channel to channel_names or remove the file")
            images.setdefault(m.group("case"), {})[ch] = p

        label_files: dict[str, Path] = {}
        for p in _visible_files(labels_dir, file_ending):
            label_files[p.name[: -len(file_ending)]] = p

        for case, chans in sorted(images.items()):
            missing = [c for c in range(n_ch) if c not in chans]
            if missing:
                expected = images_dir / f"{case}_{missing[0]:04d}{file_ending}"
                raise MedadaptError(
                    f"{expected}: missing channel {missing[0]:04d} of case {case!r} (dataset.json lists {n_ch} "
                    f"channels); add the file or remove the case's other channel files")
            if case not in label_files:
                raise MedadaptError(
                    f"{chans[0]}: image has no label; add {labels_dir / (case + file_ending)} or move the image "
                    "to imagesTs")
        for case, p in sorted(label_files.items()):
            if case not in images:
                raise MedadaptError(
                    f"{p}: label has no image; add {images_dir / (case + '_0000' + file_ending)} or remove the label")

        case_ids = sorted(images)
        if not case_ids:
            raise MedadaptError(f"{images_dir}: no training images ending in {file_ending!r}; add "
                                f"<case>_0000{file_ending} files (and labels in labelsTr)")
        num_training = meta.get("numTraining")
        if num_training is not None:
            if isinstance(num_training, bool) or not isinstance(num_training, int):
                raise MedadaptError(f'{djson}: "numTraining" must be an integer; set it to {len(case_ids)}')
            if num_training != len(case_ids):
                raise MedadaptError(
                    f"{djson}: numTraining is {num_training} but imagesTr/labelsTr hold {len(case_ids)} cases; "
                    f"set numTraining to {len(case_ids)}")

        name = meta.get("name") if isinstance(meta.get("name"), str) else root.name
        return cls(
            root=root, name=name, channel_names=channel_names, labels=labels, file_ending=file_ending,
            case_ids=case_ids,
            _images={c: [images[c][i] for i in range(n_ch)] for c in case_ids},
            _labels={c: label_files[c] for c in case_ids},
        )

    def load_case(self, case_id: str) -> tuple[list[Volume], Volume]:
        """Read and validate one case: its channel images (float32) and its label map (int16)."""
        images = [read_image(p) for p in self.image_paths(case_id)]
        label = read_label(self.label_path(case_id))
        self.validate_case(images, label)
        return images, label

    def validate_case(self, images: list[Volume], label: Volume | None) -> None:
        """Check that channels and label share one geometry and that label values are declared labels."""
        if len(images) != self.num_channels:
            where = images[0].path if images and images[0].path else self.root
            raise MedadaptError(f"{where}: {len(images)} channel image(s) given but dataset.json lists "
                                f"{self.num_channels}; provide one file per channel")
        validate_geometry(images, label)
        if label is not None:
            present = np.unique(label.array)
            allowed = set(self.labels.values())
            bad = [int(v) for v in present if int(v) not in allowed]
            if bad:
                raise MedadaptError(
                    f"{label.path}: label values {bad} are not in dataset.json labels "
                    f"{sorted(allowed)}; add them to \"labels\" in {self.root / 'dataset.json'} or fix the label map")


def validate_geometry(images: list[Volume], label: Volume | None = None) -> None:
    """All channels (and the label, if given) must share shape, spacing, origin and direction."""
    if not images:
        raise ValueError("validate_geometry needs at least one image")
    ref = images[0]
    others = [(v, "image") for v in images[1:]] + ([(label, "label")] if label is not None else [])
    for vol, kind in others:
        fix = ("resample/re-export it onto the image grid, or copy the image header if only the header is wrong"
               if kind == "label" else "resample all channels onto the grid of channel 0000")
        name = vol.path if vol.path is not None else kind
        refname = ref.path if ref.path is not None else "the first image"
        if tuple(vol.array.shape) != tuple(ref.array.shape):
            raise MedadaptError(f"{name}: {kind} shape {_xyz(vol.array.shape)} differs from {refname} shape "
                                f"{_xyz(ref.array.shape)} (x, y, z); {fix}")
        sp_a, sp_b = np.asarray(vol.spacing, float), np.asarray(ref.spacing, float)
        if np.any(np.abs(sp_a - sp_b) > SPACING_RTOL * np.maximum(np.abs(sp_a), np.abs(sp_b))):
            raise MedadaptError(f"{name}: {kind} spacing {_xyz(vol.spacing)} mm differs from {refname} spacing "
                                f"{_xyz(ref.spacing)} mm (x, y, z); {fix}")
        o_a, o_b = vol.affine[:3, 3], ref.affine[:3, 3]
        if np.max(np.abs(o_a - o_b)) > ORIGIN_ATOL_MM:
            raise MedadaptError(f"{name}: {kind} origin {_fmt(o_a)} mm differs from {refname} origin {_fmt(o_b)} mm "
                                f"(by up to {np.max(np.abs(o_a - o_b)):.4g} mm); {fix}")
        d_a, d_b = _directions(vol.affine), _directions(ref.affine)
        if np.max(np.abs(d_a - d_b)) > DIRECTION_ATOL:
            raise MedadaptError(f"{name}: {kind} orientation {vol.orientation} / direction cosines differ from "
                                f"{refname} ({ref.orientation}); {fix}")


def _directions(affine: np.ndarray) -> np.ndarray:
    m = np.asarray(affine, float)[:3, :3]
    norms = np.linalg.norm(m, axis=0)
    return m / np.where(norms > 0, norms, 1.0)


def _xyz(zyx) -> str:
    """A (z, y, x) tuple printed in the (x, y, z) order users see in viewers."""
    return "(" + ", ".join(f"{float(v):.6g}" for v in list(zyx)[::-1]) + ")"


def _fmt(v) -> str:
    return "(" + ", ".join(f"{float(x):.4g}" for x in v) + ")"


def _parse_channel_names(meta: dict, djson: Path) -> dict[str, str]:
    ch = meta.get("channel_names", meta.get("modality"))
    if not isinstance(ch, dict) or not ch:
        raise MedadaptError(f'{djson}: "channel_names" is missing or empty; add e.g. "channel_names": {{"0": "CT"}}')
    try:
        keys = sorted(int(k) for k in ch)
    except (TypeError, ValueError):
        raise MedadaptError(f'{djson}: "channel_names" keys must be channel indices "0", "1", ...; '
                            f'e.g. {{"0": "CT"}}') from None
    if keys != list(range(len(keys))):
        raise MedadaptError(f'{djson}: "channel_names" keys must be consecutive channel indices from "0" '
                            f"(found {keys}); renumber them")
    if not all(isinstance(v, str) for v in ch.values()):
        raise MedadaptError(f'{djson}: "channel_names" values must be names such as "CT"; fix them')
    by_index = {int(k): v for k, v in ch.items()}
    return {str(k): str(by_index[k]) for k in keys}


def _parse_labels(meta: dict, djson: Path) -> dict[str, int]:
    labels = meta.get("labels")
    if not isinstance(labels, dict) or not labels:
        raise MedadaptError(f'{djson}: "labels" is missing or empty; add e.g. "labels": '
                            '{"background": 0, "lymph_node": 1}')
    if "regions_class_order" in meta or any(isinstance(v, (list, tuple)) for v in labels.values()):
        raise MedadaptError(f"{djson}: region-based labels (lists of label values / regions_class_order) are not "
                            "supported yet; use one integer per label")
    if all(isinstance(k, str) and k.strip().isdigit() for k in labels) and all(isinstance(v, str) for v in labels.values()):
        raise MedadaptError(f'{djson}: "labels" looks like nnU-Net v1 format (number -> name); nnU-Net v2 uses '
                            'name -> number, e.g. {"background": 0, "lymph_node": 1}; swap keys and values')
    out: dict[str, int] = {}
    for k, v in labels.items():
        if isinstance(v, bool) or not isinstance(v, int):
            raise MedadaptError(f'{djson}: label {k!r} has value {v!r}; label values must be integers 0..N')
        if str(k).lower() == "ignore":
            raise MedadaptError(f'{djson}: the "ignore" label is not supported yet; remove it and its voxels')
        out[str(k)] = int(v)
    values = sorted(out.values())
    if values != list(range(len(values))):
        raise MedadaptError(f'{djson}: label values must be consecutive integers 0..N with background 0 '
                            f"(found {values}); renumber the labels (and the label maps)")
    if out.get("background", 0) != 0:
        raise MedadaptError(f'{djson}: "background" must have value 0; renumber the labels')
    return out


# ---------------------------------------------------------------------- prediction inputs
def find_images(path: str | Path, file_ending: str | None = None,
                num_channels: int = 1) -> list[tuple[str, list[Path]]]:
    """Images to predict: ``[(case_id, [channel paths...]), ...]`` sorted by case id.

    ``path`` is one NIfTI file (case id = file name without ending and without ``_0000``; further channels
    ``_0001``... are taken from the same folder) or a folder of ``<case>_XXXX<ending>`` files grouped by case.
    With a single channel, files without the ``_0000`` suffix are accepted too.
    """
    path = Path(path)
    if not path.exists():
        raise MedadaptError(f"{path}: not found; pass a NIfTI file or a folder of <case>_0000.nii.gz files")
    if path.is_file():
        if not path.name.endswith((file_ending,) if file_ending else NIFTI_ENDINGS):
            want = file_ending or ".nii.gz/.nii"
            raise MedadaptError(f"{path}: not a {want} file; pass a NIfTI image or a folder of them")
        stem = _strip(path.name, file_ending)
        m = _CHANNEL_RE.match(stem)
        ending = path.name[len(stem):]
        if num_channels == 1:
            case = m.group("case") if m and m.group("channel") == "0000" else stem
            return [(case, [path])]
        if not m or m.group("channel") != "0000":
            raise MedadaptError(f"{path}: the model needs {num_channels} channels; name the files "
                                f"<case>_0000{ending} ... <case>_{num_channels - 1:04d}{ending} and pass the first "
                                "one or their folder")
        case = m.group("case")
        paths = [path.parent / f"{case}_{c:04d}{ending}" for c in range(num_channels)]
        for p in paths:
            if not p.is_file():
                raise MedadaptError(f"{p}: missing channel of case {case!r} (the model needs {num_channels} "
                                    "channels); add the file")
        return [(case, paths)]

    files = _visible_files(path, file_ending)
    if not files:
        want = f"{file_ending!r}" if file_ending else ".nii.gz/.nii"
        raise MedadaptError(f"{path}: no {want} images in this folder; pass a folder of <case>_0000.nii.gz files "
                            "(or a single image)")
    groups: dict[str, dict[int, Path]] = {}
    for p in files:
        stem = _strip(p.name, file_ending)
        m = _CHANNEL_RE.match(stem)
        if m is None:
            if num_channels != 1:
                raise MedadaptError(f"{p}: the model needs {num_channels} channels per case; rename the files "
                                    f"<case>_0000 ... <case>_{num_channels - 1:04d}")
            case, ch = stem, 0
        else:
            case, ch = m.group("case"), int(m.group("channel"))
            if ch >= num_channels:
                raise MedadaptError(f"{p}: channel {ch:04d} but the model takes {num_channels} channel(s); "
                                    "remove the file or check the folder")
        if ch in groups.get(case, {}):
            raise MedadaptError(f"{p}: case {case!r} channel {ch:04d} is given twice (also "
                                f"{groups[case][ch].name}); keep one of the files")
        groups.setdefault(case, {})[ch] = p
    out = []
    for case in sorted(groups):
        chans = groups[case]
        for c in range(num_channels):
            if c not in chans:
                some = next(iter(chans.values()))
                ending = some.name[len(_strip(some.name, file_ending)):]
                raise MedadaptError(f"{path / f'{case}_{c:04d}{ending}'}: missing channel {c:04d} of case {case!r} "
                                    f"(the model needs {num_channels} channels); add the file")
        out.append((case, [chans[c] for c in range(num_channels)]))
    return out
