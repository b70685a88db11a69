"""The streaming gadget: stages over ISMRMRD objects (``Iterable[In] -> Iterator[Out]``), in data-flow order.

:mod:`~kmotion.gadget.buffer` (echo trains -> slice groups), :mod:`~kmotion.gadget.assemble` (the centred
k-space grid), :mod:`~kmotion.gadget.reference` (with :mod:`~kmotion.gadget.calibration`),
:mod:`~kmotion.gadget.estimate`, :mod:`~kmotion.gadget.correct`, :mod:`~kmotion.gadget.report`; their
parameters in :mod:`~kmotion.gadget.params`; :mod:`~kmotion.gadget.pipeline` composes them into
:class:`MotionCorrector`; :func:`reconstruct_images` (:mod:`~kmotion.gadget.recon`) reconstructs images.
"""

from kmotion.gadget.assemble import AssembledSlice, assemble
from kmotion.gadget.buffer import SliceBuffer, SliceGeometry, SliceKey, buffer_slices
from kmotion.gadget.params import GadgetParams
from kmotion.gadget.pipeline import MotionCorrector, motion_correct
from kmotion.gadget.recon import reconstruct_images, reconstruct_slice
from kmotion.gadget.report import MotionReport

__all__ = [
    "AssembledSlice",
    "GadgetParams",
    "MotionCorrector",
    "MotionReport",
    "SliceBuffer",
    "SliceGeometry",
    "SliceKey",
    "assemble",
    "buffer_slices",
    "motion_correct",
    "reconstruct_images",
    "reconstruct_slice",
]
