"""Offline replay: stream an ISMRMRD ``.h5`` file through the motion-correction gadget and store the result.

``kmotion replay IN.h5 OUT.h5`` (:func:`replay`) reads the header, the acquisitions and the waveforms of
``IN.h5`` (merged in time-stamp order, :mod:`kmotion.io.ismrmrd_reader`), streams them through
:func:`kmotion.gadget.pipeline.motion_correct` and writes ``OUT.h5`` (:mod:`kmotion.io.ismrmrd_writer`,
:mod:`kmotion.io.estimates`):

* ``/dataset/xml``, ``/dataset/data``, ``/dataset/waveforms``: the header and every input acquisition and
  waveform (corrected acquisitions where correction ran, untouched ones otherwise), in stream order
  (waveforms are merged with the acquisitions by time stamp);
* ``/dataset/images_uncorrected`` and ``/dataset/images_corrected``: one magnitude image per slice group,
  :func:`kmotion.gadget.recon.reconstruct_images` of the input stream and of the output stream (same
  reconstruction for both; image series 1 and 2);
* ``/dataset/kmotion_motion_estimates``: one row per estimated slice group (fields as the CSV below; its
  attribute ``json`` holds ``MotionReport.as_dict()`` of every report);
* ``/dataset/kmotion_true_motion``: copied from the input when present (files of ``kmotion simulate-raw``).

Both tables live inside the ISMRMRD group, so the file has one top-level group and readers that take the last
(mrpro) or the only group (FIRE tools) open the raw data (:mod:`kmotion.io.estimates`).

MRD v2: an input file that starts with the MRD v2 magic bytes is read as an MRD v2 binary stream
(:mod:`kmotion.io.mrd_v2`; the true motion then comes from the header's ``kmotion.true_motion``).  The output
is written in the input's format unless ``out_format`` says otherwise: ``mrd1`` the ISMRMRD ``.h5`` above,
``mrd2`` an MRD v2 stream file with the header, every acquisition and waveform in stream order (unchanged
ones exactly as read), then the corrected and the uncorrected images (image series 2 and 1, the estimates in
their meta ``kmotion_*``); MRD v2 has no place for the tables: use ``motion_csv``.

``--motion-csv PATH`` writes the same rows as CSV (:data:`kmotion.io.estimates.CSV_COLUMNS`): ``slice,
contrast, phase, repetition, set, reference_repetition, dx_px, dy_px, rot_deg, dx_std_px, dy_std_px,
rot_std_deg, dx_mm, dy_mm, patient_x_mm, patient_y_mm, patient_z_mm, chi2, p_value, flagged, corrected,
method, reason`` and, when the input holds the true motion, ``true_dx_px, true_dy_px, true_rot_deg,
true_dx_mm, true_dy_mm`` (the truth of the repetition relative to the report's reference repetition, composed
from the stored per-repetition truth).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ismrmrd
import ismrmrd.xsd
import numpy as np
from tqdm import tqdm

from kmotion.gadget import GadgetParams, MotionCorrector, MotionReport
from kmotion.gadget.recon import reconstruct_images
from kmotion.io.estimates import TRUE_COLUMNS, row_from_report, write_estimates, write_motion_csv
from kmotion.io.ismrmrd_h5 import parse_encoding
from kmotion.io.ismrmrd_header import LenientHeader
from kmotion.io.ismrmrd_reader import open_ismrmrd
from kmotion.io.ismrmrd_writer import (
    IsmrmrdWriter,
    TrueMotion,
    read_true_motion,
    true_motion_from_header,
    write_true_motion,
)
from kmotion.io.mrd_v2 import Mrd2FileWriter, is_mrd2_file, open_mrd2
from kmotion.physics.validate import InputError

__all__ = ["CORRECTED", "UNCORRECTED", "ReplayResult", "estimate_rows", "replay", "summarise"]

log = logging.getLogger("kmotion.replay")

UNCORRECTED = "images_uncorrected"
CORRECTED = "images_corrected"


@dataclass
class ReplayResult:
    """What :func:`replay` wrote and measured."""

    out: Path
    n_acquisitions: int
    n_waveforms: int
    n_corrected_slices: int
    reports: list[MotionReport]
    rows: list[dict[str, Any]]
    truth: list[TrueMotion] | None
    n_images_uncorrected: int
    n_images_corrected: int
    seconds: float
    summary: dict[str, float] = field(default_factory=dict)
    format: str = "mrd1"
    """Format of ``out``: ``mrd1`` (ISMRMRD ``.h5``) or ``mrd2`` (MRD v2 stream file)."""


def _relative_truth(
    rep: TrueMotion, ref: TrueMotion, spacing_mm: tuple[float, float]
) -> tuple[float, float, float, float, float]:
    """Motion of ``rep`` relative to ``ref`` (both relative to the same base): ``T_rep o T_ref^-1``.

    With ``T(r) = R(phi) r + t`` (mm): ``phi = phi_rep - phi_ref``, ``t = t_rep - R(phi) t_ref``.
    Returns ``(dx_px, dy_px, phi_deg, dx_mm, dy_mm)``.
    """
    phi = rep.phi_deg - ref.phi_deg
    c, s = math.cos(math.radians(phi)), math.sin(math.radians(phi))
    dx_mm = rep.dx_mm - (c * ref.dx_mm - s * ref.dy_mm)
    dy_mm = rep.dy_mm - (s * ref.dx_mm + c * ref.dy_mm)
    return dx_mm / spacing_mm[1], dy_mm / spacing_mm[0], phi, dx_mm, dy_mm


def _spacing(header: ismrmrd.xsd.ismrmrdHeader) -> tuple[float, float]:
    """Recon-grid pixel spacing ``(dy_mm, dx_mm)`` (the grid of the estimates and of the stored truth)."""
    enc = parse_encoding(ismrmrd.xsd.ToXML(header), "header")
    ny, nx = enc.recon_matrix[1], enc.recon_matrix[0]
    return enc.recon_fov_mm[1] / ny, enc.recon_fov_mm[0] / nx


def estimate_rows(
    reports: Sequence[MotionReport],
    truth: Sequence[TrueMotion] | None = None,
    spacing_mm: tuple[float, float] = (1.0, 1.0),
) -> list[dict[str, Any]]:
    """One table row per report: ``MotionReport.as_dict()``, typed by
    :func:`~kmotion.io.estimates.row_from_report` (keys :data:`~kmotion.io.estimates.CSV_COLUMNS` and any
    newer report key) [+ ``TRUE_COLUMNS``]."""
    by_key = {(t.slice, t.repetition, getattr(t, "shot", -1)): t for t in truth} if truth else {}

    def lookup(sl: int, rp: int, shot: int) -> TrueMotion | None:
        """Truth of (slice, repetition, shot); per-repetition truth (shot -1) serves every shot."""
        t = by_key.get((sl, rp, shot))
        if t is None and shot != -1:
            t = by_key.get((sl, rp, -1))
        if t is None and shot == -1:  # per-shot truth of a repetition: its gauge shot's
            t = next((v for k, v in by_key.items() if k[:2] == (sl, rp) and v.shot == v.centre_shot), None)
        return t

    rows = []
    for rep in reports:
        d = rep.as_dict()
        d.setdefault("phase", int(getattr(rep.key, "phase", 0)))
        row = row_from_report(d)
        if truth is not None:
            t_rep = lookup(row["slice"], row["repetition"], row.get("shot", -1))
            t_ref = lookup(row["slice"], row["reference_repetition"], -1)
            vals = (math.nan,) * 5
            if t_rep is not None and t_ref is not None:
                vals = _relative_truth(t_rep, t_ref, spacing_mm)
            row.update(dict(zip(TRUE_COLUMNS, vals, strict=True)))
        rows.append(row)
    return rows


def summarise(rows: Sequence[dict[str, Any]]) -> dict[str, float]:
    """MAE of the estimates against the truth over moved rows (repetition != reference, finite numbers).

    Keys: ``n``, ``mae_dx_px``, ``mae_dy_px``, ``mae_rot_deg``, ``mae_dx_mm``, ``mae_dy_mm`` (empty dict when
    there is no truth or no estimated moved repetition).
    """
    use = [
        r
        for r in rows
        if "true_dx_px" in r
        and r["repetition"] != r["reference_repetition"]
        and all(math.isfinite(r[k]) for k in ("dx_px", "dy_px", "rot_deg", "true_dx_px", "true_rot_deg"))
    ]
    if not use:
        return {}
    out: dict[str, float] = {"n": float(len(use))}
    for est, tru, name in (
        ("dx_px", "true_dx_px", "mae_dx_px"),
        ("dy_px", "true_dy_px", "mae_dy_px"),
        ("rot_deg", "true_rot_deg", "mae_rot_deg"),
        ("dx_mm", "true_dx_mm", "mae_dx_mm"),
        ("dy_mm", "true_dy_mm", "mae_dy_mm"),
    ):
        out[name] = float(np.mean([abs(r[est] - r[tru]) for r in use]))
    return out


def replay(
    in_path: str | Path,
    out_path: str | Path,
    params: GadgetParams | None = None,
    motion_csv: str | Path | None = None,
    dataset: str = "dataset",
    progress: bool | None = None,
    out_format: str = "auto",
) -> ReplayResult:
    """Stream ``in_path`` through the gadget and write ``out_path`` (contents in the module docstring).

    Parameters
    ----------
    in_path, out_path
        Input and output files: ISMRMRD ``.h5`` or MRD v2 (the output is replaced; it must differ from the
        input).
    params
        Gadget parameters (default :class:`GadgetParams()`).
    motion_csv
        Optional CSV of the estimates.
    dataset
        ISMRMRD group name in both files.
    progress
        tqdm progress bar over the input items (None: only on a terminal).
    out_format
        ``auto`` (the input's format), ``mrd1`` (ISMRMRD ``.h5``) or ``mrd2`` (MRD v2 stream file).

    Raises
    ------
    InputError
        For a missing, non-HDF5 or malformed input (message names the file and the field).
    """
    t0 = time.perf_counter()
    in_mrd2 = is_mrd2_file(in_path)
    src: Any = open_mrd2(in_path) if in_mrd2 else open_ismrmrd(in_path, dataset)
    if out_format not in ("auto", "mrd1", "mrd2"):
        raise InputError(f"output format: expected auto, mrd1 or mrd2, got {out_format!r}")
    fmt = ("mrd2" if in_mrd2 else "mrd1") if out_format == "auto" else out_format
    if getattr(src, "n_other", 0):
        log.warning(
            "%s: %d item(s) that are neither acquisitions nor waveforms are not replayed",
            src.path,
            src.n_other,
        )
    out = Path(out_path)
    if out.resolve() == src.path.resolve():
        raise InputError(f"{out}: the output file must differ from the input file")
    params = GadgetParams() if params is None else params
    truth = (None if in_mrd2 else read_true_motion(src.path, dataset)) or true_motion_from_header(src.header)
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.exists():
        out.unlink()

    reports: list[MotionReport] = []
    counts = {"acq": 0, "wave": 0, "corr": 0, "img_c": 0, "img_u": 0}
    n_items = src.n_acquisitions + src.n_waveforms
    # the header as read leniently (ISMRMRD .h5 input; an MRD v2 input's is already parsed); written back
    # with the defaults filled when any were
    header_in = getattr(src, "lenient_header", lambda: src.header)()
    xml_out: Any = header_in.output_xml if isinstance(header_in, LenientHeader) else src.xml
    if fmt == "mrd2" and isinstance(header_in, LenientHeader) and header_in.header is None:
        xml_out = None  # a header that cannot be read cannot become an MRD v2 one: none (it is optional)
    try:
        writer: Any = (
            Mrd2FileWriter(out, xml_out, getattr(src, "context", None))
            if fmt == "mrd2"
            else IsmrmrdWriter(out, xml_out, dataset)
        )
        with writer:

            def tee(items: Iterable[object]) -> Iterator[object]:
                for item in items:
                    if isinstance(item, ismrmrd.Acquisition):
                        writer.append(item)
                        counts["acq"] += 1
                    elif isinstance(item, ismrmrd.Waveform):
                        writer.append(item)
                        counts["wave"] += 1
                    elif isinstance(item, MotionReport):
                        reports.append(item)
                        if item.corrected:
                            counts["corr"] += 1
                        log.debug("%s", item.log_line())
                    yield item

            bar = tqdm(
                src.items(),
                total=n_items,
                desc=f"replay {src.path.name}",
                unit="item",
                disable=(None if progress is None else not progress),
                leave=False,
            )
            # a header or data the gadget does not handle: pass-through
            corrector = MotionCorrector(header_in, params)
            header = corrector.header if corrector.geometry is not None else None
            corrected = tee(corrector(bar))
            if header is None:  # passed through untouched (the corrector logged why): no images to make
                for _ in corrected:
                    pass
            else:
                for img in reconstruct_images(corrected, header, series_index=2):
                    if isinstance(img, ismrmrd.Image):
                        writer.append_image(CORRECTED, img)
                        counts["img_c"] += 1
            bar.close()
            if header is not None:
                for img in reconstruct_images(src.items(), header, series_index=1):
                    if isinstance(img, ismrmrd.Image):
                        writer.append_image(UNCORRECTED, img)
                        counts["img_u"] += 1
    except BaseException:
        out.unlink(missing_ok=True)  # no partial output file (e.g. a missing model, Ctrl-C)
        raise

    if counts["acq"] != src.n_acquisitions or counts["wave"] != src.n_waveforms:
        raise RuntimeError(
            f"replay of {src.path}: {src.n_acquisitions} acquisitions and {src.n_waveforms} waveforms in, "
            f"{counts['acq']} and {counts['wave']} out"
        )
    rows = estimate_rows(reports, truth, (1.0, 1.0) if header is None else _spacing(header))
    if fmt == "mrd1":
        write_estimates(out, rows, [r.as_dict() for r in reports], dataset)
        if truth is not None:
            write_true_motion(out, truth, dataset)
    if motion_csv is not None:
        write_motion_csv(rows, motion_csv)
    return ReplayResult(
        out=out,
        n_acquisitions=counts["acq"],
        n_waveforms=counts["wave"],
        n_corrected_slices=counts["corr"],
        reports=reports,
        rows=rows,
        truth=truth,
        n_images_uncorrected=counts["img_u"],
        n_images_corrected=counts["img_c"],
        seconds=time.perf_counter() - t0,
        summary=summarise(rows),
        format=fmt,
    )
