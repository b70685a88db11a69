"""Network estimator vs. the classical registration on the same held-out simulated pairs.

Prints MAE per parameter (dx, dy px; phi deg), medians, gross-failure rate (> 3 px/deg) and ms per pair for
the shipped estimator (or ``--model PATH``), the classical registration (Fourier-Mellin + phase
correlation + data-consistency refinement) and its plain variant, at the abstract's setting and optionally
at SNR 20, with 8 coils and at 256x216 (readout 256, 216 phase-encoding rows, square pixels).

Run:  .venv/bin/python benchmarks/bench_estimators.py --pairs 2000 [--settings default snr20 coils8 256x216]
"""

from __future__ import annotations

import argparse
import platform
from pathlib import Path

import torch

from kmotion.estimation.classical import register_classical
from kmotion.estimation.metrics import evaluate
from kmotion.estimation.network import NetworkEstimator
from kmotion.estimation.prepare import to_network_grid
from kmotion.simulation.sources import PhantomSource, sample_pairs
from kmotion.simulation.study import StudyConfig, StudySimulator

DEFAULT_MODEL = Path(__file__).resolve().parents[1] / "gadgets" / "kmotion" / "models" / "default.safetensors"


def settings(name: str) -> tuple[StudyConfig, StudyConfig]:
    """(data config of the pairs, classical config); the network maps crops onto its own grid."""
    if name == "default":
        cfg = StudyConfig(standardise=False)
    elif name == "snr20":
        cfg = StudyConfig(snr=20.0, standardise=False)
    elif name == "coils8":
        cfg = StudyConfig(n_coils=8, standardise=False)
    elif name == "256x216":
        # square pixels 220/256 mm; motion range = the network's trained range in mm (±12 px at 448/220 mm)
        cfg = StudyConfig(
            matrix=(216, 256),
            fov_mm=(216 * 220 / 256, 220.0),
            crop=(64, 256),
            motion_range=(6.8, 6.8, 12.0),
            standardise=False,
        )
    else:
        raise SystemExit(f"unknown setting {name!r}")
    return cfg, cfg


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=str(DEFAULT_MODEL))
    p.add_argument("--pairs", type=int, default=2000)
    p.add_argument("--settings", nargs="*", default=["default", "snr20", "coils8", "256x216"])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=20261126)
    p.add_argument("--skip-classical", action="store_true")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    est = NetworkEstimator.load(args.model, device="cpu")
    net_study = est.study
    print(
        f"estimators on held-out phantoms (seed {args.seed}), torch {torch.__version__}, "
        f"{platform.machine()}, {args.threads} thread(s); model {args.model}"
    )
    print(
        "| setting | estimator | MAE dx [px] | MAE dy [px] | MAE phi [deg] | median dx/dy/phi | gross "
        "| ms/pair |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for name in args.settings:
        cfg, ccfg = settings(name)
        batch = sample_pairs(
            StudySimulator(cfg), PhantomSource(cfg), args.pairs, torch.Generator().manual_seed(args.seed)
        )

        def net_fn(ref: torch.Tensor, mov: torch.Tensor, cfg: StudyConfig = cfg) -> torch.Tensor:
            if cfg.matrix == net_study.matrix and cfg.fov_mm == net_study.fov_mm:
                return est.estimate(ref, mov).motion
            r, m, grid = to_network_grid(ref, mov, cfg.fov_mm, net_study.matrix, net_study.crop)
            out = est.estimate(r, m).motion.clone()
            dy_mm, dx_mm = cfg.pixel_spacing_mm
            out[:, 0] *= grid.mm_per_net_px[1] / dx_mm
            out[:, 1] *= grid.mm_per_net_px[0] / dy_mm
            return out

        rows = [("network", net_fn)]
        if not args.skip_classical:
            rows += [
                ("classical", lambda r, m, c=ccfg: register_classical(r, m, c)),
                ("classical (plain FM + PC)", lambda r, m, c=ccfg: register_classical(r, m, c, refine=False)),
            ]
        for label, fn in rows:
            res = evaluate(fn, batch, chunk=256)
            print(
                f"| {name} | {label} | {res['mae_dx_px']:.3f} | {res['mae_dy_px']:.3f} | "
                f"{res['mae_phi_deg']:.3f} | {res['median_dx_px']:.3f}/{res['median_dy_px']:.3f}/"
                f"{res['median_phi_deg']:.3f} | {100 * res['gross_failure_rate']:.1f} % | "
                f"{res['ms_per_pair']:.2f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
