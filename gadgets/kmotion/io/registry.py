"""The content-sniffing loader dispatch: :func:`load_base_images` picks the loader of a raw-data file.

The loaders import :mod:`kmotion.io.base`; this module imports them (so ``base`` never imports a loader).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import h5py

from kmotion.io.base import BaseImages, check_file, looks_like_twix
from kmotion.io.fastmri import load_fastmri_h5
from kmotion.io.ismrmrd_h5 import load_ismrmrd_h5
from kmotion.io.twix import load_twix
from kmotion.physics.validate import InputError

__all__ = ["load_base_images"]


def load_base_images(path: str | Path, **kw: Any) -> BaseImages:
    """Load base images from raw data, choosing the loader from the file's content.

    * HDF5 with a ``kspace`` dataset -> :func:`kmotion.io.fastmri.load_fastmri_h5`;
    * HDF5 with an ISMRMRD dataset group (``kw["dataset"]``, default ``"dataset"``) ->
      :func:`kmotion.io.ismrmrd_h5.load_ismrmrd_h5`;
    * Siemens twix ``.dat`` -> :func:`kmotion.io.twix.load_twix`.

    Other keyword arguments are passed to the chosen loader.  Anything else raises
    :class:`~kmotion.physics.validate.InputError` naming the file and what was expected.
    """
    p = check_file(path)
    if h5py.is_hdf5(p):
        name = kw.pop("dataset", "dataset")
        with h5py.File(p, "r") as f:
            keys = list(f.keys())
            is_fastmri = "kspace" in f and isinstance(f["kspace"], h5py.Dataset)
            is_ismrmrd = name in f and isinstance(f[name], h5py.Group)
            candidates = [k for k in keys if isinstance(f[k], h5py.Group) and "xml" in f[k]]
        if is_fastmri:
            return load_fastmri_h5(p, **kw)
        if is_ismrmrd:
            return load_ismrmrd_h5(p, dataset=name, **kw)
        hint = f"; ISMRMRD-like groups found: {candidates} (pass dataset=...)" if candidates else ""
        raise InputError(
            f"{p}: HDF5 file of unknown layout: expected a 'kspace' dataset (fastMRI) or an ISMRMRD "
            f"group '{name}', got top-level entries {keys}{hint}"
        )
    if looks_like_twix(p):
        return load_twix(p, **kw)
    with open(p, "rb") as f:
        first = f.read(8)
    raise InputError(
        f"{p}: unrecognised file format: expected HDF5 (fastMRI with 'kspace', or ISMRMRD) or a Siemens "
        f"twix .dat file, got neither (first bytes {first!r})"
    )
