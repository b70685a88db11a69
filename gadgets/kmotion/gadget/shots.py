"""The shot (echo-train) motion model: every echo train of a slice group gets its own rigid pose.

Used when ``GadgetParams.motion_model`` is ``shot`` (or ``auto`` picks it, :func:`use_shot_model`); see
``docs/intra_scan.md``.

* **Shot identity** (:func:`shot_identity`, the rule is logged): ``idx.segment`` when the slice group's lines
  carry more than one value; otherwise consecutive runs of ``echoTrainLength`` lines in arrival order (the
  header's encoding); otherwise breaks in ``acquisition_time_stamp`` longer than three times the median
  step; otherwise one train.  A row acquired twice belongs to its last arrival.
* **Estimation** against the reference's model (:func:`kmotion.gadget.fit.fit_slices` with the shot of
  each row): one pose, standard errors and likelihood-ratio statistic per shot; the do-no-harm rule
  (:func:`kmotion.gadget.decide.decide`) per shot.  A shot whose motion is not significant keeps pose 0.
* **Correction** (:func:`kmotion.gadget.correct.correct_shots`): one motion-aware SENSE reconstruction
  with every shot's pose (:func:`kmotion.physics.shot_sense.sense_reconstruct_shots`), re-sampled without
  motion on the acquired samples (``cartesian``), or each line's inverse ramp and rotated positions with its
  shot's pose (``trajectory``).
* **Reports**: one :class:`MotionReport` per shot (``shot`` >= 0) after the slice's summary (``shot`` -1).
"""

from __future__ import annotations

import logging
import math

import numpy as np
import torch

from kmotion.gadget.assemble import line_layout
from kmotion.gadget.buffer import SliceBuffer
from kmotion.gadget.decide import report_for
from kmotion.gadget.fit import fit_slices
from kmotion.gadget.params import GadgetParams
from kmotion.gadget.reference import SliceWork
from kmotion.gadget.report import MotionReport

__all__ = ["estimate_shots", "shot_identity", "use_shot_model"]

log = logging.getLogger("kmotion.gadget")

_TIME_GAP = 3.0
"""A break in the time stamps longer than this many median steps starts a new echo train."""


def shot_identity(buffer: SliceBuffer) -> tuple[np.ndarray, str]:
    """``(n_ky,)`` the shot of each grid row (-1: not acquired; shots numbered by first arrival) and the
    rule that gave it (module docstring)."""
    n_ro, n_x, lines = line_layout(buffer)
    acqs = [ln.acq for ln in lines]
    n_ky = buffer.geometry.encoding.encoded_matrix[1]
    segments = [int(a.idx.segment) for a in acqs]
    etl = buffer.geometry.echo_train_length
    stamps = np.array([int(a.acquisition_time_stamp) for a in acqs], dtype=np.int64)
    if len(set(segments)) > 1:
        ids, rule = segments, "idx.segment"
    elif etl is not None and 0 < etl < len(acqs):
        ids, rule = [i // etl for i in range(len(acqs))], f"echoTrainLength {etl} and arrival order"
    else:
        steps = np.diff(stamps)
        med = float(np.median(steps)) if steps.size else 0.0
        if med > 0 and bool((steps > _TIME_GAP * med).any()):
            ids = np.concatenate([[0], np.cumsum(steps > _TIME_GAP * med)]).tolist()
            rule = "time stamps"
        else:
            ids, rule = [0] * len(acqs), "one echo train"
    order: dict[int, int] = {}
    for i in ids:
        order.setdefault(int(i), len(order))
    out = np.full(n_ky, -1, dtype=np.int64)
    for ln, i in zip(lines, ids, strict=True):
        if 0 <= ln.row < n_ky:
            out[ln.row] = order[int(i)]
    return out, rule


def use_shot_model(params: GadgetParams, single_repetition: bool, n_shots: int) -> bool:
    """``shot`` for ``motion_model = shot``; for ``auto`` when the stream has one repetition (no reference
    repetition will come) and the slice group holds more than one echo train."""
    if params.motion_model == "shot":
        return True
    return params.motion_model == "auto" and single_repetition and n_shots > 1


def estimate_shots(work: list[SliceWork], params: GadgetParams, device: torch.device) -> None:
    """Per-shot estimates of slices on one grid with a reference model: ``w.shot_reports`` and the summary
    ``w.report`` (corrected when any shot is)."""
    rows = [w.shot_rows for w in work]
    assert all(r is not None for r in rows)
    results = fit_slices(work, params, device, [r for r in rows if r is not None])
    for w, ests in zip(work, results, strict=True):
        reports: list[MotionReport] = []
        for est in sorted(ests, key=lambda e: e.shot):
            rep = report_for(w, est.motion, est.std, est.chi2, 3, params, est.method, est.ambiguous)
            rep.shot = est.shot
            reports.append(rep)
        w.shot_reports = reports
        assert w.reference is not None and w.assembled is not None
        if w.reference.slice.key.repetition == w.assembled.key.repetition:  # a low-resolution reference
            _isolated_shots(reports)
        n_corr = sum(r.corrected for r in reports)
        assert w.reference is not None
        ref_rep = w.reference.slice.key.repetition
        summary = MotionReport(
            w.buffer.key, ref_rep, math.nan, math.nan, math.nan, math.nan, math.nan,
            (math.nan, math.nan, math.nan), any(r.flagged for r in reports), n_corr > 0,
            f"per-shot motion: {n_corr} of {len(reports)} shots corrected (shots by {w.shot_rule})",
        )
        summary.method = reports[0].method if reports else ""
        w.report = summary


def _isolated_shots(reports: list[MotionReport], k_sigma: float = 4.0, floor: float = 1.0) -> None:
    """Leave alone a corrected shot whose pose is far from those of its neighbours in time when these agree.

    With a low-resolution reference (a calibration scan) a shot that shares few rows with it can end in a
    wrong pose that still fits better than zero; real motion is piecewise smooth over echo trains, so a
    single shot far (``k_sigma`` standard errors and ``floor`` px/deg) from the shots before and after it,
    which agree with each other, is not corrected (the first and last shot are not judged).
    """
    poses = [(r.dx_px, r.dy_px, r.rot_deg) if r.corrected else (0.0, 0.0, 0.0) for r in reports]
    stds = [(r.dx_std_px, r.dy_std_px, r.rot_std_deg) for r in reports]
    for i, r in enumerate(reports):
        if not r.corrected or len(reports) < 3:
            continue
        if i == 0 or i == len(reports) - 1:
            continue  # a first or last shot has neighbours on one side only: a step there is plausible
        others = [i - 1, i + 1]
        a, b = (poses[j] for j in others)
        if any(abs(u - v) > floor for u, v in zip(a, b, strict=True)):
            continue  # the neighbours disagree: the motion is changing here
        med = [(u + v) / 2 for u, v in zip(a, b, strict=True)]
        far = [
            abs(p - m) > max(floor, k_sigma * (s if math.isfinite(s) else 0.0))
            for p, m, s in zip(poses[i], med, stds[i], strict=True)
        ]
        if any(far):
            r.corrected, r.flagged = False, True
            r.reason = (
                f"isolated: differs from its neighbouring shots {others[0]}, {others[1]} (which agree) by "
                f"more than {k_sigma:g} std and {floor:g} px/deg; not corrected"
            )
