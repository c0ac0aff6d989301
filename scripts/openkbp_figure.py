"""One imported OpenKBP patient's axial, coronal and sagittal slices with its contours (docs/bench/openkbp-patient.png):
the check by eye that import-openkbp's HU and axes are right (anterior up in the axial and sagittal views,
superior up in the coronal and sagittal views, the patient's left on the image's right: radiological view).

    python scripts/openkbp_figure.py $nnUNet_raw/Dataset600_OpenKBP_OARs pt_001 docs/bench/openkbp-patient.png
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("dataset", type=Path, help="an imported OpenKBP dataset (import-openkbp --out)")
    ap.add_argument("case", help="case id, e.g. pt_001")
    ap.add_argument("out", type=Path, help="PNG to write")
    args = ap.parse_args()

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    from medadapt.data.io import read_image, read_label
    from medadapt.viz import ct_window

    ct = read_image(args.dataset / "imagesTr" / f"{args.case}_0000.nii.gz")
    lab = read_label(args.dataset / "labelsTr" / f"{args.case}.nii.gz")
    labels = {v: k for k, v in json.loads((args.dataset / "dataset.json").read_text())["labels"].items() if v}
    img, seg = ct.array, lab.array  # (z: inferior->superior, y: anterior->posterior, x: right->left)
    sz, sy, sx = ct.spacing
    fg = np.argwhere(seg > 0)
    cz, cy, cx = (fg.mean(0).round().astype(int) if len(fg) else np.array(img.shape) // 2)
    # radiological views: patient's right on the image's left; anterior up (axial); superior up (coronal, sagittal)
    views = [("axial", img[cz], seg[cz], sy / sx),
             ("coronal", img[:, cy, :][::-1], seg[:, cy, :][::-1], sz / sx),
             ("sagittal", img[:, :, cx][::-1], seg[:, :, cx][::-1], sz / sy)]
    colours = plt.get_cmap("tab10")
    fig, axes = plt.subplots(1, 3, figsize=(13, 4.8))
    for ax, (name, im, sg, aspect) in zip(axes, views):
        ax.imshow(ct_window(im, 40, 400), cmap="gray", aspect=aspect, interpolation="nearest")
        for v in sorted(labels):
            if (sg == v).any():
                ax.contour(sg == v, levels=[0.5], colors=[colours(v - 1)], linewidths=1.0)
        ax.set_title(f"{name} (HU window 40/400)")
        ax.set_axis_off()
    handles = [Line2D([0], [0], color=colours(v - 1), lw=2, label=n) for v, n in sorted(labels.items())]
    fig.legend(handles=handles, loc="lower center", ncol=len(handles), frameon=False)
    fig.suptitle(f"OpenKBP {args.case} as import-openkbp writes it ({args.dataset.name}); spacing z/y/x "
                 f"{sz:.2f}/{sy:.2f}/{sx:.2f} mm; min/median/max HU {img.min():.0f}/{np.median(img):.0f}/{img.max():.0f}")
    fig.tight_layout(rect=(0, 0.06, 1, 0.95))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=110)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
