"""Streaming reads of ISMRMRD ``.h5`` files: the header and the items, in chunks, and stored images.

:func:`open_ismrmrd` checks the file and parses its header; :meth:`IsmrmrdSource.items` yields the
acquisitions and waveforms in time-stamp order without loading the file; :func:`read_images` reads an image
group (e.g. the images of ``kmotion replay``).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import h5py
import ismrmrd
import ismrmrd.xsd
import numpy as np

from kmotion.io.ismrmrd_h5 import check_ismrmrd_file, parse_encoding
from kmotion.physics.validate import InputError

__all__ = ["IsmrmrdSource", "open_ismrmrd", "read_images"]


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


def read_images(path: str | Path, group: str, dataset: str = "dataset") -> list[ismrmrd.Image]:
    """The images of ``/dataset/<group>`` of an ISMRMRD file (empty list when absent)."""
    with ismrmrd.Dataset(str(path), dataset, create_if_needed=False, mode="r") as ds:
        if group not in ds._dataset:  # noqa: SLF001 - ismrmrd has no public "has images" query
            return []
        return [ds.read_image(group, i) for i in range(ds.number_of_images(group))]
