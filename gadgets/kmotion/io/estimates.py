"""kmotion's motion-estimate tables: the HDF5 dataset ``/<group>/kmotion_motion_estimates`` and the CSV.

One row per estimated slice group, columns :data:`CSV_COLUMNS` (in this order):

* the slice-group key ``slice, contrast, phase, repetition, set`` and ``reference_repetition``;
* the estimate ``dx_px, dy_px, rot_deg`` (pixels of the recon grid, degrees), its standard errors
  ``dx_std_px, dy_std_px, rot_std_deg``, the same translation in mm ``dx_mm, dy_mm`` and in the patient frame
  ``patient_x_mm, patient_y_mm, patient_z_mm``;
* the significance test ``chi2, p_value`` (likelihood ratio of "motion" against "no motion");
* ``flagged, corrected, method, reason``;

then, when the true motion is known, :data:`TRUE_COLUMNS` (``true_dx_px, true_dy_px, true_rot_deg,
true_dx_mm, true_dy_mm``), then any further key of ``MotionReport.as_dict()`` that this list does not name
yet (so new report fields are never dropped).  Numbers that were not estimated are NaN (empty in the
report's JSON).

Where the tables live
---------------------
:func:`write_estimates` stores the rows as a structured dataset **inside** the ISMRMRD group
(``/dataset/kmotion_motion_estimates``, :func:`estimates_path`), next to ``xml`` and ``data``, as
``ismrmrd_generate_cartesian_shepp_logan`` stores its ``phantom``/``csm`` arrays: the file keeps one
top-level group, so readers that take the last (mrpro's ``KData.from_file``, the FIRE image tools) or the
only top-level group open the raw data.  ``ismrmrd.File`` lists only sub-groups and ``ismrmrd.Dataset``
and the C++ library read their datasets by name, so they ignore it.  Files written by earlier versions kept
it at ``/kmotion/motion_estimates`` (:data:`LEGACY_ESTIMATES_DATASET`); :func:`read_estimates` reads both and
fills columns that older files lack (``phase`` 0, uncertainties NaN, ``method`` empty).
:func:`write_motion_csv` / :func:`read_motion_csv` write and read the CSV.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from kmotion.physics.validate import InputError

__all__ = [
    "COLUMN_KINDS",
    "CSV_COLUMNS",
    "ESTIMATES_NAME",
    "LEGACY_ESTIMATES_DATASET",
    "TRUE_COLUMNS",
    "estimates_path",
    "read_estimates",
    "read_motion_csv",
    "row_from_report",
    "write_estimates",
    "write_motion_csv",
]

ESTIMATES_NAME = "kmotion_motion_estimates"
"""Name of the estimates dataset inside the ISMRMRD group (:func:`estimates_path`)."""
LEGACY_ESTIMATES_DATASET = "kmotion/motion_estimates"
"""Where earlier versions stored the estimates (in a top-level group; still read)."""

CSV_COLUMNS = [
    "slice",
    "contrast",
    "phase",
    "repetition",
    "set",
    "shot",
    "reference_repetition",
    "dx_px",
    "dy_px",
    "rot_deg",
    "dx_std_px",
    "dy_std_px",
    "rot_std_deg",
    "dx_mm",
    "dy_mm",
    "patient_x_mm",
    "patient_y_mm",
    "patient_z_mm",
    "chi2",
    "p_value",
    "flagged",
    "corrected",
    "method",
    "reason",
]
TRUE_COLUMNS = ["true_dx_px", "true_dy_px", "true_rot_deg", "true_dx_mm", "true_dy_mm"]

_INTS = ("slice", "contrast", "phase", "repetition", "set", "shot", "reference_repetition")
COLUMN_KINDS: dict[str, str] = {
    **dict.fromkeys(_INTS, "int"),
    **{c: "float" for c in CSV_COLUMNS if c not in _INTS + ("flagged", "corrected", "method", "reason")},
    **dict.fromkeys(TRUE_COLUMNS, "float"),
    "flagged": "bool",
    "corrected": "bool",
    "method": "str",
    "reason": "str",
}
"""Kind (``int``, ``float``, ``bool``, ``str``) of every known column."""

_DEFAULTS = {"int": 0, "float": math.nan, "bool": False, "str": ""}
_H5_TYPES = {"int": np.dtype("<i4"), "float": np.dtype("<f8"), "bool": np.dtype("?")}
_PRECISE = ("chi2", "p_value")  # written with significant digits, not fixed decimals


def estimates_path(dataset: str = "dataset") -> str:
    """HDF5 path of the estimates of the ISMRMRD group ``dataset``: ``<dataset>/kmotion_motion_estimates``."""
    return f"{dataset}/{ESTIMATES_NAME}"


def _kind(name: str, value: Any) -> str:
    if name in COLUMN_KINDS:
        return COLUMN_KINDS[name]
    if isinstance(value, bool | np.bool_):
        return "bool"
    if isinstance(value, int | np.integer):
        return "int"
    if isinstance(value, str | bytes):
        return "str"
    return "float"  # floats and None (a number that was not estimated)


_COLUMN_DEFAULTS = {"shot": -1}
"""Defaults other than the kind's: ``shot`` -1 (a whole slice group; files before per-shot estimates)."""


def _typed(kind: str, value: Any, name: str = "") -> Any:
    """``value`` as a Python value of ``kind`` (None and empty text: the column's or the kind's default)."""
    if value is None or (isinstance(value, str) and value == "" and kind != "str"):
        return _COLUMN_DEFAULTS.get(name, _DEFAULTS[kind])
    if kind == "int":
        return int(value)
    if kind == "float":
        return float(value)
    if kind == "bool":
        return value if isinstance(value, bool) else (str(value).strip().lower() == "true")
    return value.decode() if isinstance(value, bytes) else str(value)


def row_from_report(report: Mapping[str, Any]) -> dict[str, Any]:
    """One table row from ``MotionReport.as_dict()``: every key kept, typed, None -> NaN / defaults.

    Keys the report lacks (e.g. ``phase`` from a report written before it existed) get their default
    (:data:`COLUMN_KINDS`: 0, NaN, False, "").
    """
    row = {c: _typed(COLUMN_KINDS[c], report.get(c), c) for c in CSV_COLUMNS}
    if report.get("reference_repetition") is None:
        row["reference_repetition"] = -1
    for k, v in report.items():
        if k not in row:
            row[k] = _typed(_kind(k, v), v)
    return row


def _missing(v: Any) -> bool:
    return v is None or (isinstance(v, float) and math.isnan(v))


def _columns(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    """:data:`CSV_COLUMNS`, then :data:`TRUE_COLUMNS` when present, then other keys in first-seen order."""
    cols = list(CSV_COLUMNS)
    if rows and TRUE_COLUMNS[0] in rows[0]:
        cols += TRUE_COLUMNS
    for r in rows:
        cols += [k for k in r if k not in cols]
    return cols


def _cell(name: str, v: Any) -> Any:
    if isinstance(v, float | np.floating):
        return f"{v:.6g}" if name in _PRECISE else f"{v:.4f}"
    return v


def write_motion_csv(rows: Sequence[Mapping[str, Any]], path: str | Path) -> Path:
    """Write estimate rows as CSV (columns as in the module docstring; floats with 4 decimals, ``chi2`` and
    ``p_value`` with 6 significant digits, NaN as ``nan``)."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    cols = _columns(rows)
    with p.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: _cell(k, r.get(k, _DEFAULTS[_kind(k, None)])) for k in cols})
    return p


def read_motion_csv(path: str | Path) -> list[dict[str, Any]]:
    """The typed rows of a CSV of :func:`write_motion_csv` (also of older versions: missing columns get
    their defaults, e.g. ``phase`` 0 and NaN uncertainties).  Unknown columns are read as text."""
    with Path(path).open(newline="") as f:
        table = list(csv.DictReader(f))
    rows = []
    for t in table:
        row = {c: _typed(COLUMN_KINDS[c], t.get(c), c) for c in CSV_COLUMNS}
        for k, v in t.items():
            if k not in row:
                row[k] = _typed(COLUMN_KINDS.get(k, "str"), v)
        rows.append(row)
    return rows


def write_estimates(
    path: str | Path,
    rows: Sequence[Mapping[str, Any]],
    reports: Sequence[Mapping[str, Any]],
    dataset: str = "dataset",
) -> None:
    """Store estimate ``rows`` as the dataset ``/<dataset>/kmotion_motion_estimates`` (replacing it).

    Integer columns are ``int32``, floats ``float64``, flags ``bool``, text variable-length UTF-8.  The
    attribute ``json`` holds ``reports`` (``MotionReport.as_dict()`` of every report; non-finite numbers
    become null).  The ISMRMRD group must exist (it is the file's raw-data group).
    """
    cols = _columns(rows)
    kinds = [_kind(c, next((r[c] for r in rows if not _missing(r.get(c))), None)) for c in cols]
    dtype = np.dtype([(c, _H5_TYPES.get(k, h5py.string_dtype())) for c, k in zip(cols, kinds, strict=True)])
    arr = np.array(
        [tuple(_typed(k, r.get(c)) for c, k in zip(cols, kinds, strict=True)) for r in rows], dtype=dtype
    )
    name = estimates_path(dataset)
    with h5py.File(path, "a") as f:
        if name in f:
            del f[name]
        d = f.create_dataset(name, data=arr, maxshape=(None,))
        d.attrs["json"] = json.dumps([_jsonable(r) for r in reports])
        d.attrs["description"] = (
            "kmotion motion estimates per slice group (slice, contrast, phase, repetition, set) relative to "
            "reference_repetition: dx/dy in pixels of the recon grid and mm, rot in degrees, standard errors "
            "*_std_*, likelihood-ratio chi2 and p_value against no motion, patient-frame translation in mm"
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


def read_estimates(path: str | Path, dataset: str = "dataset") -> list[dict[str, Any]]:
    """The estimate rows of a ``kmotion replay`` output file (typed; every :data:`CSV_COLUMNS` present).

    Reads ``/<dataset>/kmotion_motion_estimates``, or the older ``/kmotion/motion_estimates``.

    Raises
    ------
    InputError
        When the file holds neither.
    """
    name = estimates_path(dataset)
    with h5py.File(path, "r") as f:
        if name not in f:
            name = LEGACY_ESTIMATES_DATASET
        if name not in f:
            raise InputError(
                f"{path}: '{estimates_path(dataset)}': expected the estimates of kmotion replay, got none"
            )
        arr = f[name][()]
    rows = []
    names = arr.dtype.names or ()
    for a in arr:
        rec = {n: a[n].item() if isinstance(a[n], np.generic) else a[n] for n in names}
        row = {c: _typed(COLUMN_KINDS[c], rec.get(c), c) for c in CSV_COLUMNS}
        for n in names:
            if n not in row:
                row[n] = _typed(_kind(n, rec[n]), rec[n])
        rows.append(row)
    return rows
