"""The built-in example: simulate a batch of the study's training pairs and draw a few of them."""

from __future__ import annotations

import json
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from kmotion.io.base import BaseImages  # noqa: E402
from kmotion.physics.motion import apply_motion_image  # noqa: E402
from kmotion.simulation.phantoms import coil_maps_from_coefficients  # noqa: E402
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
