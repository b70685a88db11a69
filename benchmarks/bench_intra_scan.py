"""Motion within a scan (issue 10): per-shot accuracy, image error and speed of the gadget's shot model.

Data (held out: phantom seeds from 6,000,000 on, used nowhere else; the per-shot network trains below
1,000,000 and ``bench_shot_seeds.py`` uses 5,000,000+): one head-phantom slice of
:func:`kmotion.simulation.intra_scan.simulate_intra_scan`, 256 x 256, FOV 220 mm, 2x readout oversampling,
8 fixed coils, echo-train length 16, R = 2 plus 24 calibration lines, SNR 30, motion within +-10 mm /
+-10 deg; orderings interleaved, checkered, linear, centric; patterns steps, drift, jerk, random.  Two
references:

* ``repetition``: a motion-free repetition before the moved scan (ACS rows in the echo trains);
* ``calibration``: no reference repetition; the 24 ACS rows are a separate motion-free calibration scan in
  encoding space 1 (a low-resolution reference; the imaging then has no ACS rows).

Every acquisition goes through the gadget (:class:`kmotion.gadget.MotionCorrector`,
``GadgetParams(motion_model="shot", device=...)``), in memory (no files).  Per setting and phantom:

* per-shot absolute error of the estimates ``(dx, dy)`` [mm] and ``phi`` [deg] against the truth, over all
  shots (the estimate of a shot left alone is its report's value, which is not applied); the largest error
  among the **corrected** shots; shots corrected / left alone; the largest true motion left alone;
* image NRMSE (:func:`kmotion.demo.nrmse`, magnitude, whole image) against the same SENSE reconstruction
  (:func:`kmotion.gadget.reconstruct_images`) of the same simulation without motion and noise: uncorrected,
  corrected, and the **oracle** — the same correction (:func:`kmotion.gadget.correct.correct_shots`) with the
  true pose of every shot (``MotionCorrector.estimate_slices`` replaced by the truth, significant, applied);
  the ratio corrected / oracle;
* the time spent on the moved slice: the echo trains fitted as they ended (``EarlyShots``, during the stream,
  when a reference repetition is complete) plus the work at slice completion (``MotionCorrector._process``:
  assembling, the reference's SENSE model on first use, the trains left, the correction), and the latter
  alone (the latency after the slice's last line).

``--joint``: the joint mode without any reference (aligned SENSE,
:func:`kmotion.estimation.joint.joint_estimate` with its defaults; the gadget does **not** run it): the scan
alone (``reference_repetitions = 0``, ACS rows in the echo trains, coil maps from them as the gadget computes
them, :func:`kmotion.gadget.calibration.coil_maps_for`), ``estimate_slices`` replaced by the joint estimate
with every non-gauge shot applied, corrected by the same :func:`~kmotion.gadget.correct.correct_shots`; truth
and estimates in the gauge of the shot holding the k-space centre row; the oracle is the same correction with
the true poses.  Caveat: without clean calibration data the coil maps (of the correction and of the image
reconstruction) come from ACS rows acquired in moving echo trains, so even the oracle's image is poor.

``--scaling``: the time per slice (estimated run only) as the echo-train length (8/16/32, i.e. 18/9/5
shots), the coils (4/8/16) and the matrix (128/256) change one at a time from the 256^2, 8-coil, ETL 16
setting (interleaved, steps, motion-free reference repetition), for each of ``--speed-threads``; the median
(and minimum) of ``--repeats`` runs.  With CUDA present the same on the GPU, with the card and torch version.

The numbers vary with the machine's load: say so when quoting them.  Usage::

    .venv/bin/python benchmarks/bench_intra_scan.py --phantoms 2 --out docs/results/bench_intra_scan.md
    .venv/bin/python benchmarks/bench_intra_scan.py --joint --out docs/results/bench_intra_scan_joint.md
    .venv/bin/python benchmarks/bench_intra_scan.py --scaling --out docs/results/bench_intra_scan_speed.md
"""

from __future__ import annotations

import argparse
import copy
import csv
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import ismrmrd
import numpy as np
import torch

from kmotion.demo import nrmse
from kmotion.estimation.joint import joint_estimate
from kmotion.gadget import GadgetParams, MotionCorrector, MotionReport, reconstruct_images
from kmotion.gadget.calibration import coil_maps_for
from kmotion.gadget.decide import report_for
from kmotion.gadget.estimate import reference_model
from kmotion.gadget.reference import Reference, SliceWork
from kmotion.gadget.report import blank_report
from kmotion.gadget.shots import EarlyShots, shot_identity
from kmotion.simulation.intra_scan import IntraScanAcquisition, IntraScanConfig, simulate_intra_scan

SEED0 = 6_000_000
ORDERINGS = ("interleaved", "checkered", "linear", "centric")
PATTERNS = ("steps", "drift", "jerk", "random")
REFERENCES = ("repetition", "calibration")
NAN3 = (math.nan, math.nan, math.nan)


# ------------------------------------------------------------------------------------------------ data


def make_config(
    ordering: str,
    pattern: str,
    reference: str,
    seed: int,
    matrix: int = 256,
    coils: int = 8,
    etl: int = 16,
    max_mm: float = 10.0,
    max_deg: float = 10.0,
) -> IntraScanConfig:
    """The simulation of one setting; ``reference`` ``repetition``, ``calibration`` or ``none`` (joint)."""
    return IntraScanConfig(
        matrix=(matrix, matrix),
        n_coils=coils,
        ordering=ordering,
        echo_train_length=etl,
        pattern=pattern,
        seed=seed,
        separate_calibration=reference == "calibration",
        reference_repetitions=1 if reference == "repetition" else 0,
        max_mm=max_mm,
        max_deg=max_deg,
    )


def _copy(items: list[object]) -> list[object]:
    return [copy.deepcopy(i) if isinstance(i, ismrmrd.Acquisition) else i for i in items]


def _image(items: list[object], header: object, repetition: int) -> np.ndarray:
    """Magnitude image of slice 0, ``repetition`` (the gadget's SENSE reconstruction)."""
    for im in reconstruct_images(iter(items), header, series_index=0):  # type: ignore[arg-type]
        if isinstance(im, ismrmrd.Image) and int(im.repetition) == repetition and int(im.slice) == 0:
            return np.abs(np.asarray(im.data)).reshape(im.data.shape[-2:])
    raise RuntimeError(f"no image of repetition {repetition}")


_FREE: dict[IntraScanConfig, np.ndarray] = {}


def free_image(cfg: IntraScanConfig) -> np.ndarray:
    """The motion-free, noise-free image of ``cfg`` (same sampling and reconstruction), cached."""
    key = replace(cfg, pattern="none", snr=None, ordering="linear")  # the rows do not depend on the order
    if key not in _FREE:
        acq = simulate_intra_scan(key)
        _FREE[key] = _image(acq.items, acq.header, key.reference_repetitions)
    return _FREE[key]


# ------------------------------------------------------------------------------------------- the gadget


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class Timing:
    """Seconds per slice estimated per shot (one slice per batch here): ``completion`` is the work at slice
    completion (``_process``), ``estimate`` its estimation part, ``early`` the echo trains fitted as they
    ended (:class:`kmotion.gadget.shots.EarlyShots`, during the stream, before the slice completes)."""

    completion: list[float] = field(default_factory=list)
    estimate: list[float] = field(default_factory=list)
    early: float = 0.0


def timed(mc: MotionCorrector) -> Timing:
    """Wrap ``mc._process`` and ``mc.estimate_slices`` to time the slices estimated per shot (the early
    per-train fits are timed by :func:`early_timer`)."""
    t = Timing()
    process, estimate = mc._process, mc.estimate_slices
    last: list[float] = []

    def est(work: list[SliceWork]) -> None:
        _sync(mc.device)
        t0 = time.perf_counter()
        estimate(work)
        _sync(mc.device)
        last.append(time.perf_counter() - t0)

    def proc(work: list[SliceWork]) -> None:
        last.clear()
        _sync(mc.device)
        t0 = time.perf_counter()
        process(work)
        _sync(mc.device)
        dt = time.perf_counter() - t0
        if any(w.shot_reports is not None for w in work):
            t.completion.append(dt / len(work))
            t.estimate.append(sum(last) / len(work))

    mc.estimate_slices = est  # type: ignore[method-assign]
    mc._process = proc  # type: ignore[method-assign]
    return t


@contextmanager
def early_timer(t: Timing, device: torch.device) -> Iterator[None]:
    """Add the time of every :meth:`EarlyShots.note` call (per-train fits as trains end) to ``t.early``."""
    note = EarlyShots.note

    def timed_note(self: EarlyShots, item: object) -> None:
        t0 = time.perf_counter()
        note(self, item)
        _sync(device)
        t.early += time.perf_counter() - t0

    EarlyShots.note = timed_note  # type: ignore[method-assign]
    try:
        yield
    finally:
        EarlyShots.note = note  # type: ignore[method-assign]


def _summary(w: SliceWork, reports: list[MotionReport], method: str) -> MotionReport:
    n_corr = sum(r.corrected for r in reports)
    ref_rep = w.reference.slice.key.repetition if w.reference is not None else -1
    s = blank_report(
        w.buffer.key, ref_rep, f"per-shot motion ({method}): {n_corr} of {len(reports)} shots corrected"
    )
    s.corrected = n_corr > 0
    s.method = method
    return s


def oracle(mc: MotionCorrector, truth: np.ndarray) -> None:
    """Stage 4 replaced by the true pose of every shot (``truth`` ``(n_shots, 3)`` px/deg, shot = segment):
    significant, no uncertainty, applied unless below ``min_correction`` (then pose 0, as the gadget)."""

    def estimate_slices(work: list[SliceWork]) -> None:
        for w in work:
            if w.report is not None or w.reference is None or w.shot_rows is None:
                continue
            # the reference's model (coil maps, warm start of the correction) as the gadget builds it
            dwell = float(w.buffer.acquisitions[0].sample_time_us)
            reference_model(w.reference, mc.calibration, mc.noise, dwell, mc.device)
            reports = []
            for s in range(int(w.shot_rows.max()) + 1):
                m = tuple(float(v) for v in truth[s])
                rep = report_for(w, m, NAN3, math.inf, 3, mc.params, "oracle: true motion")  # type: ignore[arg-type]
                rep.shot = s
                reports.append(rep)
            w.shot_reports = reports
            w.report = _summary(w, reports, "oracle")

    mc.estimate_slices = estimate_slices  # type: ignore[method-assign]


def joint(mc: MotionCorrector, truth: np.ndarray | None = None, **kwargs: object) -> dict[str, object]:
    """Stage 4 for a stream without any reference: the joint estimate (or, with ``truth``, the true poses)
    of every shot of the scan's own slice, all applied; returns what happened (iterations, gauge)."""
    info: dict[str, object] = {}
    prefix = "reference; per-shot motion not estimated"

    def estimate_slices(work: list[SliceWork]) -> None:
        for w in work:
            if w.report is None or not w.report.reason.startswith(prefix) or w.assembled is None:
                continue
            a = w.assembled
            rows, rule = shot_identity(w.buffer)
            maps = coil_maps_for(a, mc.calibration, mc.device)
            if isinstance(maps, str):
                raise RuntimeError(f"joint: no coil maps: {maps}")
            n = int(rows.max()) + 1
            samples = a.samples()
            masks = torch.stack([torch.from_numpy(samples & (rows == s)[:, None]) for s in range(n)])
            if truth is None:
                lim = mc.params.max_translation_mm
                res = joint_estimate(
                    torch.from_numpy(a.kspace)[None].to(mc.device),
                    maps[None],
                    masks[None].to(mc.device),
                    a.pixel_spacing_mm,
                    max_translation_px=(lim / a.pixel_spacing_mm[1], lim / a.pixel_spacing_mm[0]),
                    **kwargs,  # type: ignore[arg-type]
                )
                motion = res.motion[0].cpu().numpy()
                info.update(iterations=res.iterations, gauge=int(res.gauge[0]))
            else:
                motion = truth
            w.reference = Reference(a, maps)
            w.shot_rows, w.shot_rule = rows, rule
            reports = []
            for s in range(n):
                dx, dy, phi = (float(v) for v in motion[s])
                sy, sx = a.pixel_spacing_mm
                rep = MotionReport(
                    w.buffer.key,
                    -1,
                    dx,
                    dy,
                    phi,
                    dx * sx,
                    dy * sy,
                    NAN3,
                    False,
                    bool(abs(dx) > 0 or abs(dy) > 0 or abs(phi) > 0),
                    "",
                    shot=s,
                )
                reports.append(rep)
            w.shot_reports = reports
            w.report = _summary(w, reports, "joint" if truth is None else "oracle")

    mc.estimate_slices = estimate_slices  # type: ignore[method-assign]
    return info


# ------------------------------------------------------------------------------------------------ runs


@dataclass
class Run:
    """One phantom of one setting (errors in mm / deg)."""

    ordering: str
    pattern: str
    reference: str
    seed: int
    n_shots: int
    n_corrected: int
    mae_dx_mm: float
    mae_dy_mm: float
    mae_phi_deg: float
    mae_corrected: tuple[float, float, float]
    """MAE (mm, mm, deg) over the corrected shots only (NaN when none)."""
    worst: str
    """The corrected shot with the largest error (``shot s (centre)``, its errors), or ``-``."""
    max_err_corrected_mm: float
    max_err_corrected_deg: float
    max_true_left_mm: float
    max_true_left_deg: float
    nrmse_uncorrected: float
    nrmse_corrected: float
    nrmse_oracle: float
    seconds: float
    """Per slice: the echo trains fitted as they ended plus the work at slice completion."""
    seconds_completion: float
    """Per slice, at slice completion: the trains left, the correction (the latency after the last line)."""
    seconds_early: float
    """Per slice: the echo trains fitted as they ended (during the stream)."""
    note: str = ""

    @property
    def ratio(self) -> float:
        return self.nrmse_corrected / self.nrmse_oracle


def _moved_reports(out: Sequence[object], repetition: int) -> list[MotionReport]:
    reps = [o for o in out if isinstance(o, MotionReport) and o.shot >= 0 and o.key.repetition == repetition]
    return sorted(reps, key=lambda r: r.shot)


def _errors(reports: list[MotionReport], truth: np.ndarray, spacing: tuple[float, float]) -> np.ndarray:
    """``(n_shots, 3)`` |estimate - truth| in mm, mm, deg (NaN where nothing was estimated)."""
    scale = np.array([spacing[1], spacing[0], 1.0])
    est = np.array([(r.dx_px, r.dy_px, r.rot_deg) for r in reports], dtype=np.float64)
    return np.abs(est - truth[: len(reports)]) * scale


def run_setting(
    cfg: IntraScanConfig,
    reference: str,
    device: str = "cpu",
    with_oracle: bool = True,
    joint_kwargs: dict[str, object] | None = None,
) -> Run:
    """Simulate ``cfg``, run it through the gadget (estimated, and the oracle), measure (module docstring)."""
    acq: IntraScanAcquisition = simulate_intra_scan(cfg)
    moved = cfg.reference_repetitions
    truth = acq.motion[moved]
    spacing = cfg.pixel_spacing_mm
    params = GadgetParams(motion_model="shot", device=device)
    keep = _copy(acq.items) if with_oracle else []
    free = free_image(cfg)
    unc = nrmse(_image(acq.items, acq.header, moved), free)

    mc = MotionCorrector(acq.header, params)
    info: dict[str, object] = {}
    if reference == "none":
        info = joint(mc, None, **(joint_kwargs or {}))
    t = timed(mc)
    with early_timer(t, mc.device):
        out = list(mc(acq.items))
    reports = _moved_reports(out, moved)
    if len(reports) != acq.sampling.n_shots:
        raise RuntimeError(f"{len(reports)} shot reports for {acq.sampling.n_shots} shots: {out[:3]}")
    cor = nrmse(_image(out, acq.header, moved), free)
    err = _errors(reports, truth, spacing)
    corrected = np.array([r.corrected for r in reports])
    true_mm = np.abs(truth) * np.array([spacing[1], spacing[0], 1.0])
    orc = math.nan
    if with_oracle:
        mo = MotionCorrector(acq.header, params)
        if reference == "none":
            joint(mo, truth)
        else:
            oracle(mo, truth)
        orc = nrmse(_image(list(mo(keep)), acq.header, moved), free)
    mae_corr = (math.nan, math.nan, math.nan)
    worst = "-"
    if corrected.any():
        mae_corr = tuple(float(v) for v in err[corrected].mean(0))  # type: ignore[assignment]
        scaled = err / np.array([0.5, 0.5, 0.5])  # relative to the 0.5 mm / 0.5 deg bound
        s = int(np.flatnonzero(corrected)[np.argmax(scaled[corrected].max(1))])
        tag = " (centre)" if s == acq.centre_shot else ""
        worst = f"shot {s}{tag}: {err[s, 0]:.2f} / {err[s, 1]:.2f} mm, {err[s, 2]:.2f} deg"
    note = ""
    if info:
        est_mm = np.abs([(r.dx_mm, r.dy_mm, r.rot_deg) for r in reports])
        note = (
            f"{info.get('iterations')} alternations, gauge shot {info.get('gauge')} "
            f"(simulation's centre shot {acq.centre_shot}); mean |estimate| {est_mm[:, :2].mean():.2f} mm, "
            f"{est_mm[:, 2].mean():.2f} deg; "
            f"mean |truth| {true_mm[:, :2].mean():.2f} mm, {true_mm[:, 2].mean():.2f} deg"
        )
    return Run(
        cfg.ordering,
        cfg.pattern,
        reference,
        cfg.seed,
        len(reports),
        int(corrected.sum()),
        float(np.nanmean(err[:, 0])),
        float(np.nanmean(err[:, 1])),
        float(np.nanmean(err[:, 2])),
        mae_corr,
        worst,
        float(err[corrected, :2].max()) if corrected.any() else 0.0,
        float(err[corrected, 2].max()) if corrected.any() else 0.0,
        float(true_mm[~corrected, :2].max()) if (~corrected).any() else 0.0,
        float(true_mm[~corrected, 2].max()) if (~corrected).any() else 0.0,
        unc,
        cor,
        orc,
        t.early + sum(t.completion) if t.completion else math.nan,
        statistics.median(t.completion) if t.completion else math.nan,
        t.early,
        note,
    )


# ---------------------------------------------------------------------------------------------- output


class Output:
    """Print and collect markdown lines (written to ``--out`` at the end)."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def __call__(self, line: str = "") -> None:
        print(line, flush=True)
        self.lines.append(line)


def _fmt(v: float, digits: int = 3) -> str:
    return "–" if not math.isfinite(v) else f"{v:.{digits}f}"


def _commit() -> str:
    """The repository's commit (``git describe --always --dirty``), or ``unknown``."""
    try:
        got = subprocess.run(
            ["git", "describe", "--always", "--dirty"],
            capture_output=True,
            text=True,
            cwd=Path(__file__).resolve().parent,
            timeout=10,
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return got.stdout.strip() or "unknown"


def machine_line(threads: int, device: str) -> str:
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else math.nan
    line = (
        f"commit {_commit()}, {time.strftime('%Y-%m-%d %H:%M')}; "
        f"torch {torch.__version__}, {platform.machine()}, {os.cpu_count()} CPU cores (shared machine, load "
        f"average {load:.1f} at the start), torch threads {threads}, device {device}"
    )
    if torch.cuda.is_available():
        line += f"; CUDA: {torch.cuda.get_device_name(0)} (CUDA {torch.version.cuda})"
    else:
        line += "; no CUDA on this machine"
    return line


HEAD = (
    "| ordering | pattern | reference | shots corrected / total | MAE dx / dy [mm] | MAE phi [deg] "
    "| MAE of the corrected shots dx / dy [mm] / phi [deg] "
    "| max error corrected [mm / deg] | max true motion left alone [mm / deg] "
    "| NRMSE uncorrected / corrected / oracle | corrected / oracle | s per slice (at completion) |"
)
RULE = "|---|---|---|---|---|---|---|---|---|---|---|---|"


def row(ordering: str, pattern: str, reference: str, runs: list[Run]) -> str:
    """One markdown row: means over the phantoms (errors, NRMSE, ratio), sums (counts), maxima (max errors),
    medians (time)."""

    def mean(name: str) -> float:
        return float(np.mean([getattr(r, name) for r in runs]))

    def top(name: str) -> float:
        return float(np.max([getattr(r, name) for r in runs]))

    ratios = [r.ratio for r in runs]
    corr = corrected_mae(runs)
    return (
        f"| {ordering} | {pattern} | {reference} | {sum(r.n_corrected for r in runs)} / "
        f"{sum(r.n_shots for r in runs)} | {_fmt(mean('mae_dx_mm'))} / {_fmt(mean('mae_dy_mm'))} "
        f"| {_fmt(mean('mae_phi_deg'))} | {_fmt(corr[0])} / {_fmt(corr[1])} / {_fmt(corr[2])} "
        f"| {_fmt(top('max_err_corrected_mm'))} / "
        f"{_fmt(top('max_err_corrected_deg'))} | {_fmt(top('max_true_left_mm'), 2)} / "
        f"{_fmt(top('max_true_left_deg'), 2)} | {_fmt(mean('nrmse_uncorrected'))} / "
        f"{_fmt(mean('nrmse_corrected'))} / {_fmt(mean('nrmse_oracle'))} | {_fmt(float(np.mean(ratios)))} "
        f"(max {_fmt(max(ratios))}) | {_fmt(statistics.median(r.seconds for r in runs), 2)} "
        f"({_fmt(statistics.median(r.seconds_completion for r in runs), 2)}) |"
    )


def corrected_mae(runs: list[Run]) -> tuple[float, float, float]:
    """MAE over every corrected shot of ``runs`` (weighted by their numbers)."""
    n = sum(r.n_corrected for r in runs)
    if n == 0:
        return (math.nan, math.nan, math.nan)
    tot = [sum(r.n_corrected * r.mae_corrected[i] for r in runs if r.n_corrected) for i in range(3)]
    return (tot[0] / n, tot[1] / n, tot[2] / n)


def per_phantom(out: Output, runs: list[Run]) -> None:
    """One row per phantom and setting (the raw numbers behind the table)."""
    out("")
    out("### Per phantom")
    out("")
    out(
        "| ordering | pattern | reference | seed | corrected / shots | MAE dx / dy / phi (all shots) "
        "| MAE dx / dy / phi (corrected) | worst corrected shot | NRMSE uncorrected / corrected / oracle "
        "| s per slice (at completion) |"
    )
    out("|---|---|---|---|---|---|---|---|---|---|")
    for r in runs:
        c = r.mae_corrected
        out(
            f"| {r.ordering} | {r.pattern} | {r.reference} | {r.seed} | {r.n_corrected} / {r.n_shots} "
            f"| {r.mae_dx_mm:.3f} / {r.mae_dy_mm:.3f} / {r.mae_phi_deg:.3f} "
            f"| {_fmt(c[0])} / {_fmt(c[1])} / {_fmt(c[2])} | {r.worst} "
            f"| {r.nrmse_uncorrected:.3f} / {r.nrmse_corrected:.3f} / {_fmt(r.nrmse_oracle)} "
            f"| {r.seconds:.2f} ({r.seconds_completion:.2f}) |"
        )


def _check(ok: bool) -> str:
    return "met" if ok else "**not met**"


def targets(out: Output, runs: list[Run]) -> None:
    """The issue's accuracy targets, per reference, against the runs (all patterns and phantoms pooled)."""
    out("")
    out("### Targets (all patterns and phantoms of each group pooled)")
    out("")
    out("| group | target | measured | verdict |")
    out("|---|---|---|---|")
    for reference in sorted({r.reference for r in runs}):
        for orderings in (("interleaved", "checkered"), ("linear",), ("centric",)):
            rs = [r for r in runs if r.reference == reference and r.ordering in orderings]
            if not rs:
                continue
            name = f"{'/'.join(orderings)}, reference {reference}"
            mae = (
                float(np.mean([r.mae_dx_mm for r in rs])),
                float(np.mean([r.mae_dy_mm for r in rs])),
                float(np.mean([r.mae_phi_deg for r in rs])),
            )
            worst = max(r.max_err_corrected_mm for r in rs), max(r.max_err_corrected_deg for r in rs)
            ratio = max(r.ratio for r in rs)
            c = corrected_mae(rs)
            n_c, n_s = sum(r.n_corrected for r in rs), sum(r.n_shots for r in rs)
            info = (
                f"| {name} | (information) MAE of the corrected shots only | {_fmt(c[0])} / {_fmt(c[1])} mm, "
                f"{_fmt(c[2])} deg ({n_c} of {n_s} shots) | – |"
            )
            if reference == "none":
                ok = max(mae[:2]) <= 0.3 and mae[2] <= 0.3
                out(
                    f"| {name} | MAE <= 0.3 mm / 0.3 deg | {mae[0]:.3f} / {mae[1]:.3f} mm, {mae[2]:.3f} deg "
                    f"| {_check(ok)} |"
                )
                out(f"| {name} | NRMSE <= 1.5 x oracle | max ratio {ratio:.2f} | {_check(ratio <= 1.5)} |")
                continue
            if orderings == ("linear",):
                ok = mae[0] <= 0.05 and mae[2] <= 0.05
                out(
                    f"| {name} | MAE dx <= 0.05 mm, phi <= 0.05 deg | dx {mae[0]:.3f} mm, "
                    f"phi {mae[2]:.3f} deg (dy {mae[1]:.3f} mm) | {_check(ok)} |"
                )
                out(f"| {name} | NRMSE <= 1.1 x oracle | max ratio {ratio:.3f} | {_check(ratio <= 1.1)} |")
                out(info)
                continue
            ok = max(mae[:2]) <= 0.05 and mae[2] <= 0.05
            tag = "" if orderings != ("centric",) else " (no target; as interleaved)"
            out(
                f"| {name} | MAE <= 0.05 mm / 0.05 deg{tag} | {mae[0]:.3f} / {mae[1]:.3f} mm, "
                f"{mae[2]:.3f} deg | {_check(ok)} |"
            )
            ok = worst[0] <= 0.5 and worst[1] <= 0.5
            out(
                f"| {name} | no corrected shot off by > 0.5 mm / 0.5 deg{tag} | max {worst[0]:.3f} mm, "
                f"{worst[1]:.3f} deg | {_check(ok)} |"
            )
            out(info)


def write(out: Output, path: str | None, runs: list[Run], csv_path: str | None) -> None:
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text("\n".join(out.lines) + "\n")
        print(f"wrote {path}")
    if csv_path and runs:
        with open(csv_path, "w", newline="") as f:
            wr = csv.DictWriter(f, fieldnames=[*asdict(runs[0]), "ratio"])
            wr.writeheader()
            for r in runs:
                wr.writerow({**asdict(r), "ratio": r.ratio})
        print(f"wrote {csv_path}")


# ----------------------------------------------------------------------------------------------- modes


def accuracy(a: argparse.Namespace, out: Output, references: Sequence[str]) -> list[Run]:
    runs: list[Run] = []
    out(HEAD)
    out(RULE)
    per_row: list[Run] = []
    for reference in references:
        for oi, ordering in enumerate(a.orderings):
            for pi, pattern in enumerate(a.patterns):
                per_row = []
                for i in range(a.phantoms):
                    seed = SEED0 + 10_000 * oi + 100 * pi + i + (50 if reference == "calibration" else 0)
                    cfg = make_config(
                        ordering, pattern, reference, seed, a.matrix, a.coils, a.etl, a.max_mm, a.max_deg
                    )
                    r = run_setting(cfg, reference, a.device, not a.no_oracle, a.joint_kwargs)
                    print(f"  {asdict(r)}", file=sys.stderr, flush=True)
                    per_row.append(r)
                runs.extend(per_row)
                out(row(ordering, pattern, reference, per_row))
    return runs


def scaling(a: argparse.Namespace, out: Output) -> None:
    base = dict(matrix=256, coils=8, etl=16)
    variants = [base, {**base, "etl": 8}, {**base, "etl": 32}, {**base, "coils": 4}, {**base, "coils": 16}]
    variants.append({**base, "matrix": 128})
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    out(
        "| device | threads | matrix | coils | ETL | shots "
        "| s per slice: estimation + correction, median (min) | at slice completion (latency) "
        "| trains fitted as they ended |"
    )
    out("|---|---|---|---|---|---|---|---|---|")
    for device in devices:
        for threads in a.speed_threads if device == "cpu" else [torch.get_num_threads()]:
            torch.set_num_threads(threads)
            # warm-up (lazy initialisation, first allocations): not counted
            run_setting(
                make_config("interleaved", "steps", "repetition", SEED0 + 99, 128, 4, 16),
                "repetition",
                device,
                with_oracle=False,
            )
            for v in variants:
                runs = []
                for k in range(a.repeats):
                    cfg = make_config(
                        "interleaved",
                        "steps",
                        "repetition",
                        SEED0 + 90_000 + k,
                        v["matrix"],
                        v["coils"],
                        v["etl"],
                    )
                    runs.append(run_setting(cfg, "repetition", device, with_oracle=False))
                tot = [r.seconds for r in runs]
                out(
                    f"| {device} | {threads if device == 'cpu' else '–'} | {v['matrix']}^2 | {v['coils']} "
                    f"| {v['etl']} | {runs[0].n_shots} | {statistics.median(tot):.2f} ({min(tot):.2f}) "
                    f"| {statistics.median(r.seconds_completion for r in runs):.2f} "
                    f"| {statistics.median(r.seconds_early for r in runs):.2f} |"
                )


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    p.add_argument("--phantoms", type=int, default=2, help="held-out phantoms per setting")
    p.add_argument("--orderings", nargs="+", default=list(ORDERINGS))
    p.add_argument("--patterns", nargs="+", default=list(PATTERNS))
    p.add_argument("--references", nargs="+", default=list(REFERENCES), choices=REFERENCES)
    p.add_argument("--matrix", type=int, default=256)
    p.add_argument("--coils", type=int, default=8)
    p.add_argument("--etl", type=int, default=16)
    p.add_argument("--max-mm", type=float, default=10.0, help="motion range of the patterns [mm]")
    p.add_argument("--max-deg", type=float, default=10.0, help="motion range of the patterns [deg]")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (accuracy and joint runs)")
    p.add_argument("--no-oracle", action="store_true", help="skip the true-motion correction")
    p.add_argument("--joint", action="store_true", help="the joint mode without a reference instead")
    p.add_argument("--joint-outer", type=int, default=None, help="--joint: alternations (default: joint's)")
    p.add_argument("--scaling", action="store_true", help="the cost table instead (module docstring)")
    p.add_argument("--speed-threads", type=int, nargs="+", default=[1, 2])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default=None, help="markdown file for the tables")
    p.add_argument("--csv", default=None, help="CSV of every run (one row per phantom and setting)")
    a = p.parse_args(argv)
    a.joint_kwargs = {"outer": a.joint_outer} if a.joint_outer else None
    torch.set_num_threads(a.threads)
    out = Output()
    args = argv if argv is not None else sys.argv[1:]
    out(f"<!-- {' '.join(['benchmarks/bench_intra_scan.py', *args])} -->")
    out(machine_line(a.threads, a.device))
    out("")
    t0 = time.perf_counter()
    runs: list[Run] = []
    if a.scaling:
        scaling(a, out)
    elif a.joint:
        if a.orderings == list(ORDERINGS):
            a.orderings = ["interleaved", "checkered", "linear"]
        runs = accuracy(a, out, ["none"])
        for r in runs:
            out(f"<!-- {r.ordering} {r.pattern} seed {r.seed}: {r.note} -->")
        targets(out, runs)
        per_phantom(out, runs)
    else:
        runs = accuracy(a, out, a.references)
        targets(out, runs)
        per_phantom(out, runs)
    out("")
    out(f"total {time.perf_counter() - t0:.0f} s")
    write(out, a.out, runs, a.csv)


if __name__ == "__main__":
    main()
