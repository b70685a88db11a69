"""Streaming gadget stages (``Iterable[In] -> Iterator[Out]``): buffer imaging lines, assemble slices."""

from kmotion.gadget.stages import (
    AssembledSlice,
    SliceBuffer,
    SliceGeometry,
    SliceKey,
    assemble,
    buffer_slices,
)

__all__ = ["AssembledSlice", "SliceBuffer", "SliceGeometry", "SliceKey", "assemble", "buffer_slices"]
