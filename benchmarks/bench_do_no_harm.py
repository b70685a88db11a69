"""Do no harm: false corrections without motion, detection of small motion, accuracy over the capture range.

Data: ``kmotion.simulation.raw.simulate_raw_from_objects`` with repetition 0 the reference and the other
repetitions motion-free or moved, through the whole gadget (``MotionCorrector``, default parameters):
* objects: the Shepp-Logan phantom of the ISMRMRD C++ tool ``ismrmrd_generate_cartesian_shepp_logan`` (little
  texture; skipped when the tool is not installed) and textured head phantoms
  (:func:`kmotion.simulation.phantoms.make_phantoms`);
* coils 1, 8, 32 (synthetic maps), acceleration R = 1..4 with 24 calibration lines, SNR 5, 10, 20, 50
  (``docs/conventions.md``), 2x readout oversampling and a noise line, ``--matrix`` (128 by default);
* ``coils < R`` is ill-posed (no SENSE): reported apart.

Reported per setting:
* **motion-free**: the fraction of slices changed (corrected) and the largest correction applied;
* **small motion** (translation 0.5..2 mm or rotation 0.5..2 deg, the other parameters smaller): the detection
  rate (slices corrected);
* **capture range** (uniform over +-20 mm, +-15 deg): MAE of dx, dy [mm], phi [deg] and the rate of gross
  errors (> 1 mm or > 1 deg) among corrected slices, and the rate of slices flagged (not corrected).

    .venv/bin/python benchmarks/bench_do_no_harm.py [--quick] [--matrix 128] [--repeats 6] [--out F.md]
"""

from __future__ import annotations

import argparse
import math
import platform
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np
import torch

from kmotion.gadget import GadgetParams, MotionCorrector, MotionReport
from kmotion.simulation.phantoms import coil_maps_from_coefficients, make_coil_coefficients, make_phantoms
from kmotion.simulation.raw import RawConfig, simulate_raw_from_objects

FOV = 220.0


def shepp_logan(n: int) -> np.ndarray | None:
    """``(n, n)`` complex64 Shepp-Logan phantom of the ISMRMRD C++ tool (None without the tool)."""
    tool = shutil.which("ismrmrd_generate_cartesian_shepp_logan")
    if tool is None:
        return None
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "sl.h5"
        subprocess.run([tool, "-m", str(n), "-c", "1", "-o", str(out)], check=True, capture_output=True)
        with h5py.File(out, "r") as f:
            p = f["dataset/phantom"][()]
    img = (p["real"] + 1j * p["imag"]).astype(np.complex64).reshape(n, n)
    return img


def objects(kind: str, n: int, seed: int) -> np.ndarray:
    """``(1, n, n)`` object of ``kind`` (``shepp_logan`` or ``head``)."""
    if kind == "shepp_logan":
        sl = shepp_logan(n)
        assert sl is not None
        # shrink to 80 % so that motion up to 20 mm keeps it inside the FOV
        k = np.fft.fftshift(np.fft.fft2(np.fft.ifftshift(sl)))
        m = int(round(n / 0.8)) // 2 * 2
        pad = np.zeros((m, m), dtype=np.complex64)
        o = (m - n) // 2
        pad[o : o + n, o : o + n] = k
        big = np.fft.fftshift(np.fft.ifft2(np.fft.ifftshift(pad)))
        c = m // 2
        return big[c - n // 2 : c - n // 2 + n, c - n // 2 : c - n // 2 + n][None].astype(np.complex64) * (
            m * m / (n * n)
        )
    return make_phantoms(1, (n, n), (FOV, FOV), generator=seed).numpy()


def run_setting(
    kind: str, n: int, coils: int, accel: int, snr: float, motion: np.ndarray, seed: int
) -> list[MotionReport]:
    """Reports of the moved repetitions (1..) of one simulated acquisition."""
    obj = objects(kind, n, seed)
    maps = coil_maps_from_coefficients(
        make_coil_coefficients(1, coils, (n, n), (FOV, FOV), generator=seed + 1), (n, n)
    )
    cfg = RawConfig(
        matrix=(n, n),
        fov_mm=(FOV, FOV),
        n_coils=coils,
        n_slices=1,
        n_repetitions=len(motion),
        acceleration=accel,
        calibration_lines=24,
        snr=snr,
        seed=seed,
        motion=tuple(tuple(float(v) for v in m) for m in motion),
    )
    raw = simulate_raw_from_objects(obj, maps.numpy(), cfg)
    out = MotionCorrector(raw.header, GadgetParams(device="cpu"))(raw.items)
    reps = [o for o in out if isinstance(o, MotionReport) and o.key.repetition > 0]
    return sorted(reps, key=lambda r: r.key.repetition)


def draw(kind: str, n_rep: int, rng: np.random.Generator, spacing: float) -> np.ndarray:
    """``(n_rep + 1, 3)`` motions in px/deg (row 0 zero) of a benchmark part."""
    out = np.zeros((n_rep + 1, 3))
    for i in range(1, n_rep + 1):
        if kind == "small":
            m = rng.uniform(-0.5, 0.5, 3) * np.array([1.0, 1.0, 1.0])
            j = rng.integers(0, 3)
            m[j] = rng.choice([-1, 1]) * rng.uniform(0.5, 2.0)
        elif kind == "range":
            m = np.array([rng.uniform(-20, 20), rng.uniform(-20, 20), rng.uniform(-15, 15)])
        else:
            m = np.zeros(3)
        out[i, :2] = m[:2] / spacing  # mm -> px
        out[i, 2] = m[2]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--matrix", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=6, help="moved repetitions per setting and part")
    ap.add_argument("--quick", action="store_true", help="a few settings only")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=None, help="also write the table (markdown) here")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    n = args.matrix
    spacing = FOV / n
    kinds = ["shepp_logan", "head"] if shepp_logan(16) is not None else ["head"]
    coils_list, r_list, snr_list = [1, 8, 32], [1, 2, 3, 4], [5.0, 10.0, 20.0, 50.0]
    if args.quick:
        coils_list, r_list, snr_list = [8], [2], [10.0, 50.0]
    lines = [
        f"# bench_do_no_harm: matrix {n}, FOV {FOV:g} mm, {args.repeats} repetitions per part; "
        f"{platform.processor() or platform.machine()}, torch {torch.__version__}, {args.threads} thread(s)",
        "",
        "| object | coils | R | SNR | motion-free changed | largest applied (px, deg) "
        "| detected (>= 0.5 mm/deg) | MAE dx, dy [mm], phi [deg] over +-20 mm/+-15 deg | gross / flagged |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    print("\n".join(lines), flush=True)
    totals = {"free": [0, 0], "det": [0, 0], "gross": [0, 0]}
    t0 = time.perf_counter()
    seed = 0
    for kind in kinds:
        for coils in coils_list:
            for accel in r_list:
                for snr in snr_list:
                    seed += 10
                    rng = np.random.default_rng(seed)
                    parts = {p: draw(p, args.repeats, rng, spacing) for p in ("free", "small", "range")}
                    res = {p: run_setting(kind, n, coils, accel, snr, m, seed) for p, m in parts.items()}
                    free = res["free"]
                    changed = [r for r in free if r.corrected]
                    big = max((max(abs(r.dx_px), abs(r.dy_px), abs(r.rot_deg)) for r in changed), default=0.0)
                    det = sum(r.corrected for r in res["small"])
                    errs, gross, flagged = [], 0, 0
                    for r, m in zip(res["range"], parts["range"][1:], strict=True):
                        if not r.corrected:
                            flagged += 1
                            continue
                        e = np.array(
                            [(r.dx_px - m[0]) * spacing, (r.dy_px - m[1]) * spacing, r.rot_deg - m[2]]
                        )
                        errs.append(np.abs(e))
                        gross += int(np.abs(e).max() > 1.0)
                    mae = np.mean(errs, 0) if errs else np.full(3, math.nan)
                    ill = " (ill-posed)" if coils < accel else ""
                    row = (
                        f"| {kind} | {coils} | {accel}{ill} | {snr:g} | {len(changed)}/{len(free)} "
                        f"| {big:.2f} | "
                        f"{det}/{len(res['small'])} | {mae[0]:.3f}, {mae[1]:.3f}, {mae[2]:.3f} | "
                        f"{gross}/{len(errs)} / {flagged} |"
                    )
                    print(row, flush=True)
                    lines.append(row)
                    if coils >= accel:
                        totals["free"][0] += len(changed)
                        totals["free"][1] += len(free)
                        if snr >= 20:
                            totals["det"][0] += det
                            totals["det"][1] += len(res["small"])
                        totals["gross"][0] += gross
                        totals["gross"][1] += len(errs)
    summary = [
        "",
        "Well-posed settings (coils >= R): motion-free slices changed "
        f"{totals['free'][0]}/{totals['free'][1]}; "
        f"small motion detected at SNR >= 20: {totals['det'][0]}/{totals['det'][1]}; gross errors among "
        f"corrected over the capture range: {totals['gross'][0]}/{totals['gross'][1]}. "
        f"{time.perf_counter() - t0:.0f} s.",
    ]
    print("\n".join(summary))
    lines += summary
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
