"""Plot the Siemens twix GRE phantom as loaded by :func:`kmotion.io.load_twix`.

Writes ``docs/img/twix_phantom.png``: per-coil magnitude and phase, the root-sum-of-squares image and
the log k-space magnitude of the returned (readout-oversampling-free) grid.

Usage: ``.venv/bin/python docs/scripts/plot_twix_phantom.py [path/to/file.dat] [out.png]``
"""

from __future__ import annotations

import io
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from kmotion.io import load_twix  # noqa: E402
from kmotion.physics.fft import fft2c  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
DEFAULT_DAT = REPO / ".." / "shared" / "data" / "siemens_twix_gre_phantom.dat"
DEFAULT_PNG = REPO / "docs" / "img" / "twix_phantom.png"


def main(dat: Path = DEFAULT_DAT, png: Path = DEFAULT_PNG) -> None:
    """Load ``dat`` with :func:`load_twix` and save the overview figure to ``png``."""
    base = load_twix(dat)
    imgs = base.images[0]  # first image: (n_coils, n_y, n_x)
    n_coils, n_y, n_x = imgs.shape
    fov_y, fov_x = base.fov_mm
    dy, dx = base.pixel_spacing_mm
    # image extent in mm, pixel centres at (index - n // 2) * spacing; row 0 (top) = most negative y
    extent = (
        (-(n_x // 2) - 0.5) * dx,
        (n_x - n_x // 2 - 0.5) * dx,
        (n_y - n_y // 2 - 0.5) * dy,
        (-(n_y // 2) - 0.5) * dy,
    )
    k_extent = (-(n_x // 2) - 0.5, n_x - n_x // 2 - 0.5, n_y - n_y // 2 - 0.5, -(n_y // 2) - 0.5)
    rss = np.sqrt((np.abs(imgs) ** 2).sum(0))
    scale = float(np.percentile(rss, 99.5))
    kspace = fft2c(base.as_tensor()[0]).numpy()
    logk = np.log10(np.sqrt((np.abs(kspace) ** 2).sum(0)) + 1e-12)

    fig, axes = plt.subplots(2, n_coils + 1, figsize=(4.0 * (n_coils + 1), 7.6), layout="constrained")
    img_label = dict(xlabel="x = readout [mm]", ylabel="y = phase encoding [mm]")
    for c in range(n_coils):
        ax = axes[0, c]
        im = ax.imshow(np.abs(imgs[c]), cmap="gray", extent=extent, vmin=0, vmax=scale)
        ax.set(title=f"coil {c}: magnitude", **img_label)
        fig.colorbar(im, ax=ax, shrink=0.8)
        ax = axes[1, c]
        phase = np.where(rss > 0.25 * scale, np.angle(imgs[c]), np.nan)  # background noise masked
        im = ax.imshow(phase, cmap="twilight", extent=extent, vmin=-np.pi, vmax=np.pi)
        ax.set(title=f"coil {c}: phase [rad] (object only)", **img_label)
        fig.colorbar(im, ax=ax, shrink=0.8)
    ax = axes[0, n_coils]
    im = ax.imshow(rss, cmap="gray", extent=extent, vmin=0, vmax=scale)
    ax.set(title="root-sum-of-squares", **img_label)
    fig.colorbar(im, ax=ax, shrink=0.8)
    ax = axes[1, n_coils]
    vmax = float(logk.max())
    im = ax.imshow(logk, cmap="viridis", extent=k_extent, vmin=vmax - 4, vmax=vmax)
    ax.set(
        title="log10 |k| (RSS over coils)",
        xlabel=f"kx = readout [1/{fov_x:g} mm]",
        ylabel=f"ky = phase encoding [1/{fov_y:g} mm]",
    )
    fig.colorbar(im, ax=ax, shrink=0.8)
    fig.suptitle(
        f"{dat.name}: {n_coils} coils, matrix {n_y} x {n_x}, FOV {fov_y:g} x {fov_x:g} mm (y x x), "
        "readout oversampling removed\nrows = y (phase encoding), columns = x (readout)",
        fontsize=10,
    )
    png.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=80)
    plt.close(fig)
    # 256-colour palette PNG (octree quantiser keeps the colour maps smooth): ~1/4 of the RGBA size
    Image.open(buf).convert("RGB").quantize(256, method=Image.Quantize.FASTOCTREE).save(png, optimize=True)
    print(f"wrote {png} ({png.stat().st_size / 1024:.0f} KiB)")


if __name__ == "__main__":
    args = [Path(a) for a in sys.argv[1:3]]
    main(*args)
