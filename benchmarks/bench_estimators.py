"""Network estimator vs. the classical registration on the same held-out simulated pairs.

Prints MAE per parameter (dx, dy px; phi deg), medians, gross-failure rate (> 3 px/deg) and ms per pair for
the shipped estimator (network + data-consistency refinement; or ``--model PATH``), the network alone, the
classical registration (Fourier-Mellin + phase correlation + the same data-consistency refinement, seeded
by Fourier-Mellin instead of the network) and the plain classical baseline (Fourier-Mellin + phase
correlation), at the abstract's setting and at SNR 20, with 8 coils and at 256x216 (readout 256, 216
phase-encoding rows, square pixels).

Run:  .venv/bin/python benchmarks/bench_estimators.py --pairs 2000 [--settings default snr20 coils8 256x216]
"""

from __future__ import annotations

import argparse
import platform
from collections.abc import Callable
from pathlib import Path

import torch

from kmotion.estimation.classical import register_classical
from kmotion.estimation.metrics import evaluate
from kmotion.estimation.network import NetworkEstimator
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
    net_only = NetworkEstimator.load(args.model, device="cpu", refine=False)
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

        def estimator(
            e: NetworkEstimator, cfg: StudyConfig = cfg
        ) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
            def run(ref: torch.Tensor, mov: torch.Tensor) -> torch.Tensor:
                if cfg.matrix == net_study.matrix and cfg.fov_mm == net_study.fov_mm:
                    return e.estimate(ref, mov).motion
                return e.estimate_data(ref, mov, cfg.matrix, cfg.fov_mm, cfg.acceleration).motion

            return run

        rows = [("network + refinement (shipped)", estimator(est)), ("network alone", estimator(net_only))]
        if not args.skip_classical:
            rows += [
                ("classical (FM + PC + refinement)", lambda r, m, c=ccfg: register_classical(r, m, c)),
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
