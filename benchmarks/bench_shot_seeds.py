"""The per-shot network as a seed of the per-shot fit: zero vs coarse grid vs network vs both (the ablation).

Data (held-out: phantom seeds from 5,000,000 on, never used in training, whose seeds stay below 1,000,000 and
whose validation seed is 1,000,003): head phantoms (:func:`kmotion.simulation.phantoms.make_phantoms`),
``--matrix`` (256) square, FOV 220 mm, 8 synthetic coils, R = 2 + 24 calibration lines, echo-train length 16,
orderings interleaved, checkered and linear (:func:`kmotion.simulation.multishot.shot_sampling`), an
independent random pose per echo train within +-10 mm / +-10 deg (``motion_pattern(..., "random")``), complex
noise at SNR 30 on every acquired sample (:func:`kmotion.simulation.multishot.shot_kspace` + noise).

Reference: the true object + complex white noise of the same SNR (an image-domain noise draw), with the true
coil maps; ``noise_reference`` is an independent noise image of the same level, as the gadget passes.

Per slice, :func:`kmotion.estimation.shots.fit_shots` with the arguments of the gadget's per-shot fit
(``kmotion.gadget.fit.fit_slices`` with shot rows: ``n_phase=N_PHASE_SHOTS`` (0), ``keep=2``,
``tolerance=2e-3``, neighbours on, ``N_VIRTUAL_SHOTS`` (4) virtual coils, the shot's samples inside the
inscribed k-space disc) from the candidates

* (a) **zero**: ``[0]``;
* (b) **coarse**: ``[0]`` + :func:`kmotion.estimation.shots.coarse_search` (the gadget's: rotation grid over
  +-18 deg in 1.5 deg steps, translations within +-25 mm, 1 angle x 4 translations per shot);
* (c) **network**: ``[0, network seed]`` (:class:`kmotion.estimation.shot_network.ShotNetworkEstimator`,
  the shipped ``shot.safetensors``; a shot outside the network's crop gets ``[0, 0]``);
* (d) **both**: ``[0, network seed]`` + coarse (what the gadget does).

Reported per ordering and variant: per-shot MAE of dx, dy [mm] and phi [deg], the gross-error rate (a shot
off by > 1 mm or > 1 deg in any parameter), the largest error, and the time per slice on ``--threads`` (1)
CPU threads (network + search + fit as each variant needs); and the network alone (no fit).

    .venv/bin/python benchmarks/bench_shot_seeds.py [--slices 8] [--matrix 256] [--threads 1]
        [--model PATH] [--out docs/results/bench_shot_seeds.md]
"""

from __future__ import annotations

import argparse
import math
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from kmotion.estimation.shot_network import ShotNetworkEstimator
from kmotion.estimation.shots import ShotProblems, coarse_search, fit_shots
from kmotion.gadget.fit import ANGLE_STEP_DEG, N_PHASE_SHOTS, N_VIRTUAL_SHOTS, inscribed_disc
from kmotion.gadget.params import GadgetParams
from kmotion.network.storage import read_meta
from kmotion.physics.fft import fft2c
from kmotion.simulation.multishot import motion_pattern, shot_kspace, shot_sampling
from kmotion.simulation.phantoms import (
    coil_maps_from_coefficients,
    make_coil_coefficients,
    make_phantoms,
    snr_sigma,
)

FOV = 220.0
N_COILS = 8
ETL = 16
R = 2
ACS = 24
SNR = 30.0
MAX_MM = 10.0
MAX_DEG = 10.0
SEED0 = 5_000_000
ORDERINGS = ("interleaved", "checkered", "linear")
VARIANTS = ("zero", "coarse", "network", "both")
MODEL = Path(__file__).resolve().parents[1] / "gadgets" / "kmotion" / "models" / "shot.safetensors"


@dataclass
class Tally:
    """Per-shot errors ``(n, 3)`` (mm, mm, deg) and times per slice [s] of one ordering and variant."""

    errors: list[np.ndarray] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)

    def row(self) -> tuple[float, float, float, float, float, float, int]:
        e = np.concatenate(self.errors) if self.errors else np.zeros((0, 3))
        if len(e) == 0:
            return (math.nan,) * 6 + (0,)  # type: ignore[return-value]
        gross = float(((e[:, :2] > 1.0).any(1) | (e[:, 2] > 1.0)).mean())
        mae = e.mean(0)
        return (
            float(mae[0]),
            float(mae[1]),
            float(mae[2]),
            gross,
            float(np.abs(e).max()),
            float(np.mean(self.seconds)) if self.seconds else math.nan,
            len(e),
        )


def simulate_slice(
    n: int, ordering: str, seed: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, np.ndarray, torch.Tensor]:
    """One slice: (k-space ``(C, n, n)``, shot masks ``(S, n)``, reference image, noise image, maps, true
    poses ``(S, 3)`` px/deg, reference k-space ``(C, n, n)``)."""
    spacing = (FOV / n, FOV / n)
    x = make_phantoms(1, (n, n), (FOV, FOV), generator=seed)
    maps = coil_maps_from_coefficients(
        make_coil_coefficients(1, N_COILS, (n, n), (FOV, FOV), generator=seed + 1), (n, n)
    )
    samp = shot_sampling(n, ETL, ordering, acceleration=R, calibration_lines=ACS)
    poses = motion_pattern(samp.n_shots, "random", MAX_MM, MAX_DEG, spacing, seed=seed)
    sigma = float(snr_sigma(x, SNR)[0])
    g = torch.Generator().manual_seed(seed + 2)
    k = shot_kspace(x[0], maps[0], samp, poses, spacing)
    acquired = samp.masks().any(0)
    noise = torch.randn(k.shape, dtype=torch.complex64, generator=g) * sigma
    k = k + noise * acquired[None, :, None]
    ref = x[0] + sigma * torch.randn(x[0].shape, dtype=torch.complex64, generator=g)
    noise_ref = sigma * torch.randn(x[0].shape, dtype=torch.complex64, generator=g)
    k_ref = fft2c(maps[0] * ref[None])
    return k, samp.masks(), ref, noise_ref, maps[0], poses, k_ref


def errors_mm_deg(est: torch.Tensor | np.ndarray, true: np.ndarray, n: int) -> np.ndarray:
    """``(S, 3)`` absolute errors in mm, mm, deg."""
    e = np.abs(np.asarray(est, dtype=np.float64) - true)
    e[:, :2] *= FOV / n
    return e


def run(args: argparse.Namespace) -> str:
    torch.set_num_threads(args.threads)
    n = args.matrix
    spacing = (FOV / n, FOV / n)
    params = GadgetParams()
    est = ShotNetworkEstimator.load(args.model, "cpu")
    info = read_meta(args.model)
    tallies = {(o, v): Tally() for o in ORDERINGS for v in (*VARIANTS, "network alone")}
    no_seed = {o: [0, 0] for o in ORDERINGS}
    lim_t = (params.max_translation_mm / spacing[1], params.max_translation_mm / spacing[0])
    angles = torch.arange(
        -params.max_rotation_deg, params.max_rotation_deg + 1e-9, ANGLE_STEP_DEG, dtype=torch.float64
    )
    disc = torch.from_numpy(inscribed_disc((n, n)))
    for oi, ordering in enumerate(ORDERINGS):
        for i in range(args.slices):
            seed = SEED0 + 1000 * oi + 10 * i
            k, masks, ref, noise_ref, maps, true, k_ref = simulate_slice(n, ordering, seed)
            p = masks.shape[0]
            # the network (its input preparation included)
            t0 = time.perf_counter()
            seeds = est.estimate(k_ref[None], k[None].expand(p, -1, -1, -1), masks, (n, n), (FOV, FOV))
            t_net = time.perf_counter() - t0
            valid = seeds.valid.numpy()
            no_seed[ordering][0] += int((~valid).sum())
            no_seed[ordering][1] += p
            alone = tallies[(ordering, "network alone")]
            alone.errors.append(errors_mm_deg(seeds.motion.numpy()[valid], true[valid], n))
            alone.seconds.append(t_net)
            net_seed = torch.where(seeds.valid[:, None], seeds.motion, torch.zeros_like(seeds.motion))
            # the fit's problems (the gadget's: the shot's samples inside the inscribed disc)
            m = (masks[:, :, None] & disc[None])[None]
            problems, vmaps = ShotProblems.from_masks(k[None], m).compressed(
                k[None], maps[None], N_VIRTUAL_SHOTS
            )
            t0 = time.perf_counter()
            coarse = coarse_search(
                ref[None],
                vmaps,
                problems,
                angles,
                spacing,
                n_candidates=1,
                n_translations=4,
                max_translation_px=lim_t,
            )
            t_coarse = time.perf_counter() - t0
            zero = torch.zeros(p, 1, 3, dtype=torch.float64)
            cands = {
                "zero": (zero, 0.0),
                "coarse": (torch.cat([zero, coarse], 1), t_coarse),
                "network": (torch.cat([zero, net_seed[:, None]], 1), t_net),
                "both": (torch.cat([zero, net_seed[:, None], coarse], 1), t_net + t_coarse),
            }
            for variant, (c, t_extra) in cands.items():
                t0 = time.perf_counter()
                fit = fit_shots(
                    ref[None],
                    vmaps,
                    problems,
                    c,
                    spacing,
                    None,
                    keep=2,
                    tolerance=2e-3,
                    use_neighbours=True,
                    n_phase=N_PHASE_SHOTS,
                    noise_reference=noise_ref[None],
                )
                t_fit = time.perf_counter() - t0
                tal = tallies[(ordering, variant)]
                order = problems.shot_index.numpy()
                tal.errors.append(errors_mm_deg(fit.motion.numpy(), true[order], n))
                tal.seconds.append(t_fit + t_extra)
            print(
                f"{ordering} slice {i + 1}/{args.slices}: "
                + ", ".join(
                    f"{v} MAE {tallies[(ordering, v)].errors[-1].mean():.3f}"
                    for v in (*VARIANTS, "network alone")
                ),
                flush=True,
            )
    return report(args, tallies, no_seed, info)


def report(
    args: argparse.Namespace,
    tallies: dict[tuple[str, str], Tally],
    no_seed: dict[str, list[int]],
    info: dict[str, object],
) -> str:
    training = info.get("training", {})
    training = training if isinstance(training, dict) else {}
    val = training.get("validation", {})
    lines = [
        "# The per-shot network as a seed: zero vs coarse grid vs network vs both",
        "",
        f"Measured {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} by `benchmarks/bench_shot_seeds.py "
        f"--slices {args.slices} --matrix {args.matrix} --threads {args.threads}` on {platform.machine()} "
        f"({platform.processor() or 'cpu'}), torch {torch.__version__}, {args.threads} thread(s); the "
        "machine was shared with other jobs, so times are upper bounds.",
        "",
        f"Data: {args.slices} held-out head phantoms per ordering (seeds {SEED0}+), {args.matrix} x "
        f"{args.matrix}, FOV {FOV:g} mm, {N_COILS} coils, R = {R} + {ACS} calibration lines, ETL {ETL}, "
        f"SNR {SNR:g}, an independent random pose per shot within +-{MAX_MM:g} mm / +-{MAX_DEG:g} deg. "
        "Reference: the true object + noise at the same SNR, true coil maps. The fit: `fit_shots` with the "
        f"gadget's per-shot arguments (n_phase {N_PHASE_SHOTS}, keep 2, {N_VIRTUAL_SHOTS} virtual coils, "
        "neighbours, inscribed disc). Gross error: a shot off by "
        "> 1 mm or > 1 deg in any parameter. Time: per slice (all its shots), network + search + fit as "
        "the variant needs.",
        "",
        f"Network: `{Path(args.model).name}`, best epoch {training.get('epoch', '?')}; "
        f"its validation MAE (all orderings, network grid px): dx {val.get('mae_dx_px', math.nan):.2f}, "
        f"dy {val.get('mae_dy_px', math.nan):.2f} px, phi {val.get('mae_phi_deg', math.nan):.2f} deg.",
        "",
        "| ordering | seed | MAE dx [mm] | MAE dy [mm] | MAE phi [deg] | gross errors | largest error | "
        "time / slice [s] | shots |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for o in ORDERINGS:
        for v in (*VARIANTS, "network alone"):
            dx, dy, phi, gross, worst, sec, count = tallies[(o, v)].row()
            lines.append(
                f"| {o} | {v} | {dx:.3f} | {dy:.3f} | {phi:.3f} | {100 * gross:.1f} % | {worst:.2f} | "
                f"{sec:.2f} | {count} |"
            )
    lines += [
        "",
        "Shots without a network seed (no row in the network's central crop; they get the zero candidate "
        "twice): " + ", ".join(f"{o} {no_seed[o][0]} of {no_seed[o][1]}" for o in ORDERINGS) + ".",
        "",
    ]
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--slices", type=int, default=8, help="slices per ordering")
    p.add_argument("--matrix", type=int, default=256)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--model", default=str(MODEL))
    p.add_argument("--out", help="write the Markdown table here")
    args = p.parse_args()
    if not Path(args.model).is_file():
        print(f"bench_shot_seeds: error: model {args.model} not found (python -m model_training.ship_shot)")
        return 2
    text = run(args)
    print(text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
