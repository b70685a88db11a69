"""What the gadget says about each slice group: :class:`MotionReport` (yielded before the slice's lines)."""

from __future__ import annotations

import logging
import math
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import ismrmrd

from kmotion.gadget.buffer import SliceKey
from kmotion.gadget.classify import IMAGING, classify

__all__ = ["MotionReport", "StreamSummary", "blank_report"]

log = logging.getLogger("kmotion.gadget")


@dataclass
class MotionReport:
    """The estimate of one slice group relative to its reference repetition.

    ``dx_px``/``dy_px`` in pixels of the data's encoded grid (x = readout, y = phase encode), ``rot_deg`` in
    degrees (positive: from +x towards +y, see ``docs/conventions.md``), ``dx_mm``/``dy_mm`` in mm,
    ``patient_mm`` the translation ``dx_mm * read_dir + dy_mm * phase_dir`` in the patient frame.  NaN where
    nothing was estimated.

    Uncertainty and significance (``docs/gadget.md``, "Do no harm"): ``dx_std_px``/``dy_std_px``/
    ``rot_std_deg`` the standard errors of the estimate, ``chi2`` the likelihood-ratio statistic of "motion"
    against "no motion" (3 degrees of freedom), ``p_value`` its p-value under no motion; ``method`` says how
    the estimate was made (e.g. whether the network seeded the data-consistency fit).  NaN / empty when not
    estimated.
    """

    key: SliceKey
    reference_repetition: int
    dx_px: float
    dy_px: float
    rot_deg: float
    dx_mm: float
    dy_mm: float
    patient_mm: tuple[float, float, float]
    flagged: bool
    corrected: bool
    reason: str
    dx_std_px: float = math.nan
    dy_std_px: float = math.nan
    rot_std_deg: float = math.nan
    chi2: float = math.nan
    p_value: float = math.nan
    method: str = ""
    shot: int = -1
    """Echo train (shot) of a per-shot estimate; -1 for a whole slice group."""

    def as_dict(self) -> dict[str, object]:
        """JSON-able dict (NaN becomes None)."""

        def num(v: float) -> float | None:
            return float(v) if math.isfinite(v) else None

        return {
            "slice": int(self.key.slice),
            "contrast": int(self.key.contrast),
            "phase": int(self.key.phase),
            "repetition": int(self.key.repetition),
            "set": int(self.key.set),
            "reference_repetition": int(self.reference_repetition),
            "dx_px": num(self.dx_px),
            "dy_px": num(self.dy_px),
            "rot_deg": num(self.rot_deg),
            "dx_mm": num(self.dx_mm),
            "dy_mm": num(self.dy_mm),
            "patient_x_mm": num(self.patient_mm[0]),
            "patient_y_mm": num(self.patient_mm[1]),
            "patient_z_mm": num(self.patient_mm[2]),
            "dx_std_px": num(self.dx_std_px),
            "dy_std_px": num(self.dy_std_px),
            "rot_std_deg": num(self.rot_std_deg),
            "chi2": num(self.chi2),
            "p_value": num(self.p_value),
            "flagged": bool(self.flagged),
            "corrected": bool(self.corrected),
            "reason": self.reason,
            "method": self.method,
            "shot": int(self.shot),
        }

    def log_line(self) -> str:
        """One line: the key's counters (slice, contrast, phase, rep, set), px, mm, deg, patient mm, flags and
        the reason."""
        k = self.key
        p = self.patient_mm
        ref = f"ref rep {self.reference_repetition}" if self.reference_repetition >= 0 else "no reference"
        head = (
            f"slice {k.slice} contrast {k.contrast} phase {k.phase} rep {k.repetition} set {k.set} "
            f"{f'shot {self.shot} ' if self.shot >= 0 else ''}({ref}): "
        )
        if not any(math.isfinite(v) for v in (self.dx_px, self.dy_px, self.rot_deg)):
            line = f"{head}no estimate; flagged {self.flagged}, corrected {self.corrected}"
        else:
            line = (
                f"{head}dx {self.dx_px:+.2f} px ({self.dx_mm:+.2f} mm) "
                f"dy {self.dy_px:+.2f} px ({self.dy_mm:+.2f} mm) rot {self.rot_deg:+.2f} deg"
                f"{self._uncertainty()}; "
                f"patient ({p[0]:+.2f}, {p[1]:+.2f}, {p[2]:+.2f}) mm; flagged {self.flagged}, "
                f"corrected {self.corrected}"
            )
        return f"{line}; {self.reason}" if self.reason else line

    def _uncertainty(self) -> str:
        if not math.isfinite(self.dx_std_px):
            return ""
        return (
            f" (+- {self.dx_std_px:.3f} px, {self.dy_std_px:.3f} px, {self.rot_std_deg:.3f} deg; "
            f"chi2 {self.chi2:.1f}, p {self.p_value:.2g})"
        )


def blank_report(key: SliceKey, ref_rep: int, reason: str, zeros: bool = False) -> MotionReport:
    """A report without an estimate (NaN, or zeros for a reference), not corrected, with ``reason``."""
    v = 0.0 if zeros else math.nan
    return MotionReport(key, ref_rep, v, v, v, v, v, (v, v, v), False, False, reason)


def _shorten(text: str, width: int = 160) -> str:
    """``text`` cut at a word boundary to at most ``width`` characters (``...`` marks the cut)."""
    if len(text) <= width:
        return text
    cut = text[: width - 4].rsplit(" ", 1)[0]
    return f"{cut} ..."


@dataclass
class StreamSummary:
    """What left a stream: acquisitions by class (:func:`~kmotion.gadget.classify.classify`) and reports.

    :meth:`note` (or :meth:`watch`) every output item; at the end of the stream :meth:`end_of_stream` logs
    one WARNING when acquisitions other than noise measurements arrived but no slice group was estimated
    (everything passed through, or only references), naming what arrived and why nothing was estimated.
    """

    acquisitions: Counter[str] = field(default_factory=Counter)
    reasons: Counter[str] = field(default_factory=Counter)
    n_estimated: int = 0

    def note(self, item: object) -> None:
        """Count one output item."""
        if isinstance(item, ismrmrd.Acquisition):
            self.acquisitions[classify(item)] += 1
        elif isinstance(item, MotionReport):
            # a translation-only estimate (no coil maps) has no rotation (NaN) but was estimated
            estimated = item.corrected or (
                not item.reason.startswith("reference") and math.isfinite(item.dx_px + item.dy_px)
            )
            if estimated:
                self.n_estimated += 1
            else:
                self.reasons[item.reason or "no reason given"] += 1

    def watch(self, items: Iterable[object]) -> Iterator[object]:
        """``items`` unchanged, each noted."""
        for item in items:
            self.note(item)
            yield item

    def end_of_stream(self) -> str | None:
        """Log (and return) the WARNING when nothing was estimated (see the class docstring); else None."""
        n_other = sum(n for k, n in self.acquisitions.items() if k != "noise measurement")
        if self.n_estimated or not n_other:
            return None
        groups = sum(self.reasons.values())
        why = "; ".join(f"{n} x {_shorten(r)}" for r, n in self.reasons.most_common())
        passed = ", ".join(f"{n} {k}" for k, n in sorted(self.acquisitions.items()) if k != IMAGING)
        why = f" ({why})" if why else ""
        msg = (
            f"end of stream: no slice group was estimated: {self.acquisitions[IMAGING]} imaging lines in "
            f"{groups} slice group(s){why}; passed through untouched: {passed or 'nothing else'}. Every "
            "acquisition left unchanged."
        )
        log.warning("%s", msg)
        return msg
