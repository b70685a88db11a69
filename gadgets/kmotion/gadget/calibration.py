"""Calibration data and coil maps: :class:`CalibrationStore` keeps the calibration-only (ACS) lines,
:func:`coil_maps_for` estimates a reference slice's coil maps from them and from its own centre rows.
"""

from __future__ import annotations

import logging

import ismrmrd
import numpy as np
import torch

from kmotion.gadget.assemble import AssembledSlice, assemble
from kmotion.gadget.buffer import SliceBuffer, SliceGeometry
from kmotion.physics.sense import calibration_block, coil_maps_lowres
from kmotion.physics.validate import InputError

__all__ = ["MIN_CALIBRATION_ROWS", "CalibrationStore", "coil_maps_for"]

log = logging.getLogger("kmotion.gadget")

MIN_CALIBRATION_ROWS = 8
"""Fewest consecutive fully sampled centre rows from which coil maps are estimated."""


def _is_calibration_only(item: object) -> bool:
    return (
        isinstance(item, ismrmrd.Acquisition)
        and item.is_flag_set(ismrmrd.ACQ_IS_PARALLEL_CALIBRATION)
        and not item.is_flag_set(ismrmrd.ACQ_IS_PARALLEL_CALIBRATION_AND_IMAGING)
        and int(item.encoding_space_ref) == 0
    )


class CalibrationStore:
    """Calibration-only lines (``ACQ_IS_PARALLEL_CALIBRATION``) per (slice, contrast, set).

    Only the lines of the first repetition seen for a group are kept.
    """

    def __init__(self, geometry: SliceGeometry) -> None:
        self.geometry = geometry
        self._lines: dict[tuple[int, int, int], list[ismrmrd.Acquisition]] = {}
        self._rep: dict[tuple[int, int, int], int] = {}

    def note(self, item: object) -> bool:
        """Keep ``item`` if it is a calibration-only line; True if it is one."""
        if not _is_calibration_only(item):
            return False
        assert isinstance(item, ismrmrd.Acquisition)
        i = item.idx
        g = (int(i.slice), int(i.contrast), int(i.set))
        rep = self._rep.setdefault(g, int(i.repetition))
        if int(i.repetition) == rep:
            self._lines.setdefault(g, []).append(item)
        return True

    def kspace_for(self, ref: AssembledSlice) -> tuple[np.ndarray, tuple[int, int]] | str:
        """The calibration k-space of a reference slice and its fully sampled centre block ``[lo, hi)``.

        Calibration lines of the reference's own repetition fill the rows the reference lacks.  Lines of
        another repetition (the object may have moved in between) are not mixed with the reference: they
        are used alone when they hold a block (coil sensitivities do not move), else the reference alone.
        Returns a reason string when fewer than :data:`MIN_CALIBRATION_ROWS` centre rows are fully sampled.
        """
        kspace = ref.kspace
        mask = ref.mask.copy()
        g = (ref.key.slice, ref.key.contrast, ref.key.set)
        lines = self._lines.get(g, [])
        if lines:
            try:
                cal = assemble(SliceBuffer(ref.key, list(lines), self.geometry, True), quiet=True)
                if cal.kspace.shape != kspace.shape:
                    log.info(
                        "calibration lines of %s on another grid %s than the slice %s: ignored",
                        tuple(ref.key),
                        cal.kspace.shape,
                        kspace.shape,
                    )
                elif self._rep[g] == ref.key.repetition:
                    kspace = np.where(cal.mask[None, :, None] & ~mask[None, :, None], cal.kspace, kspace)
                    mask = mask | cal.mask
                else:
                    lo, hi = calibration_block(cal.mask)
                    if hi - lo >= MIN_CALIBRATION_ROWS:
                        kspace, mask = cal.kspace, cal.mask
            except InputError as exc:
                log.info("calibration lines of %s unusable: %s", tuple(ref.key), exc)
        rows = calibration_block(mask)
        if rows[1] - rows[0] < MIN_CALIBRATION_ROWS:
            return (
                f"no calibration data (need >= {MIN_CALIBRATION_ROWS} fully sampled centre rows in the "
                f"reference or ACS lines, got {rows[1] - rows[0]})"
            )
        return kspace, rows


def coil_maps_for(ref: AssembledSlice, store: CalibrationStore, device: torch.device) -> torch.Tensor | str:
    """Coil maps ``(n_coils, n_y, n_x)`` of a reference slice, or the reason why there are none."""
    got = store.kspace_for(ref)
    if isinstance(got, str):
        return got
    kspace, rows = got
    n_c = kspace.shape[0]
    if n_c < ref.acceleration:
        return f"ill-posed: {n_c} coils for acceleration {ref.acceleration}"
    aspect = ref.fov_mm[1] / ref.fov_mm[0]  # same k-extent in cycles/mm along x as the row block
    return coil_maps_lowres(torch.from_numpy(kspace).to(device), rows, aspect=aspect)
