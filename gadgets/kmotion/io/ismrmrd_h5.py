"""Loader for fully sampled Cartesian ISMRMRD ``.h5`` raw data.

Returned grid (see :func:`load_ismrmrd_h5`)
-------------------------------------------
* y (rows, phase encoding): the header's ``encodedSpace.matrixSize.y`` lines, FOV_y =
  ``encodedSpace.fieldOfView_mm.y``; the line ``encodingLimits.kspace_encoding_step_1.center`` is put
  at row ``n_ky // 2`` (our centred convention).
* x (columns, readout): ``discard_pre`` / ``discard_post`` samples are dropped and each readout is put
  in a k-space row with its ``center_sample`` (0 = unset: ``number_of_samples // 2``) at index
  ``n_ro // 2``.  ``n_ro`` is ``encodedSpace.matrixSize.x`` times the smallest integer factor that
  holds every readout: readouts longer than the encoded matrix are taken as oversampled relative to
  the encoded grid (pixel spacing ``encodedFOV_x / encodedMatrix_x``) and the central
  ``encodedMatrix_x`` image columns are kept, so FOV_x = ``encodedSpace.fieldOfView_mm.x``.  If
  ``reconSpace.fieldOfView_mm.x`` is smaller than the encoded FOV_x (the ``siemens_to_ismrmrd`` /
  fastMRI convention, where the encoded space includes the 2x oversampling), the image is further
  cropped to the recon FOV_x, which is then FOV_x.  Shorter readouts (asymmetric echo) are zero filled.
* Phase oversampling, if any, is kept (no crop along y).
"""

from __future__ import annotations

import math
from pathlib import Path

import h5py
import ismrmrd
import numpy as np
import torch

from kmotion.io.base import BaseImages, check_file
from kmotion.io.ismrmrd_header import HeaderEncoding, encoding_of, read_header
from kmotion.physics.fft import ifft2c
from kmotion.physics.validate import InputError

__all__ = [
    "SKIP_FLAGS",
    "HeaderEncoding",
    "centred_length",
    "check_ismrmrd_file",
    "crop_readout",
    "load_ismrmrd_h5",
    "parse_encoding",
    "readout_grid",
]

SKIP_FLAGS = (
    ismrmrd.ACQ_IS_NOISE_MEASUREMENT,
    ismrmrd.ACQ_IS_NAVIGATION_DATA,
    ismrmrd.ACQ_IS_PHASECORR_DATA,
    ismrmrd.ACQ_IS_DUMMYSCAN_DATA,
    ismrmrd.ACQ_IS_RTFEEDBACK_DATA,
    ismrmrd.ACQ_IS_HPFEEDBACK_DATA,
    ismrmrd.ACQ_IS_PHASE_STABILIZATION,
    ismrmrd.ACQ_IS_PHASE_STABILIZATION_REFERENCE,
)
"""Flags that make an acquisition a non-imaging line (the loader skips it, the gadget passes it through).

``ACQ_IS_PARALLEL_CALIBRATION`` is handled apart: skipped only without
``ACQ_IS_PARALLEL_CALIBRATION_AND_IMAGING`` (calibration lines that are also imaging lines).  Every other
flag leaves an imaging line an imaging line, deliberately: ``ACQ_IS_SURFACECOILCORRECTIONSCAN_DATA``
(``siemens_to_ismrmrd`` sets it from the MDH's raw-data-correction bit on ordinary imaging lines),
``ACQ_IS_REVERSE``, the user and compression flags, the first/last flags.  The table of every flag is in
``docs/gadget.md`` ("Acquisition flags and counters")."""

# (name in labels, ismrmrd idx field) of the counters that separate images
_IMAGE_DIMS = (
    ("slice", "slice"),
    ("contrast", "contrast"),
    ("phase", "phase"),
    ("rep", "repetition"),
    ("set", "set"),
)


def check_ismrmrd_file(path: str | Path, dataset: str = "dataset") -> tuple[str, list[str], dict[str, int]]:
    """Check that ``path`` is an ISMRMRD HDF5 file with a ``dataset`` group holding an XML header.

    Returns the path as a string, the group's entries and the number of records of each of its datasets;
    raises :class:`InputError` naming the file and the missing part.
    """
    p = check_file(path)
    src = str(p)
    if not h5py.is_hdf5(p):
        raise InputError(f"{src}: expected an HDF5 (ISMRMRD .h5) file, got a file that is not HDF5")
    with h5py.File(p, "r") as f:
        if dataset not in f or not isinstance(f[dataset], h5py.Group):
            raise InputError(
                f"{src}: ISMRMRD dataset group '{dataset}': expected an HDF5 group, got top-level entries "
                f"{list(f.keys())}"
            )
        group = f[dataset]
        keys = list(group.keys())
        counts = {
            k: int(group[k].shape[0]) for k in keys if isinstance(group[k], h5py.Dataset) and group[k].shape
        }
    if "xml" not in keys:
        raise InputError(f"{src}: '{dataset}/xml': expected the ISMRMRD XML header, got entries {keys}")
    return src, keys, counts


def parse_encoding(xml: bytes | str, source: str) -> HeaderEncoding:
    """Parse the first encoding of an ISMRMRD XML header, leniently.

    The header is read by :func:`~kmotion.io.ismrmrd_header.read_header` (the strict schema parser, else
    the documented defaults for what older writers and other tools leave out).  Raises
    :class:`InputError` naming ``source`` if the header is not XML, cannot be read even with defaults, has
    no ``<encoding>`` or an encodedSpace without a positive matrix and FOV.
    """
    got = read_header(xml, source)
    if got.header is None:
        raise InputError(str(got.problem))
    return encoding_of(got.header, source)


def centred_length(n_kept: int, centre: int) -> int:
    """Smallest row length ``L`` with the centre sample at ``L // 2`` that holds all ``n_kept`` samples."""
    even = 2 * max(centre, n_kept - centre)
    odd = max(2 * centre + 1, 2 * (n_kept - centre) - 1)
    return min(even, odd)


def readout_grid(enc: HeaderEncoding, min_length: int) -> tuple[int, int, float]:
    """(k-space row length, returned n_x, returned FOV_x) for readouts needing ``min_length`` samples.

    The row length is the encoded matrix x times an integer oversampling factor; the pixel spacing of
    the transformed row is ``encodedFOV_x / encodedMatrix_x``.
    """
    enc_x = enc.encoded_matrix[0]
    n_ro = enc_x * max(1, math.ceil(min_length / enc_x))
    dx = enc.encoded_fov_mm[0] / enc_x
    n_x = enc_x
    recon_fov_x = enc.recon_fov_mm[0]
    if 0 < recon_fov_x < enc.encoded_fov_mm[0] * (1 - 1e-6):
        n_x = max(1, int(round(recon_fov_x / dx)))
    return n_ro, n_x, n_x * dx


def crop_readout(images: torch.Tensor, n_x: int) -> torch.Tensor:
    """Centred image-domain crop of the last axis to ``n_x`` (index ``n // 2`` stays the centre)."""
    n = images.shape[-1]
    start = n // 2 - n_x // 2
    return images[..., start : start + n_x]


def load_ismrmrd_h5(path: str | Path, dataset: str = "dataset") -> BaseImages:
    """Load a fully sampled 2-D Cartesian ISMRMRD ``.h5`` file as coil images.

    Non-imaging acquisitions (noise, navigator, phase correction, calibration-only, dummy, feedback,
    phase stabilisation) are skipped; acquisitions of other encoding spaces than 0 are ignored.  One
    image per (slice, contrast, phase, repetition, set); lines acquired more than once (averages) are
    averaged.  Every line in ``encodingLimits.kspace_encoding_step_1`` [minimum, maximum] must be
    acquired; lines outside that range stay zero (e.g. partial Fourier).  The grid returned is
    described in the module docstring.

    Parameters
    ----------
    path
        ISMRMRD HDF5 file (opened read-only).
    dataset
        Name of the ISMRMRD group in the file.

    Returns
    -------
    BaseImages
        ``images`` ``(n_images, n_coils, n_y, n_x)`` complex64 with ``fov_mm = (FOV_y, FOV_x)``.
    """
    src, group_keys, _ = check_ismrmrd_file(path, dataset)
    if "data" not in group_keys:
        raise InputError(f"{src}: '{dataset}/data': expected acquisitions, got entries {group_keys}")

    with ismrmrd.Dataset(src, dataset, create_if_needed=False, mode="r") as ds:
        enc = parse_encoding(ds.read_xml_header(), f"{src}: '{dataset}/xml'")
        if enc.trajectory.lower() != "cartesian":
            raise InputError(f"{src}: encoding trajectory: expected 'cartesian', got '{enc.trajectory}'")
        if enc.encoded_matrix[2] > 1:
            raise InputError(
                f"{src}: encodedSpace matrixSize.z: expected 1 (2-D imaging), got {enc.encoded_matrix[2]}"
            )
        # (key, ky, data (n_ch, n_kept), centre sample within the kept samples, centred row length needed)
        lines = []
        for i in range(ds.number_of_acquisitions()):
            acq = ds.read_acquisition(i)
            if any(acq.is_flag_set(flag) for flag in SKIP_FLAGS):
                continue
            if acq.is_flag_set(ismrmrd.ACQ_IS_PARALLEL_CALIBRATION) and not acq.is_flag_set(
                ismrmrd.ACQ_IS_PARALLEL_CALIBRATION_AND_IMAGING
            ):
                continue
            if acq.encoding_space_ref != 0:
                continue
            n_s = int(acq.number_of_samples)
            pre, post = int(acq.discard_pre), int(acq.discard_post)
            key = tuple(int(getattr(acq.idx, name)) for _, name in _IMAGE_DIMS)
            data = np.array(acq.data[:, pre : n_s - post], dtype=np.complex64)
            # center_sample 0 means "not set" (a Cartesian echo never peaks at the first sample)
            centre = (int(acq.center_sample) or n_s // 2) - pre
            if not 0 <= centre < data.shape[1]:
                raise InputError(
                    f"{src}: acquisition {i}: center_sample: expected within the {data.shape[1]} samples "
                    f"kept after discard_pre = {pre}, discard_post = {post}, got {acq.center_sample}"
                )
            lines.append(
                (key, int(acq.idx.kspace_encode_step_1), data, centre, centred_length(data.shape[1], centre))
            )
    if not lines:
        raise InputError(f"{src}: '{dataset}/data': expected imaging acquisitions, got none (all skipped)")
    n_coils = {ln[2].shape[0] for ln in lines}
    if len(n_coils) != 1:
        raise InputError(f"{src}: acquisitions: expected one channel count, got {sorted(n_coils)}")
    n_bad = sum(int((~np.isfinite(ln[2])).sum()) for ln in lines)
    if n_bad:
        raise InputError(f"{src}: acquisition data: expected finite samples, got {n_bad} NaN/Inf samples")

    n_ch = n_coils.pop()
    n_ky = enc.encoded_matrix[1]
    c_ky = enc.step1_limits[2] if enc.step1_limits is not None else n_ky // 2
    n_ro, n_x, fov_x = readout_grid(enc, max(ln[4] for ln in lines))
    keys = sorted({ln[0] for ln in lines})
    kspace = np.zeros((len(keys), n_ch, n_ky, n_ro), dtype=np.complex128)
    counts = np.zeros((len(keys), n_ky), dtype=np.int64)
    key_index = {k: i for i, k in enumerate(keys)}
    for key, ky, data, centre, _ in lines:
        row = ky - c_ky + n_ky // 2
        col = n_ro // 2 - centre
        if not 0 <= row < n_ky:
            raise InputError(
                f"{src}: kspace_encode_step_1 = {ky}: expected a line within the encoded matrix y = {n_ky} "
                f"around encodingLimits center {c_ky}, got row {row}"
            )
        if col < 0 or col + data.shape[1] > n_ro:
            raise InputError(
                f"{src}: center_sample = {centre}: expected the readout of {data.shape[1]} samples to fit a "
                f"centred row of {n_ro} samples, got columns {col}..{col + data.shape[1] - 1}"
            )
        kspace[key_index[key], :, row, col : col + data.shape[1]] += data
        counts[key_index[key], row] += 1

    if enc.step1_limits is not None:
        lo, hi = enc.step1_limits[0], enc.step1_limits[1]
    else:
        lo, hi = c_ky - n_ky // 2, c_ky - n_ky // 2 + n_ky - 1
    needed = np.arange(lo, hi + 1) - c_ky + n_ky // 2
    needed = needed[(needed >= 0) & (needed < n_ky)]
    for i, key in enumerate(keys):
        missing = int((counts[i, needed] == 0).sum())
        if missing:
            raise InputError(
                f"{src}: image {dict(zip([d for d, _ in _IMAGE_DIMS], key, strict=True))}: expected fully "
                f"sampled k-space (lines {lo}..{hi} of kspace_encoding_step_1), got {missing} missing lines"
            )
    kspace /= np.maximum(counts, 1)[:, None, :, None]

    images = crop_readout(ifft2c(torch.from_numpy(kspace.astype(np.complex64))), n_x)
    varying = [j for j in range(len(_IMAGE_DIMS)) if j == 0 or len({k[j] for k in keys}) > 1]
    labels = [" ".join(f"{_IMAGE_DIMS[j][0]} {k[j]}" for j in varying) for k in keys]
    return BaseImages(
        images=images.numpy(),
        fov_mm=(enc.encoded_fov_mm[1], fov_x),
        source=f"{src} (ISMRMRD '{dataset}')",
        labels=labels,
    )
