"""The motion-correction pipeline: the stages of the gadget composed into one :class:`MotionCorrector`.

:class:`MotionCorrector` is one callable ``Iterable[object] -> Iterator[object]`` over ISMRMRD objects;
every way of running the gadget (``kmotion.frontends``: Gadgetron, replay, MRD stream, FIRE server) wraps
it.  The stages, in data-flow order (``docs/gadget.md``):

1. buffer (:mod:`~kmotion.gadget.buffer`): imaging lines -> one :class:`SliceBuffer` per slice group,
   gathered into batches; everything else passes through;
2. assemble (:mod:`~kmotion.gadget.assemble`): the lines on the centred k-space grid;
3. reference (:mod:`~kmotion.gadget.reference`): the reference of each (slice, contrast, phase, set);
4. estimate (:mod:`~kmotion.gadget.estimate`): the motion relative to the reference;
5. correct (:mod:`~kmotion.gadget.correct`): new data on the acquired lines (coil maps from
   :mod:`~kmotion.gadget.calibration`);
6. report (:mod:`~kmotion.gadget.report`): one :class:`MotionReport`, then the slice's acquisitions.

Output contract: every input item leaves exactly once (acquisitions corrected or untouched, with their
headers, waveforms and anything else untouched); for each imaging slice group one :class:`MotionReport` is
yielded immediately before that slice's acquisitions, which keep their arrival order.  Data problems never
raise: the slice passes through untouched with a reason in its report and a WARNING on ``kmotion.gadget``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TypeAlias

import ismrmrd.xsd
import torch

from kmotion.estimation.network import NetworkEstimator
from kmotion.gadget.buffer import SliceBatch, SliceBuffer, SliceGeometry, batch_slices
from kmotion.gadget.calibration import CalibrationStore
from kmotion.gadget.correct import correct_slices, write_back
from kmotion.gadget.estimate import estimate_motion, prepare_crops, reference_model
from kmotion.gadget.noise import NoiseStore
from kmotion.gadget.params import DEFAULT_MODEL, GadgetParams, resolve_device
from kmotion.gadget.reference import Reference, References, SliceWork, choose_reference
from kmotion.gadget.report import StreamSummary, blank_report
from kmotion.gadget.shots import EarlyShots, shot_identity, use_shot_model
from kmotion.io.ismrmrd_header import LenientHeader, read_header
from kmotion.physics.validate import InputError

__all__ = ["HeaderCheck", "HeaderLike", "MotionCorrector", "check_header", "motion_correct"]

log = logging.getLogger("kmotion.gadget")

_NORMAL = ("reference", "below min_correction", "no significant motion", "not correctable: 3D encoding")
"""Reasons of normal outcomes (logged at INFO; anything else not corrected is a WARNING).  A 3D scan's slabs
all pass through for the same reason, said once more in the end-of-stream WARNING."""


#: A stream's header as the front ends have it: parsed, read leniently, the XML text, or none.
HeaderLike: TypeAlias = ismrmrd.xsd.ismrmrdHeader | LenientHeader | str | bytes | None

PASS_THROUGH = "data passed through untouched (no motion estimation or correction)"
"""Start of the WARNING of a stream the gadget does not handle (followed by the reason)."""


@dataclass(frozen=True)
class HeaderCheck:
    """What the gadget can do with a stream's header (:func:`check_header`).

    ``geometry`` is None when the stream passes through untouched; ``problem`` then says why (an unreadable
    header, no encoding, a trajectory other than Cartesian).  ``filled`` lists the defaults of a header read
    leniently (``kmotion.io.ismrmrd_header``).
    """

    header: ismrmrd.xsd.ismrmrdHeader | None
    geometry: SliceGeometry | None
    filled: tuple[str, ...] = ()
    problem: str | None = None

    def warning(self) -> str | None:
        """The one WARNING of the stream about its header (None: nothing to say)."""
        if self.problem is not None:
            return f"{PASS_THROUGH}: {self.problem}"
        if self.filled:
            return f"ISMRMRD header read with defaults: {'; '.join(self.filled)}"
        return None


def check_header(header: HeaderLike, source: str = "ISMRMRD stream header") -> HeaderCheck:
    """Read ``header`` leniently and the gadget's geometry from it; never raises for its content.

    Parameters
    ----------
    header
        A parsed ``ismrmrd.xsd`` header, a :class:`~kmotion.io.ismrmrd_header.LenientHeader`, the XML text
        (read with :func:`~kmotion.io.ismrmrd_header.read_header`), or None (no header).
    source
        Named in the reasons.
    """
    if header is None:
        return HeaderCheck(None, None, (), f"{source}: no ISMRMRD header")
    if isinstance(header, LenientHeader):
        lenient = header
    elif isinstance(header, str | bytes):
        lenient = read_header(header, source)
    else:
        lenient = LenientHeader("", header)
    if lenient.header is None:
        return HeaderCheck(None, None, lenient.filled, lenient.problem or f"{source}: unreadable")
    try:
        geometry = SliceGeometry.from_header(lenient.header)
    except (InputError, AttributeError, TypeError, ValueError) as exc:  # a header object built by hand
        return HeaderCheck(lenient.header, None, lenient.filled, str(exc))
    return HeaderCheck(lenient.header, geometry, lenient.filled)


class MotionCorrector:
    """Streaming rigid motion estimation and correction (see the module docstring and ``docs/gadget.md``).

    Parameters
    ----------
    header
        The stream's header (:data:`HeaderLike`; read leniently, :func:`check_header`).  A header that
        cannot be used, or one of data the gadget does not handle (no encoding, a trajectory other than
        Cartesian), puts the corrector in pass-through: ``passthrough`` holds the reason, and each stream
        passes through untouched with one WARNING.
    params
        Gadget parameters.

    Raises
    ------
    InputError
        For a missing or corrupt model or an unusable device (never for the header).
    """

    def __init__(self, header: HeaderLike, params: GadgetParams | None = None) -> None:
        self.params = GadgetParams() if params is None else params
        self.check = check_header(header)
        self.passthrough: str | None = self.check.problem
        self.header = self.check.header
        self.geometry = self.check.geometry
        self.device = resolve_device(self.params.device)
        if self.params.threads > 0 and torch.get_num_threads() != self.params.threads:
            torch.set_num_threads(self.params.threads)
        path = Path(self.params.model) if self.params.model else DEFAULT_MODEL
        self.estimator = NetworkEstimator.load(path, self.device, refine=False)  # a seed of the fit
        self.net_crop: tuple[int, int] = tuple(self.estimator.model.config.crop)  # type: ignore[assignment]
        self.net_acceleration = int(self.estimator.study.acceleration)
        if self.geometry is not None:
            self.calibration = CalibrationStore(self.geometry)
        self.noise = NoiseStore()
        self.references: References = {}
        limit = _repetition_limit(self.header)
        self.single_repetition = limit == 0  # the header promises one repetition (False when unknown)
        self.several_repetitions = limit > 0
        self._rules_logged: set[str] = set()

    def __call__(self, items: Iterable[object]) -> Iterator[object]:
        """Run the pipeline over ``items`` (see the module docstring for the output contract).

        Batching: completed slices wait while the following input items each complete another slice (up to
        ``batch_slices``); any other item (a line that completes nothing, a pass-through item, the end of
        the stream) flushes them first, so no slice waits for more than the next input item.

        An exception raised by ``items`` itself (e.g. a broken connection) ends the stream: the slices held
        so far (incomplete ones included) are emitted first, then the exception is re-raised.

        Each call is one stream: references and calibration lines of an earlier call are forgotten (the
        estimator stays loaded), so one corrector can serve several streams in a row, not at once.

        At the end of a stream in which no slice group was estimated although acquisitions other than noise
        arrived, one WARNING says so (:class:`~kmotion.gadget.report.StreamSummary`).

        In pass-through (``passthrough`` set) every item is yielded unchanged, after one WARNING naming the
        reason; a header read with defaults gets one WARNING naming them.
        """
        warning = self.check.warning()
        if warning is not None:
            log.warning("%s", warning)
        if self.geometry is None or self.header is None:
            yield from items
            return
        self.calibration = CalibrationStore(self.geometry)
        self.noise = NoiseStore()
        self.references = {}
        self.early = EarlyShots(
            self.params,
            self.geometry,
            self.references,
            lambda ref, acq: reference_model(
                ref, self.calibration, self.noise, float(acq.sample_time_us), self.device
            ),
            self.device,
            self.single_repetition,
        )
        summary = StreamSummary()
        for out in batch_slices(self._tap(items), self.header, self.params.batch_slices):
            if isinstance(out, SliceBatch):
                yield from summary.watch(self._flush(out.buffers))
                continue
            self.calibration.note(out) or self.noise.note(out)
            summary.note(out)
            yield out
        summary.end_of_stream()

    def _tap(self, items: Iterable[object]) -> Iterator[object]:
        """``items`` unchanged; each imaging line is shown to the early per-train estimation first."""
        for item in items:
            try:
                self.early.note(item)
            except Exception as exc:  # never into the stream
                log.info("early echo-train estimation skipped: %s: %s", type(exc).__name__, exc)
            yield item

    def _flush(self, buffers: list[SliceBuffer]) -> Iterator[object]:
        """Reference, estimate and correct a batch, then yield each slice's report and acquisitions."""
        t0 = time.perf_counter()
        work = [SliceWork(b) for b in buffers]
        try:
            self._process(work)
        except Exception as exc:  # never raise out of the stream for a data problem
            log.warning("motion correction of %d slice(s) failed: %s: %s", len(work), type(exc).__name__, exc)
            for w in work:
                if w.report is None or w.report.corrected:
                    ref_rep = w.reference.slice.key.repetition if w.reference else -1
                    w.report = blank_report(w.buffer.key, ref_rep, f"failed: {type(exc).__name__}: {exc}")
                w.new_data = w.traj = None
        dt = time.perf_counter() - t0
        for w in work:
            assert w.report is not None
            write_back(w)
            normal = w.report.corrected or w.report.reason.startswith(_NORMAL)
            log.log(logging.INFO if normal else logging.WARNING, "%s", w.report.log_line())
            yield w.report
            for r in w.shot_reports or ():
                log.info("%s", r.log_line())
                yield r
            yield from w.buffer.acquisitions
        log.debug("%d slice(s) in %.3f s", len(work), dt)

    def _process(self, work: list[SliceWork]) -> None:
        for w in work:
            choose_reference(w, self.references, self.params.reference_repetition)
            own_reference = w.report is not None and w.report.reason == "reference"
            if w.report is not None and not own_reference:
                continue
            if own_reference and self.several_repetitions:
                continue  # the reference repetition of a scan with several: the reference of the others
            rows, rule = shot_identity(w.buffer)
            if not use_shot_model(self.params, self.single_repetition, int(rows.max()) + 1):
                if w.report is None:
                    prepare_crops(w, self.net_crop, self.net_acceleration)
                continue
            if own_reference:  # no reference repetition: a separate calibration scan, else none
                assert w.assembled is not None
                cal = self.calibration.separate_scan(w.assembled)
                if isinstance(cal, str):
                    assert w.report is not None
                    w.report.reason = (
                        f"reference; per-shot motion not estimated: {cal} and no reference repetition"
                    )
                    continue
                w.reference, w.report = Reference(cal), None
                rule += "; reference: the separate calibration scan"
            w.shot_rows, w.shot_rule = rows, rule
            if rule not in self._rules_logged:
                self._rules_logged.add(rule)
                log.info("shot motion model: echo trains identified by %s", rule)
        self.estimate_slices(work)
        corrected = [w for w in work if w.report is not None and w.report.corrected]
        correct_slices(corrected, self.params, self.calibration, self.device)

    def estimate_slices(self, work: list[SliceWork]) -> None:
        """Stage 4 for a batch: fill the report of every slice with a reference (tests may replace it)."""
        estimate_motion(
            work,
            self.estimator,
            self.net_acceleration,
            self.params,
            self.calibration,
            self.noise,
            self.device,
            getattr(self, "early", None),
        )


def _repetition_limit(header: ismrmrd.xsd.ismrmrdHeader | None) -> int:
    """The header's largest repetition index (``encodingLimits.repetition.maximum``), -1 when unknown."""
    try:
        lim = header.encoding[0].encodingLimits.repetition  # type: ignore[union-attr]
        return -1 if lim is None else int(lim.maximum)
    except (AttributeError, IndexError, TypeError, ValueError):
        return -1


def motion_correct(
    items: Iterable[object], header: HeaderLike, params: GadgetParams | None = None
) -> Iterator[object]:
    """Convenience: ``MotionCorrector(header, params)(items)``."""
    return MotionCorrector(header, params)(items)
