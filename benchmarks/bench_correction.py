"""Correction error of the cartesian motion correction (SENSE with the motion in the forward model).

Data: ``kmotion.simulation.raw.simulate_raw`` — 256 x 256, FOV 220 mm, 2x readout oversampling, 8 coils,
R = 2 plus a 24-line calibration block, SNR 30 (and noise-free), repetition 0 motion-free, 10 moved
repetitions with motion within 80 % of the network's range, |phi| >= 5 deg in at least half of them.

For every moved slice: NRMSE of the magnitude image reconstructed from the corrected lines against the
image of the motion-free reference (repetition 0), both with :func:`kmotion.gadget.recon.reconstruct_images`
(SENSE, the same coil maps), and the same for the uncorrected lines.  Once with the **true** motion given to
the correction (an oracle estimate: the correction alone) and once with the **estimated** motion (the
gadget's estimator, ``MotionCorrector.estimate_slices``; with ``--network-only`` also the shipped network's
estimate alone, the fit's seed).  The oracle replaces ``estimate_slices`` by the truth through
:func:`kmotion.gadget.estimate.report_for` (significant, applied).  Also the estimate's absolute error, the
slices corrected and the time per slice spent in the pipeline.

    .venv/bin/python benchmarks/bench_correction.py [--matrix 256] [--slices 2] [--repetitions 11]
    .venv/bin/python benchmarks/bench_correction.py --snr 30 --estimated-only --network-only
"""

from __future__ import annotations

import argparse
import copy
import math
import platform
import time

import ismrmrd
import numpy as np
import torch
from common import use_true_motion

from kmotion.gadget import GadgetParams, MotionCorrector, MotionReport, reconstruct_images
from kmotion.gadget.estimate import report_for
from kmotion.gadget.reference import SliceWork
from kmotion.simulation.raw import RawConfig, simulate_raw


def _images(items: list[object], header: object) -> dict[tuple[int, int], np.ndarray]:
    return {
        (o.slice, o.repetition): o.data[0, 0]
        for o in reconstruct_images(items, header)  # type: ignore[arg-type]
        if isinstance(o, ismrmrd.Image)
    }


def _copy(items: list[object]) -> list[object]:
    return [copy.deepcopy(i) if isinstance(i, ismrmrd.Acquisition) else i for i in items]


def _network_only(mc: MotionCorrector) -> None:
    """Stage 4 replaced by the shipped network's estimate alone (the fit's seed), always applied."""
    nan3 = (math.nan, math.nan, math.nan)

    def estimate_slices(work: list[SliceWork]) -> None:
        for w in work:
            if w.report is not None or w.reference is None or w.assembled is None:
                continue
            if w.crops is None:
                raise SystemExit(f"network alone: {w.network_note}")
            n_ky, n_kx = w.assembled.kspace.shape[1:]
            est = mc.estimator.estimate_data(
                w.crops[0][None],
                w.crops[1][None],
                (int(n_ky), int(n_kx)),
                w.assembled.fov_mm,
                mc.net_acceleration,
            )
            motion = tuple(float(v) for v in est.motion[0])
            w.report = report_for(w, motion, nan3, math.inf, 3, mc.params, "network alone")  # type: ignore[arg-type]

    mc.estimate_slices = estimate_slices  # type: ignore[method-assign]


def run(cfg: RawConfig, mode: str, device: str) -> dict[str, float]:
    """``mode``: ``true`` (oracle), ``estimated`` (the gadget's estimator), ``network`` (network alone)."""
    raw = simulate_raw(cfg)
    truth = {(t.slice, t.repetition): t for t in raw.truth}
    mc = MotionCorrector(raw.header, GadgetParams(device=device))
    if mode == "true":
        use_true_motion(mc, truth)
    elif mode == "network":
        _network_only(mc)
    before = _copy(raw.items)
    t0 = time.perf_counter()
    out = list(mc(raw.items))
    wall = time.perf_counter() - t0
    img_b, img_a = _images(before, raw.header), _images(out, raw.header)
    unc, cor, err, n_cor = [], [], [], 0
    for o in out:
        if not isinstance(o, MotionReport) or o.key.repetition == 0:
            continue
        s, r = o.key.slice, o.key.repetition
        t = truth[(s, r)]
        ref = img_b[(s, 0)]
        unc.append(np.linalg.norm(img_b[(s, r)] - ref) / np.linalg.norm(ref))
        cor.append(np.linalg.norm(img_a[(s, r)] - img_a[(s, 0)]) / np.linalg.norm(img_a[(s, 0)]))
        err.append([abs(o.dx_px - t.dx_px), abs(o.dy_px - t.dy_px), abs(o.rot_deg - t.phi_deg)])
        n_cor += int(o.corrected)
    u, c, e = np.array(unc), np.array(cor), np.array(err)
    n_slices = cfg.n_slices * cfg.n_repetitions
    return {
        "unc": float(u.mean()),
        "cor": float(c.mean()),
        "ratio": float((c / u).mean()),
        "ratio_max": float((c / u).max()),
        "mae_dx": float(e[:, 0].mean()),
        "mae_dy": float(e[:, 1].mean()),
        "mae_phi": float(e[:, 2].mean()),
        "s_per_slice": wall / n_slices,
        "corrected": n_cor,
        "moved": len(cor),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--matrix", type=int, default=256)
    p.add_argument("--slices", type=int, default=2)
    p.add_argument("--repetitions", type=int, default=11)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=3)
    p.add_argument("--snr", type=float, nargs="*", default=[30.0, 0.0], help="0: noise-free")
    p.add_argument("--network-only", action="store_true", help="also the network alone (the fit's seed)")
    p.add_argument("--estimated-only", action="store_true")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    print(f"torch {torch.__version__}, {platform.machine()}, device {a.device}, {a.threads} thread(s)")
    print(
        "| SNR | motion given to the correction | NRMSE uncorrected | NRMSE corrected "
        "| corrected / uncorrected mean (max) | MAE dx / dy [px] / phi [deg] | corrected | s per slice |"
    )
    print("|---|---|---|---|---|---|---|---|")
    modes = ["estimated"] if a.estimated_only else ["true", "estimated"]
    if a.network_only:
        modes.append("network")
    for snr_arg in a.snr:
        snr = snr_arg or None
        cfg = RawConfig(
            matrix=(a.matrix, a.matrix), n_slices=a.slices, n_repetitions=a.repetitions, snr=snr, seed=a.seed
        )
        for mode in modes:
            r = run(cfg, mode, a.device)
            mae = "–" if mode == "true" else f"{r['mae_dx']:.3f} / {r['mae_dy']:.3f} / {r['mae_phi']:.3f}"
            print(
                f"| {snr if snr else '∞'} | {mode} | {r['unc']:.3f} | {r['cor']:.3f} "
                f"| {r['ratio']:.3f} ({r['ratio_max']:.3f}) | {mae} | {r['corrected']}/{r['moved']} "
                f"| {r['s_per_slice']:.2f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
