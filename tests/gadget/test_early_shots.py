"""Echo trains estimated as they end (``kmotion.gadget.shots.EarlyShots``), before their slice completes."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from kmotion.gadget import GadgetParams, MotionCorrector, MotionReport
from kmotion.simulation.intra_scan import IntraScanConfig, simulate_intra_scan

CFG = IntraScanConfig(
    matrix=(96, 96),
    n_coils=6,
    ordering="interleaved",
    echo_train_length=12,
    reference_repetitions=1,
    pattern="steps",
    snr=None,
    seed=2,
)


def _run(early: bool) -> tuple[MotionCorrector, list[MotionReport], list[object]]:
    acq = simulate_intra_scan(CFG)
    mc = MotionCorrector(acq.header, GadgetParams(device="cpu", motion_model="shot"))
    if not early:
        mc_note = mc.__class__._tap

        def no_tap(self: MotionCorrector, items: object) -> object:
            self.early._applies = lambda: False  # type: ignore[method-assign]
            return mc_note(self, items)  # type: ignore[arg-type]

        mc._tap = no_tap.__get__(mc)  # type: ignore[method-assign]
    out = list(mc(acq.items))
    reps = [o for o in out if isinstance(o, MotionReport) and o.key.repetition == 1 and o.shot >= 0]
    return mc, sorted(reps, key=lambda r: r.shot), out


def test_trains_estimated_as_they_end_give_the_same_estimates(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="kmotion.gadget")
    mc, early, out = _run(early=True)
    n_shots = CFG.sampling().n_shots
    # every train but the last ends before its slice completes (the next train starts): estimated early
    assert mc.early.n_early == n_shots - 1
    assert sum("estimated as it ended" in r.getMessage() for r in caplog.records) == n_shots - 1
    _, late, _ = _run(early=False)
    assert [r.shot for r in early] == [r.shot for r in late] == list(range(n_shots))
    for a, b in zip(early, late, strict=True):  # the same fit, run earlier: the same poses
        np.testing.assert_allclose(
            [a.dx_px, a.dy_px, a.rot_deg], [b.dx_px, b.dy_px, b.rot_deg], rtol=0, atol=0.02
        )
        assert a.corrected == b.corrected
    acq = simulate_intra_scan(CFG)
    truth = {t.shot: t for t in acq.truth if t.repetition == 1}
    # noise-free, but coil maps from 24 calibration lines whose phase convention moves with the object, and a
    # 96^2 grid with 6 coils: a check of the early path only (accuracy at 256^2: docs/intra_scan.md)
    for r in early:
        t = truth[r.shot]
        np.testing.assert_allclose(
            [r.dx_px, r.dy_px, r.rot_deg], [t.dx_px, t.dy_px, t.phi_deg], rtol=0, atol=0.3
        )
