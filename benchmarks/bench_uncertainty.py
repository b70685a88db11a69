"""Are the reported standard errors and the significance test honest?  Spread of estimates over noise.

One object and one set of coil maps (a textured head phantom, ``make_phantoms`` of the phantoms module;
128 x 128, FOV 220 mm, 8 coils, R = 2 + 24 calibration lines, 2x readout oversampling) are acquired in
``--realisations`` independent noise realisations (:func:`kmotion.simulation.raw.simulate_raw_from_objects`,
only ``RawConfig.seed`` changes: new noise on every sample of every repetition) at each SNR.  Each stream has
three repetitions: 0 the reference, 1 moved by ``MOTION``, 2 motion-free (a motion-free pair with 0).  Each
runs through the whole gadget (``MotionCorrector``, ``GadgetParams(false_alarm_rate=--alpha)``), with the
simulator's noise line and, as a second source, without it (the noise level then comes from the data).

Reported per SNR and noise source:

* for the moved repetition, per parameter (dx, dy [px], phi [deg]): the bias (mean error), the empirical
  standard deviation of the estimates, the mean reported standard error and their ratio (1 = honest; > 1: the
  reported error is too small), and the RMS of the z-scores ``(estimate - truth) / reported std`` (includes
  the bias);
* for the motion-free pairs: the empirical std of the estimates against the mean reported std, the mean of
  the likelihood-ratio statistic (3 under "no motion" for a calibrated test), and the empirical false-alarm
  rate (``p < alpha``: the fraction of motion-free slices the test calls moved; corrected only when also above
  ``min_correction``) against the nominal ``alpha``.

    .venv/bin/python benchmarks/bench_uncertainty.py [--realisations 30] [--snr 10 30 50] [--alpha 0.05]
        [--threads 1] [--out docs/results/bench_uncertainty.md]
"""

from __future__ import annotations

import argparse
import os
import time
from dataclasses import dataclass
from pathlib import Path

import ismrmrd
import numpy as np
import torch
from common import cpu_name

from kmotion.gadget import GadgetParams, MotionCorrector, MotionReport
from kmotion.simulation.phantoms import coil_maps_from_coefficients, make_coil_coefficients, make_phantoms
from kmotion.simulation.raw import RawConfig, simulate_raw_from_objects

N, FOV, COILS, ACCEL = 128, 220.0, 8, 2
MOTION = (2.5, -1.5, 6.0)
"""The motion of repetition 1 (dx_px, dy_px, phi_deg)."""
NAMES = ("dx [px]", "dy [px]", "phi [deg]")


@dataclass
class Estimates:
    """Estimates ``(n, 3)``, reported std ``(n, 3)``, statistics ``(n,)``, p-values ``(n,)``, corrected
    ``(n,)`` of one repetition over the realisations."""

    est: np.ndarray
    std: np.ndarray
    chi2: np.ndarray
    p: np.ndarray
    corrected: np.ndarray


def realisations(snr: float, n: int, noise_line: bool, alpha: float) -> tuple[Estimates, Estimates]:
    """The moved (repetition 1) and motion-free (repetition 2) estimates of ``n`` noise realisations."""
    obj = make_phantoms(1, (N, N), (FOV, FOV), generator=11).numpy()
    maps = coil_maps_from_coefficients(
        make_coil_coefficients(1, COILS, (N, N), (FOV, FOV), generator=12), (N, N)
    ).numpy()
    params = GadgetParams(device="cpu", false_alarm_rate=alpha)
    rows: dict[int, list[MotionReport]] = {1: [], 2: []}
    for i in range(n):
        cfg = RawConfig(
            matrix=(N, N),
            fov_mm=(FOV, FOV),
            n_coils=COILS,
            n_slices=1,
            n_repetitions=3,
            acceleration=ACCEL,
            calibration_lines=24,
            snr=snr,
            seed=1000 + i,
            motion=((0.0, 0.0, 0.0), MOTION, (0.0, 0.0, 0.0)),
        )
        raw = simulate_raw_from_objects(obj, maps, cfg)
        items = raw.items
        if not noise_line:
            items = [
                o
                for o in items
                if not (
                    isinstance(o, ismrmrd.Acquisition) and o.is_flag_set(ismrmrd.ACQ_IS_NOISE_MEASUREMENT)
                )
            ]
        for o in MotionCorrector(raw.header, params)(items):
            if isinstance(o, MotionReport) and o.key.repetition in rows:
                rows[o.key.repetition].append(o)

    def pack(reps: list[MotionReport]) -> Estimates:
        return Estimates(
            np.array([[r.dx_px, r.dy_px, r.rot_deg] for r in reps]),
            np.array([[r.dx_std_px, r.dy_std_px, r.rot_std_deg] for r in reps]),
            np.array([r.chi2 for r in reps]),
            np.array([r.p_value for r in reps]),
            np.array([r.corrected for r in reps]),
        )

    return pack(rows[1]), pack(rows[2])


def moved_rows(snr: float, source: str, m: Estimates) -> list[str]:
    """Markdown rows of the moved repetition: one per parameter."""
    out = []
    truth = np.array(MOTION)
    for j, name in enumerate(NAMES):
        err = m.est[:, j] - truth[j]
        emp = float(np.std(m.est[:, j], ddof=1))
        rep = float(np.mean(m.std[:, j]))
        z = float(np.sqrt(np.mean((err / m.std[:, j]) ** 2)))
        out.append(
            f"| {snr:g} | {source} | {name} | {np.mean(err):+.4f} | {emp:.4f} | {rep:.4f} | {emp / rep:.2f} "
            f"| {z:.2f} | {int(m.corrected.sum())}/{len(err)} |"
        )
    return out


def free_row(snr: float, source: str, f: Estimates, alpha: float) -> str:
    """Markdown row of the motion-free pairs."""
    emp = np.std(f.est, axis=0, ddof=1)
    rep = np.mean(f.std, axis=0)
    ratio = emp / rep
    n = len(f.p)
    fa = int((f.p < alpha).sum())
    return (
        f"| {snr:g} | {source} | {emp[0]:.4f}, {emp[1]:.4f}, {emp[2]:.4f} | {rep[0]:.4f}, {rep[1]:.4f}, "
        f"{rep[2]:.4f} | {ratio[0]:.2f}, {ratio[1]:.2f}, {ratio[2]:.2f} | {np.mean(f.chi2):.2f} "
        f"| {fa}/{n} = {fa / n:.3f} (nominal {alpha:g}) | {int(f.corrected.sum())}/{n} |"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--realisations", type=int, default=30)
    ap.add_argument("--snr", type=float, nargs="+", default=[10.0, 30.0, 50.0])
    ap.add_argument("--alpha", type=float, default=0.05, help="nominal false-alarm rate of the test")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=None, help="also write the tables (markdown) here")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    head = (
        f"# bench_uncertainty: {N} x {N}, FOV {FOV:g} mm, {COILS} coils, R = {ACCEL} + 24 calibration lines, "
        f"motion {MOTION} (px, px, deg), {args.realisations} noise realisations per SNR; "
        f"{cpu_name()}, {os.cpu_count()} logical CPUs, torch {torch.__version__}, {args.threads} thread(s)"
    )
    moved = [
        "## Moved repetition: bias, spread and reported standard error",
        "",
        "| SNR | noise level from | parameter | bias | empirical std | mean reported std "
        "| empirical / reported | RMS z-score | corrected |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    free = [
        "## Motion-free pairs: spread, statistic and false alarms",
        "",
        "| SNR | noise level from | empirical std dx, dy [px], phi [deg] | mean reported std "
        "| empirical / reported | mean chi2 (3 under no motion) | p < alpha | corrected |",
        "|---|---|---|---|---|---|---|---|",
    ]
    print(head, flush=True)
    for snr in args.snr:
        for noise_line in (True, False):
            source = "noise line" if noise_line else "the data"
            m, f = realisations(snr, args.realisations, noise_line, args.alpha)
            rows = moved_rows(snr, source, m)
            moved += rows
            free.append(free_row(snr, source, f, args.alpha))
            print("\n".join(rows), flush=True)
            print(free[-1], flush=True)
    lines = [head, "", *moved, "", *free, "", f"{time.perf_counter() - t0:.0f} s."]
    print("\n".join(lines))
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
