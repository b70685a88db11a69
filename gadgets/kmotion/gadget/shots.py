"""The shot (echo-train) motion model: every echo train of a slice group gets its own rigid pose.

Used when ``GadgetParams.motion_model`` is ``shot`` (or ``auto`` picks it, :func:`use_shot_model`); see
``docs/intra_scan.md``.

* **Shot identity** (:func:`shot_identity`, the rule is logged): ``idx.segment`` when the slice group's lines
  carry more than one value; otherwise breaks in ``acquisition_time_stamp`` (steps longer than three times
  the median step and a quarter of the longest: the pause between trains, not a skipped calibration line);
  otherwise consecutive runs of ``echoTrainLength`` lines in arrival order (the header's encoding; wrong
  when calibration-only lines, which the slice does not hold, are read inside the trains); otherwise one
  train.  A row acquired twice belongs to its last arrival.
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
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import ismrmrd
import numpy as np
import torch

from kmotion.gadget.assemble import assemble, line_layout
from kmotion.gadget.buffer import SliceBuffer, SliceGeometry, SliceKey
from kmotion.gadget.classify import IMAGING, classify
from kmotion.gadget.decide import report_for
from kmotion.gadget.fit import ShotEstimate, fit_slices
from kmotion.gadget.params import GadgetParams
from kmotion.gadget.reference import Reference, SliceWork, low_resolution_reference
from kmotion.gadget.report import MotionReport, blank_report

__all__ = ["EarlyShots", "estimate_shots", "shot_identity", "use_shot_model"]

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
    steps = np.diff(stamps)
    med = float(np.median(steps)) if steps.size else 0.0
    breaks = (steps > _TIME_GAP * med) & (steps > 0.25 * steps.max()) if med > 0 else np.zeros(0, bool)
    if len(set(segments)) > 1:
        ids, rule = segments, "idx.segment"
    elif bool(breaks.any()):
        ids = np.concatenate([[0], np.cumsum(breaks)]).tolist()
        rule = "time stamps"
    elif etl is not None and 0 < etl < len(acqs):
        ids, rule = [i // etl for i in range(len(acqs))], f"echoTrainLength {etl} and arrival order"
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


def estimate_shots(
    work: list[SliceWork], params: GadgetParams, device: torch.device, early: EarlyShots | None = None
) -> None:
    """Per-shot estimates of slices on one grid with a reference model: ``w.shot_reports`` and the summary
    ``w.report`` (corrected when any shot is).  Trains already estimated as they ended (``early``) are not
    fitted again."""
    cached: list[dict[int, ShotEstimate]] = []
    rows: list[np.ndarray] = []
    for w in work:
        assert w.shot_rows is not None
        got = early.take(w.buffer.key, w.shot_rows) if early is not None else {}
        cached.append(got)
        r = w.shot_rows.copy()
        r[np.isin(r, list(got))] = -1
        rows.append(r)
    todo = [i for i, r in enumerate(rows) if (r >= 0).any()]
    fitted: list[list[ShotEstimate]] = [[] for _ in work]
    if todo:
        for i, ests in zip(
            todo, fit_slices([work[i] for i in todo], params, device, [rows[i] for i in todo]), strict=True
        ):
            fitted[i] = ests
    results = [fitted[i] + list(cached[i].values()) for i in range(len(work))]
    for w, ests in zip(work, results, strict=True):
        reports: list[MotionReport] = []
        for est in sorted(ests, key=lambda e: e.shot):
            rep = report_for(w, est.motion, est.std, est.chi2, 3, params, est.method, est.ambiguous)
            rep.shot = est.shot
            reports.append(rep)
        w.shot_reports = reports
        assert w.reference is not None and w.assembled is not None
        if low_resolution_reference(w):  # a calibration scan as the reference
            _isolated_shots(reports)
        n_corr = sum(r.corrected for r in reports)
        summary = blank_report(
            w.buffer.key,
            w.reference.slice.key.repetition,
            f"per-shot motion: {n_corr} of {len(reports)} shots corrected (shots by {w.shot_rule})",
        )
        summary.flagged, summary.corrected = any(r.flagged for r in reports), n_corr > 0
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


@dataclass
class _Train:
    """The open echo train of a slice group: its lines so far."""

    segment: int
    lines: list[ismrmrd.Acquisition] = field(default_factory=list)


class EarlyShots:
    """Estimates each echo train as soon as it ends, while its slice group is still being acquired.

    Runs when the shot model applies and a reference repetition of the slice group is complete (its model is
    built on first use).  An echo train ends when the next line of its slice group carries another
    ``idx.segment`` or, with constant segments, after ``echoTrainLength`` lines; trains are numbered in
    arrival order, as :func:`shot_identity` does.  At slice completion :func:`estimate_shots` takes the
    cached estimates (:meth:`take`) and fits only the trains left; the cache is dropped when its rows differ
    from the completed slice's shots.  Never raises into the stream (a failure is logged, the train is
    fitted at completion instead).
    """

    def __init__(
        self,
        params: GadgetParams,
        geometry: SliceGeometry,
        references: dict[tuple[int, int, int, int], Reference],
        model_for: Callable[[Reference, ismrmrd.Acquisition], object],
        device: torch.device,
        single_repetition: bool,
    ) -> None:
        self.params, self.geometry, self.references = params, geometry, references
        self.model_for, self.device, self.single_repetition = model_for, device, single_repetition
        self._open: dict[SliceKey, _Train] = {}
        self._count: dict[SliceKey, int] = {}
        self._cache: dict[SliceKey, dict[int, tuple[np.ndarray, ShotEstimate]]] = {}
        self.n_early = 0

    def _applies(self) -> bool:
        return self.params.motion_model == "shot" or (
            self.params.motion_model == "auto" and self.single_repetition
        )

    def note(self, item: object) -> None:
        """Observe one input item (before the buffer holds it)."""
        if not self._applies() or classify(item) != IMAGING:
            return
        assert isinstance(item, ismrmrd.Acquisition)
        i = item.idx
        key = SliceKey(int(i.slice), int(i.contrast), int(i.phase), int(i.repetition), int(i.set))
        ref = self.references.get((key.slice, key.contrast, key.phase, key.set))
        if ref is None or ref.slice.key.repetition == key.repetition:
            return
        seg = int(i.segment)
        train = self._open.get(key)
        etl = self.geometry.echo_train_length
        if train is not None and (seg != train.segment or (etl and len(train.lines) >= etl and seg == 0)):
            self._finish(key, train, ref)
            train = None
        if train is None:
            train = self._open[key] = _Train(seg)
        train.lines.append(item)

    def _finish(self, key: SliceKey, train: _Train, ref: Reference) -> None:
        index = self._count.get(key, 0)
        self._count[key] = index + 1
        try:
            t0 = time.perf_counter()
            buf = SliceBuffer(key, list(train.lines), self.geometry, False)
            a = assemble(buf, quiet=True)
            if isinstance(self.model_for(ref, train.lines[0]), str):
                return
            w = SliceWork(buf)
            w.assembled, w.reference = a, ref
            rows = np.where(a.mask, 0, -1)
            (est,) = fit_slices([w], self.params, self.device, [rows])[0]
            est.shot = index
            self._cache.setdefault(key, {})[index] = (a.mask.copy(), est)
            self.n_early += 1
            log.debug(
                "%s: echo train %d estimated as it ended (%.0f ms)",
                key.label(),
                index,
                1e3 * (time.perf_counter() - t0),
            )
        except Exception as exc:  # the train is fitted with its slice instead
            log.info(
                "%s: echo train %d not estimated early (%s: %s)", key.label(), index, type(exc).__name__, exc
            )

    def take(self, key: SliceKey, shot_rows: np.ndarray) -> dict[int, ShotEstimate]:
        """The cached estimates of ``key`` whose rows are those of the same shot in ``shot_rows``."""
        self._open.pop(key, None)
        self._count.pop(key, None)
        cached = self._cache.pop(key, {})
        return {s: est for s, (mask, est) in cached.items() if np.array_equal(mask, shot_rows == s)}
