"""Simulated training pairs per second: the batched k-space simulation vs. the per-sample version.

Both count the base-image generation (one synthetic phantom per ``pairs_per_base`` = 16 pairs).

* fast: :func:`kmotion.simulation.sources.sample_pairs` (phantoms, spectrum once per base image,
  kernel interpolation at the crop's rotated k-space points);
* per-sample (CPU): per pair ``scipy.ndimage.rotate(order=3)`` of the complex base image, two full FFTs
  (reference and moved), the phase ramp, the row removal and the crop;
* full-FFT torch (CUDA, where present): the same straightforward steps batched on the GPU
  (band-limited rotation, full FFTs) — :func:`kmotion.simulation.study.simulate_image_domain`.

Also prints the fast path's relative error on the cropped samples against the image-domain version.

Run:  .venv/bin/python benchmarks/bench_simulation.py  [--device cpu|cuda|all]
"""

from __future__ import annotations

import argparse
import platform
import time

import numpy as np
import scipy.ndimage as ndi
import torch

from kmotion.physics.sampling import crop_undersampled
from kmotion.simulation.phantoms import make_phantoms
from kmotion.simulation.sources import PhantomSource, sample_pairs
from kmotion.simulation.study import StudyConfig, StudySimulator, draw_motion, simulate_image_domain


def np_fft2c(img: np.ndarray) -> np.ndarray:
    ax = (-2, -1)
    return np.fft.fftshift(np.fft.fft2(np.fft.ifftshift(img, axes=ax), axes=ax, norm="ortho"), axes=ax)


def per_sample_pairs(cfg: StudyConfig, n_pairs: int, seed: int) -> float:
    """Straightforward per-sample simulation; returns pairs per second."""
    g = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng(seed)
    n_y, n_x = cfg.matrix
    ky = (np.arange(n_y) - n_y // 2)[:, None] / n_y
    kx = (np.arange(n_x) - n_x // 2)[None, :] / n_x
    t0 = time.perf_counter()
    base = None
    for i in range(n_pairs):
        if i % cfg.pairs_per_base == 0:
            base = make_phantoms(1, cfg.matrix, cfg.fov_mm, generator=g)[0].numpy()
        assert base is not None
        dx, dy, phi = rng.uniform(-1, 1, 3) * np.array(cfg.motion_range)
        # scipy's positive angle turns the other way on our (y down) grid: -phi for our convention
        moved = ndi.rotate(base, -phi, reshape=False, order=3)
        ref_k = np_fft2c(base)
        mov_k = np_fft2c(moved) * np.exp(-2j * np.pi * (kx * dx + ky * dy))
        for k in (ref_k, mov_k):
            crop_undersampled(torch.from_numpy(k.astype(np.complex64)), cfg.crop, cfg.acceleration)
    return n_pairs / (time.perf_counter() - t0)


def fast_pairs(cfg: StudyConfig, n_pairs: int, batch: int, device: str, seed: int) -> float:
    sim = StudySimulator(cfg, device)
    src = PhantomSource(cfg, device=device)
    g = torch.Generator(device=device).manual_seed(seed)
    sample_pairs(sim, src, batch, g)  # warm-up
    _sync(device)
    t0 = time.perf_counter()
    done = 0
    while done < n_pairs:
        sample_pairs(sim, src, batch, g)
        done += batch
    _sync(device)
    return done / (time.perf_counter() - t0)


def image_domain_pairs(cfg: StudyConfig, n_pairs: int, batch: int, device: str, seed: int) -> float:
    g = torch.Generator(device=device).manual_seed(seed)
    n_base = max(1, batch // cfg.pairs_per_base)
    index = torch.arange(batch, device=device) // cfg.pairs_per_base
    _sync(device)
    t0 = time.perf_counter()
    done = 0
    while done < n_pairs:
        objects = make_phantoms(n_base, cfg.matrix, cfg.fov_mm, generator=g, device=device)[:, None]
        motion = draw_motion(batch, cfg.motion_range, g, device)
        simulate_image_domain(cfg, objects, motion, index)
        done += batch
    _sync(device)
    return done / (time.perf_counter() - t0)


def accuracy(cfg: StudyConfig, device: str) -> tuple[float, float]:
    """Max and median relative error of the fast crops vs. the image-domain version (noise-free)."""
    g = torch.Generator().manual_seed(7)
    acc_cfg = StudyConfig(**{**cfg.to_dict(), "standardise": False, "snr": None})
    objects = make_phantoms(4, cfg.matrix, cfg.fov_mm, generator=g)[:, None].to(device)
    motion = draw_motion(32, cfg.motion_range, g).to(device)
    index = torch.arange(32, device=device) % 4
    fast = StudySimulator(acc_cfg, device).simulate(objects, motion, index)
    _, mov = simulate_image_domain(acc_cfg, objects, motion, index)
    rel = (fast.moved - mov).flatten(1).norm(dim=1) / mov.flatten(1).norm(dim=1)
    return float(rel.max()), float(rel.median())


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="all", choices=["cpu", "cuda", "all"])
    p.add_argument("--matrix", type=int, default=448)
    p.add_argument("--crop", type=int, nargs=2, default=(64, 64), metavar=("S_Y", "S_X"))
    p.add_argument("--pairs", type=int, default=4096, help="pairs timed for the fast path on CPU")
    p.add_argument("--baseline-pairs", type=int, default=64, help="pairs timed for the per-sample version")
    p.add_argument("--batch", type=int, default=256)
    args = p.parse_args()
    cfg = StudyConfig(matrix=(args.matrix, args.matrix), crop=tuple(args.crop))
    print(
        f"kmotion simulation benchmark: matrix {cfg.matrix}, FOV {cfg.fov_mm} mm, crop {cfg.crop}, "
        f"R={cfg.acceleration}, {cfg.pairs_per_base} pairs per base image (generation counted)"
    )
    print(
        f"torch {torch.__version__}, {platform.processor() or platform.machine()}, "
        f"{torch.get_num_threads()} threads"
    )
    devices = ["cpu", "cuda"] if args.device == "all" else [args.device]
    for device in devices:
        if device == "cuda" and not torch.cuda.is_available():
            print("cuda: not available, skipped")
            continue
        err_max, err_med = accuracy(cfg, device)
        if device == "cpu":
            base = per_sample_pairs(cfg, args.baseline_pairs, seed=0)
            fast = fast_pairs(cfg, args.pairs, args.batch, device, seed=1)
            print(f"cpu  per-sample (scipy rotate order 3 + 2 full FFTs): {base:10.1f} pairs/s")
            print(f"cpu  fast k-space simulation:                         {fast:10.1f} pairs/s")
            print(f"cpu  ratio fast / per-sample:                         {fast / base:10.1f} x")
        else:
            name = torch.cuda.get_device_name()
            batch = 8192
            base = image_domain_pairs(cfg, 8 * 1024, 1024, device, seed=0)
            fast = fast_pairs(cfg, 64 * batch, batch, device, seed=1)
            print(f"cuda ({name}) full-FFT torch version:               {base:10.1f} pairs/s")
            print(f"cuda ({name}) fast k-space simulation:              {fast:10.1f} pairs/s")
            print(f"cuda ratio fast / full-FFT:                           {fast / base:10.1f} x")
        print(
            f"{device} fast vs image-domain relative error on the crops: max {err_max:.2e}, "
            f"median {err_med:.2e}"
        )


if __name__ == "__main__":
    main()
