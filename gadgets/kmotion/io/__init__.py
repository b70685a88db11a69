"""Loaders that turn users' raw data (ISMRMRD, fastMRI, Siemens twix) into base images.

Every loader returns :class:`BaseImages`: coil images ``(n_images, n_coils, n_y, n_x)`` complex64 in the
image domain (y = phase encoding, x = readout, readout oversampling removed) and ``fov_mm = (FOV_y,
FOV_x)`` of that grid.  :func:`load_base_images` picks the loader from the file's content.
"""

from kmotion.io.base import BaseImages, load_base_images, resize_matrix
from kmotion.io.fastmri import load_fastmri_h5
from kmotion.io.ismrmrd_h5 import load_ismrmrd_h5
from kmotion.io.twix import load_twix

__all__ = [
    "BaseImages",
    "load_base_images",
    "load_fastmri_h5",
    "load_ismrmrd_h5",
    "load_twix",
    "resize_matrix",
]
