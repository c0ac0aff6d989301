"""Head & neck phantom: from the thoracic inlet (lung apices, clavicles) to the mandible and parotids.

Patient frame (mm, before the case's size/position jitter): z = 0 at mid-neck (about C4/C5), +z superior;
+y anterior; +x the patient's right. The deep neck is muscle by default; fat spaces (carotid space, posterior
triangle, submandibular space, visceral space) are carved out of it and hold the vessels, glands and nodes.
"""
from __future__ import annotations

import numpy as np

from medadapt.synth.canvas import (
    AIRWAY, ARTERY, CARTILAGE, CORTEX, CSF, FAT, GLAND, LUNG, MARROW, MUSCLE, SKIN, SOFT, TABLE, VEIN,
    Canvas, Curve, ellipsoid, plate, prism, tube,
)
from medadapt.synth.stations import Station
from medadapt.synth.structures import S

BIG = 1e3  # "whole z range" for prisms


def _rot_z(deg: float) -> np.ndarray:
    """Rotation matrix (rows = local axes in (z, y, x)) for an in-plane rotation."""
    a = np.deg2rad(deg)
    return np.array([[1, 0, 0], [0, np.cos(a), np.sin(a)], [0, -np.sin(a), np.cos(a)]])


def build(canvas: Canvas, rng: np.random.Generator, t: dict, spec) -> list[Station]:
    f = canvas.frame
    U, N = rng.uniform, rng.normal
    fat_t = U(*spec.patient.fat_thickness_mm)

    # ---------------------------------------------------------------- body outline and skin; deep neck = fat
    kz = [-80, -60, -45, -25, 10, 35, 55, 80]
    neck_w, neck_d = N(1.0, 0.04), N(1.0, 0.04)
    ax = Curve(kz, np.array([150, 128, 90, 64, 60, 63, 68, 72]) * neck_w)
    ay = Curve(kz, np.array([95, 88, 72, 62, 60, 64, 78, 86]) * neck_d)
    yc = Curve(kz, np.array([-22, -20, -17, -15, -15, -8, 2, 5]) + N(0, 1.5))
    body = prism(f, -BIG, BIG, yc, 0.0, ay, ax)
    canvas.fill(body, t["skin"], SKIN)
    canvas.fill(body, t["fat_deep"], FAT, inset=2.0)

    # patient table under the back
    y_table = float(yc(0.0) - ay(0.0)) - U(3, 12)
    y_table = float(f.to_world([0.0, y_table, 0.0])[1])  # the table does not turn with the patient
    canvas.fill(plate(f, -BIG, BIG, [[y_table, -400], [y_table, 400]], 2.0, space="world"), t["table"], TABLE)

    # ---------------------------------------------------------------- landmarks
    z_mand = U(28, 38)           # inferior border of the mandible
    z_bif = U(14, 30)            # carotid bifurcation
    z_cric = U(-16, -8)          # cricoid: trachea below, larynx above
    z_thy = U(-45, -30)          # thyroid centre
    y_aw = Curve([-80, -12, 0, 22, 30, 80], np.array([6, 10, 12, 10, 4, 0]) + N(0, 1.5))
    ax_aw = Curve([-80, -12, 0, 22, 30, 80], np.array([8, 8.5, 9, 10, 14, 17]) * N(1, 0.06))
    ay_aw = Curve([-80, -12, 0, 22, 30, 80], np.array([7.5, 8, 8.5, 7.5, 6, 7]) * N(1, 0.06))
    y_vb = Curve([-80, -40, 0, 40, 80], np.array([-28, -22, -17, -14, -16]) + N(0, 1.0))
    vb_ax = Curve([-80, -40, 40], [12.5, 10, 9])
    vb_ay = Curve([-80, -40, 40], [10, 8.5, 8])
    ym, xe = 56 + N(0, 2), 44 + N(0, 2)  # mandible: chin and angle

    sides = []
    for side in (+1, -1):
        # carotid chain centre line (common / internal carotid) and internal jugular vein
        xc = Curve([-80, -40, 0, 40, 80], side * (np.array([27, 27, 25, 27, 30]) + N(0, 1.2, 5)))
        ycar = Curve([-80, -40, 0, 40, 80], np.array([5, 6, 6, 0, -8]) + N(0, 1.2, 5))
        r_cca = U(3.0, 4.0)
        rj = U(4.5, 7.5) * (1.12 if side > 0 else 0.92)
        rj_y = rj * U(0.6, 1.0)
        gap = U(0.5, 3.0)
        xj = Curve(xc.z, xc.v + side * (r_cca + rj + gap))
        yj = Curve(ycar.z, ycar.v + np.array([0, 1, 2, -2, -8]) + N(0, 1.5, 5))
        sides.append(dict(side=side, xc=xc, yc=ycar, r_cca=r_cca, xj=xj, yj=yj, rj=rj, rj_y=rj_y))

    # ---------------------------------------------------------------- muscles (the rest of the deep neck is fat)
    y_post = Curve(kz, yc.v - ay.v)
    top = Curve(y_vb.z, y_vb.v - 3.0)
    canvas.fill(prism(f, -BIG, BIG, Curve(kz, 0.5 * (top(kz) + y_post.v)), 0.0, Curve(kz, 0.5 * (top(kz) - y_post.v) + 2),
                      Curve(kz, ax.v * U(0.78, 0.86))), t["muscle"], MUSCLE)  # posterior neck muscles
    canvas.fill(prism(f, -BIG, BIG, Curve(kz, 0.5 * (top(kz) + y_post.v) - 4), 0.0, Curve(kz, 0.3 * (top(kz) - y_post.v)),
                      1.2), t["fat_deep"], FAT)  # nuchal fat plane
    canvas.fill(prism(f, -BIG, BIG, Curve(y_vb.z, y_vb.v + 4), 0.0, Curve(vb_ay.z, vb_ay.v + 4),
                      Curve(vb_ax.z, vb_ax.v + 10)), t["muscle"], MUSCLE)  # prevertebral
    canvas.fill(prism(f, z_cric, BIG, y_aw, 0.0, Curve(ay_aw.z, ay_aw.v + 4), Curve(ax_aw.z, ax_aw.v + 4)),
                t["muscle"], MUSCLE)  # pharyngeal constrictors
    canvas.fill(prism(f, z_mand - 8, BIG, 26.0, 0.0, Curve([z_mand - 8, z_mand + 10], [18, 30]),
                      Curve([z_mand - 8, z_mand + 10], [20, 32])), t["muscle"], MUSCLE)  # tongue, floor of mouth
    for s in sides:
        side = s["side"]
        canvas.fill(prism(f, -BIG, 35, Curve(y_vb.z, y_vb.v - 1), Curve(vb_ax.z, side * (vb_ax.v + 15)), 8.0, 8.0),
                    t["muscle"], MUSCLE)  # scalenes
        canvas.fill(prism(f, -60, 45, Curve(y_vb.z, y_vb.v - 14), Curve(vb_ax.z, side * (vb_ax.v + 27)), 8.0, 7.0),
                    t["muscle"], MUSCLE)  # levator scapulae
        zk = [-80, -55, -30, 0, 30, 60, 80]
        scm = prism(f, -BIG, BIG,
                    Curve(zk, np.array([40, 38, 30, 22, 8, -8, -12]) + N(0, 1.5)),
                    Curve(zk, side * (np.array([14, 18, 30, 41, 47, 50, 50]) + N(0, 1.5))),
                    Curve(zk, [12, 14, 16, 16, 15, 13, 12]), Curve(zk, np.array([5, 6, 7, 7, 7, 7, 6]) * U(0.8, 1.25)),
                    theta=Curve(zk, side * np.deg2rad([-60, -55, -45, -35, -20, -10, -10])))
        canvas.fill(scm, t["muscle"], MUSCLE)  # sternocleidomastoid
        canvas.fill(prism(f, -BIG, 22, Curve(y_aw.z, y_aw.v + ay_aw.v + 12), side * 9.0, 2.5, 7.0),
                    t["muscle"], MUSCLE)  # strap muscles
        canvas.fill(prism(f, z_mand + 6, BIG, 6.0, side * (xe - 9), 13.0, 5.0, theta=side * 0.2),
                    t["muscle"], MUSCLE)  # medial pterygoid
        canvas.fill(prism(f, z_mand + 4, BIG, 6.0, side * (xe + 8), 15.0, 5.0, theta=side * 0.15),
                    t["muscle"], MUSCLE)  # masseter

    # subcutaneous fat and platysma over everything drawn so far
    ring = np.clip(body.frac(2.0) - body.frac(2.0 + fat_t), 0.0, 1.0)
    canvas.fill(body, t["fat"], FAT, frac=ring)
    ring = np.clip(body.frac(2.0 + fat_t) - body.frac(3.5 + fat_t), 0.0, 1.0)
    canvas.fill(body, t["muscle"], MUSCLE, frac=ring)
    del body, ring

    # ---------------------------------------------------------------- lung apices, clavicles, manubrium
    for side in (+1, -1):
        canvas.fill(ellipsoid(f, [-100 + N(0, 4), -18, side * 42], [55, 28, 26]), t["lung"], LUNG,
                    within=[MUSCLE, FAT], part=S.lung)
    for side in (+1, -1):
        pts = [[-62, 38, side * 12], [-60, 30, side * 45], [-57, 10, side * 85], [-55, -5, side * 110]]
        pts = np.array(pts, float) + [N(0, 2), 0, 0]
        rc = U(6, 7.5)
        canvas.fill_all(tube(f, pts, rc), t["cortex"], CORTEX, part=S.clavicle)
        canvas.fill_all(tube(f, pts, rc - 2.0), t["marrow"], MARROW, part=S.clavicle)
    man = prism(f, -BIG, -64 + N(0, 2), 40.0, 0.0, 8.0, 22.0)
    canvas.fill(man, t["cortex"], CORTEX)
    canvas.fill(man, t["marrow"], MARROW, inset=2.0)

    # ---------------------------------------------------------------- cervical spine
    period, disc_h, phase = U(15, 18), U(4, 5.5), U(0, 18)
    vb = prism(f, -BIG, BIG, y_vb, 0.0, vb_ay, vb_ax)
    if vb is not None:
        Zs = f.PZ[vb.sl[0]][:, None, None]
        disc = np.mod(Zs - phase, period) < disc_h
        bone = np.where(disc, S.intervertebral_disc, S.vertebrae).astype(np.uint8)
        canvas.fill(vb, np.where(disc, t["disc"], t["cortex"]), CORTEX, part=bone)
        canvas.fill(vb, np.where(disc, t["disc"], t["marrow"]), MARROW, inset=1.8, part=bone)
    y_can = Curve(y_vb.z, y_vb.v - 8.5 - 7.0)
    arch = prism(f, -BIG, BIG, y_can, 0.0, 10.0, 11.0)
    canvas.fill(arch, t["small_bone"], CORTEX, part=S.vertebrae)
    canvas.fill(prism(f, -BIG, BIG, Curve(y_can.z, y_can.v - 14.0), 0.0, 7.0, 3.0), t["small_bone"], CORTEX,
                part=S.vertebrae)  # spinous processes
    canvas.fill(arch, t["csf"], CSF, inset=3.0)
    canvas.fill(prism(f, -BIG, BIG, y_can, 0.0, 3.8, 5.0), t["soft"], CSF, part=S.spinal_cord)
    for side in (+1, -1):
        tp = prism(f, -BIG, 45, Curve(y_vb.z, y_vb.v - 2), Curve(vb_ax.z, side * (vb_ax.v + 8)), 4.5, 7.0)
        canvas.fill(tp, t["small_bone"], CORTEX, part=S.vertebrae)
        canvas.fill(prism(f, -BIG, 45, Curve(y_vb.z, y_vb.v - 2), Curve(vb_ax.z, side * (vb_ax.v + 8)), 2.0, 2.0),
                    t["artery"], ARTERY, part=S.vertebral_artery)  # vertebral artery in the transverse foramen

    # ---------------------------------------------------------------- mandible, hyoid
    xs = np.linspace(-xe, xe, 13)
    arc = np.stack([ym - (ym - 2) * (xs / xe) ** 2, xs], axis=1)
    mand = plate(f, z_mand, z_mand + 26, arc, 4.5)
    canvas.fill(mand, t["cortex"], CORTEX, part=S.mandible)
    canvas.fill(mand, t["marrow"], MARROW, inset=2.0, part=S.mandible)
    for side in (+1, -1):
        ramus = prism(f, z_mand + 8, BIG, 2.0, side * (xe + 1), 13.0, 4.5, theta=side * 0.15)
        canvas.fill(ramus, t["cortex"], CORTEX, part=S.mandible)
        canvas.fill(ramus, t["marrow"], MARROW, inset=1.8, part=S.mandible)
    xs = np.linspace(-18, 18, 7)
    canvas.fill(plate(f, z_mand - 12, z_mand - 7, np.stack([30 - 16 * (xs / 18) ** 2, xs], 1), 2.5),
                t["small_bone"], CORTEX, part=S.hyoid)

    # ---------------------------------------------------------------- airway: larynx / trachea, oesophagus
    calc = U(0, 250)
    cart = prism(f, -BIG, 22, y_aw, 0.0, Curve(ay_aw.z, ay_aw.v + 2.5), Curve(ax_aw.z, ax_aw.v + 2.5))
    if cart is not None:
        Zs = f.PZ[cart.sl[0]][:, None, None]
        canvas.fill(cart, np.where(Zs > z_cric, t["cartilage"] + calc, t["cartilage"]), CARTILAGE,
                    part=np.where(Zs > z_cric, S.laryngeal_cartilage, 0).astype(np.uint8))
    lumen = prism(f, -BIG, BIG, y_aw, 0.0, ay_aw, ax_aw)
    if lumen is not None:
        Zs = f.PZ[lumen.sl[0]][:, None, None]
        canvas.fill(lumen, t["air"], AIRWAY, part=np.where(Zs > z_cric, S.upper_airway, S.trachea).astype(np.uint8))
    y_es = Curve(y_aw.z, y_aw.v - ay_aw.v - 2.5 - 4.5)
    canvas.fill(prism(f, -BIG, z_cric, y_es, -3.0, 4.5, 7.5), t["soft"], SOFT, part=S.esophagus)
    if rng.random() < 0.4:
        canvas.fill(prism(f, -BIG, z_cric, y_es, -3.0, 1.5, 2.5), t["air"], AIRWAY, part=S.esophagus)

    # ---------------------------------------------------------------- thyroid
    for side in (+1, -1):
        x_l = side * (float(ax_aw(z_thy)) + 8.5)
        canvas.fill(ellipsoid(f, [z_thy + N(0, 2), float(y_aw(z_thy)) + 2, x_l],
                              [U(16, 23), U(8, 11), U(6, 8)], rot=_rot_z(side * U(-15, 15))),
                    t["thyroid"], GLAND, part=S.thyroid)
    canvas.fill(ellipsoid(f, [z_thy - 6, float(y_aw(z_thy) + ay_aw(z_thy)) + 5, 0.0], [6, 3, 12]), t["thyroid"], GLAND,
                part=S.thyroid)  # isthmus

    # ---------------------------------------------------------------- vessels
    for s in sides:
        side, xc, ycar = s["side"], s["xc"], s["yc"]
        canvas.fill(prism(f, -BIG, z_bif + 2, ycar, xc, s["r_cca"], s["r_cca"]), t["artery"], ARTERY, part=S.carotid_artery)
        x_b, y_b = float(xc(z_bif)), float(ycar(z_bif))
        ica = [[z_bif, y_b, x_b], [z_bif + 20, y_b - 4, x_b + side * 1.5], [90, -10, float(xc(80))]]
        eca = [[z_bif, y_b, x_b], [z_bif + 15, y_b + 5, x_b - side * 3], [75, 10, x_b - side * 2]]
        canvas.fill_all(tube(f, ica, [s["r_cca"], 0.8 * s["r_cca"], 0.75 * s["r_cca"]]), t["artery"], ARTERY,
                        part=S.carotid_artery)
        canvas.fill_all(tube(f, eca, [0.8 * s["r_cca"], 0.6 * s["r_cca"], 0.5 * s["r_cca"]]), t["artery"], ARTERY,
                        part=S.carotid_artery)
        canvas.fill(prism(f, -BIG, BIG, s["yj"], s["xj"], s["rj_y"], s["rj"]), t["vein"], VEIN,
                    part=S.internal_jugular_vein)
        # external jugular vein on the sternocleidomastoid
        zk = [-80, -55, -30, 0, 30, 60, 80]
        ej = prism(f, -50, 40, Curve(zk, np.array([28, 26, 18, 8, -4, -16, -18]) + N(0, 2)),
                   Curve(zk, side * (np.array([22, 28, 42, 52, 56, 58, 58]) + N(0, 2))), 1.8, 1.8)
        canvas.fill(ej, t["vein"], VEIN, within=[FAT, MUSCLE])

    # ---------------------------------------------------------------- salivary glands
    for side in (+1, -1):
        canvas.fill(ellipsoid(f, [z_mand - 2 + N(0, 2), 26 + N(0, 2), side * (27 + N(0, 1.5))],
                              [U(9, 12), U(10, 13), U(8, 11)]), t["submandibular"], GLAND, part=S.submandibular_gland)
        canvas.fill(ellipsoid(f, [z_mand + 28 + N(0, 3), -6 + N(0, 2), side * (53 + N(0, 1.5))],
                              [U(17, 22), U(12, 16), U(8, 10)]), t["parotid"], GLAND, within=[MUSCLE, FAT, GLAND],
                    part=S.parotid_gland)

    return _stations(sides, y_aw, ax_aw, ay_aw, z_mand)


def _stations(sides, y_aw, ax_aw, ay_aw, z_mand) -> list[Station]:
    by_side = {s["side"]: s for s in sides}

    def jugular(z_lo: float, z_hi: float):
        def sample(rng, rn, side):
            s = by_side[side]
            z = rng.uniform(z_lo, z_hi)
            th = np.deg2rad(rng.uniform(-110, 110))
            dist = max(s["rj"], s["rj_y"]) + rn + rng.uniform(1.0, 6.0)
            return np.array([z, float(s["yj"](z)) + dist * np.sin(th), float(s["xj"](z)) + side * dist * np.cos(th)])
        return sample

    def level_v(rng, rn, side):
        s = by_side[side]
        z = rng.uniform(-50, 35)
        return np.array([z, float(s["yj"](z)) - rng.uniform(14, 30), float(s["xj"](z)) + side * rng.uniform(5, 18)])

    def level_ib(rng, rn, side):
        return np.array([rng.uniform(z_mand - 18, z_mand + 4), rng.uniform(18, 40), side * rng.uniform(12, 34)])

    def level_vi(rng, rn, side):
        z = rng.uniform(-60, -10)
        return np.array([z, float(y_aw(z)) + rng.uniform(-9, 4), side * (float(ax_aw(z)) + 2.5 + rn + rng.uniform(0.5, 6))])

    return [
        Station("II", 0.28, jugular(z_mand - 12, z_mand + 30)),
        Station("III", 0.22, jugular(-12, z_mand - 12)),
        Station("IV", 0.14, jugular(-60, -12)),
        Station("V", 0.14, level_v),
        Station("IB", 0.10, level_ib, gland_tol=0.3),
        Station("VI", 0.12, level_vi, gland_tol=0.3),
    ]
