"""Loader for Siemens twix ``.dat`` raw data (2-D Cartesian, VB and VD/VE) via ``twixtools``.

Returned grid
-------------
* y (rows, phase encoding): ``sKSpace.lPhaseEncodingLines`` lines, FOV_y = ``asSlice[0].dPhaseFOV``;
  the mdh's k-space centre line (``CenterLin``) is put at row ``n_y // 2``.
* x (columns, readout): ``sKSpace.lBaseResolution`` columns, FOV_x = ``asSlice[0].dReadoutFOV``.  The
  readout is oversampled by ``Meas.flReadoutOSFactor`` (2 on Siemens systems); each readout is placed
  in a row of ``round(n_x * os)`` samples with its centre sample (``CenterCol``) at the row's centre,
  transformed, and the central ``n_x`` image columns are kept.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
import twixtools

from kmotion.io.base import BaseImages, check_file, looks_like_twix
from kmotion.io.ismrmrd_h5 import crop_readout
from kmotion.physics.fft import ifft2c
from kmotion.physics.validate import InputError

__all__ = ["load_twix"]

# (label name, mdb counter) of the counters that separate images
_IMAGE_DIMS = (("slice", "cSlc"), ("echo", "cEco"), ("phase", "cPhs"), ("rep", "cRep"), ("set", "cSet"))


def _get(tree: Any, keys: tuple[str | int, ...], src: str, expected: str) -> Any:
    node = tree
    for k in keys:
        try:
            node = node[k]
        except (KeyError, IndexError, TypeError) as e:
            path = ".".join(str(x) for x in keys)
            raise InputError(f"{src}: twix header {path}: expected {expected}, got no such field") from e
    return node


def load_twix(path: str | Path) -> BaseImages:
    """Load the last measurement of a Siemens twix ``.dat`` file as coil images.

    Only image scans (``mdb.is_image_scan()``: no noise adjust, phase correction, feedback, sync or
    pure PAT reference lines) are used.  One image per (slice, echo, phase, repetition, set); repeated
    lines (averages) are averaged.  3-D (partition-encoded) and EPI (reflected readout) data are refused.

    Parameters
    ----------
    path
        Siemens twix ``.dat`` file.

    Returns
    -------
    BaseImages
        ``images`` ``(n_images, n_coils, n_y, n_x)`` complex64, readout oversampling removed;
        grid and FOV as described in the module docstring.
    """
    p = check_file(path)
    src = str(p)
    if not looks_like_twix(p):
        raise InputError(
            f"{src}: expected a Siemens twix .dat file (VB, or VD/VE multi-raid header followed by a "
            "'Config' protocol buffer), got a file without that header"
        )
    try:
        scans = twixtools.read_twix(str(p), verbose=False)
    except Exception as e:  # twixtools raises assorted errors on truncated / corrupt files
        raise InputError(f"{src}: twixtools could not read the file as twix ({type(e).__name__}: {e})") from e
    if not scans:
        raise InputError(f"{src}: expected at least one measurement in the twix file, got none")
    meas = scans[-1]
    hdr = meas["hdr"]
    yaps = _get(hdr, ("MeasYaps",), src, "the MeasYaps protocol")
    n_x = int(_get(yaps, ("sKSpace", "lBaseResolution"), src, "the readout matrix"))
    n_y = int(_get(yaps, ("sKSpace", "lPhaseEncodingLines"), src, "the number of phase-encoding lines"))
    if int(yaps["sKSpace"].get("ucDimension", 2)) == 4:
        raise InputError(f"{src}: sKSpace.ucDimension: expected 2-D imaging (2), got 3-D (4)")
    slice0 = _get(yaps, ("sSliceArray", "asSlice", 0), src, "slice geometry")
    fov_x = float(_get(slice0, ("dReadoutFOV",), src, "the readout FOV in mm"))
    fov_y = float(_get(slice0, ("dPhaseFOV",), src, "the phase FOV in mm"))
    os_factor = float(hdr.get("Meas", {}).get("flReadoutOSFactor") or 2.0)
    n_ro = int(round(n_x * os_factor))

    mdbs = [m for m in meas["mdb"] if m.is_image_scan()]
    if not mdbs:
        raise InputError(f"{src}: expected image scans in the last measurement, got none")
    if any(m.cPar != 0 for m in mdbs):
        raise InputError(f"{src}: partition counter: expected 0 for 2-D imaging, got 3-D partitions")
    if any(m.is_flag_set("REFLECT") for m in mdbs):
        raise InputError(f"{src}: readouts: expected non-reflected (non-EPI) lines, got REFLECT lines")
    n_ch = {m.data.shape[0] for m in mdbs}
    if len(n_ch) != 1:
        raise InputError(f"{src}: channels: expected one channel count for all lines, got {sorted(n_ch)}")

    keys = sorted({tuple(int(getattr(m, c)) for _, c in _IMAGE_DIMS) for m in mdbs})
    key_index = {k: i for i, k in enumerate(keys)}
    kspace = np.zeros((len(keys), n_ch.pop(), n_y, n_ro), dtype=np.complex128)
    counts = np.zeros((len(keys), n_y), dtype=np.int64)
    for m in mdbs:
        i = key_index[tuple(int(getattr(m, c)) for _, c in _IMAGE_DIMS)]
        data = np.asarray(m.data)
        row = int(m.cLin) - int(m.mdh.CenterLin) + n_y // 2
        col = n_ro // 2 - int(m.mdh.CenterCol)
        if not 0 <= row < n_y:
            raise InputError(
                f"{src}: line {m.cLin} (centre line {m.mdh.CenterLin}): expected it within "
                f"lPhaseEncodingLines = {n_y} (phase oversampling is not supported), got row {row}"
            )
        if col < 0 or col + data.shape[1] > n_ro:
            raise InputError(
                f"{src}: readout of {data.shape[1]} samples (centre column {m.mdh.CenterCol}): expected it "
                f"within {n_ro} = lBaseResolution x readout oversampling {os_factor:g}"
            )
        kspace[i, :, row, col : col + data.shape[1]] += data
        counts[i, row] += 1
    kspace /= np.maximum(counts, 1)[:, None, :, None]
    n_bad = int((~np.isfinite(kspace)).sum())
    if n_bad:
        raise InputError(f"{src}: raw data: expected finite samples, got {n_bad} NaN/Inf samples")

    images = crop_readout(ifft2c(torch.from_numpy(kspace.astype(np.complex64))), n_x)
    varying = [j for j in range(len(_IMAGE_DIMS)) if j == 0 or len({k[j] for k in keys}) > 1]
    labels = [" ".join(f"{_IMAGE_DIMS[j][0]} {k[j]}" for j in varying) for k in keys]
    return BaseImages(images=images.numpy(), fov_mm=(fov_y, fov_x), source=f"{src} (twix)", labels=labels)
