"""Streaming reads of ISMRMRD ``.h5`` files: the header and the items, in chunks, and stored images.

:func:`open_ismrmrd` checks the file and reads its header leniently (:mod:`kmotion.io.ismrmrd_header`;
missing ``encodingLimits`` from the acquisitions); :meth:`IsmrmrdSource.items` yields the
acquisitions and waveforms in time-stamp order without loading the file; :func:`read_images` reads an image
group (e.g. the images of ``kmotion replay``).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import h5py
import ismrmrd
import ismrmrd.xsd
import numpy as np

from kmotion.io.ismrmrd_h5 import check_ismrmrd_file
from kmotion.io.ismrmrd_header import LenientHeader, counter_ranges, fill_limits_from_data, read_header
from kmotion.physics.validate import InputError

__all__ = ["IsmrmrdSource", "open_ismrmrd", "read_images"]

log = logging.getLogger("kmotion.io")


@dataclass
class IsmrmrdSource:
    """An opened ISMRMRD file: its header and the counts of its items (read lazily by :meth:`items`).

    ``header`` is the header read leniently (None when it cannot be read: ``header_problem`` says why;
    ``header_filled`` names the defaults filled); ``xml`` the text as stored.
    """

    path: Path
    dataset: str
    header: ismrmrd.xsd.ismrmrdHeader | None
    xml: str
    n_acquisitions: int
    n_waveforms: int
    header_filled: tuple[str, ...] = ()
    header_problem: str | None = None

    def lenient_header(self) -> LenientHeader:
        """The header as :class:`~kmotion.io.ismrmrd_header.LenientHeader` (what the pipeline takes)."""
        return LenientHeader(self.xml, self.header, self.header_filled, self.header_problem)

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
    """Open an ISMRMRD ``.h5`` file for streaming.

    A file that cannot be used (missing, not HDF5, no ``dataset`` group, no ``xml`` or ``data``) raises
    :class:`InputError` naming the problem.  The header never does: it is read leniently, and the
    ``encodingLimits`` counters it lacks are filled from the acquisitions' counters (logged at INFO).
    """
    src, keys, counts = check_ismrmrd_file(path, dataset)
    n_acq, n_wav = counts.get("data", 0), counts.get("waveforms", 0)
    if "data" not in keys or n_acq == 0:
        raise InputError(f"{src}: '{dataset}/data': expected acquisitions, got entries {keys}")
    with ismrmrd.Dataset(src, dataset, create_if_needed=False, mode="r") as ds:
        raw_xml = ds.read_xml_header()
    xml = raw_xml.decode("utf-8", "replace") if isinstance(raw_xml, bytes) else str(raw_xml)
    xml = xml.rstrip("\x00")
    got = read_header(xml, f"{src}: '{dataset}/xml'")
    if got.header is not None and got.header.encoding:
        with h5py.File(src, "r") as f:
            heads = f[dataset]["data"].fields(["head"])[:]
        heads = heads["head"] if heads.dtype.names == ("head",) else heads
        for note in fill_limits_from_data(got.header, counter_ranges(heads)):
            log.info("%s: header %s", src, note)
    return IsmrmrdSource(Path(src), dataset, got.header, xml, n_acq, n_wav, got.filled, got.problem)


def read_images(path: str | Path, group: str, dataset: str = "dataset") -> list[ismrmrd.Image]:
    """The images of ``/dataset/<group>`` of an ISMRMRD file (empty list when absent)."""
    with ismrmrd.Dataset(str(path), dataset, create_if_needed=False, mode="r") as ds:
        if group not in ds._dataset:  # noqa: SLF001 - ismrmrd has no public "has images" query
            return []
        return [ds.read_image(group, i) for i in range(ds.number_of_images(group))]
