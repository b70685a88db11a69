"""Pieces shared by the benchmark scripts of this folder (run as ``python benchmarks/NAME.py``, which puts
this folder on ``sys.path``)."""

from __future__ import annotations

import math
import platform

from kmotion.gadget import MotionCorrector
from kmotion.gadget.estimate import report_for
from kmotion.gadget.reference import SliceWork
from kmotion.io.ismrmrd_writer import TrueMotion

__all__ = ["cpu_name", "use_true_motion"]


def cpu_name() -> str:
    """The CPU's model name (``/proc/cpuinfo``), else what :mod:`platform` says."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def use_true_motion(mc: MotionCorrector, truth: dict[tuple[int, int], TrueMotion]) -> None:
    """Replace stage 4 of ``mc`` by the true motion of each (slice, repetition): significant, without
    uncertainty, so every moved slice is corrected with its truth (the correction alone, or the latency
    without the estimation)."""
    nan3 = (math.nan, math.nan, math.nan)

    def estimate_slices(work: list[SliceWork]) -> None:
        for w in work:
            if w.report is None and w.reference is not None:
                t = truth[(w.buffer.key.slice, w.buffer.key.repetition)]
                motion = (t.dx_px, t.dy_px, t.phi_deg)
                w.report = report_for(w, motion, nan3, math.inf, 3, mc.params, "oracle: true motion")

    mc.estimate_slices = estimate_slices  # type: ignore[method-assign]
