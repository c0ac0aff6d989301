"""Speed of the DICOM paths (issue 24's targets): import a 512 x 512 x 300 CT with 20 structures, and write an
RTSTRUCT of 10 structures back, each timed in a fresh process with its peak resident memory.

    python -m medadapt.dicom.bench [--workdir DIR] [--slices 300] [--size 512] [--json]

The data are made first (not timed): a CT phantom (body ellipse, noise) written as a CT series, and 20
structures (ellipsoids; the first is the body outline on every slice, as real structure sets carry) written
as an RTSTRUCT by medadapt itself. Then, each in its own process:

* ``import``: ``import_dicom`` of the export with 20 ``--roi`` labels (scan, geometry, HU, rasterising all 20
  ROIs, writing the NIfTI dataset).
* ``rtstruct``: what ``medadapt to-dicom --format rtstruct`` does with a 10-label map on that series (read the
  series' headers and the label map, contours of 10 structures on every slice they touch, write the file).
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

N_STRUCTURES = 20
N_WRITTEN = 10


def _structures(shape, spacing, rng) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """(name, centre zyx voxels, radii zyx voxels) of the 20 structures; the first is the body outline."""
    nz, ny, nx = shape
    out = [("External", np.array([nz / 2, ny / 2, nx / 2]), np.array([nz * 10.0, ny * 0.42, nx * 0.46]))]
    for i in range(1, N_STRUCTURES):
        radii_mm = rng.uniform(8, 45, 3)
        radii = radii_mm / np.asarray(spacing)
        centre = np.array([rng.uniform(0.15, 0.85) * nz, rng.uniform(0.3, 0.7) * ny, rng.uniform(0.25, 0.75) * nx])
        out.append((f"Struct_{i:02d}", centre, radii))
    return out


def _ellipsoid(shape, centre, radii) -> tuple[tuple[slice, ...], np.ndarray]:
    lo = np.maximum(np.floor(centre - radii).astype(int), 0)
    hi = np.minimum(np.ceil(centre + radii).astype(int) + 1, shape)
    grids = np.ogrid[tuple(slice(a, b) for a, b in zip(lo, hi))]
    d = sum(((g - c) / r) ** 2 for g, c, r in zip(grids, centre, radii))
    return tuple(slice(a, b) for a, b in zip(lo, hi)), d <= 1.0


def make_data(workdir: Path, size: int, slices: int, seed: int = 0) -> dict:
    from medadapt.dicom.ctwriter import write_ct_series
    from medadapt.dicom.rtstruct import write_rtstruct
    from medadapt.dicom.series import load_series

    workdir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    shape, spacing = (slices, size, size), (1.5, 500.0 / size, 500.0 / size)
    structures = _structures(shape, spacing, rng)
    ct = np.full(shape, -1000, np.int16)
    sl, m = _ellipsoid(shape, *structures[0][1:])
    ct[sl][m] = 30
    ct += rng.integers(-20, 21, shape, dtype=np.int16)
    affine = np.diag([-spacing[2], -spacing[1], spacing[0], 1.0])
    affine[:3, 3] = (250.0, 250.0, -225.0)
    export = workdir / "export" / "bench_001"
    write_ct_series(ct, affine, export / "CT", patient_id="bench_001")
    series = load_series(export / "CT")
    del ct
    # the structures overlap, so no single label map holds them: one RTSTRUCT per structure, ROIs merged
    import pydicom

    merged = None
    for i, (name, centre, radii) in enumerate(structures):
        lab = np.zeros(series.shape, np.uint8)
        s, m = _ellipsoid(series.shape, centre, radii)
        lab[s][m] = 1
        ds = write_rtstruct(lab, series, {1: name}, workdir / f".rs_{i}.dcm")
        part = pydicom.dcmread(ds)
        if merged is None:
            merged = part
        else:
            n = len(merged.StructureSetROISequence) + 1
            for seq in ("StructureSetROISequence", "ROIContourSequence", "RTROIObservationsSequence"):
                item = getattr(part, seq)[0]
                for kw in ("ROINumber", "ReferencedROINumber", "ObservationNumber"):
                    if kw in item:
                        setattr(item, kw, n)
                getattr(merged, seq).append(item)
        ds.unlink()
    merged.save_as(export / "RS.dcm", enforce_file_format=True)
    # the 10-label map for the write-back (painted in order; later structures cover earlier ones)
    lab = np.zeros(series.shape, np.uint8)
    for v, (name, centre, radii) in enumerate(structures[:N_WRITTEN], start=1):
        s, m = _ellipsoid(series.shape, centre, radii)
        lab[s][m] = v
    from medadapt.data.io import write_volume

    write_volume(lab, series.affine, workdir / "labels10.nii.gz")
    (workdir / "names.json").write_text(json.dumps({str(v): n for v, (n, _, _) in
                                                    enumerate(structures[:N_WRITTEN], start=1)}))
    return {"export": str(workdir / "export"), "series": str(export / "CT"), "labels": str(workdir / "labels10.nii.gz"),
            "rois": [n for n, _, _ in structures]}


def _peak_rss_mib() -> float:
    """This process's peak resident memory: VmHWM (ru_maxrss would include the parent's at fork)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _phase(name: str, workdir: Path) -> dict:
    """Run one timed phase in this process; report seconds and peak RSS."""
    t0 = time.perf_counter()
    info: dict = {}
    if name == "import":
        import shutil

        from medadapt.dicom.importer import import_dicom

        out = workdir / "Dataset999_Bench"
        shutil.rmtree(out, ignore_errors=True)
        rois = json.loads((workdir / "rois.json").read_text())
        r = import_dicom(workdir / "export", out, [f"s{i:02d}={n}" for i, n in enumerate(rois)])
        info = {"cases": len(r.training), "labels": len(r.labels) - 1}
    elif name == "rtstruct":
        from medadapt.dicom.export import to_dicom

        names = {int(k): v for k, v in json.loads((workdir / "names.json").read_text()).items()}
        path = to_dicom(workdir / "labels10.nii.gz", workdir / "export" / "bench_001" / "CT", workdir / "rs10.dcm",
                        "rtstruct", labels=names)
        import pydicom

        ds = pydicom.dcmread(path)
        info = {"rois": len(ds.StructureSetROISequence),
                "contours": sum(len(getattr(i, "ContourSequence", [])) for i in ds.ROIContourSequence),
                "bytes": path.stat().st_size}
    else:
        raise SystemExit(f"unknown phase {name}")
    seconds = time.perf_counter() - t0
    rss = _peak_rss_mib()
    return {"phase": name, "seconds": round(seconds, 2), "peak_rss_mib": round(rss, 0), **info}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m medadapt.dicom.bench", description=__doc__.split("\n\n")[0])
    ap.add_argument("--workdir", type=Path, default=Path("medadapt_runs/bench-dicom"))
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--slices", type=int, default=300)
    ap.add_argument("--repeats", type=int, default=1, help="time each phase this many times (default 1)")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--phase", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.phase:
        print(json.dumps(_phase(args.phase, args.workdir)))
        return 0
    t0 = time.perf_counter()
    data = make_data(args.workdir, args.size, args.slices)
    (args.workdir / "rois.json").write_text(json.dumps(data["rois"]))
    setup = time.perf_counter() - t0
    results = []
    for _ in range(args.repeats):
        for phase in ("import", "rtstruct"):
            t = time.perf_counter()
            proc = subprocess.run([sys.executable, "-m", "medadapt.dicom.bench", "--phase", phase, "--workdir",
                                   str(args.workdir)], capture_output=True, text=True, check=True)
            r = json.loads(proc.stdout.strip().splitlines()[-1])
            r["process_seconds"] = round(time.perf_counter() - t, 2)
            results.append(r)
    if args.json:
        print(json.dumps({"setup_seconds": round(setup, 1), "results": results}, indent=2))
    else:
        print(f"data: {args.size} x {args.size} x {args.slices} CT, {N_STRUCTURES} structures (made in {setup:.0f} s)")
        for r in results:
            extra = {k: v for k, v in r.items() if k not in ("phase", "seconds", "peak_rss_mib", "process_seconds")}
            print(f"{r['phase']:<9} {r['seconds']:>6.2f} s in the call, {r['process_seconds']:>6.2f} s as a process, "
                  f"peak RSS {r['peak_rss_mib']:.0f} MiB  {extra}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
