"""Offline replay: stream an ISMRMRD ``.h5`` file through the motion-correction gadget and store the result.

``kmotion replay IN.h5 OUT.h5`` (:func:`replay`) reads the header, the acquisitions and the waveforms of
``IN.h5`` (merged in time-stamp order), streams them through
:func:`kmotion.gadget.pipeline.motion_correct` and writes ``OUT.h5``:

* ``/dataset/xml``, ``/dataset/data``, ``/dataset/waveforms``: the header and every input acquisition and
  waveform (corrected acquisitions where correction ran, untouched ones otherwise), in stream order
  (waveforms are merged with the acquisitions by time stamp);
* ``/dataset/images_uncorrected`` and ``/dataset/images_corrected``: one magnitude image per slice group,
  :func:`kmotion.gadget.recon.reconstruct_images` of the input stream and of the output stream (same
  reconstruction for both; image series 1 and 2);
* ``/kmotion/motion_estimates``: one row per estimated (slice, contrast, repetition, set) (fields as the CSV
  below; its attribute ``json`` holds ``MotionReport.as_dict()`` of every report);
* ``/kmotion/true_motion``: copied from the input when present (files of ``kmotion simulate-raw``).

``--motion-csv PATH`` writes the same rows as CSV: ``slice, contrast, repetition, set,
reference_repetition, dx_px, dy_px, rot_deg, dx_mm, dy_mm, patient_x_mm, patient_y_mm, patient_z_mm,
flagged, corrected, reason`` and, when the input holds the true motion, ``true_dx_px, true_dy_px,
true_rot_deg, true_dx_mm, true_dy_mm`` (the truth of the repetition relative to the report's reference
repetition, composed from the stored per-repetition truth).
"""

from __future__ import annotations

import csv
import json
import logging
import math
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import ismrmrd
import ismrmrd.xsd
import numpy as np
from tqdm import tqdm

from kmotion.gadget.pipeline import GadgetParams, MotionReport, motion_correct
from kmotion.gadget.recon import reconstruct_images
from kmotion.io.ismrmrd_h5 import check_ismrmrd_file, parse_encoding
from kmotion.physics.validate import InputError
from kmotion.simulation.raw import (
    TRUTH_DATASET,
    IsmrmrdWriter,
    TrueMotion,
    read_true_motion,
    write_true_motion,
)

__all__ = [
    "ESTIMATES_DATASET",
    "IsmrmrdSource",
    "ReplayResult",
    "estimate_rows",
    "open_ismrmrd",
    "read_estimates",
    "read_images",
    "replay",
    "summarise",
    "write_motion_csv",
]

log = logging.getLogger("kmotion.replay")

ESTIMATES_DATASET = "kmotion/motion_estimates"
UNCORRECTED = "images_uncorrected"
CORRECTED = "images_corrected"

CSV_COLUMNS = [
    "slice",
    "contrast",
    "repetition",
    "set",
    "reference_repetition",
    "dx_px",
    "dy_px",
    "rot_deg",
    "dx_mm",
    "dy_mm",
    "patient_x_mm",
    "patient_y_mm",
    "patient_z_mm",
    "flagged",
    "corrected",
    "reason",
]
TRUE_COLUMNS = ["true_dx_px", "true_dy_px", "true_rot_deg", "true_dx_mm", "true_dy_mm"]


@dataclass
class IsmrmrdSource:
    """An opened ISMRMRD file: its header and the counts of its items (read lazily by :meth:`items`)."""

    path: Path
    dataset: str
    header: ismrmrd.xsd.ismrmrdHeader
    xml: str
    n_acquisitions: int
    n_waveforms: int

    def items(self, chunk: int = 256) -> Iterator[object]:
        """Acquisitions and waveforms in time-stamp order (read in chunks of ``chunk`` records).

        Acquisitions keep their file order; each waveform is emitted before the first acquisition whose
        ``acquisition_time_stamp`` is not earlier than the waveform's ``time_stamp`` (the rest at the end).
        """
        with h5py.File(self.path, "r") as f:
            grp = f[self.dataset]
            waves = [_waveform(r) for r in grp["waveforms"][()]] if self.n_waveforms else []
            waves.sort(key=lambda w: int(w.time_stamp))
            data = grp["data"]
            j = 0
            for start in range(0, self.n_acquisitions, chunk):
                for rec in data[start : start + chunk]:
                    acq = _acquisition(rec)
                    t = int(acq.acquisition_time_stamp)
                    while j < len(waves) and int(waves[j].time_stamp) <= t:
                        yield waves[j]
                        j += 1
                    yield acq
            yield from waves[j:]


def _acquisition(rec: np.void) -> ismrmrd.Acquisition:
    """An ``ismrmrd.Acquisition`` from one record of an ISMRMRD ``data`` dataset (as ``read_acquisition``)."""
    acq = ismrmrd.Acquisition(rec["head"])
    acq.data[:] = rec["data"].view(np.complex64).reshape(acq.active_channels, acq.number_of_samples)
    if acq.traj.size > 0:
        acq.traj[:] = rec["traj"].reshape(acq.number_of_samples, acq.trajectory_dimensions)
    return acq


def _waveform(rec: np.void) -> ismrmrd.Waveform:
    """An ``ismrmrd.Waveform`` from one record of a ``waveforms`` dataset (as ``read_waveform``)."""
    from ismrmrd.hdf5 import waveform_header_dtype

    head = np.zeros((1,), dtype=waveform_header_dtype)
    head[0] = rec["head"]
    wav = ismrmrd.Waveform(head)
    wav.data[:] = rec["data"].view(np.uint32).reshape(wav.channels, wav.number_of_samples)
    return wav


def open_ismrmrd(path: str | Path, dataset: str = "dataset") -> IsmrmrdSource:
    """Open an ISMRMRD ``.h5`` file for streaming; bad input raises :class:`InputError` naming the problem."""
    src, keys, counts = check_ismrmrd_file(path, dataset)
    n_acq, n_wav = counts.get("data", 0), counts.get("waveforms", 0)
    if "data" not in keys or n_acq == 0:
        raise InputError(f"{src}: '{dataset}/data': expected acquisitions, got entries {keys}")
    with ismrmrd.Dataset(src, dataset, create_if_needed=False, mode="r") as ds:
        raw_xml = ds.read_xml_header()
    xml = raw_xml.decode("utf-8", "replace") if isinstance(raw_xml, bytes) else str(raw_xml)
    xml = xml.rstrip("\x00")
    parse_encoding(xml, f"{src}: '{dataset}/xml'")  # clear messages for a missing/bad <encoding>
    try:
        header = ismrmrd.xsd.CreateFromDocument(xml)
    except Exception as e:  # the schema parser's exceptions have no common base
        raise InputError(
            f"{src}: '{dataset}/xml': expected an ISMRMRD header that the ismrmrd schema accepts, got: {e}"
        ) from e
    return IsmrmrdSource(Path(src), dataset, header, xml, n_acq, n_wav)


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
    """One CSV row (dict, keys ``CSV_COLUMNS`` [+ ``TRUE_COLUMNS``]) per report."""
    by_key = {(t.slice, t.repetition): t for t in truth} if truth else {}
    rows = []
    for rep in reports:
        key = rep.key
        pat = tuple(float(v) for v in (rep.patient_mm if rep.patient_mm is not None else (math.nan,) * 3))
        row: dict[str, Any] = {
            "slice": int(key.slice),
            "contrast": int(key.contrast),
            "repetition": int(key.repetition),
            "set": int(key.set),
            "reference_repetition": -1 if rep.reference_repetition is None else int(rep.reference_repetition),
            "dx_px": float(rep.dx_px),
            "dy_px": float(rep.dy_px),
            "rot_deg": float(rep.rot_deg),
            "dx_mm": float(rep.dx_mm),
            "dy_mm": float(rep.dy_mm),
            "patient_x_mm": pat[0],
            "patient_y_mm": pat[1],
            "patient_z_mm": pat[2],
            "flagged": bool(rep.flagged),
            "corrected": bool(rep.corrected),
            "reason": str(rep.reason or ""),
        }
        if truth is not None:
            t_rep = by_key.get((row["slice"], row["repetition"]))
            t_ref = by_key.get((row["slice"], row["reference_repetition"]))
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


def write_motion_csv(rows: Sequence[dict[str, Any]], path: str | Path) -> Path:
    """Write estimate rows as CSV (columns ``CSV_COLUMNS`` [+ ``TRUE_COLUMNS``])."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    cols = CSV_COLUMNS + (TRUE_COLUMNS if rows and "true_dx_px" in rows[0] else [])
    with p.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: (f"{v:.4f}" if isinstance(v, float) else v) for k, v in r.items()})
    return p


_EST_DTYPE = np.dtype(
    [(c, "<i4") for c in CSV_COLUMNS[:5]]
    + [(c, "<f8") for c in CSV_COLUMNS[5:13]]
    + [("flagged", "?"), ("corrected", "?"), ("reason", h5py.string_dtype())]
)


def _write_estimates(path: Path, reports: Sequence[MotionReport], rows: Sequence[dict[str, Any]]) -> None:
    arr = np.array([tuple(r[c] for c in _EST_DTYPE.names or ()) for r in rows], dtype=_EST_DTYPE)
    with h5py.File(path, "a") as f:
        if ESTIMATES_DATASET in f:
            del f[ESTIMATES_DATASET]
        d = f.create_dataset(ESTIMATES_DATASET, data=arr, maxshape=(None,))
        d.attrs["json"] = json.dumps([_jsonable(r.as_dict()) for r in reports])
        d.attrs["description"] = (
            "kmotion motion estimates per (slice, contrast, repetition, set) relative to "
            "reference_repetition: "
            "dx/dy in pixels of the recon grid and mm, rot in degrees, patient-frame translation in mm"
        )


def _jsonable(x: Any) -> Any:
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_jsonable(v) for v in x]
    if isinstance(x, np.generic):
        return x.item()
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


def read_estimates(path: str | Path) -> list[dict[str, Any]]:
    """The ``/kmotion/motion_estimates`` rows of a replay output file."""
    with h5py.File(path, "r") as f:
        if ESTIMATES_DATASET not in f:
            raise InputError(
                f"{path}: '{ESTIMATES_DATASET}': expected the estimates of kmotion replay, got none"
            )
        arr = f[ESTIMATES_DATASET][()]
    rows = []
    for a in arr:
        row = {n: (a[n].decode() if isinstance(a[n], bytes) else a[n].item()) for n in arr.dtype.names}
        rows.append(row)
    return rows


def read_images(path: str | Path, group: str, dataset: str = "dataset") -> list[ismrmrd.Image]:
    """The images of ``/dataset/<group>`` of an ISMRMRD file (empty list when absent)."""
    with ismrmrd.Dataset(str(path), dataset, create_if_needed=False, mode="r") as ds:
        if group not in ds._dataset:  # noqa: SLF001 - ismrmrd has no public "has images" query
            return []
        return [ds.read_image(group, i) for i in range(ds.number_of_images(group))]


def replay(
    in_path: str | Path,
    out_path: str | Path,
    params: GadgetParams | None = None,
    motion_csv: str | Path | None = None,
    dataset: str = "dataset",
    progress: bool | None = None,
) -> ReplayResult:
    """Stream ``in_path`` through the gadget and write ``out_path`` (contents in the module docstring).

    Parameters
    ----------
    in_path, out_path
        Input and output ISMRMRD ``.h5`` files (the output is replaced; it must differ from the input).
    params
        Gadget parameters (default :class:`GadgetParams()`).
    motion_csv
        Optional CSV of the estimates.
    dataset
        ISMRMRD group name in both files.
    progress
        tqdm progress bar over the input items (None: only on a terminal).

    Raises
    ------
    InputError
        For a missing, non-HDF5 or malformed input (message names the file and the field).
    """
    t0 = time.perf_counter()
    src = open_ismrmrd(in_path, dataset)
    out = Path(out_path)
    if out.resolve() == src.path.resolve():
        raise InputError(f"{out}: the output file must differ from the input file")
    params = GadgetParams() if params is None else params
    truth = read_true_motion(src.path)
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.exists():
        out.unlink()

    reports: list[MotionReport] = []
    counts = {"acq": 0, "wave": 0, "corr": 0, "img_c": 0, "img_u": 0}
    n_items = src.n_acquisitions + src.n_waveforms
    try:
        with IsmrmrdWriter(out, src.xml, dataset) as writer:

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
            for img in reconstruct_images(
                tee(motion_correct(bar, src.header, params)), src.header, series_index=2
            ):
                if isinstance(img, ismrmrd.Image):
                    writer.append_image(CORRECTED, img)
                    counts["img_c"] += 1
            bar.close()
            for img in reconstruct_images(src.items(), src.header, series_index=1):
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
    rows = estimate_rows(reports, truth, _spacing(src.header))
    _write_estimates(out, reports, rows)
    if truth is not None:
        write_true_motion(out, truth)
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
    )


__all__ += ["CORRECTED", "CSV_COLUMNS", "TRUE_COLUMNS", "TRUTH_DATASET", "UNCORRECTED"]
