"""Every file format of kmotion, readers and writers.

* Base-image loaders of users' raw data: ISMRMRD ``.h5`` (:mod:`~kmotion.io.ismrmrd_h5`, which also parses
  ISMRMRD headers for the gadget), fastMRI ``.h5`` (:mod:`~kmotion.io.fastmri`), Siemens twix ``.dat``
  (:mod:`~kmotion.io.twix`); :func:`load_base_images` (:mod:`~kmotion.io.registry`) picks one by content.
* ISMRMRD ``.h5`` streams: :mod:`~kmotion.io.ismrmrd_reader` (chunked reads of the items, images) and
  :mod:`~kmotion.io.ismrmrd_writer` (buffered writer, kmotion's true-motion records).
* kmotion's estimate tables (HDF5 dataset and CSV): :mod:`~kmotion.io.estimates`.
* MRD v1 / Gadgetron message framing (streams and sockets): :mod:`~kmotion.io.mrd_v1`.

Every loader returns :class:`BaseImages`: coil images ``(n_images, n_coils, n_y, n_x)`` complex64 in the
image domain (y = phase encoding, x = readout, readout oversampling removed) and ``fov_mm = (FOV_y,
FOV_x)`` of that grid.  :func:`load_base_images` picks the loader from the file's content.
"""

from kmotion.io.base import BaseImages, resize_matrix
from kmotion.io.fastmri import load_fastmri_h5
from kmotion.io.ismrmrd_h5 import load_ismrmrd_h5
from kmotion.io.registry import load_base_images
from kmotion.io.twix import load_twix

__all__ = [
    "BaseImages",
    "load_base_images",
    "load_fastmri_h5",
    "load_ismrmrd_h5",
    "load_twix",
    "resize_matrix",
]
