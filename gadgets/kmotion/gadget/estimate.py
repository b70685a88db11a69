"""Stage 4 of the streaming gadget: estimate the motion of each slice relative to its reference.

:func:`prepare_crops` takes the rows the estimator reads (:func:`crop_rows`) from the reference and the moved
slice; :func:`estimate_motion` runs the shipped estimator (network + data-consistency refinement,
``NetworkEstimator.estimate_data``) once per grid shape and turns its output into :class:`MotionReport`
objects in the data's pixels, mm and the patient frame, with the flags and the decision to correct.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from kmotion.estimation.network import NetworkEstimator
from kmotion.gadget.assemble import AssembledSlice
from kmotion.gadget.reference import SliceWork
from kmotion.gadget.report import MotionReport, blank_report
from kmotion.physics.validate import InputError

__all__ = ["crop_rows", "estimate_motion", "prepare_crops"]

_REFINE_ROWS = 128
"""Acquired rows about the centre given to the estimator when the data hold them (the network reads its own
64; the data-consistency refinement uses up to ``refine_crop`` rows of them)."""


def crop_rows(
    ref: AssembledSlice, mov: AssembledSlice, net_crop: tuple[int, int], r_net: int
) -> np.ndarray | str:
    """Grid rows of the network crop: ``s_y`` acquired rows ``n_ky//2 + parity + R_net * j``."""
    if ref.acceleration not in (1, r_net):
        return f"acceleration {ref.acceleration} not supported by the network (trained at {r_net})"
    parity = ref.parity if ref.acceleration == r_net else 0
    n_ky = ref.kspace.shape[1]
    # the network reads its s_y central rows; the refinement uses up to _REFINE_ROWS of them
    for s_y in range(max(net_crop[0], _REFINE_ROWS), net_crop[0] - 1, -8):
        j = np.arange(-(s_y // 2), s_y - s_y // 2)
        rows = n_ky // 2 + parity + r_net * j
        if rows[0] >= 0 and rows[-1] < n_ky and ref.mask[rows].all() and mov.mask[rows].all():
            return rows
    return (
        f"the network needs {net_crop[0]} acquired rows (every {r_net}nd) about the centre in the "
        f"reference and this slice; {n_ky} rows, acquired {int(mov.mask.sum())}"
    )


def prepare_crops(w: SliceWork, net_crop: tuple[int, int], r_net: int) -> None:
    """The estimator's input of a slice with a reference: ``w.crops`` (reference, moved), or ``w.report``
    with the reason why the slice cannot be estimated."""
    assert w.assembled is not None and w.reference is not None
    r = w.reference.slice
    rows = crop_rows(r, w.assembled, net_crop, r_net)
    if isinstance(rows, str):
        w.report = blank_report(w.buffer.key, r.key.repetition, rows)
        return
    w.crops = (torch.from_numpy(r.kspace[:, rows]), torch.from_numpy(w.assembled.kspace[:, rows]))


def estimate_motion(
    work: list[SliceWork], estimator: NetworkEstimator, r_net: int, min_correction: float
) -> None:
    """Run the estimator on every prepared slice (one call per grid shape) and fill the reports.

    ``r_net`` is the acceleration the network was trained at; ``min_correction`` as ``GadgetParams``.
    """
    groups: dict[tuple[object, ...], list[SliceWork]] = {}
    for w in work:
        assert w.crops is not None and w.assembled is not None
        groups.setdefault((tuple(w.crops[0].shape), w.assembled.fov_mm), []).append(w)
    for ws in groups.values():
        ref = torch.stack([w.crops[0] for w in ws if w.crops is not None])
        mov = torch.stack([w.crops[1] for w in ws if w.crops is not None])
        try:
            a0 = ws[0].assembled
            assert a0 is not None
            n_ky, n_kx = a0.kspace.shape[1:]
            est = estimator.estimate_data(ref, mov, (int(n_ky), int(n_kx)), a0.fov_mm, r_net)
        except (InputError, RuntimeError, ValueError) as exc:
            for w in ws:
                assert w.reference is not None
                w.report = blank_report(
                    w.buffer.key, w.reference.slice.key.repetition, f"not estimated: {exc}"
                )
            continue
        for i, w in enumerate(ws):
            assert w.assembled is not None and w.reference is not None
            a = w.assembled
            dx_px, dy_px, phi = (float(v) for v in est.motion[i])
            dx_mm, dy_mm = dx_px * a.pixel_spacing_mm[1], dy_px * a.pixel_spacing_mm[0]
            patient = tuple(dx_mm * r + dy_mm * p for r, p in zip(a.read_dir, a.phase_dir, strict=True))
            finite = all(math.isfinite(v) for v in (dx_px, dy_px, phi))
            edge = bool(est.at_range_edge[i])
            unreliable = getattr(est, "unreliable", None)  # refinement and network disagree (or edge)
            disagree = unreliable is not None and bool(unreliable[i]) and not edge
            flagged = edge or disagree or not finite
            why = "at the edge of the trained motion range" if edge else ""
            if disagree:
                why = "unreliable: network and refinement disagree by > 3 px/deg"
            rep = MotionReport(
                w.buffer.key,
                w.reference.slice.key.repetition,
                dx_px,
                dy_px,
                phi,
                dx_mm,
                dy_mm,
                patient,  # type: ignore[arg-type]
                flagged,
                True,
                why if finite else "",
            )
            mc = min_correction
            if not finite:
                rep.corrected, rep.reason = False, "estimate not finite"
            elif abs(dx_px) < mc and abs(dy_px) < mc and abs(phi) < mc:
                rep.corrected, rep.reason = False, "below min_correction"
            elif abs(phi) > 90:
                rep.corrected, rep.reason = False, f"rotation {phi:.1f} deg beyond +-90"
            w.report = rep
