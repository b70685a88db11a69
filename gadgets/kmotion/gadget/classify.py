"""Which acquisitions are imaging lines: :func:`classify` (the gadget's flag table, ``docs/gadget.md``,
"Acquisition flags and counters").

An acquisition is an *imaging line* unless it carries one of the flags of :data:`NON_IMAGING_FLAGS` (noise
measurement, navigator, phase correction, dummy scan, RT/HP feedback, phase stabilisation and its
reference), is a calibration-only line (``ACQ_IS_PARALLEL_CALIBRATION`` without
``ACQ_IS_PARALLEL_CALIBRATION_AND_IMAGING``; kept for the coil maps by
:class:`~kmotion.gadget.calibration.CalibrationStore`), or belongs to another encoding space than 0.  Every
other flag leaves a line an imaging line: ``ACQ_IS_SURFACECOILCORRECTIONSCAN_DATA`` (``siemens_to_ismrmrd``
sets it from the MDH's raw-data-correction bit on ordinary imaging lines), ``ACQ_IS_REVERSE`` (flipped in
:func:`~kmotion.gadget.assemble.assemble`), ``ACQ_IS_PARALLEL_CALIBRATION_AND_IMAGING``, the user flags,
the compression flags and the first/last flags (of which ``ACQ_LAST_IN_SLICE`` completes a group).
"""

from __future__ import annotations

import ismrmrd

__all__ = ["IMAGING", "NON_IMAGING_FLAGS", "classify", "is_calibration_only", "is_imaging"]

IMAGING = "imaging"
"""The class :func:`classify` gives an imaging line."""

NON_IMAGING_FLAGS: dict[int, str] = {
    ismrmrd.ACQ_IS_NOISE_MEASUREMENT: "noise measurement",
    ismrmrd.ACQ_IS_NAVIGATION_DATA: "navigator",
    ismrmrd.ACQ_IS_PHASECORR_DATA: "phase correction",
    ismrmrd.ACQ_IS_DUMMYSCAN_DATA: "dummy scan",
    ismrmrd.ACQ_IS_RTFEEDBACK_DATA: "real-time feedback",
    ismrmrd.ACQ_IS_HPFEEDBACK_DATA: "high-performance feedback",
    ismrmrd.ACQ_IS_PHASE_STABILIZATION: "phase stabilisation",
    ismrmrd.ACQ_IS_PHASE_STABILIZATION_REFERENCE: "phase stabilisation reference",
}
"""Flags that make an acquisition a non-imaging line (it passes through untouched), with their class name;
the same set as :data:`kmotion.io.ismrmrd_h5.SKIP_FLAGS`."""


def is_calibration_only(item: object) -> bool:
    """True for a calibration-only line: ``ACQ_IS_PARALLEL_CALIBRATION`` without ``..._AND_IMAGING``."""
    return (
        isinstance(item, ismrmrd.Acquisition)
        and item.is_flag_set(ismrmrd.ACQ_IS_PARALLEL_CALIBRATION)
        and not item.is_flag_set(ismrmrd.ACQ_IS_PARALLEL_CALIBRATION_AND_IMAGING)
    )


def classify(item: object) -> str:
    """What the gadget does with ``item``: :data:`IMAGING` or the kind of item it passes through.

    Returns ``"imaging"``; a name of :data:`NON_IMAGING_FLAGS` (the first such flag set);
    ``"parallel calibration"`` (calibration-only line, any encoding space); ``"encoding space N"`` (another
    encoding space's line); ``"not an acquisition"`` (waveforms and anything else).
    """
    if not isinstance(item, ismrmrd.Acquisition):
        return "not an acquisition"
    for flag, name in NON_IMAGING_FLAGS.items():
        if item.is_flag_set(flag):
            return name
    if is_calibration_only(item):
        return "parallel calibration"
    space = int(item.encoding_space_ref)
    if space != 0:
        return f"encoding space {space}"
    return IMAGING


def is_imaging(item: object) -> bool:
    """True for an ``ismrmrd.Acquisition`` that is an imaging line of encoding space 0 (:func:`classify`)."""
    return classify(item) == IMAGING
