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
from pathlib import Path

import ismrmrd.xsd

from kmotion.estimation.network import NetworkEstimator
from kmotion.gadget.buffer import SliceBatch, SliceBuffer, SliceGeometry, batch_slices
from kmotion.gadget.calibration import CalibrationStore
from kmotion.gadget.correct import correct_slices, write_back
from kmotion.gadget.estimate import estimate_motion, prepare_crops
from kmotion.gadget.params import DEFAULT_MODEL, GadgetParams, resolve_device
from kmotion.gadget.reference import References, SliceWork, choose_reference
from kmotion.gadget.report import StreamSummary, blank_report

__all__ = ["MotionCorrector", "motion_correct"]

log = logging.getLogger("kmotion.gadget")


class MotionCorrector:
    """Streaming rigid motion estimation and correction (see the module docstring and ``docs/gadget.md``).

    Parameters
    ----------
    header
        The stream's ``ismrmrd.xsd`` header (first encoding, Cartesian).
    params
        Gadget parameters.

    Raises
    ------
    InputError
        For a header without a usable Cartesian encoding, a missing or corrupt model, or an unusable device.
    """

    def __init__(self, header: ismrmrd.xsd.ismrmrdHeader, params: GadgetParams | None = None) -> None:
        self.params = GadgetParams() if params is None else params
        self.header = header
        self.geometry = SliceGeometry.from_header(header)
        self.device = resolve_device(self.params.device)
        path = Path(self.params.model) if self.params.model else DEFAULT_MODEL
        self.estimator = NetworkEstimator.load(path, self.device)
        self.net_crop: tuple[int, int] = tuple(self.estimator.model.config.crop)  # type: ignore[assignment]
        self.net_acceleration = int(self.estimator.study.acceleration)
        self.calibration = CalibrationStore(self.geometry)
        self.references: References = {}

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
        """
        self.calibration = CalibrationStore(self.geometry)
        self.references = {}
        summary = StreamSummary()
        for out in batch_slices(items, self.header, self.params.batch_slices):
            if isinstance(out, SliceBatch):
                yield from summary.watch(self._flush(out.buffers))
                continue
            self.calibration.note(out)
            summary.note(out)
            yield out
        summary.end_of_stream()

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
            normal = w.report.corrected or w.report.reason in ("reference", "below min_correction")
            log.log(logging.INFO if normal else logging.WARNING, "%s", w.report.log_line())
            yield w.report
            yield from w.buffer.acquisitions
        log.debug("%d slice(s) in %.3f s", len(work), dt)

    def _process(self, work: list[SliceWork]) -> None:
        for w in work:
            choose_reference(w, self.references, self.params.reference_repetition)
            if w.report is None:
                prepare_crops(w, self.net_crop, self.net_acceleration)
        estimate_motion(
            [w for w in work if w.crops is not None],
            self.estimator,
            self.net_acceleration,
            self.params.min_correction,
        )
        corrected = [w for w in work if w.report is not None and w.report.corrected]
        correct_slices(corrected, self.params, self.calibration, self.device)


def motion_correct(
    items: Iterable[object], header: ismrmrd.xsd.ismrmrdHeader, params: GadgetParams | None = None
) -> Iterator[object]:
    """Convenience: ``MotionCorrector(header, params)(items)``."""
    return MotionCorrector(header, params)(items)
