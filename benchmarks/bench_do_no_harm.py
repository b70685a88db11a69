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

Then a summary per SNR over the well-posed settings against the targets of ``docs/gadget.md`` ("Do no
harm"), with the MAE split into motion inside the earlier estimator's range (+-8.8 mm, +-12 deg) and beyond
it, and the reasons of the slices not corrected.  ``--csv`` writes one row per slice (truth, estimate,
standard errors, test, decision).

    .venv/bin/python benchmarks/bench_do_no_harm.py [--quick] [--matrix 128] [--repeats 6] [--out F.md]
        [--csv F.csv] [--threads 1] [--jobs 2]
"""

from __future__ import annotations

import argparse
import csv
import math
import platform
import shutil
import subprocess
import tempfile
import time
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from contextlib import nullcontext
from dataclasses import astuple, dataclass, fields
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


def run_part(setting: tuple[str, int, int, int, float, int, int, int]) -> list[Row]:
    """The rows of one setting ``(object, matrix, coils, R, SNR, seed, repeats, threads)``: its three parts
    (motion-free, small motion, capture range) drawn from ``seed``."""
    kind, n, coils, accel, snr, seed, repeats, threads = setting
    torch.set_num_threads(threads)
    spacing = FOV / n
    rng = np.random.default_rng(seed)
    parts = {p: draw(p, repeats, rng, spacing) for p in ("free", "small", "range")}
    out: list[Row] = []
    for part, m in parts.items():
        reps = run_setting(kind, n, coils, accel, snr, m, seed)
        out += records(kind, coils, accel, snr, part, m, reps, spacing)
    return out


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


OLD_RANGE_MM = 1.5 * 12.0 * 220.0 / 448.0
"""Translation range of the earlier estimator's search (1.5 x the network's trained +-5.9 mm: +-8.8 mm)."""
OLD_RANGE_DEG = 12.0
"""Rotation range the earlier estimator was trained and tested on."""
GROSS_MM, GROSS_DEG = 1.0, 1.0
"""An error above either is gross."""


@dataclass
class Row:
    """One moved repetition of one setting: truth and estimate (mm, deg), the test and the decision."""

    object: str
    coils: int
    R: int
    snr: float
    part: str
    repetition: int
    true_dx_mm: float
    true_dy_mm: float
    true_phi_deg: float
    dx_mm: float
    dy_mm: float
    phi_deg: float
    dx_std_mm: float
    dy_std_mm: float
    rot_std_deg: float
    chi2: float
    p_value: float
    corrected: bool
    flagged: bool
    reason: str
    pixel_mm: float

    def error(self) -> np.ndarray:
        """``(3,)`` absolute error dx, dy [mm], phi [deg]."""
        return np.abs(
            np.array(
                [
                    self.dx_mm - self.true_dx_mm,
                    self.dy_mm - self.true_dy_mm,
                    self.phi_deg - self.true_phi_deg,
                ]
            )
        )

    def applied(self) -> float:
        """The largest component of the estimate, in px (translations) or deg."""
        return max(abs(self.dx_mm) / self.pixel_mm, abs(self.dy_mm) / self.pixel_mm, abs(self.phi_deg))

    def gross(self) -> bool:
        """An error above ``GROSS_MM`` or ``GROSS_DEG``."""
        e = self.error()
        return bool(e[0] > GROSS_MM or e[1] > GROSS_MM or e[2] > GROSS_DEG)

    def inside_old_range(self) -> bool:
        """The true motion lies within the earlier estimator's range."""
        t = max(abs(self.true_dx_mm), abs(self.true_dy_mm))
        return t <= OLD_RANGE_MM and abs(self.true_phi_deg) <= OLD_RANGE_DEG


def records(
    kind: str,
    coils: int,
    accel: int,
    snr: float,
    part: str,
    motion: np.ndarray,
    reps: list[MotionReport],
    spacing: float,
) -> list[Row]:
    """One :class:`Row` per moved repetition (``motion`` in px/deg per repetition)."""
    rows = []
    for r in reps:
        m = motion[r.key.repetition]
        rows.append(
            Row(
                kind,
                coils,
                accel,
                snr,
                part,
                int(r.key.repetition),
                float(m[0] * spacing),
                float(m[1] * spacing),
                float(m[2]),
                r.dx_px * spacing,
                r.dy_px * spacing,
                r.rot_deg,
                r.dx_std_px * spacing,
                r.dy_std_px * spacing,
                r.rot_std_deg,
                r.chi2,
                r.p_value,
                bool(r.corrected),
                bool(r.flagged),
                r.reason,
                spacing,
            )
        )
    return rows


def _reason(r: Row) -> str:
    """The reason's kind (its text before any numbers)."""
    return r.reason.split(" (")[0].split(":")[0] or "corrected"


def table_row(kind: str, coils: int, accel: int, snr: float, rows: list[Row]) -> str:
    """The markdown row of one setting."""
    free = [r for r in rows if r.part == "free"]
    changed = [r for r in free if r.corrected]
    big = max((r.applied() for r in changed), default=0.0)
    small = [r for r in rows if r.part == "small"]
    det = sum(r.corrected for r in small)
    rng_rows = [r for r in rows if r.part == "range"]
    cor = [r for r in rng_rows if r.corrected]
    mae = np.mean([r.error() for r in cor], 0) if cor else np.full(3, math.nan)
    gross = sum(r.gross() for r in cor)
    ill = " (ill-posed)" if coils < accel else ""
    return (
        f"| {kind} | {coils} | {accel}{ill} | {snr:g} | {len(changed)}/{len(free)} | {big:.2f} | "
        f"{det}/{len(small)} | {mae[0]:.3f}, {mae[1]:.3f}, {mae[2]:.3f} | "
        f"{gross}/{len(cor)} / {len(rng_rows) - len(cor)} |"
    )


def _mae(rows: list[Row]) -> str:
    if not rows:
        return "–"
    m = np.mean([r.error() for r in rows], 0)
    return f"{m[0]:.3f}, {m[1]:.3f}, {m[2]:.3f} ({len(rows)})"


def _counts(rows: list[Row]) -> str:
    c = Counter(_reason(r) for r in rows)
    return ", ".join(f"{n} x {k}" for k, n in c.most_common()) or "none"


def summary(rows: list[Row]) -> list[str]:
    """Markdown summary against the targets of issue 9 (well-posed settings: coils >= R)."""
    ok = [r for r in rows if r.coils >= r.R]
    out = [
        "",
        TARGETS,
        "",
        "| SNR | motion-free changed | largest applied correction [px, deg] | small motion detected "
        "| capture range: corrected / not | MAE inside +-8.8 mm, +-12 deg: dx, dy [mm], phi [deg] (n) "
        "| MAE outside (n) | gross errors among corrected |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for snr in sorted({r.snr for r in ok}):
        sel = [r for r in ok if r.snr == snr]
        free = [r for r in sel if r.part == "free"]
        ch = [r for r in free if r.corrected]
        big = max((r.applied() for r in ch), default=0.0)
        small = [r for r in sel if r.part == "small"]
        det = sum(r.corrected for r in small)
        rng_rows = [r for r in sel if r.part == "range"]
        cor = [r for r in rng_rows if r.corrected]
        out.append(
            f"| {snr:g} | {len(ch)}/{len(free)} ({100 * len(ch) / max(len(free), 1):.1f} %) | {big:.2f} "
            f"| {det}/{len(small)} ({100 * det / max(len(small), 1):.1f} %) "
            f"| {len(cor)} / {len(rng_rows) - len(cor)} | {_mae([r for r in cor if r.inside_old_range()])} "
            f"| {_mae([r for r in cor if not r.inside_old_range()])} "
            f"| {sum(r.gross() for r in cor)}/{len(cor)} |"
        )
    out += [
        "",
        "Not corrected over the capture range, by reason: "
        + _counts([r for r in ok if r.part == "range" and not r.corrected])
        + ". Small motion not corrected, by reason: "
        + _counts([r for r in ok if r.part == "small" and not r.corrected])
        + ". Motion-free slices corrected: "
        + _counts([r for r in ok if r.part == "free" and r.corrected])
        + ".",
    ]
    return out


TARGETS = "## Against the targets (well-posed settings: coils >= R)"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--matrix", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=6, help="moved repetitions per setting and part")
    ap.add_argument("--quick", action="store_true", help="a few settings only")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per process")
    ap.add_argument("--jobs", type=int, default=1, help="settings run in parallel processes (same results)")
    ap.add_argument("--out", type=Path, default=None, help="also write the tables (markdown) here")
    ap.add_argument("--csv", type=Path, default=None, help="also write one row per slice here")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    n = args.matrix
    kinds = ["shepp_logan", "head"] if shepp_logan(16) is not None else ["head"]
    coils_list, r_list, snr_list = [1, 8, 32], [1, 2, 3, 4], [5.0, 10.0, 20.0, 50.0]
    if args.quick:
        coils_list, r_list, snr_list = [8], [2], [10.0, 50.0]
    lines = [
        f"# bench_do_no_harm: matrix {n}, FOV {FOV:g} mm, {args.repeats} repetitions per part; "
        f"{platform.processor() or platform.machine()}, torch {torch.__version__}, {args.threads} thread(s) "
        f"x {args.jobs} process(es)",
        "",
        "| object | coils | R | SNR | motion-free changed | largest applied (px, deg) "
        "| detected (>= 0.5 mm/deg) | MAE dx, dy [mm], phi [deg] over +-20 mm/+-15 deg "
        "| gross / corrected / not corrected |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    print("\n".join(lines), flush=True)
    rows: list[Row] = []
    t0 = time.perf_counter()
    settings = []
    seed = 0
    for kind in kinds:
        for coils in coils_list:
            for accel in r_list:
                for snr in snr_list:
                    seed += 10
                    settings.append((kind, n, coils, accel, snr, seed, args.repeats, args.threads))
    with ProcessPoolExecutor(args.jobs) if args.jobs > 1 else nullcontext() as pool:
        results = pool.map(run_part, settings) if pool is not None else map(run_part, settings)
        for (kind, _, coils, accel, snr, _, _, _), setting in zip(settings, results, strict=True):
            rows += setting
            row = table_row(kind, coils, accel, snr, setting)
            print(row, flush=True)
            lines.append(row)
    lines += summary(rows)
    lines.append("")
    lines.append(f"{len(rows)} slices in {time.perf_counter() - t0:.0f} s.")
    print("\n".join(lines[lines.index(TARGETS) :]))
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text("\n".join(lines) + "\n")
    if args.csv is not None:
        args.csv.parent.mkdir(parents=True, exist_ok=True)
        with args.csv.open("w", newline="") as f:
            w = csv.writer(f)
            w.writerow([fld.name for fld in fields(Row)])
            for r in rows:
                w.writerow([f"{v:.5g}" if isinstance(v, float) else v for v in astuple(r)])


if __name__ == "__main__":
    main()
