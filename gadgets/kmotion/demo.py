"""The built-in examples.

* :func:`run_stream_demo` (``kmotion demo``): the whole streaming gadget on simulated raw data —
  ``simulate_raw`` -> ``replay`` -> a PNG report (images before/after correction and the motion-free
  reference, estimated vs true motion), the CSV of the estimates and ``summary.json`` (MAE, NRMSE).
* :func:`run_twix_demo` (``kmotion demo --twix``): the same on the real Siemens phantom with simulated motion.
* :func:`run_demo` (``kmotion demo --pairs``): simulate a batch of the study's training pairs and draw a few.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Iterable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import ismrmrd  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from kmotion.frontends.replay import CORRECTED, UNCORRECTED, replay  # noqa: E402
from kmotion.gadget.params import GadgetParams  # noqa: E402
from kmotion.gadget.recon import reconstruct_images  # noqa: E402
from kmotion.io.base import BaseImages  # noqa: E402
from kmotion.io.ismrmrd_reader import read_images  # noqa: E402
from kmotion.physics.motion import apply_motion_image  # noqa: E402
from kmotion.simulation.phantoms import coil_maps_from_coefficients  # noqa: E402
from kmotion.simulation.raw import (  # noqa: E402
    RawAcquisition,
    RawConfig,
    simulate_raw,
    simulate_raw_from_objects,
    write_raw,
)
from kmotion.simulation.sources import PhantomSource  # noqa: E402
from kmotion.simulation.study import StudyConfig, StudySimulator, draw_motion  # noqa: E402


def run_demo(
    config: StudyConfig,
    out_dir: Path,
    n_show: int = 4,
    seed: int = 0,
    device: str = "cpu",
    n_pairs: int = 256,
) -> Path:
    """Simulate ``n_pairs`` pairs, save them, and plot ``n_show`` (images, k-space crops, targets).

    Returns the path of the PNG.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    g = torch.Generator(device=device).manual_seed(seed)
    sim = StudySimulator(config, device)
    source = PhantomSource(config, device=device)
    t0 = time.perf_counter()
    n_base = -(-n_pairs // config.pairs_per_base)
    base = source.draw(n_base, g)
    motion = draw_motion(n_pairs, config.motion_range, g, device)
    index = torch.arange(n_pairs, device=device) // config.pairs_per_base
    batch = sim.simulate(base.objects, motion, index, base.coil_coefficients, base.noise_sigma, generator=g)
    elapsed = time.perf_counter() - t0
    np.savez_compressed(
        out_dir / "pairs.npz",
        inputs=batch.inputs.cpu().numpy(),
        targets=batch.targets.cpu().numpy(),
        motion=batch.motion.cpu().numpy(),
        config=json.dumps(config.to_dict()),
    )
    # show pairs from different base images
    show = torch.arange(n_show, device=device) * config.pairs_per_base % n_pairs
    obj = base.objects[index[show]]
    mot = motion[show]
    moved = apply_motion_image(obj, mot[:, 0], mot[:, 1], mot[:, 2], config.pixel_spacing_mm)
    if base.coil_coefficients is not None:
        maps = coil_maps_from_coefficients(base.coil_coefficients[index[show]], config.matrix)
        ref_img = (obj * maps).abs().pow(2).sum(1).sqrt()
        mov_img = (moved * maps).abs().pow(2).sum(1).sqrt()
    else:
        ref_img, mov_img = obj[:, 0].abs(), moved[:, 0].abs()
    ref_crop = batch.reference[show].abs().pow(2).sum(1).sqrt()
    mov_crop = batch.moved[show].abs().pow(2).sum(1).sqrt()
    phase_diff = torch.angle((batch.moved[show] * batch.reference[show].conj()).sum(1))

    fig, axes = plt.subplots(n_show, 5, figsize=(19, 3.4 * n_show), squeeze=False)
    fy, fx = config.fov_mm
    img_ext = (-fx / 2, fx / 2, fy / 2, -fy / 2)
    s_y, s_x = config.crop
    r = config.acceleration
    crop_ext = (-s_x // 2 - 0.5, s_x - s_x // 2 - 0.5, r * (s_y - s_y // 2) - r / 2, -r * (s_y // 2) - r / 2)
    vmax = float(ref_img.max())
    for row in range(n_show):
        dx, dy, phi = (float(v) for v in mot[row])
        a = axes[row]
        a[0].imshow(ref_img[row].cpu().numpy(), cmap="gray", extent=img_ext, vmin=0, vmax=vmax)
        a[0].set_title("reference |image|")
        a[1].imshow(mov_img[row].cpu().numpy(), cmap="gray", extent=img_ext, vmin=0, vmax=vmax)
        a[1].set_title(f"moved: dx={dx:+.1f}, dy={dy:+.1f} px, phi={phi:+.1f}°", fontsize=9)
        for ax in a[:2]:
            ax.set_xlabel("x = readout [mm]")
            ax.set_ylabel("y = phase enc. [mm]")
        lo = float(torch.log10(ref_crop[row].clamp_min(1e-12)).max()) - 4
        for ax, crop, name in ((a[2], ref_crop, "reference"), (a[3], mov_crop, "moved")):
            im = ax.imshow(
                torch.log10(crop[row].clamp_min(1e-12)).cpu().numpy(),
                extent=crop_ext,
                aspect="auto",
                vmin=lo,
                vmax=lo + 4,
                cmap="viridis",
            )
            ax.set_title(f"{name}: log10 |k| crop {s_y}x{s_x}")
            ax.set_xlabel("kx")
            ax.set_ylabel("ky (acquired rows)")
            fig.colorbar(im, ax=ax, fraction=0.046)
        im = a[4].imshow(
            phase_diff[row].cpu().numpy(),
            extent=crop_ext,
            aspect="auto",
            cmap="twilight",
            vmin=-np.pi,
            vmax=np.pi,
        )
        a[4].set_title("arg(moved · conj(reference))")
        a[4].set_xlabel("kx")
        fig.colorbar(im, ax=a[4], fraction=0.046)
    rx, ry, rphi = config.motion_range
    coils = f", {config.n_coils} coils" if config.n_coils > 1 else ""
    snr = f", SNR {config.snr:g}" if config.snr else ""
    fig.suptitle(
        f"kmotion: {n_pairs} simulated training pairs in {elapsed:.2f} s ({device}); matrix "
        f"{config.matrix[0]}x{config.matrix[1]}, FOV {fy:g}x{fx:g} mm, R={r}{coils}{snr}; "
        f"motion ~ U[±{rx:g} px, ±{ry:g} px, ±{rphi:g}°]"
    )
    fig.tight_layout()
    path = out_dir / "training_pairs.png"
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def plot_base_images(base: BaseImages, path: Path, max_images: int = 4) -> None:
    """Root-sum-of-squares magnitude of up to ``max_images`` base images, axes in mm."""
    n = min(max_images, base.images.shape[0])
    fig, axes = plt.subplots(1, n, figsize=(4.5 * n, 4.5), squeeze=False)
    fy, fx = base.fov_mm
    for i in range(n):
        rss = np.sqrt((np.abs(base.images[i]) ** 2).sum(0))
        axes[0, i].imshow(rss, cmap="gray", extent=(-fx / 2, fx / 2, fy / 2, -fy / 2))
        axes[0, i].set_title(base.labels[i] if i < len(base.labels) else f"image {i}")
        axes[0, i].set_xlabel("x = readout [mm]")
        axes[0, i].set_ylabel("y = phase encoding [mm]")
    fig.suptitle(f"{base.source}: {base.images.shape[1]} coil(s), root-sum-of-squares")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)


# --------------------------------------------------------------------------------------------------------
# the streaming demo: simulate-raw -> replay -> report


@dataclass
class StreamDemoResult:
    """Files written by :func:`run_stream_demo` / :func:`run_twix_demo` and the measured numbers."""

    png: Path
    csv: Path
    raw_h5: Path
    replay_h5: Path
    summary_json: Path
    summary: dict[str, Any]


def nrmse(image: np.ndarray, reference: np.ndarray) -> float:
    """``||image - reference||_2 / ||reference||_2`` over the whole image (magnitude images)."""
    ref = np.abs(np.asarray(reference, dtype=np.float64))
    return float(np.linalg.norm(np.abs(np.asarray(image, dtype=np.float64)) - ref) / np.linalg.norm(ref))


def _images_by_key(images: Iterable[object]) -> dict[tuple[int, int], np.ndarray]:
    out: dict[tuple[int, int], np.ndarray] = {}
    for im in images:
        if isinstance(im, ismrmrd.Image):
            out[(int(im.slice), int(im.repetition))] = np.abs(np.asarray(im.data)).reshape(im.data.shape[-2:])
    return out


def _finish_stream_demo(
    raw: RawAcquisition,
    motion_free: RawAcquisition,
    out_dir: Path,
    params: GadgetParams | None,
    title: str,
    progress: bool | None,
    reference_note: str = "same recon, no noise",
) -> StreamDemoResult:
    """Write ``raw``, replay it, reconstruct the motion-free twin, measure and draw.

    ``motion_free`` is a one-repetition, noise-free (beyond the base images' own), motion-free acquisition of
    the same objects and coils: every repetition of it would be identical, so its one image per slice is the
    reference of every repetition of that slice.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    raw_h5 = write_raw(raw, out_dir / "raw.h5")
    csv_path = out_dir / "motion.csv"
    res = replay(raw_h5, out_dir / "replayed.h5", params, motion_csv=csv_path, progress=progress)
    ref_by_slice = {
        key[0]: img
        for key, img in _images_by_key(
            reconstruct_images(iter(motion_free.items), motion_free.header, series_index=0)
        ).items()
    }
    reference = {
        (r["slice"], r["repetition"]): ref_by_slice[r["slice"]]
        for r in res.rows
        if r["slice"] in ref_by_slice
    }
    uncorrected = _images_by_key(read_images(res.out, UNCORRECTED))
    corrected = _images_by_key(read_images(res.out, CORRECTED))
    per_image = []
    for row in res.rows:
        key = (row["slice"], row["repetition"])
        if row["repetition"] == row["reference_repetition"] or key not in reference:
            continue
        if key not in uncorrected or key not in corrected:
            continue
        per_image.append(
            {
                "slice": key[0],
                "repetition": key[1],
                "nrmse_uncorrected": nrmse(uncorrected[key], reference[key]),
                "nrmse_corrected": nrmse(corrected[key], reference[key]),
                "corrected": row["corrected"],
            }
        )
    n_unc = float(np.mean([p["nrmse_uncorrected"] for p in per_image])) if per_image else math.nan
    n_cor = float(np.mean([p["nrmse_corrected"] for p in per_image])) if per_image else math.nan
    summary: dict[str, Any] = {
        "title": title,
        "reference": f"motion-free twin ({reference_note})",
        "n_moved_slices": len(per_image),
        **{k: v for k, v in res.summary.items() if k != "n"},
        "nrmse_uncorrected": n_unc,
        "nrmse_corrected": n_cor,
        "nrmse_ratio": n_cor / n_unc if n_unc > 0 else math.nan,
        "per_image": per_image,
        "replay_seconds": res.seconds,
        "total_seconds": time.perf_counter() - t0,
    }
    summary_json = out_dir / "summary.json"
    summary_json.write_text(json.dumps(summary, indent=2))
    png = _plot_stream_demo(res.rows, reference, uncorrected, corrected, per_image, raw, summary, out_dir)
    return StreamDemoResult(png, csv_path, raw_h5, res.out, summary_json, summary)


def _plot_stream_demo(
    rows: list[dict[str, Any]],
    reference: dict[tuple[int, int], np.ndarray],
    uncorrected: dict[tuple[int, int], np.ndarray],
    corrected: dict[tuple[int, int], np.ndarray],
    per_image: list[dict[str, Any]],
    raw: RawAcquisition,
    summary: dict[str, Any],
    out_dir: Path,
) -> Path:
    cfg = raw.config
    fy, fx = cfg.fov_mm
    ext = (-fx / 2, fx / 2, fy / 2, -fy / 2)
    s0 = [r for r in rows if r["slice"] == 0]
    moved = [r for r in s0 if r["repetition"] != r["reference_repetition"]]
    # example repetitions: largest rotation, largest translation, and the worst-corrected one
    examples: list[int] = []
    if moved:
        picks = [
            max(moved, key=lambda r: abs(r.get("true_rot_deg", r["rot_deg"]))),
            max(
                moved,
                key=lambda r: math.hypot(r.get("true_dx_mm", r["dx_mm"]), r.get("true_dy_mm", r["dy_mm"])),
            ),
        ]
        worst = [p for p in per_image if p["slice"] == 0]
        if worst:
            rep = max(worst, key=lambda p: p["nrmse_corrected"])["repetition"]
            picks.append(next(r for r in moved if r["repetition"] == rep))
        for r in picks:
            if r["repetition"] not in examples:
                examples.append(r["repetition"])
    n_col = 1 + max(len(examples), 3)
    fig, axes = plt.subplots(3, n_col, figsize=(4.2 * n_col, 12.5), squeeze=False)
    ref_rep = s0[0]["reference_repetition"] if s0 else 0
    ref_img = reference.get((0, ref_rep))
    vmax = float(np.percentile(ref_img, 99.5)) if ref_img is not None else None
    for ax in axes[:2].ravel():
        ax.axis("off")
    if ref_img is not None:
        axes[0, 0].imshow(ref_img, cmap="gray", extent=ext, vmin=0, vmax=vmax)
        axes[0, 0].set_title(f"{summary['reference']}".replace(" (", "\n("), fontsize=10)
    nr = {(p["slice"], p["repetition"]): p for p in per_image}
    by_rep = {r["repetition"]: r for r in s0}
    for j, rep in enumerate(examples, start=1):
        r = by_rep[rep]
        p = nr.get((0, rep), {})
        true = (
            f"true {r['true_dx_px']:+.1f}, {r['true_dy_px']:+.1f} px, {r['true_rot_deg']:+.1f}°\n"
            if "true_dx_px" in r
            else ""
        )
        for i, (imgs, name, key) in enumerate(
            ((uncorrected, "uncorrected", "nrmse_uncorrected"), (corrected, "corrected", "nrmse_corrected"))
        ):
            img = imgs.get((0, rep))
            if img is None:
                continue
            axes[i, j].imshow(img, cmap="gray", extent=ext, vmin=0, vmax=vmax)
            est = f"est. {r['dx_px']:+.1f}, {r['dy_px']:+.1f} px, {r['rot_deg']:+.1f}°\n" if i else true
            axes[i, j].set_title(
                f"rep {rep} {name}: NRMSE {p.get(key, math.nan):.3f}\n{est}".rstrip(), fontsize=9
            )
    if ref_img is not None:
        err = corrected.get((0, examples[0])) if examples else None
        if err is not None:
            axes[1, 0].imshow(
                np.abs(err - ref_img), cmap="magma", extent=ext, vmin=0, vmax=0.25 * (vmax or 1)
            )
            axes[1, 0].set_title(f"|corrected - reference|, rep {examples[0]}\n(x4 contrast)", fontsize=9)
            axes[1, 0].axis("on")
    reps = [r["repetition"] for r in s0]
    for ax, est, tru, label in (
        (axes[2, 0], "dx_px", "true_dx_px", "dx [px]"),
        (axes[2, 1], "dy_px", "true_dy_px", "dy [px]"),
        (axes[2, 2], "rot_deg", "true_rot_deg", "phi [deg]"),
    ):
        ax.plot(reps, [r[est] for r in s0], "o-", label="estimated")
        if s0 and tru in s0[0]:
            ax.plot(reps, [r[tru] for r in s0], "x--", label="true")
        ax.set_xlabel("repetition")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        ax.set_title(f"slice 0: {label}")
    ax = axes[2, 3]
    p0 = [p for p in per_image if p["slice"] == 0]
    x = np.array([p["repetition"] for p in p0])
    ax.bar(x - 0.2, [p["nrmse_uncorrected"] for p in p0], 0.4, label="uncorrected")
    ax.bar(x + 0.2, [p["nrmse_corrected"] for p in p0], 0.4, label="corrected")
    ax.set_xlabel("repetition")
    ax.set_ylabel("NRMSE vs motion-free")
    ax.legend(fontsize=8)
    ax.set_title("slice 0: NRMSE per repetition")
    for extra in axes[2, 4:]:
        extra.axis("off")
    mae = (
        f"MAE dx {summary['mae_dx_px']:.2f} px, dy {summary['mae_dy_px']:.2f} px, phi "
        f"{summary['mae_rot_deg']:.2f}°; "
        if "mae_dx_px" in summary
        else ""
    )
    fig.suptitle(
        f"{summary['title']}: {mae}NRMSE uncorrected {summary['nrmse_uncorrected']:.3f} -> corrected "
        f"{summary['nrmse_corrected']:.3f} (mean over {summary['n_moved_slices']} moved slices)\n"
        f"{cfg.n_coils} coils, matrix {cfg.matrix[0]}x{cfg.matrix[1]}, FOV {fy:g}x{fx:g} mm, "
        f"R={cfg.acceleration}, {cfg.n_slices} slice(s), {cfg.n_repetitions} repetitions",
        fontsize=11,
    )
    fig.tight_layout()
    path = out_dir / "motion_report.png"
    fig.savefig(path, dpi=72)
    plt.close(fig)
    return path


def run_stream_demo(
    out_dir: Path,
    config: RawConfig | None = None,
    params: GadgetParams | None = None,
    progress: bool | None = None,
) -> StreamDemoResult:
    """The README's main job: ``simulate_raw`` -> ``replay`` -> PNG report, CSV and ``summary.json``.

    The NRMSE reference is a motion-free, noise-free twin of the simulated acquisition (same phantoms, coils
    and sampling, motion zero, no noise) reconstructed by the same
    :func:`~kmotion.gadget.recon.reconstruct_images`.
    """
    cfg = RawConfig() if config is None else config
    raw = simulate_raw(cfg)
    still = simulate_raw(replace(cfg, n_repetitions=1, motion=((0.0, 0.0, 0.0),), snr=None))
    return _finish_stream_demo(
        raw, still, Path(out_dir), params, "kmotion streaming demo (simulated)", progress
    )


def coil_maps_from_images(images: np.ndarray, smooth_fraction: float = 0.06) -> tuple[np.ndarray, np.ndarray]:
    """Split coil images ``(n_coils, n_y, n_x)`` into an object and smooth fixed coil maps.

    Maps: ``img_c / rss`` with the phase of a smoothed coil sum removed, on the object (``rss > 0.1 max``),
    extended smoothly beyond it by normalised Gaussian convolution (width ``smooth_fraction`` of the
    matrix); object: the SENSE-1 combination ``sum conj(c) img / sum |c|^2``.
    """
    img = np.asarray(images, dtype=np.complex128)
    n_y, n_x = img.shape[-2:]
    rss = np.sqrt((np.abs(img) ** 2).sum(0))
    mask = rss > 0.1 * rss.max()
    fy = np.fft.fftfreq(n_y)[:, None]
    fx = np.fft.fftfreq(n_x)[None, :]
    sig = smooth_fraction * np.array([n_y, n_x])
    gauss = np.exp(-2 * np.pi**2 * ((fy * sig[0]) ** 2 + (fx * sig[1]) ** 2))

    def smooth(a: np.ndarray) -> np.ndarray:
        return np.fft.ifft2(np.fft.fft2(a, axes=(-2, -1)) * gauss, axes=(-2, -1))

    phase = np.exp(1j * np.angle(smooth(img.sum(0) * mask)))
    raw_maps = np.where(mask, img / np.maximum(rss, 1e-30) * phase.conj(), 0)
    den = np.abs(smooth(mask.astype(np.float64)))
    maps = smooth(raw_maps) / np.maximum(den, 1e-3)
    maps = maps / np.sqrt((np.abs(maps) ** 2).sum(0)).max()
    obj = (maps.conj() * img).sum(0) / np.maximum((np.abs(maps) ** 2).sum(0), 1e-6)
    obj = np.where(den > 0.02, obj, 0)
    return obj.astype(np.complex64), maps.astype(np.complex64)


def run_twix_demo(
    twix_path: Path,
    out_dir: Path,
    n_repetitions: int = 12,
    pad_fov: float = 1.5,
    seed: int = 0,
    params: GadgetParams | None = None,
    progress: bool | None = None,
) -> StreamDemoResult:
    """The streaming demo on the real Siemens phantom: known simulated motion, R = 2 over its real coils.

    The twix coil images are split into an object and smooth fixed coil maps
    (:func:`coil_maps_from_images`) after zero-padding the FOV by ``pad_fov`` (the phantom fills its FOV;
    ``docs/data.md``); the object is then moved, multiplied by the fixed maps, sampled with R = 2 and a
    24-line calibration block and written as ISMRMRD (no noise added: the data carry their own).
    """
    from kmotion.io import load_twix

    base = load_twix(twix_path).padded(pad_fov)
    obj, maps = coil_maps_from_images(base.images[0])
    n_y, n_x = obj.shape
    cfg = RawConfig(
        matrix=(n_y, n_x),
        fov_mm=base.fov_mm,
        n_coils=maps.shape[0],
        n_slices=1,
        n_repetitions=n_repetitions,
        snr=None,
        seed=seed,
    )
    raw = simulate_raw_from_objects(obj[None], maps[None], cfg)
    still = simulate_raw_from_objects(
        obj[None], maps[None], replace(cfg, n_repetitions=1, motion=((0.0, 0.0, 0.0),))
    )
    title = f"kmotion streaming demo on {Path(twix_path).name} (simulated motion)"
    note = "same recon, the data's own noise"
    return _finish_stream_demo(raw, still, Path(out_dir), params, title, progress, note)
