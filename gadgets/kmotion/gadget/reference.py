"""Stage 3 of the streaming gadget: the reference of each (slice, contrast, phase, set), and the per-slice
record.

:class:`SliceWork` is what the stages know about one slice group of a batch as it passes through reference
-> estimate -> correct; :func:`choose_reference` assembles it and registers it to its reference, or makes it
the reference (the first complete, correctable repetition, or ``reference_repetition``).
"""

from __future__ import annotations

from dataclasses import dataclass

import ismrmrd
import numpy as np
import torch

from kmotion.gadget.assemble import AssembledSlice, assemble
from kmotion.gadget.buffer import SliceBuffer
from kmotion.gadget.report import MotionReport, blank_report
from kmotion.physics.validate import InputError

__all__ = ["Reference", "References", "SliceWork", "choose_reference", "low_resolution_reference"]


@dataclass
class Reference:
    """The reference slice of a (slice, contrast, phase, set), assembled, and its coil maps."""

    slice: AssembledSlice
    maps: torch.Tensor | str | None = None  # None: not computed yet; str: why there are none
    model: object | None = None  # its ReferenceModel (gadget/reference_model.py) or why none; on first use


References = dict[tuple[int, int, int, int], Reference]
"""The references of a stream by (slice, contrast, phase, set): each cardiac phase has its own."""


@dataclass
class SliceWork:
    """One slice group on its way through the stages (fields are filled stage by stage)."""

    buffer: SliceBuffer
    report: MotionReport | None = None
    assembled: AssembledSlice | None = None
    reference: Reference | None = None
    crops: tuple[torch.Tensor, torch.Tensor] | None = None
    seed: torch.Tensor | None = None  # the network's (dx_px, dy_px, phi_deg), a starting point of the fit
    network_note: str = ""  # why the network gave no seed
    shot_rows: np.ndarray | None = None  # (n_ky,) shot of each row: the shot motion model (gadget/shots.py)
    shot_rule: str = ""  # how the shots were identified
    shot_reports: list[MotionReport] | None = None  # one per shot, after ``report`` (the summary)
    new_data: list[tuple[ismrmrd.Acquisition, np.ndarray]] | None = None
    traj: list[np.ndarray] | None = None


def low_resolution_reference(w: SliceWork) -> bool:
    """Whether ``w``'s reference is its own separate calibration scan (the shot model without a reference
    repetition, ``docs/intra_scan.md``) rather than another repetition."""
    assert w.reference is not None and w.assembled is not None
    return w.reference.slice.key.repetition == w.assembled.key.repetition


def choose_reference(w: SliceWork, references: References, want: int | None) -> None:
    """Assemble ``w`` and pick, store or check its reference.

    Sets ``w.report`` when the slice goes no further (not assembled, not correctable, the reference itself,
    no reference yet, a grid other than the reference's); otherwise sets ``w.reference`` and leaves
    ``w.report`` None.  ``want`` is ``GadgetParams.reference_repetition``.
    """
    key = w.buffer.key
    group = (key.slice, key.contrast, key.phase, key.set)
    try:
        a = assemble(w.buffer)
    except InputError as exc:
        w.report = blank_report(key, -1, f"not assembled: {exc}")
        return
    w.assembled = a
    ref = references.get(group)
    if not a.correctable:
        w.report = blank_report(key, ref.slice.key.repetition if ref else -1, f"not correctable: {a.reason}")
        return
    if ref is None:
        if want is None or want == key.repetition:
            references[group] = Reference(a)
            w.report = blank_report(key, key.repetition, "reference", zeros=True)
        else:
            w.report = blank_report(key, want, f"no reference yet (waiting for repetition {want})")
        return
    w.reference = ref
    r = ref.slice
    if a.kspace.shape != r.kspace.shape:
        w.report = blank_report(
            key, r.key.repetition, f"grid {a.kspace.shape} differs from the reference's {r.kspace.shape}"
        )
