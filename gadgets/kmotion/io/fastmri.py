"""Loader for fastMRI ``.h5`` raw data (knee / brain, single- and multi-coil).

Layout of a fastMRI file and how it maps onto ours
--------------------------------------------------
``kspace`` is ``[slices, coils, readout, phase-encode]`` (multi-coil) or ``[slices, readout,
phase-encode]`` (single-coil), complex64.  fastMRI reconstructs with the same centred orthonormal FFT
as we do (``fftshift(ifft2(ifftshift(k)))``, centre at index ``n // 2``), so the only change is the
axis order: readout is fastMRI's axis -2 and our kx (axis -1); phase encoding is fastMRI's axis -1 and
our ky (axis -2).  Since a transpose commutes with the 2-D centred FFT, we transpose k-space to
``(slices, coils, ky, kx)`` (adding a coil axis of 1 for single-coil files) and transform.

The readout is 2x oversampled (e.g. 640 samples for a 320 readout matrix).  Phase-encoding columns
outside the acquired lines are zero padded: fastMRI places line ``l`` of
``encodingLimits.kspace_encoding_step_1`` at column ``encodedSpace.matrixSize.y // 2 - center + l``, so
the centre line is at column ``n_ky // 2`` as in our convention.

Returned grid
-------------
* y: all ``encodedSpace.matrixSize.y`` phase-encoding columns of the file (the encoded matrix,
  including the zero-padded, non-acquired ones), FOV_y = ``encodedSpace.fieldOfView_mm.y``.
* x: the central half of the readout (image-domain crop, oversampling removed),
  FOV_x = ``n_x * encodedSpace.fieldOfView_mm.x / encodedSpace.matrixSize.x`` (the encoded space
  includes the oversampling, so this is half the encoded FOV_x = reconSpace FOV_x in fastMRI files).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import h5py
import numpy as np
import torch

from kmotion.io.base import BaseImages, check_file
from kmotion.io.ismrmrd_h5 import crop_readout, parse_encoding
from kmotion.physics.fft import ifft2c
from kmotion.physics.validate import InputError

__all__ = ["load_fastmri_h5"]


def load_fastmri_h5(path: str | Path, slices: Sequence[int] | None = None) -> BaseImages:
    """Load a fastMRI ``.h5`` file as coil images, one image per slice.

    Parameters
    ----------
    path
        fastMRI HDF5 file with datasets ``kspace`` and ``ismrmrd_header``.
    slices
        Slice indices to read (default: all); only these are read from disk.

    Returns
    -------
    BaseImages
        ``images`` ``(n_slices, n_coils, n_y, n_x)`` complex64 (``n_coils = 1`` for single-coil files),
        ``n_y`` = encoded phase-encoding matrix, ``n_x`` = half the readout samples; grid and FOV as
        described in the module docstring.
    """
    p = check_file(path)
    src = str(p)
    if not h5py.is_hdf5(p):
        raise InputError(f"{src}: expected an HDF5 (fastMRI .h5) file, got a file that is not HDF5")
    with h5py.File(p, "r") as f:
        if "kspace" not in f or not isinstance(f["kspace"], h5py.Dataset):
            raise InputError(f"{src}: 'kspace': expected a k-space dataset, got entries {list(f.keys())}")
        ds = f["kspace"]
        if ds.ndim not in (3, 4):
            raise InputError(
                f"{src}: 'kspace': expected [slices, coils, readout, phase-encode] or "
                f"[slices, readout, phase-encode], got shape {ds.shape}"
            )
        if not np.issubdtype(ds.dtype, np.complexfloating):
            raise InputError(f"{src}: 'kspace': expected complex data, got dtype {ds.dtype}")
        if "ismrmrd_header" not in f:
            raise InputError(
                f"{src}: 'ismrmrd_header': expected the ISMRMRD XML header dataset, "
                f"got entries {list(f.keys())}"
            )
        xml = f["ismrmrd_header"][()]
        chosen = list(range(ds.shape[0])) if slices is None else sorted({int(s) for s in slices})
        if not chosen or chosen[0] < 0 or chosen[-1] >= ds.shape[0]:
            raise InputError(
                f"{src}: slices: expected indices in 0..{ds.shape[0] - 1}, "
                f"got {None if slices is None else list(slices)}"
            )
        kspace = np.asarray(ds[chosen], dtype=np.complex64)
    if isinstance(xml, np.ndarray):
        xml = xml.reshape(-1)[0]
    if not isinstance(xml, bytes | str):
        raise InputError(f"{src}: 'ismrmrd_header': expected an XML string, got {type(xml).__name__}")
    enc = parse_encoding(xml, f"{src}: 'ismrmrd_header'")

    if kspace.ndim == 3:
        kspace = kspace[:, None]
    kspace = np.ascontiguousarray(kspace.transpose(0, 1, 3, 2))  # -> (slices, coils, ky = PE, kx = readout)
    _, _, n_ky, n_ro = kspace.shape
    if n_ky != enc.encoded_matrix[1]:
        raise InputError(
            f"{src}: 'kspace' phase-encoding axis: expected encodedSpace matrixSize.y = "
            f"{enc.encoded_matrix[1]} columns, got {n_ky}"
        )
    if enc.step1_limits is not None:
        lo, hi, centre = enc.step1_limits
        first, last = n_ky // 2 - centre + lo, n_ky // 2 - centre + hi
        if not (0 <= first <= last < n_ky):
            raise InputError(
                f"{src}: encodingLimits kspace_encoding_step_1 (min {lo}, max {hi}, center {centre}): "
                f"expected acquired lines within the {n_ky} phase-encoding columns, "
                f"got columns {first}..{last}"
            )
    n_bad = int((~np.isfinite(kspace.view(np.float32))).sum())
    if n_bad:
        raise InputError(f"{src}: 'kspace': expected finite values, got {n_bad} NaN/Inf values")

    n_x = n_ro // 2
    images = crop_readout(ifft2c(torch.from_numpy(kspace)), n_x)
    fov_x = n_x * enc.encoded_fov_mm[0] / enc.encoded_matrix[0]  # readout pixel spacing from the header
    return BaseImages(
        images=images.numpy(),
        fov_mm=(enc.encoded_fov_mm[1], fov_x),
        source=f"{src} (fastMRI)",
        labels=[f"slice {i}" for i in chosen],
    )
