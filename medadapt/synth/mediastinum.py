"""Mediastinum phantom: from the top of the heart to the thoracic inlet, lungs on both sides.

Patient frame (mm, before the case's size/position jitter): z = 0 a little above the carina, +z superior; +y
anterior; +x the patient's right. The thoracic cavity is lung by default; the mediastinum is fat, and every
mediastinal structure (trachea, oesophagus, aorta, pulmonary arteries, caval and brachiocephalic veins) carries
a rim of fat that holds the nodal stations (IASLC: 2R/2L, 4R/4L, 5, 6, 7, 8, 10R/10L, 3A).
"""
from __future__ import annotations

import numpy as np

from medadapt.synth.canvas import (
    AIRWAY, ARTERY, CARTILAGE, CORTEX, CSF, FAT, LUNG, LUNG_VESSEL, MARROW, MUSCLE, SKIN, SOFT, TABLE, VEIN,
    Canvas, Curve, capsule, ellipsoid, plate, prism, tube,
)
from medadapt.synth.stations import Station
from medadapt.synth.structures import S

BIG = 1e3


def _fat_rim(canvas: Canvas, t: dict, pts, radii, margin: float) -> None:
    """Mediastinal fat around a tube: replaces lung only."""
    canvas.fill_all(tube(canvas.frame, pts, np.asarray(radii, float) + margin), t["fat_deep"], FAT, within=[LUNG])


def build(canvas: Canvas, rng: np.random.Generator, t: dict, spec) -> list[Station]:
    f = canvas.frame
    U, N = rng.uniform, rng.normal
    fat_t = U(*spec.patient.fat_thickness_mm)
    wall = U(10, 16)

    # ---------------------------------------------------------------- chest wall and thoracic cavity
    kz = [-80, 0, 50, 80]
    w, d = N(1.0, 0.04), N(1.0, 0.04)
    ax = Curve(kz, np.array([155, 150, 140, 150]) * w)
    ay = Curve(kz, np.array([110, 106, 100, 98]) * d)
    yc = Curve(kz, np.array([6, 5, 4, 3]) + N(0, 2))
    body = prism(f, -BIG, BIG, yc, 0.0, ay, ax)
    canvas.fill(body, t["skin"], SKIN)
    canvas.fill(body, t["fat"], FAT, inset=2.0)
    canvas.fill(body, t["muscle"], MUSCLE, inset=2.0 + fat_t)
    canvas.fill(body, t["lung"], LUNG, inset=2.0 + fat_t + wall, part=S.lung)
    del body
    y_table = float(yc(0.0) - ay(0.0)) - U(3, 12)
    y_table = float(f.to_world([0.0, y_table, 0.0])[1])  # the table does not turn with the patient
    canvas.fill(plate(f, -BIG, BIG, [[y_table, -400], [y_table, 400]], 2.0, space="world"), t["table"], TABLE)
    cav_ay = Curve(kz, ay.v - 2.0 - fat_t - wall)
    cav_ax = Curve(kz, ax.v - 2.0 - fat_t - wall)

    # ---------------------------------------------------------------- landmarks
    z_c = U(-26, -14)                 # carina
    z_arch = z_c + U(38, 50)          # top of the aortic arch centre line
    z_pa = z_c - U(2, 10)             # pulmonary bifurcation
    x_t, y_t = 6 + N(0, 1.5), -11 + N(0, 1.5)
    r_t = U(8, 10)
    y_vb = -45 + N(0, 2)

    # ---------------------------------------------------------------- mediastinal fat (central)
    canvas.fill(prism(f, -BIG, BIG, 15.0, Curve([-80, -40, 0, 80], [-8, -5, 0, 0]),
                      Curve(kz, cav_ay.v * 0.5 + 26), Curve([-80, -40, 0, 40, 80], np.array([60, 48, 36, 30, 32]) * U(0.9, 1.1))),
                t["fat_deep"], FAT, within=[LUNG])

    # ---------------------------------------------------------------- spine, paraspinal muscles, ribs, sternum
    period, disc_h, phase = U(22, 27), U(5, 7), U(0, 27)
    for side in (+1, -1):
        canvas.fill(prism(f, -BIG, BIG, y_vb - 34, side * 24.0, 20.0, 19.0), t["muscle"], MUSCLE, within=[LUNG, MUSCLE])
    vb = prism(f, -BIG, BIG, y_vb, 0.0, 13.0, 15.0)
    if vb is not None:
        Zs = f.PZ[vb.sl[0]][:, None, None]
        disc = np.mod(Zs - phase, period) < disc_h
        bone = np.where(disc, S.intervertebral_disc, S.vertebrae).astype(np.uint8)
        canvas.fill(vb, np.where(disc, t["disc"], t["cortex"]), CORTEX, part=bone)
        canvas.fill(vb, np.where(disc, t["disc"], t["marrow"]), MARROW, inset=1.8, part=bone)
    y_can = y_vb - 13 - 8.5
    arch = prism(f, -BIG, BIG, y_can, 0.0, 11.0, 12.0)
    canvas.fill(arch, t["small_bone"], CORTEX, part=S.vertebrae)
    canvas.fill(prism(f, -BIG, BIG, y_can - 16, 0.0, 9.0, 3.5, theta=0.0), t["small_bone"], CORTEX, part=S.vertebrae)
    canvas.fill(arch, t["csf"], CSF, inset=3.0)
    canvas.fill(prism(f, -BIG, BIG, y_can, 0.0, 4.0, 5.0), t["soft"], CSF, part=S.spinal_cord)
    for side in (+1, -1):
        canvas.fill(prism(f, -BIG, BIG, y_vb - 20, side * 22.0, 5.0, 10.0, theta=side * 0.3), t["small_bone"], CORTEX,
                    part=S.vertebrae)  # transverse processes

    r_period, drop = U(22, 28), U(60, 90)
    z0 = U(0, r_period)
    phis = np.linspace(0.35, 2.75, 13)
    for side in (+1, -1):
        for zk in np.arange(-110 + z0, 150, r_period):
            zr = zk + N(0, 2)
            pts = []
            for phi in phis:
                z = zr - drop * (1 - np.cos(phi)) / 2
                cy = float(yc(z))
                pts.append([z, cy - (float(cav_ay(z)) + 4) * np.cos(phi), side * (float(cav_ax(z)) + 4) * np.sin(phi)])
            pts = [[zr + 2, y_vb - 12, side * 18.0]] + pts
            pts = np.array(pts)
            rr = U(4.0, 5.0)
            bone, cartl = pts[:11], pts[10:]
            canvas.fill_all(tube(f, bone, rr), t["cortex"], CORTEX, within=[MUSCLE, LUNG, FAT, CORTEX, MARROW],
                            part=S.ribs)
            canvas.fill_all(tube(f, bone, rr - 1.8), t["marrow"], MARROW, within=[CORTEX], part=S.ribs)
            canvas.fill_all(tube(f, cartl, rr), t["cartilage"], CARTILAGE, within=[MUSCLE, LUNG, FAT],
                            part=S.costal_cartilage)
    y_st = Curve(kz, yc.v + cav_ay.v + 3.0)
    z_man = 30 + N(0, 4)
    st = prism(f, -BIG, BIG, y_st, 0.0, Curve([z_man - 1, z_man + 1], [6, 7]), Curve([z_man - 1, z_man + 1], [14, 24]))
    canvas.fill(st, t["cortex"], CORTEX, part=S.sternum)
    canvas.fill(st, t["marrow"], MARROW, inset=1.8, part=S.sternum)

    # ---------------------------------------------------------------- great vessels (fat rims first)
    r_a, r_d = U(13, 17), U(10, 13)
    aorta = np.array([[-95, 28, 12], [z_arch - 18, 28, 10], [z_arch - 3, 16, 2], [z_arch, 0, -14],
                      [z_arch - 5, -18, -22], [z_arch - 22, -28, -24], [-95, -30, -24]], float)
    aorta[:, 1:] += N(0, 1.5, (7, 2))
    r_aorta = [r_a, r_a, 0.92 * r_a, 0.88 * r_a, r_d, r_d, r_d]
    bct = [[z_arch + 4, 12, 2], [z_arch + 30, 8, 14], [110, 4, 22]]
    lcca = [[z_arch + 8, 2, -10], [110, 0, -14]]
    lsa = [[z_arch + 6, -12, -18], [z_arch + 30, -14, -26], [110, -14, -38]]
    r_p = U(12, 15)
    trunk = [[-95, 42, -14], [z_pa - 8, 30, -24]]
    lpa = [[z_pa - 8, 30, -24], [z_pa, 10, -34], [z_pa - 4, -6, -52]]
    rpa = [[z_pa - 8, 30, -24], [z_pa - 5, 10, 0], [z_pa - 6, 3, 25], [z_pa - 10, -4, 50]]
    svc_x = 38 + N(0, 2)
    svc = [[110, 20, svc_x + 2], [-95, 24, svc_x]]
    r_svc = U(8, 11)
    lbcv = [[z_arch + 35, 22, -60], [z_arch + 22, 30, -10], [z_arch + 14, 24, svc_x]]
    azy = [[-95, -36, 10], [z_c + 2, -34, 12], [z_c + 8, -14, 24], [z_c + 6, 14, svc_x - 2]]
    esoph_y = y_t - r_t - 2 - 8
    lung_v = t["lung_vessel"]

    _fat_rim(canvas, t, aorta, r_aorta, 7)
    for p, r in ((bct, 6), (lcca, 4), (lsa, 5), (svc, r_svc), (lbcv, 6)):
        _fat_rim(canvas, t, p, r, 6)
    _fat_rim(canvas, t, trunk, r_p, 6)
    _fat_rim(canvas, t, lpa, 10, 5)
    _fat_rim(canvas, t, rpa, 9.5, 5)
    _fat_rim(canvas, t, azy, 4, 4)
    canvas.fill(prism(f, -BIG, BIG, esoph_y, 0.0, 6.0 + 7, 8.5 + 7), t["fat_deep"], FAT, within=[LUNG])
    canvas.fill(prism(f, z_c, BIG, y_t, x_t, r_t + 11, r_t + 12), t["fat_deep"], FAT, within=[LUNG])
    canvas.fill(ellipsoid(f, [z_c - 18, y_t - 4, x_t - 3], [20, 16, 22]), t["fat_deep"], FAT, within=[LUNG])  # subcarinal

    # oesophagus
    canvas.fill(prism(f, -BIG, BIG, esoph_y, 0.0, 6.0, 8.5), t["soft"], SOFT, part=S.esophagus)
    if rng.random() < 0.5:
        canvas.fill(prism(f, -BIG, BIG, esoph_y, 0.0, 1.5, 2.5), t["air"], AIRWAY, part=S.esophagus)
    # heart top (left atrium)
    canvas.fill(ellipsoid(f, [-108, -8, -2], [40, 24, 40]), t["heart"], ARTERY)
    # arteries
    canvas.fill_all(tube(f, aorta, r_aorta), t["artery"], ARTERY, part=S.aorta)
    for p, r in ((bct, 6.5), (lcca, 4.0), (lsa, 5.0)):
        canvas.fill_all(tube(f, p, r), t["artery"], ARTERY, part=S.supraaortic_arteries)
    canvas.fill_all(tube(f, trunk, r_p), t["pulmonary"], ARTERY, part=S.pulmonary_artery)
    canvas.fill_all(tube(f, lpa, [r_p * 0.8, 10, 8]), t["pulmonary"], ARTERY, part=S.pulmonary_artery)
    canvas.fill_all(tube(f, rpa, [r_p * 0.8, 9.5, 9, 7.5]), t["pulmonary"], ARTERY, part=S.pulmonary_artery)
    # veins
    canvas.fill_all(tube(f, svc, r_svc), t["central_vein"], VEIN, part=S.superior_vena_cava)
    canvas.fill_all(tube(f, lbcv, 6.0), t["central_vein"], VEIN, part=S.brachiocephalic_vein)
    canvas.fill_all(tube(f, azy, 4.0), t["vein"], VEIN, part=S.azygos_vein)

    # ---------------------------------------------------------------- airway: trachea, main and lobar bronchi
    rb, lb = U(6, 7.5), U(5.5, 7)
    carina = [z_c, y_t, x_t]
    rmb = [carina, [z_c - 20, y_t - 2, x_t + 26], [z_c - 38, y_t - 4, x_t + 44]]
    lmb = [carina, [z_c - 18, y_t - 4, x_t - 28], [z_c - 40, y_t - 8, x_t - 54]]
    rul = [rmb[1], [z_c - 8, y_t - 4, x_t + 50], [z_c + 15, y_t - 6, x_t + 70]]
    lul = [lmb[1], [z_c - 6, y_t + 4, x_t - 55], [z_c + 12, y_t + 6, x_t - 75]]
    tr = prism(f, z_c, BIG, y_t, x_t, r_t, r_t * 1.08)
    canvas.fill(prism(f, z_c, BIG, y_t, x_t, r_t + 2, r_t * 1.08 + 2), t["cartilage"], CARTILAGE)
    for p, r in ((rmb, [rb, rb, rb * 0.8]), (lmb, [lb, lb, lb * 0.8]), (rul, [4.5, 4.0, 3.0]), (lul, [4.5, 4.0, 3.0])):
        canvas.fill_all(tube(f, p, np.asarray(r) + 1.8), t["soft"], SOFT)
    canvas.fill(tr, t["air"], AIRWAY, part=S.trachea)
    for p, r in ((rmb, [rb, rb, rb * 0.8]), (lmb, [lb, lb, lb * 0.8]), (rul, [4.5, 4.0, 3.0]), (lul, [4.5, 4.0, 3.0])):
        canvas.fill_all(tube(f, p, r), t["air"], AIRWAY, part=S.bronchi)

    # ---------------------------------------------------------------- lung vessels: a small tree from each hilum
    roots = {+1: np.array(rpa[-1], float), -1: np.array(lpa[-1], float)}
    for side in (+1, -1):
        for k in range(8):
            # spread the roots over the lung: up to the apex, down to the base, forwards and backwards
            elev = np.deg2rad(-65 + 130 * (k + U(0, 1)) / 8)
            azim = N(0, 0.6)
            dirn = np.array([np.sin(elev), np.cos(elev) * np.sin(azim), side * np.cos(elev) * np.cos(azim)])
            _vessel_tree(canvas, rng, roots[side], dirn, U(4, 5.5), U(35, 50), 4, lung_v)

    _scatter_vessels(canvas, rng, roots, 130, lung_v)

    return _stations(z_c, z_arch, z_pa, x_t, y_t, r_t, esoph_y)


def _scatter_vessels(canvas: Canvas, rng, roots: dict, n_per_side: int, hu) -> None:
    """Peripheral vessels: short segments anywhere in the lung, pointing away from the hilum, thinner far out."""
    f = canvas.frame
    zlo, zhi = float(f.PZ.min()), float(f.PZ.max())
    for side in (+1, -1):
        hil = roots[side]
        placed = tries = 0
        while placed < n_per_side and tries < 6 * n_per_side:
            tries += 1
            p = np.array([rng.uniform(zlo, zhi), rng.uniform(-90, 90), side * rng.uniform(10, 150)])
            dirn = p - hil
            dist = float(np.linalg.norm(dirn))
            dirn = dirn / (dist + 1e-9) + rng.normal(0, 0.35, 3)
            dirn /= np.linalg.norm(dirn) + 1e-9
            length = rng.uniform(12, 28)
            r = 0.8 + 3.2 * np.exp(-dist / 55.0) * rng.uniform(0.7, 1.3)
            idx = np.round(f.world_to_index(f.to_world(p))).astype(int)
            if np.any(idx < 0) or np.any(idx >= np.asarray(f.shape)) or canvas.cls[tuple(idx)] != LUNG:
                continue
            canvas.fill(capsule(f, p - dirn * length / 2, p + dirn * length / 2, r * 1.1, r * 0.9), hu, LUNG_VESSEL,
                        within=[LUNG, LUNG_VESSEL], part=S.pulmonary_vessels)
            placed += 1


def _vessel_tree(canvas: Canvas, rng, start, dirn, r, length, depth, hu) -> None:
    """Pulmonary vessels: a binary tree of tapering segments, drawn only over lung."""
    dirn = dirn / (np.linalg.norm(dirn) + 1e-9)
    end = start + dirn * length
    s = capsule(canvas.frame, start, end, r, r * 0.8)
    canvas.fill(s, hu, LUNG_VESSEL, within=[LUNG, LUNG_VESSEL], part=S.pulmonary_vessels)
    if depth > 0:
        for _ in range(2):
            nd = dirn + rng.normal(0, 0.5, 3)
            _vessel_tree(canvas, rng, end, nd, r * 0.72, length * rng.uniform(0.65, 0.85), depth - 1, hu)


def _stations(z_c, z_arch, z_pa, x_t, y_t, r_t, esoph_y) -> list[Station]:
    def paratracheal(z_lo, z_hi, y_lo, y_hi, gap_hi):
        def sample(rng, rn, side):
            return np.array([rng.uniform(z_lo, z_hi), y_t + rng.uniform(y_lo, y_hi),
                             x_t + side * (r_t * 1.08 + 2 + rn + rng.uniform(0.5, gap_hi))])
        return sample

    def box(z, y, x):
        def sample(rng, rn, side):
            return np.array([rng.uniform(*z), rng.uniform(*y), rng.uniform(*x)])
        return sample

    def hilar(rng, rn, side):
        return np.array([rng.uniform(z_c - 32, z_c + 4), rng.uniform(-22, 6), side * rng.uniform(30, 52)])

    def paraesophageal(rng, rn, side):
        return np.array([rng.uniform(-75, z_c - 18), esoph_y + rng.uniform(-6, 6), side * (8.5 + rn + rng.uniform(0.5, 5))])

    return [
        Station("4R", 0.20, lambda r, rn, s: paratracheal(z_c + 2, z_c + 30, -6, 14, 10)(r, rn, +1), bilateral=False),
        Station("2R", 0.08, lambda r, rn, s: paratracheal(z_c + 30, 75, -6, 12, 10)(r, rn, +1), bilateral=False),
        Station("4L", 0.12, lambda r, rn, s: paratracheal(z_c + 2, z_arch - 8, -8, 8, 6)(r, rn, -1), bilateral=False),
        Station("2L", 0.05, lambda r, rn, s: paratracheal(z_arch + 16, 75, -8, 8, 8)(r, rn, -1), bilateral=False),
        Station("5", 0.10, box((z_pa + 2, z_arch - 10), (-4, 14), (-42, -22)), bilateral=False),
        Station("6", 0.07, box((z_arch - 10, z_arch + 15), (18, 42), (-42, -14)), bilateral=False),
        Station("7", 0.18, box((z_c - 35, z_c - 6), (y_t - 10, y_t + 4), (x_t - 10, x_t + 8)), bilateral=False),
        Station("8", 0.05, paraesophageal),
        Station("10", 0.10, hilar, lung_tol=0.35),
        Station("3A", 0.05, box((-30, 60), (45, 75), (-15, 30)), bilateral=False),
    ]
