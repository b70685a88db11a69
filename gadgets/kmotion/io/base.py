"""Base-image container, k-space matrix resizing and the file checks shared by the loaders.

All loaders return :class:`BaseImages`: complex coil images ``(n_images, n_coils, n_y, n_x)`` in the
project's axis order (row = y = phase encoding, column = x = readout), image domain, complex64, plus
the field of view ``(FOV_y, FOV_x)`` of exactly that grid.  Readout oversampling is always removed.
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from kmotion.physics.fft import fft2c, ifft2c
from kmotion.physics.validate import InputError

__all__ = ["BaseImages", "check_file", "looks_like_twix", "resize_matrix"]


@dataclass
class BaseImages:
    """Coil images loaded from raw data.

    Attributes
    ----------
    images
        ``(n_images, n_coils, n_y, n_x)`` complex64, image domain; y = phase encoding (rows),
        x = readout (columns), readout oversampling removed.
    fov_mm
        ``(FOV_y, FOV_x)`` in mm of the returned grid (phase encoding, readout).
    source
        Where the images came from (file path and loader).
    labels
        One label per image, e.g. ``"slice 0 rep 1"``.
    """

    images: np.ndarray
    fov_mm: tuple[float, float]
    source: str
    labels: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        imgs = np.asarray(self.images)
        if imgs.ndim != 4:
            raise InputError(
                f"{self.source}: images: expected shape (n_images, n_coils, n_y, n_x), got {imgs.shape}"
            )
        if not (np.iscomplexobj(imgs) or np.issubdtype(imgs.dtype, np.floating)):
            raise InputError(f"{self.source}: images: expected complex data, got dtype {imgs.dtype}")
        self.images = np.ascontiguousarray(imgs, dtype=np.complex64)
        fov = tuple(float(v) for v in self.fov_mm)
        if len(fov) != 2 or not all(math.isfinite(v) and v > 0 for v in fov):
            raise InputError(f"{self.source}: fov_mm: expected two positive values (FOV_y, FOV_x), got {fov}")
        self.fov_mm = (fov[0], fov[1])
        if not self.labels:
            self.labels = [f"image {i}" for i in range(imgs.shape[0])]
        if len(self.labels) != imgs.shape[0]:
            raise InputError(
                f"{self.source}: labels: expected {imgs.shape[0]} (one per image), got {len(self.labels)}"
            )

    @property
    def pixel_spacing_mm(self) -> tuple[float, float]:
        """Pixel spacing ``(dy, dx)`` in mm: ``FOV / matrix`` along phase encoding and readout."""
        n_y, n_x = self.images.shape[-2:]
        return (self.fov_mm[0] / n_y, self.fov_mm[1] / n_x)

    def as_tensor(self, device: torch.device | str | None = None) -> torch.Tensor:
        """The images as a complex64 torch tensor ``(n_images, n_coils, n_y, n_x)`` on ``device``."""
        return torch.from_numpy(self.images).to(device=device)

    def resized(self, new_shape: tuple[int, int]) -> BaseImages:
        """Copy with the matrix changed to ``new_shape`` by :func:`resize_matrix` (FOV unchanged)."""
        return BaseImages(resize_matrix(self.images, new_shape), self.fov_mm, self.source, list(self.labels))

    def padded(self, factor: float) -> BaseImages:
        """Copy zero-padded in the image domain so the FOV grows by ``factor`` (pixel size unchanged).

        Use it when the object fills the FOV: the study's rotation is periodic and assumes objects inside
        the inscribed circle.
        """
        if not factor >= 1.0:
            raise InputError(f"{self.source}: padded: factor must be >= 1, got {factor}")
        n_y, n_x = self.images.shape[-2:]
        new = (int(round(n_y * factor)), int(round(n_x * factor)))
        out = np.zeros((*self.images.shape[:-2], *new), dtype=np.complex64)
        oy, ox = new[0] // 2 - n_y // 2, new[1] // 2 - n_x // 2  # keep the centre pixel at n // 2
        out[..., oy : oy + n_y, ox : ox + n_x] = self.images
        dy, dx = self.pixel_spacing_mm
        return BaseImages(out, (new[0] * dy, new[1] * dx), self.source, list(self.labels))


def resize_matrix(images: np.ndarray, new_shape: tuple[int, int]) -> np.ndarray:
    """Change the matrix of images by centred cropping / zero padding of their k-space.

    The last two axes ``(n_y, n_x)`` are transformed with the project's centred orthonormal FFT,
    cropped or zero padded around index ``n // 2`` (odd sizes work) and transformed back.  The FOV is
    unchanged (the pixel spacing changes); the result is scaled by ``sqrt(n_new / n_old)`` so that image
    intensities are preserved (a constant image stays constant).

    Parameters
    ----------
    images
        Complex or real array ``(..., n_y, n_x)``.
    new_shape
        ``(n_y_new, n_x_new)``, positive.

    Returns
    -------
    np.ndarray
        complex64 array ``(..., n_y_new, n_x_new)``.
    """
    arr = np.asarray(images)
    if arr.ndim < 2:
        raise InputError(f"resize_matrix: images: expected at least 2 dimensions, got shape {arr.shape}")
    if len(new_shape) != 2 or any(int(n) < 1 for n in new_shape):
        raise InputError(f"resize_matrix: new_shape: expected two positive sizes, got {new_shape}")
    n_new = (int(new_shape[0]), int(new_shape[1]))
    n_old = arr.shape[-2:]
    if n_new == n_old:
        return arr.astype(np.complex64, copy=True)
    k = fft2c(torch.from_numpy(np.ascontiguousarray(arr, dtype=np.complex64)))
    out = torch.zeros((*arr.shape[:-2], *n_new), dtype=torch.complex64)
    src, dst = [], []
    for old, new in zip(n_old, n_new, strict=True):
        # new index j <-> old index j + (old // 2 - new // 2): centres (n // 2) coincide
        shift = old // 2 - new // 2
        lo = max(0, -shift)
        hi = min(new, old - shift)
        dst.append(slice(lo, hi))
        src.append(slice(lo + shift, hi + shift))
    out[..., dst[0], dst[1]] = k[..., src[0], src[1]]
    scale = math.sqrt((n_new[0] * n_new[1]) / (n_old[0] * n_old[1]))
    return (ifft2c(out) * scale).numpy().astype(np.complex64)


def looks_like_twix(path: str | Path) -> bool:
    """True if the file starts like a Siemens twix ``.dat`` (VB or multi-raid VD/VE)."""
    p = Path(path)
    try:
        size = p.stat().st_size
        with open(p, "rb") as f:
            head = f.read(32)
            if len(head) < 32:
                return False
            first, second = struct.unpack("<II", head[:8])
            if head[8:14] == b"Config":  # VB: header length, number of buffers, first buffer "Config"
                return True
            if first < 10000 and 1 <= second <= 64:  # VD/VE multi-raid header, first entry's offset
                (offset,) = struct.unpack("<Q", head[16:24])
                if 0 < offset < size:
                    f.seek(offset + 8)
                    return f.read(6) == b"Config"
    except OSError:
        return False
    return False


def check_file(path: str | Path) -> Path:
    """``path`` as a Path when it names an existing file, else :class:`InputError` naming it."""
    p = Path(path)
    if not p.is_file():
        raise InputError(f"{p}: file not found (expected an existing raw-data file)")
    return p
