"""ISMRMRD ``.h5`` writing: the buffered stream writer and kmotion's true-motion records.

:class:`IsmrmrdWriter` (and :func:`write_stream`) store a header and a stream of acquisitions, waveforms and
images in an ISMRMRD ``.h5`` file, in chunks.  The true rigid motion of simulated data (:class:`TrueMotion`,
one row per (slice, repetition), or per (slice, repetition, shot) for motion within a scan) is stored in two
places: the HDF5 dataset ``/dataset/kmotion_true_motion`` (:func:`truth_path`; inside the ISMRMRD group, so
the file keeps one top-level group and readers that take the last or the only group open the raw data;
:func:`write_true_motion`, :func:`read_true_motion`, which also reads the ``/kmotion/true_motion`` of files
written by earlier versions) — a structured array with fields ``slice, repetition, dx_px, dy_px, phi_deg,
dx_mm, dy_mm`` and, only when the truth is per shot, ``shot, centre_shot`` — and the header's
``userParameterString`` ``kmotion.true_motion`` (:data:`TRUTH_USER_PARAMETER`, the same rows as JSON,
:func:`truth_json`, so it also travels in an MRD stream; :func:`true_motion_from_header`).

Per-shot truth (``shot >= 0``): ``shot`` is the echo train (``idx.segment``) of the row, ``centre_shot`` the
train of that (slice, repetition) that reads the k-space centre row (``n_ky // 2``; :func:`centre_shots`),
the gauge of a scan without a motion-free reference.  Per-repetition rows have ``shot = centre_shot = -1``
and are written without these columns (files and headers as before).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import h5py
import ismrmrd
import ismrmrd.xsd
import numpy as np

__all__ = [
    "LEGACY_TRUTH_DATASET",
    "TRUTH_NAME",
    "TRUTH_USER_PARAMETER",
    "IsmrmrdWriter",
    "TrueMotion",
    "centre_shots",
    "read_true_motion",
    "true_motion_from_header",
    "truth_json",
    "truth_path",
    "write_stream",
    "write_true_motion",
]

TRUTH_NAME = "kmotion_true_motion"
"""Name of the true-motion dataset inside the ISMRMRD group (:func:`truth_path`)."""
LEGACY_TRUTH_DATASET = "kmotion/true_motion"
"""Where earlier versions stored the true motion (in a top-level group; still read)."""
TRUTH_USER_PARAMETER = "kmotion.true_motion"
"""Name of the header's ``userParameterString`` holding the true motion as JSON."""


@dataclass(frozen=True)
class TrueMotion:
    """The motion of one (slice, repetition) — or of one echo train ``shot`` of it — relative to the
    motion-free reference (repetition 0, or the simulated object's pose).

    ``dx_px``/``dy_px`` in pixels of the recon grid, ``phi_deg`` in degrees, ``dx_mm``/``dy_mm`` in mm
    (``docs/conventions.md``).  ``shot``: the echo train (``idx.segment``), -1 for per-repetition truth;
    ``centre_shot``: the train of the (slice, repetition) that reads the k-space centre row, -1 when unknown.
    """

    slice: int
    repetition: int
    dx_px: float
    dy_px: float
    phi_deg: float
    dx_mm: float
    dy_mm: float
    shot: int = -1
    centre_shot: int = -1


_TRUTH_DTYPE = np.dtype(
    [
        ("slice", "<i4"),
        ("repetition", "<i4"),
        ("dx_px", "<f8"),
        ("dy_px", "<f8"),
        ("phi_deg", "<f8"),
        ("dx_mm", "<f8"),
        ("dy_mm", "<f8"),
    ]
)


_SHOT_DTYPE = np.dtype(_TRUTH_DTYPE.descr + [("shot", "<i4"), ("centre_shot", "<i4")])
_SHOT_FIELDS = ("shot", "centre_shot")


def _per_shot(truth: Sequence[TrueMotion]) -> bool:
    return any(t.shot >= 0 for t in truth)


def _truth_dict(t: TrueMotion, per_shot: bool) -> dict[str, float | int]:
    d = asdict(t)
    if not per_shot:
        for k in _SHOT_FIELDS:
            d.pop(k)
    return d


def truth_json(truth: Sequence[TrueMotion]) -> str:
    """The rows as compact JSON (the header's ``kmotion.true_motion``); ``shot``/``centre_shot`` only when the
    truth is per shot (any ``shot >= 0``).  Not XML-escaped."""
    per_shot = _per_shot(truth)
    return json.dumps([_truth_dict(t, per_shot) for t in truth], separators=(",", ":"))


def centre_shots(truth: Sequence[TrueMotion]) -> dict[tuple[int, int], int]:
    """``{(slice, repetition): centre_shot}`` of per-shot truth rows (rows with ``centre_shot < 0`` are left
    out; empty for per-repetition truth)."""
    return {(t.slice, t.repetition): t.centre_shot for t in truth if t.centre_shot >= 0}


def write_stream(
    path: str | Path,
    header: ismrmrd.xsd.ismrmrdHeader | str,
    items: Iterable[object],
    dataset: str = "dataset",
) -> None:
    """Write a header and a stream of acquisitions/waveforms to an ISMRMRD file (other items are ignored)."""
    with IsmrmrdWriter(path, header, dataset) as w:
        for item in items:
            w.append(item)


class IsmrmrdWriter:
    """Buffered writer of an ISMRMRD ``.h5`` stream (same layout as ``ismrmrd.Dataset``, in chunks).

    ``ismrmrd.Dataset.append_acquisition`` resizes the HDF5 dataset once per acquisition; this writer
    appends ``chunk`` records at a time.  Images are kept and written with ``ismrmrd.Dataset.append_image``
    when the writer closes.
    """

    def __init__(
        self,
        path: str | Path,
        header: ismrmrd.xsd.ismrmrdHeader | str,
        dataset: str = "dataset",
        chunk: int = 256,
    ) -> None:
        from ismrmrd.hdf5 import acquisition_dtype, waveform_dtype

        self.path = Path(path)
        self.dataset = dataset
        self.chunk = chunk
        xml = header if isinstance(header, str) else ismrmrd.xsd.ToXML(header)
        self._file = h5py.File(self.path, "a")
        grp = self._file.require_group(dataset)
        if "xml" in grp:
            del grp["xml"]
        grp.create_dataset("xml", shape=(1,), dtype=h5py.special_dtype(vlen=bytes))[0] = xml
        self._dtypes = {"data": acquisition_dtype, "waveforms": waveform_dtype}
        self._pending: dict[str, list[dict[str, np.ndarray]]] = {"data": [], "waveforms": []}
        self._images: list[tuple[str, ismrmrd.Image]] = []
        self.n_acquisitions = 0
        self.n_waveforms = 0

    def append(self, item: object) -> None:
        """Queue an acquisition or a waveform (anything else is ignored)."""
        from ismrmrd.hdf5 import acquisition_header_dtype, waveform_header_dtype

        if isinstance(item, ismrmrd.Acquisition):
            head = np.frombuffer(item.getHead(), dtype=acquisition_header_dtype)[0]
            data = np.ascontiguousarray(item.data, dtype=np.complex64).view(np.float32).reshape(-1)
            traj = np.ascontiguousarray(item.traj, dtype=np.float32).reshape(-1)
            self._pending["data"].append({"head": head, "traj": traj, "data": data})
            self.n_acquisitions += 1
            if len(self._pending["data"]) >= self.chunk:
                self._flush("data")
        elif isinstance(item, ismrmrd.Waveform):
            head = np.frombuffer(item.getHead(), dtype=waveform_header_dtype)[0]
            wdata = np.ascontiguousarray(item.data, dtype=np.uint32).reshape(-1)
            self._pending["waveforms"].append({"head": head, "data": wdata})
            self.n_waveforms += 1
            if len(self._pending["waveforms"]) >= self.chunk:
                self._flush("waveforms")

    def append_image(self, group: str, image: ismrmrd.Image) -> None:
        """Queue an image for ``/<dataset>/<group>`` (written on close)."""
        self._images.append((group, image))

    def _flush(self, name: str) -> None:
        recs = self._pending[name]
        if not recs:
            return
        grp = self._file[self.dataset]
        if name not in grp:
            grp.create_dataset(name, (0,), maxshape=(None,), dtype=self._dtypes[name], chunks=(self.chunk,))
        d = grp[name]
        n = d.shape[0]
        d.resize(n + len(recs), axis=0)
        arr = np.empty(len(recs), dtype=self._dtypes[name])
        arr["head"] = np.stack([r["head"] for r in recs])
        for i, r in enumerate(recs):
            for k in ("data", "traj"):
                if k in r:
                    arr[i][k] = r[k]
        d[n:] = arr
        self._pending[name] = []

    def close(self) -> None:
        """Flush everything and close the file."""
        if self._file.id.valid:
            self._flush("data")
            self._flush("waveforms")
            self._file.close()
        if self._images:
            with ismrmrd.Dataset(str(self.path), self.dataset, create_if_needed=True) as ds:
                for group, image in self._images:
                    ds.append_image(group, image)
            self._images = []

    def __enter__(self) -> IsmrmrdWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def truth_path(dataset: str = "dataset") -> str:
    """HDF5 path of the true motion of the ISMRMRD group ``dataset``: ``"<dataset>/kmotion_true_motion"``."""
    return f"{dataset}/{TRUTH_NAME}"


def write_true_motion(path: str | Path, truth: Sequence[TrueMotion], dataset: str = "dataset") -> None:
    """Store ``truth`` as the structured dataset ``/<dataset>/kmotion_true_motion`` (replacing it); with
    ``shot, centre_shot`` columns only when the truth is per shot."""
    per_shot = _per_shot(truth)
    dtype = _SHOT_DTYPE if per_shot else _TRUTH_DTYPE
    arr = np.array([tuple(_truth_dict(t, per_shot).values()) for t in truth], dtype=dtype)
    name = truth_path(dataset)
    with h5py.File(path, "a") as f:
        if name in f:
            del f[name]
        d = f.create_dataset(name, data=arr)
        d.attrs["description"] = (
            "true rigid in-plane motion per (slice, repetition) relative to repetition 0: g(r) = "
            "f(R(phi)^-1 (r - t)); dx/dy in pixels of the recon grid and in mm, phi in degrees "
            "(kmotion docs/conventions.md)"
            + (
                "; one row per echo train: shot = idx.segment, centre_shot = the train of the (slice, "
                "repetition) reading the k-space centre row (the gauge without a motion-free reference)"
                if per_shot
                else ""
            )
        )


def read_true_motion(path: str | Path, dataset: str = "dataset") -> list[TrueMotion] | None:
    """The true-motion rows of an HDF5 file (``/<dataset>/kmotion_true_motion``, or the older
    ``/kmotion/true_motion``), or None when the file has none."""
    with h5py.File(path, "r") as f:
        name = next((n for n in (truth_path(dataset), LEGACY_TRUTH_DATASET) if n in f), None)
        if name is None:
            return None
        arr = f[name][()]
    names = arr.dtype.names or ()
    return [
        TrueMotion(
            int(a["slice"]),
            int(a["repetition"]),
            float(a["dx_px"]),
            float(a["dy_px"]),
            float(a["phi_deg"]),
            float(a["dx_mm"]),
            float(a["dy_mm"]),
            int(a["shot"]) if "shot" in names else -1,
            int(a["centre_shot"]) if "centre_shot" in names else -1,
        )
        for a in arr
    ]


def true_motion_from_header(header: ismrmrd.xsd.ismrmrdHeader) -> list[TrueMotion] | None:
    """The true motion stored in the header's ``userParameterString`` ``kmotion.true_motion``, if any."""
    up = getattr(header, "userParameters", None)
    if up is None:
        return None
    for p in up.userParameterString:
        if p.name == TRUTH_USER_PARAMETER:
            return [TrueMotion(**row) for row in json.loads(p.value)]
    return None
