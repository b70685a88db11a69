"""The intra-scan demo: a simulated turbo spin echo with motion between its echo trains, through the gadget.

:func:`run_intra_scan_demo` simulates a multi-shot acquisition (:mod:`kmotion.simulation.intra_scan`:
256 x 256, 8 coils, echo-train length 16, R = 2 plus 24 calibration lines, SNR 30, a steps motion pattern
within +-10 mm / +-10 deg), streams it through the gadget with the shot motion model (``kmotion replay``,
``motion_model = shot``) and writes ``motion_report.png`` (motion-corrupted, corrected and motion-free
images; estimated vs true motion per shot), ``motion.csv`` (one row per shot), ``summary.json`` and the raw
and replayed files.  The reference the shots are registered to is the separate calibration scan (low
resolution, ``reference = "calibration"``) or a motion-free repetition before the scan (``"repetition"``);
see ``docs/intra_scan.md``.  The motion-free image is the same reconstruction of the same simulation
without motion and noise.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import ismrmrd  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from kmotion.demo import StreamDemoResult, nrmse  # noqa: E402
from kmotion.frontends.replay import CORRECTED, UNCORRECTED, replay  # noqa: E402
from kmotion.gadget.params import GadgetParams  # noqa: E402
from kmotion.gadget.recon import reconstruct_images  # noqa: E402
from kmotion.io.ismrmrd_reader import read_images  # noqa: E402
from kmotion.simulation.intra_scan import IntraScanConfig, simulate_intra_scan, write_intra_scan  # noqa: E402

__all__ = ["run_intra_scan_demo"]

REFERENCES = ("calibration", "repetition")


def _image(items: list[object], header: object, repetition: int) -> dict[int, np.ndarray]:
    """Magnitude image per slice of ``repetition``."""
    out = {}
    for im in reconstruct_images(iter(items), header, series_index=0):  # type: ignore[arg-type]
        if isinstance(im, ismrmrd.Image) and int(im.repetition) == repetition:
            out[int(im.slice)] = np.abs(np.asarray(im.data)).reshape(im.data.shape[-2:])
    return out


def _by_slice(images: list[Any], repetition: int) -> dict[int, np.ndarray]:
    return {
        int(im.slice): np.abs(np.asarray(im.data)).reshape(im.data.shape[-2:])
        for im in images
        if int(im.repetition) == repetition
    }


def run_intra_scan_demo(
    out_dir: str | Path,
    config: IntraScanConfig | None = None,
    reference: str = "repetition",
    params: GadgetParams | None = None,
    progress: bool | None = None,
) -> StreamDemoResult:
    """Simulate, replay with the shot motion model, measure and draw (module docstring).

    Parameters
    ----------
    out_dir
        Output folder (created).
    config
        The simulation; default: 256^2, 8 coils, checkered ordering, ETL 16, R = 2 + 24 calibration lines,
        SNR 30, steps pattern.
    reference
        ``calibration`` (a separate motion-free calibration scan) or ``repetition`` (a motion-free
        repetition before the scan).
    params
        Gadget parameters (``motion_model`` is set to ``shot``).
    """
    if reference not in REFERENCES:
        raise ValueError(f"reference: expected one of {REFERENCES}, got {reference!r}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    cfg = config or IntraScanConfig(ordering="checkered", pattern="steps", seed=3)
    cfg = replace(
        cfg,
        separate_calibration=reference == "calibration",
        reference_repetitions=1 if reference == "repetition" else 0,
    )
    acq = simulate_intra_scan(cfg)
    raw_h5 = write_intra_scan(acq, out / "raw.h5")
    csv_path = out / "motion.csv"
    p = replace(params or GadgetParams(), motion_model="shot")
    res = replay(raw_h5, out / "replayed.h5", p, motion_csv=csv_path, progress=progress)
    moved_rep = cfg.reference_repetitions
    free = simulate_intra_scan(replace(cfg, pattern="none", snr=None))
    ref_img = _image(free.items, free.header, moved_rep)
    unc = _by_slice(read_images(res.out, UNCORRECTED), moved_rep)
    cor = _by_slice(read_images(res.out, CORRECTED), moved_rep)
    shots = [r for r in res.rows if r.get("shot", -1) >= 0 and r["repetition"] == moved_rep]
    errs = [
        (
            abs(r["dx_mm"] - r["true_dx_mm"]),
            abs(r["dy_mm"] - r["true_dy_mm"]),
            abs(r["rot_deg"] - r["true_rot_deg"]),
        )
        for r in shots
        if all(math.isfinite(r.get(k, math.nan)) for k in ("dx_mm", "true_dx_mm", "rot_deg", "true_rot_deg"))
    ]
    corrected_errs = [e for e, r in zip(errs, shots, strict=False) if r["corrected"]]
    per_slice = [
        {
            "slice": s,
            "nrmse_uncorrected": nrmse(unc[s], ref_img[s]),
            "nrmse_corrected": nrmse(cor[s], ref_img[s]),
        }
        for s in sorted(ref_img)
        if s in unc and s in cor
    ]
    mean = np.mean(errs, axis=0) if errs else np.full(3, math.nan)
    summary: dict[str, Any] = {
        "title": "kmotion intra-scan demo (shot motion model)",
        "reference": reference,
        "ordering": cfg.ordering,
        "pattern": cfg.pattern,
        "n_shots": acq.sampling.n_shots,
        "centre_shot": acq.centre_shot,
        "n_shots_corrected": int(sum(r["corrected"] for r in shots)),
        "mae_dx_mm": float(mean[0]),
        "mae_dy_mm": float(mean[1]),
        "mae_rot_deg": float(mean[2]),
        "max_error_corrected_mm": float(max((max(e[0], e[1]) for e in corrected_errs), default=0.0)),
        "max_error_corrected_deg": float(max((e[2] for e in corrected_errs), default=0.0)),
        "nrmse_uncorrected": float(np.mean([q["nrmse_uncorrected"] for q in per_slice])),
        "nrmse_corrected": float(np.mean([q["nrmse_corrected"] for q in per_slice])),
        "per_slice": per_slice,
        "replay_seconds": res.seconds,
    }
    summary["total_seconds"] = time.perf_counter() - t0
    summary_json = out / "summary.json"
    summary_json.write_text(json.dumps(summary, indent=2))
    png = _plot(shots, ref_img, unc, cor, summary, cfg, out)
    return StreamDemoResult(png, csv_path, raw_h5, res.out, summary_json, summary)


def _plot(
    shots: list[dict[str, Any]],
    ref_img: dict[int, np.ndarray],
    unc: dict[int, np.ndarray],
    cor: dict[int, np.ndarray],
    summary: dict[str, Any],
    cfg: IntraScanConfig,
    out: Path,
) -> Path:
    fy, fx = cfg.fov_mm
    ext = (-fx / 2, fx / 2, fy / 2, -fy / 2)
    fig, axes = plt.subplots(2, 3, figsize=(14, 9.5))
    vmax = float(np.percentile(ref_img[0], 99.5)) if 0 in ref_img else None
    per = {q["slice"]: q for q in summary["per_slice"]}
    for ax, imgs, title in (
        (axes[0, 0], unc, f"motion-corrupted: NRMSE {per.get(0, {}).get('nrmse_uncorrected', math.nan):.3f}"),
        (axes[0, 1], cor, f"corrected: NRMSE {per.get(0, {}).get('nrmse_corrected', math.nan):.3f}"),
        (axes[0, 2], ref_img, "motion-free (same recon, no noise)"),
    ):
        if 0 in imgs:
            ax.imshow(imgs[0], cmap="gray", extent=ext, vmin=0, vmax=vmax)
        ax.set_title(title, fontsize=10)
        ax.axis("off")
    s0 = sorted((r for r in shots if r["slice"] == 0), key=lambda r: r["shot"])
    x = [r["shot"] for r in s0]
    for ax, est, tru, label in (
        (axes[1, 0], "dx_mm", "true_dx_mm", "dx [mm]"),
        (axes[1, 1], "dy_mm", "true_dy_mm", "dy [mm]"),
        (axes[1, 2], "rot_deg", "true_rot_deg", "phi [deg]"),
    ):
        ax.plot(x, [r[tru] for r in s0], "x--", color="k", label="true")
        ok = [r for r in s0 if r["corrected"]]
        left = [r for r in s0 if not r["corrected"]]
        ax.errorbar(
            [r["shot"] for r in ok],
            [r[est] for r in ok],
            yerr=[2 * _std(r, est, cfg.pixel_spacing_mm) for r in ok],
            fmt="o",
            label="estimated, corrected (+-2 std)",
        )
        if left:
            ax.plot([r["shot"] for r in left], [r[est] for r in left], "s", mfc="none", label="left alone")
        ax.set_xlabel("shot (echo train, in acquisition order)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(
        f"{summary['title']}: reference = {summary['reference']}, {cfg.ordering} ordering, "
        f"{summary['n_shots']} shots of {cfg.echo_train_length} echoes, "
        f"{summary['n_shots_corrected']} corrected\n"
        f"MAE dx {summary['mae_dx_mm']:.3f} mm, dy {summary['mae_dy_mm']:.3f} mm, phi "
        f"{summary['mae_rot_deg']:.3f} deg; NRMSE {summary['nrmse_uncorrected']:.3f} -> "
        f"{summary['nrmse_corrected']:.3f}; {cfg.n_coils} coils, {cfg.matrix[0]}x{cfg.matrix[1]}, "
        f"R={cfg.acceleration}",
        fontsize=11,
    )
    fig.tight_layout(rect=(0, 0, 1, 0.94))
    path = out / "motion_report.png"
    fig.savefig(path, dpi=72)
    plt.close(fig)
    return path


def _std(row: dict[str, Any], est: str, spacing: tuple[float, float]) -> float:
    """Standard error of ``est`` in the unit of the plot (mm or deg); 0 when unknown."""
    if est == "rot_deg":
        v = row.get("rot_std_deg", math.nan)
    elif est.startswith("dx"):
        v = row.get("dx_std_px", math.nan) * spacing[1]
    else:
        v = row.get("dy_std_px", math.nan) * spacing[0]
    return float(v) if math.isfinite(v) else 0.0
