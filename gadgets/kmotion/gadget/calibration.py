"""Calibration data and coil maps: :class:`CalibrationStore` keeps the calibration-only (ACS) lines,
:func:`coil_maps_for` estimates a reference slice's coil maps from them and from its own centre rows.

Calibration-only lines (``ACQ_IS_PARALLEL_CALIBRATION`` without ``..._AND_IMAGING``) of any encoding space
are kept: those of encoding space 0 (integrated or separate ACS lines of the imaging encoding) and those of
a separate reference scan in another encoding space (``encoding_space_ref = 1``, e.g. a FLASH reference
scan; the header then has two encodings).  Lines of another encoding space are used when that encoding's
geometry matches the imaging encoding (:func:`geometry_mismatch`: encoded matrix and FOV in x and y) and
their slice position and orientation match the slice's (:func:`line_mismatch`); otherwise the reason is
named in the slice's report (``translation only: ...``) and in the log.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

import ismrmrd
import numpy as np
import torch

from kmotion.gadget.assemble import AssembledSlice, assemble
from kmotion.gadget.buffer import SliceBuffer, SliceGeometry
from kmotion.gadget.classify import is_calibration_only
from kmotion.physics.sense import calibration_block, coil_maps_lowres, snr_limited_halfwidth
from kmotion.physics.validate import InputError

__all__ = [
    "MAX_CALIBRATION_ROWS",
    "MIN_CALIBRATION_ROWS",
    "POSITION_TOLERANCE_MM",
    "CalibrationStore",
    "coil_maps_for",
    "geometry_mismatch",
    "line_mismatch",
]

log = logging.getLogger("kmotion.gadget")

MIN_CALIBRATION_ROWS = 8
"""Fewest consecutive fully sampled centre rows from which coil maps are estimated."""

MAX_CALIBRATION_ROWS = 32
"""Most centre rows the coil maps are made from.  Maps from a fully sampled slice at full resolution would
carry the object's edges, phase and noise (the coil images divided by their RSS); those do not move with the
object, so every motion estimate against such maps is biased (a motion-free slice at R = 1 came out at
+-1 deg, corrected).  32 rows: the resolution of usual calibration scans.  Fewer where the outer calibration
rows hold more noise than signal (:func:`kmotion.physics.sense.snr_limited_halfwidth`)."""

POSITION_TOLERANCE_MM = 0.1
"""Largest difference of slice position [mm] (and of direction cosines, x 1e-2) between calibration lines and
the slice for the lines to count as the same slice."""

_Group = tuple[int, int, int, int, int]  # (encoding space, slice, contrast, phase, set)


def geometry_mismatch(cal: SliceGeometry, imaging: SliceGeometry) -> str:
    """Why the encoding of ``cal`` cannot be placed on the grid of ``imaging`` ("" when it can).

    Compared: ``encodedSpace`` matrix and field of view in x and y (relative tolerance 1e-3), and the
    readout crop (``reconSpace`` FOV x) that decides the assembled grid.
    """
    a, b = cal.encoding, imaging.encoding
    if a.encoded_matrix[:2] != b.encoded_matrix[:2]:
        return (
            f"encoded matrix {a.encoded_matrix[:2]} differs from the imaging encoding's "
            f"{b.encoded_matrix[:2]}"
        )
    if not np.allclose(a.encoded_fov_mm[:2], b.encoded_fov_mm[:2], rtol=1e-3, atol=0):
        return (
            f"encoded FOV {a.encoded_fov_mm[:2]} mm differs from the imaging encoding's "
            f"{b.encoded_fov_mm[:2]} mm"
        )
    if not np.isclose(a.recon_fov_mm[0], b.recon_fov_mm[0], rtol=1e-3, atol=0):
        return (
            f"recon FOV x {a.recon_fov_mm[0]} mm differs from the imaging encoding's {b.recon_fov_mm[0]} mm"
        )
    return ""


def line_mismatch(acq: ismrmrd.Acquisition, ref: AssembledSlice) -> str:
    """Why the line ``acq`` is not of the slice ``ref`` ("" when it is): position (within
    :data:`POSITION_TOLERANCE_MM`) and read/phase/slice directions (within 1e-3)."""
    if not np.allclose(np.asarray(acq.position), ref.position, rtol=0, atol=POSITION_TOLERANCE_MM):
        got = tuple(round(float(v), 2) for v in acq.position)
        return f"slice position {got} mm differs from the slice's {ref.position}"
    for name in ("read_dir", "phase_dir", "slice_dir"):
        if not np.allclose(np.asarray(getattr(acq, name)), getattr(ref, name), rtol=0, atol=1e-3):
            got = tuple(round(float(v), 3) for v in getattr(acq, name))
            return f"orientation {name} {got} differs from the slice's {getattr(ref, name)}"
    return ""


class CalibrationStore:
    """Calibration-only lines (``ACQ_IS_PARALLEL_CALIBRATION``) per (encoding space, slice, contrast, phase,
    set).  Only the lines of the first repetition seen for a group are kept.

    ``geometry`` is the imaging encoding's (encoding space 0); the geometry of further encoding spaces comes
    from its ``others``.
    """

    def __init__(self, geometry: SliceGeometry) -> None:
        self.geometry = geometry
        self._lines: dict[_Group, list[ismrmrd.Acquisition]] = {}
        self._rep: dict[_Group, int] = {}

    def note(self, item: object) -> bool:
        """Keep ``item`` if it is a calibration-only line (of any encoding space); True if it is one."""
        if not is_calibration_only(item):
            return False
        assert isinstance(item, ismrmrd.Acquisition)
        i = item.idx
        g = (int(item.encoding_space_ref), int(i.slice), int(i.contrast), int(i.phase), int(i.set))
        rep = self._rep.setdefault(g, int(i.repetition))
        if int(i.repetition) == rep:
            self._lines.setdefault(g, []).append(item)
        return True

    def _candidates(self, ref: AssembledSlice) -> Iterator[_Group]:
        """Groups whose lines may serve ``ref``, best first: its own (slice, contrast, phase, set), the same
        slice with another phase, contrast or set, then other encoding spaces (same order)."""
        k = ref.key
        own = (k.slice, k.contrast, k.phase, k.set)

        def rank(g: _Group) -> tuple[int, int, int, int]:
            return (g[0] != 0, g[1:] != own, g[2] != k.contrast, g[3] != k.phase)

        yield from sorted((g for g in self._lines if g[1] == k.slice), key=rank)

    def kspace_for(self, ref: AssembledSlice) -> tuple[np.ndarray, tuple[int, int]] | str:
        """The calibration k-space of a reference slice and its fully sampled centre block ``[lo, hi)``.

        Calibration lines of the reference's own group and repetition (encoding space 0) fill the rows the
        reference lacks.  Lines of another repetition (the object may have moved in between), of another
        phase/contrast/set of the slice, or of another encoding space are not mixed with the reference:
        they are used alone when they hold a block (coil sensitivities do not move), else the reference
        alone.  Returns a reason string when fewer than :data:`MIN_CALIBRATION_ROWS` centre rows are fully
        sampled; it names why calibration lines that were there were not used.
        """
        kspace = ref.kspace
        mask = ref.mask.copy()
        k = ref.key
        own = (0, k.slice, k.contrast, k.phase, k.set)
        unused: list[str] = []
        alone: list[tuple[np.ndarray, np.ndarray]] = []
        for g in self._candidates(ref):
            got = self._assemble(g, ref)
            if isinstance(got, str):
                unused.append(got)
                log.info("calibration lines of %s not used for %s: %s", _label(g), k.label(), got)
                continue
            if g == own and self._rep[g] == k.repetition:
                kspace = np.where(got.mask[None, :, None] & ~mask[None, :, None], got.kspace, kspace)
                mask = mask | got.mask
            else:
                alone.append((got.kspace, got.mask))
        rows = calibration_block(mask)
        if rows[1] - rows[0] >= MIN_CALIBRATION_ROWS:
            return kspace, rows
        for cal_k, cal_m in alone:
            rows = calibration_block(cal_m)
            if rows[1] - rows[0] >= MIN_CALIBRATION_ROWS:
                return cal_k, rows
        why = (
            f"no calibration data (need >= {MIN_CALIBRATION_ROWS} fully sampled centre rows in the "
            f"reference or ACS lines, got {calibration_block(mask)[1] - calibration_block(mask)[0]})"
        )
        return f"{why}; {'; '.join(unused)}" if unused else why

    def separate_scan(self, ref: AssembledSlice) -> AssembledSlice | str:
        """A separate calibration scan of ``ref``'s slice on its grid (calibration-only lines of another
        encoding space, or of encoding space 0 outside the slice's own group and repetition): a motion-free
        low-resolution reference for the per-shot model (``docs/intra_scan.md``), or why there is none."""
        k = ref.key
        own = (0, k.slice, k.contrast, k.phase, k.set)
        why: list[str] = []
        for g in self._candidates(ref):
            if g == own and self._rep[g] == k.repetition:
                continue  # ACS lines of the scan itself: acquired in its moving echo trains
            got = self._assemble(g, ref)
            if isinstance(got, str):
                why.append(got)
                continue
            rows = calibration_block(got.mask)
            if rows[1] - rows[0] >= MIN_CALIBRATION_ROWS:
                return got
            why.append(f"calibration lines of {_label(g)}: {rows[1] - rows[0]} centre rows")
        return "no separate calibration scan" + (f" ({'; '.join(why)})" if why else "")

    def _assemble(self, g: _Group, ref: AssembledSlice) -> AssembledSlice | str:
        """The lines of group ``g`` on the grid of ``ref``, or why they cannot be used for it."""
        lines = self._lines[g]
        where = f"calibration lines of {_label(g)}"
        geo = self.geometry.other(g[0])
        if isinstance(geo, str):
            return f"{where}: {geo}"
        if g[0] != 0:
            bad = geometry_mismatch(geo, self.geometry)
            if bad:
                return f"{where}: {bad}"
        bad = line_mismatch(lines[0], ref)
        if bad:
            return f"{where}: {bad}"
        try:
            cal = assemble(SliceBuffer(ref.key, list(lines), geo, True), quiet=True)
        except InputError as exc:
            return f"{where} unusable: {exc}"
        if cal.kspace.shape != ref.kspace.shape:
            return f"{where} on another grid {cal.kspace.shape} than the slice {ref.kspace.shape}"
        return cal


def _label(g: _Group) -> str:
    space, s, c, p, t = g
    return f"encoding space {space} slice {s} contrast {c} phase {p} set {t}"


def coil_maps_for(ref: AssembledSlice, store: CalibrationStore, device: torch.device) -> torch.Tensor | str:
    """Coil maps ``(n_coils, n_y, n_x)`` of a reference slice, or the reason why there are none."""
    got = store.kspace_for(ref)
    if isinstance(got, str):
        return got
    kspace, rows = got
    n_c = kspace.shape[0]
    if n_c < ref.acceleration:
        return f"ill-posed: {n_c} coils for acceleration {ref.acceleration}"
    centre = kspace.shape[1] // 2  # at most MAX_CALIBRATION_ROWS: coil maps are smooth, the object is not
    half = MAX_CALIBRATION_ROWS // 2
    rows = (max(rows[0], centre - half), min(rows[1], centre + half))
    aspect = ref.fov_mm[1] / ref.fov_mm[0]  # same k-extent in cycles/mm along x as the row block
    k = torch.from_numpy(kspace).to(device)
    h = snr_limited_halfwidth(k, rows, aspect, MIN_CALIBRATION_ROWS // 2)
    if h < min(centre - rows[0], rows[1] - 1 - centre):
        log.info(
            "slice %s: coil maps from the %d centre rows whose k-space holds more signal than noise "
            "(of %d calibration rows)",
            tuple(ref.key),
            2 * h + 1,
            rows[1] - rows[0],
        )
        rows = (centre - h, centre + h + 1)
    return coil_maps_lowres(k, rows, aspect=aspect)
