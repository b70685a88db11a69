"""Streaming gadget stages (``Iterable[In] -> Iterator[Out]``): buffer imaging lines, assemble slices,
estimate and correct motion (:class:`MotionCorrector`), reconstruct images (:func:`reconstruct_images`)."""

from kmotion.gadget.pipeline import GadgetParams, MotionCorrector, MotionReport, motion_correct
from kmotion.gadget.recon import reconstruct_images, reconstruct_slice
from kmotion.gadget.stages import (
    AssembledSlice,
    SliceBuffer,
    SliceGeometry,
    SliceKey,
    assemble,
    buffer_slices,
)

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
