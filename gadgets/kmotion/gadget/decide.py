"""The do-no-harm rule of the estimation stage: whether an estimate corrects its slice (or shot).

``docs/gadget.md`` ("Do no harm"): an estimate ``(dx_px, dy_px, phi_deg)`` with its likelihood-ratio statistic
``chi2`` corrects only when it is finite, within the capture range (``max_translation_mm``,
``max_rotation_deg``), significant (``chi2`` above the chi-square quantile ``1 - false_alarm_rate``), not
ambiguous and above ``min_correction``; every other outcome names its reason.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from scipy.stats import chi2 as chi2_law

from kmotion.gadget.params import GadgetParams
from kmotion.gadget.reference import SliceWork
from kmotion.gadget.report import MotionReport

__all__ = ["Decision", "decide", "report_for"]


@dataclass
class Decision:
    """Whether a slice is corrected, the flag, the reason and the p-value of its test."""

    corrected: bool
    flagged: bool
    reason: str
    p_value: float


def decide(
    motion: tuple[float, float, float],
    chi2: float,
    dof: int,
    params: GadgetParams,
    pixel_spacing_mm: tuple[float, float],
    ambiguous: bool = False,
) -> Decision:
    """The do-no-harm rule of ``docs/gadget.md`` for one estimate ``(dx_px, dy_px, phi_deg)``."""
    dx, dy, phi = motion
    p = float(chi2_law.sf(chi2, dof)) if not math.isnan(chi2) else math.nan
    if not all(math.isfinite(v) for v in motion) or math.isnan(chi2):
        return Decision(False, True, "estimate not finite", p)
    threshold = float(chi2_law.isf(params.false_alarm_rate, dof))
    dx_mm, dy_mm = abs(dx) * pixel_spacing_mm[1], abs(dy) * pixel_spacing_mm[0]
    if max(dx_mm, dy_mm) > params.max_translation_mm or abs(phi) > params.max_rotation_deg:
        return Decision(
            False,
            True,
            f"beyond the capture range (+-{params.max_translation_mm:g} mm, "
            f"+-{params.max_rotation_deg:g} deg): not corrected",
            p,
        )
    if chi2 <= threshold:
        return Decision(
            False, False, f"no significant motion (chi2 {chi2:.1f} <= {threshold:.1f}, p {p:.2g})", p
        )
    if ambiguous:
        return Decision(False, True, "ambiguous: another pose explains the data as well; not corrected", p)
    mc = params.min_correction
    if abs(dx) < mc and abs(dy) < mc and abs(phi) < mc:
        return Decision(False, False, "below min_correction", p)
    return Decision(True, False, "", p)


def report_for(
    w: SliceWork,
    motion: tuple[float, float, float],
    std: tuple[float, float, float],
    chi2: float,
    dof: int,
    params: GadgetParams,
    method: str,
    ambiguous: bool = False,
) -> MotionReport:
    """The :class:`MotionReport` of an estimate ``(dx_px, dy_px, phi_deg)`` of ``w`` with its standard errors,
    test statistic (``dof`` degrees of freedom) and the decision of :func:`decide`."""
    assert w.assembled is not None and w.reference is not None
    a = w.assembled
    dx, dy, phi = motion
    dx_mm, dy_mm = dx * a.pixel_spacing_mm[1], dy * a.pixel_spacing_mm[0]
    patient = tuple(dx_mm * r + dy_mm * q for r, q in zip(a.read_dir, a.phase_dir, strict=True))
    d = decide(motion, chi2, dof, params, a.pixel_spacing_mm, ambiguous)
    reason = d.reason
    if a.notes:
        reason = f"{reason}; {a.notes}" if reason else a.notes
    return MotionReport(
        w.buffer.key,
        w.reference.slice.key.repetition,
        dx,
        dy,
        phi,
        dx_mm,
        dy_mm,
        patient,  # type: ignore[arg-type]
        d.flagged,
        d.corrected,
        reason,
        std[0],
        std[1],
        std[2],
        chi2,
        d.p_value,
        method,
    )
