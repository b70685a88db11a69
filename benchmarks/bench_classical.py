"""Accuracy and speed of the classical registration baseline on held-out simulated pairs.

Pairs: ``sample_pairs(StudySimulator(cfg), PhantomSource(cfg), N, torch.Generator().manual_seed(seed))`` for
the default :class:`~kmotion.simulation.study.StudyConfig` (matrix 448, FOV 220 mm, R=2, +-12 px/deg) with
the chosen crop, coils and SNR.  Two variants of :func:`kmotion.estimation.classical.register_classical`:

* ``classical``: the full method (magnitude Fourier–Mellin, complex-coherence rotation search, phase
  correlation at rotated points);
* ``fourier-mellin``: the plain baseline (``refine=False``): magnitude rotation, then phase correlation.

Metrics (:func:`kmotion.estimation.metrics.evaluate`): MAE and median per parameter, the gross-failure rate
(any error > 3 px/deg) and the wall time per pair (after a warm-up call).

Run:  .venv/bin/python benchmarks/bench_classical.py [--pairs 512] [--snr 20] [--coils 8] [--crop 128 128]
"""

from __future__ import annotations

import argparse
import platform
from functools import partial

import torch

from kmotion.estimation.classical import register_classical
from kmotion.estimation.metrics import EstimateFn, evaluate
from kmotion.simulation.sources import PhantomSource, sample_pairs
from kmotion.simulation.study import PairBatch, StudyConfig, StudySimulator


def held_out_pairs(cfg: StudyConfig, n_pairs: int, seed: int, device: str = "cpu") -> PairBatch:
    """The benchmark's held-out pairs (fixed seed, default phantoms)."""
    sim = StudySimulator(cfg, device=device)
    return sample_pairs(sim, PhantomSource(cfg, device=device), n_pairs, torch.Generator().manual_seed(seed))


def format_row(name: str, m: dict[str, float]) -> str:
    return (
        f"{name:<16} {m['mae_dx_px']:7.3f} {m['mae_dy_px']:7.3f} {m['mae_phi_deg']:7.3f} "
        f"{m['mean_inplane_mae']:7.3f} | {m['median_dx_px']:6.3f} {m['median_dy_px']:6.3f} "
        f"{m['median_phi_deg']:6.3f} | {100 * m['gross_failure_rate']:6.2f} % | {m['ms_per_pair']:8.2f}"
    )


def main(argv: list[str] | None = None) -> dict[str, dict[str, float]]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--pairs", type=int, default=512, help="held-out pairs (default 512)")
    parser.add_argument("--snr", type=float, default=None, help="SNR of the complex noise (default: none)")
    parser.add_argument("--coils", type=int, default=1, help="synthetic receive coils (default 1)")
    parser.add_argument("--crop", type=int, nargs=2, default=(64, 64), metavar=("S_Y", "S_X"))
    parser.add_argument("--seed", type=int, default=123, help="generator seed of the pairs (default 123)")
    parser.add_argument("--chunk", type=int, default=128, help="pairs per estimator call (default 128)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    cfg = StudyConfig(snr=args.snr, n_coils=args.coils, crop=tuple(args.crop))
    batch = held_out_pairs(cfg, args.pairs, args.seed)
    print(
        f"held-out pairs: {args.pairs} (seed {args.seed}), matrix {cfg.matrix}, FOV {cfg.fov_mm} mm, "
        f"R={cfg.acceleration}, crop {cfg.crop}, coils {cfg.n_coils}, SNR {cfg.snr}, range {cfg.motion_range}"
    )
    cpu = platform.processor() or platform.machine()
    print(f"{cpu}, torch {torch.__version__}, {torch.get_num_threads()} threads")
    variants: dict[str, EstimateFn] = {
        "classical": partial(register_classical, config=cfg),
        "fourier-mellin": partial(register_classical, config=cfg, refine=False),
    }
    print(
        f"{'':<16} {'MAE dx':>7} {'dy':>7} {'phi':>7} {'mean':>7} | {'med dx':>6} {'dy':>6} {'phi':>6} | "
        f"{'>3 px/deg':>8} | {'ms/pair':>8}"
    )
    results = {}
    for name, fn in variants.items():
        fn(batch.reference[:4], batch.moved[:4])  # warm-up
        results[name] = evaluate(fn, batch, chunk=args.chunk)
        print(format_row(name, results[name]), flush=True)
    return results


if __name__ == "__main__":
    main()
