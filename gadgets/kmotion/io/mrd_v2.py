"""MRD v2 (the ``mrd-python`` package: yardl binary streams) in and out of the ismrmrd-python pipeline.

The gadget works on ismrmrd-python objects (MRD v1).  This module reads and writes MRD v2 binary streams
with ``mrd.BinaryMrdReader`` / ``mrd.BinaryMrdWriter`` and converts their items:

==========================  =============================  ============================================
MRD v2 (``mrd``)            MRD v1 (``ismrmrd``)           notes
==========================  =============================  ============================================
``Header``                  ``xsd.ismrmrdHeader``          every field, by name (camelCase <-> snake_case)
``Acquisition``             ``Acquisition``                trajectory ``(basis, samples)`` <-> ``(samples,
                                                           basis)``; ``channel_order`` <-> ``channel_mask``
``WaveformUint32``          ``Waveform``                   all fields
``Image*`` (8 data types)   ``Image``                      ``col_dir``/``line_dir`` <-> ``read_dir``/
                                                           ``phase_dir``; meta <-> XML attribute string
other items                 (none)                         passed through untouched in MRD v2 output
==========================  =============================  ============================================

MRD v2 fields are optional (None) where MRD v1 has a number (0) and its lists (user values, physiology time
stamps, counters) may be longer or shorter than MRD v1's fixed arrays.  To write every item that was not
changed exactly as it came in, the reader keeps each acquisition's MRD v2 header in a :class:`Mrd2Context`
(keyed by the MRD v1 header it became) and the writer restores the None fields and list lengths from it
(:func:`acquisition_from_ismrmrd`).  A v2 ``CalibrationMode.NOACCELERATION`` has no v1 counterpart (the v1
header then has no ``calibrationMode``).  MRD v2 has no TEXT or ERROR messages: written to MRD v2, the
estimates travel in the images' meta (``kmotion_*``) and in the log, errors in the log and the exit status.

A stream is MRD v2 when it starts with the yardl magic bytes ``b"yardl"`` (:data:`MAGIC`), MRD v1 when it
starts with a message id, an ISMRMRD file when it starts with the HDF5 signature (:func:`sniff`).
"""

from __future__ import annotations

import base64
import dataclasses
import datetime
import enum
import io
import logging
import types
import typing
from collections import deque
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

import ismrmrd
import ismrmrd.xsd
import mrd
import numpy as np

from kmotion.io.mrd_v1 import Message, MessageId, ProtocolError, TruncatedMessageError
from kmotion.physics.validate import InputError

__all__ = [
    "HDF5_MAGIC",
    "MAGIC",
    "Mrd2Context",
    "Mrd2FileWriter",
    "Mrd2MessageReader",
    "Mrd2MessageWriter",
    "Mrd2Source",
    "acquisition_from_ismrmrd",
    "acquisition_to_ismrmrd",
    "header_from_ismrmrd",
    "header_to_ismrmrd",
    "image_from_ismrmrd",
    "image_to_ismrmrd",
    "is_mrd2_file",
    "item_from_ismrmrd",
    "item_to_ismrmrd",
    "open_mrd2",
    "sniff",
    "waveform_from_ismrmrd",
    "waveform_to_ismrmrd",
]

log = logging.getLogger("kmotion.gadget")

MAGIC = b"yardl"
"""First bytes of an MRD v2 (yardl binary) stream."""
HDF5_MAGIC = b"\x89HDF\r\n\x1a\n"
"""First bytes of an HDF5 (ISMRMRD ``.h5``) file."""

_XSD = ismrmrd.xsd.ismrmrdschema.ismrmrd  # the generated (xsdata) dataclasses of the ISMRMRD v1 schema
XmlDate: Any = _XSD.XmlDate  # xsdata's date and time types, as the schema module uses them
XmlTime: Any = _XSD.XmlTime
_MRD_MODULES = (mrd.types.__name__,)


# ---- format detection ---------------------------------------------------------------------------------


class _Prefixed(io.RawIOBase):
    """``head`` followed by the rest of ``stream`` (to read a stream whose first bytes were looked at)."""

    def __init__(self, head: bytes, stream: BinaryIO) -> None:
        self._head = head
        self._stream = stream

    def readable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        view = memoryview(b).cast("B")
        if self._head:
            n = min(len(view), len(self._head))
            view[:n] = self._head[:n]
            self._head = self._head[n:]
            return n
        read1 = getattr(self._stream, "read1", self._stream.read)
        data = read1(len(view))
        view[: len(data)] = data
        return len(data)


def sniff(stream: BinaryIO) -> tuple[str, BinaryIO]:
    """The format of ``stream`` from its first 8 bytes, and a stream that still yields them.

    Returns ``("mrd2", s)`` for a yardl stream (:data:`MAGIC`), ``("hdf5", s)`` for an HDF5 file, else
    ``("mrd1", s)`` (an MRD v1 message stream, or empty input).
    """
    head = b""
    while len(head) < len(HDF5_MAGIC):
        b = stream.read(len(HDF5_MAGIC) - len(head))
        if not b:
            break
        head += b
    kind = "mrd2" if head.startswith(MAGIC) else "hdf5" if head == HDF5_MAGIC else "mrd1"
    return kind, io.BufferedReader(_Prefixed(head, stream))


def is_mrd2_file(path: str | Path) -> bool:
    """True when the file ``path`` starts with the MRD v2 magic bytes (False when it cannot be read)."""
    try:
        with open(path, "rb") as f:
            return f.read(len(MAGIC)) == MAGIC
    except OSError:
        return False


# ---- the XML header <-> the MRD v2 Header ------------------------------------------------------------


def _norm(name: str) -> str:
    """``fieldOfView_mm`` / ``field_of_view_mm`` -> ``fieldofviewmm`` (how the two schemas' names match)."""
    return name.replace("_", "").lower()


def _fields(obj_or_cls: Any) -> dict[str, tuple[str, Any]]:
    """Normalised name -> (attribute name, type) of an xsd dataclass or an ``mrd`` record class."""
    cls = obj_or_cls if isinstance(obj_or_cls, type) else type(obj_or_cls)
    hints = typing.get_type_hints(cls, include_extras=True)  # keeps yardl's Float32 / Float64 marks
    names = [f.name for f in dataclasses.fields(cls)] if dataclasses.is_dataclass(cls) else list(hints)
    return {_norm(n): (n, hints[n]) for n in names}


def _strip_optional(tp: Any) -> Any:
    """``X`` of ``Optional[X]`` / ``X | None`` / ``Annotated[X, ...]``."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        tp = args[0] if len(args) == 1 else tp
    return typing.get_args(tp)[0] if typing.get_origin(tp) is typing.Annotated else tp


def _is_float32(tp: Any) -> bool:
    """True for yardl's ``Float32`` (``Annotated[float, "Float32"]``), also inside Optional / list."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType, list):
        return any(_is_float32(a) for a in typing.get_args(tp))
    return typing.get_origin(tp) is typing.Annotated and "Float32" in typing.get_args(tp)[1:]


def _is_record(tp: Any) -> bool:
    return isinstance(tp, type) and (
        dataclasses.is_dataclass(tp) or (tp.__module__ in _MRD_MODULES and not issubclass(tp, enum.Enum))
    )


def _convert(value: Any, tp: Any, float32: bool = False) -> Any:
    """``value`` (of one schema) as the type ``tp`` of the other schema (records field by field).

    ``float32``: ``value`` comes from an MRD v2 ``float32`` field; it becomes the shortest decimal that reads
    back as the same float32 (``0.793``, not ``0.7929999828338623``).
    """
    if value is None:
        return None
    tp = _strip_optional(tp)
    if typing.get_origin(tp) is list:
        (inner,) = typing.get_args(tp)
        return [_convert(v, inner, float32) for v in value]
    if _is_record(tp):
        src = _fields(value)
        kwargs = {}
        for key, (name, ftp) in _fields(tp).items():
            if key in src:
                v = _convert(getattr(value, src[key][0]), ftp, _is_float32(src[key][1]))
                if v is not None:
                    kwargs[name] = v
        return tp(**kwargs)
    if tp is float and float32:
        return float(str(np.float32(value)))
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        label = _norm(
            value.value
            if isinstance(value, enum.Enum) and isinstance(value.value, str)
            else value.name
            if isinstance(value, enum.Enum)
            else str(value)
        )
        for m in tp:
            if _norm(m.value if isinstance(m.value, str) else m.name) == label:
                return m
        return None  # no counterpart (e.g. MRD v2 CalibrationMode.NOACCELERATION)
    if tp is str and isinstance(value, enum.Enum):  # MRD v2 PatientGender -> xsd string "M"/"F"/"O"
        return value.name
    if tp is XmlDate:
        return XmlDate.from_date(value)
    if tp is datetime.date:
        return value.to_date()
    if tp is XmlTime:
        ns = int(value.numpy_value.astype("timedelta64[ns]").astype(np.int64))
        s, frac = divmod(ns, 1_000_000_000)
        return XmlTime(s // 3600, s // 60 % 60, s % 60, frac)
    if tp is mrd.Time:
        return mrd.Time.from_components(value.hour, value.minute, value.second, value.fractional_second or 0)
    if tp is bytes:  # xsd userParameterBase64 holds the decoded bytes, MRD v2 the base64 text
        return base64.b64decode(value)
    if tp is str and isinstance(value, bytes):
        return base64.b64encode(value).decode("ascii")
    return tp(value) if tp in (int, float, str) else value


def header_to_ismrmrd(header: mrd.Header | None) -> ismrmrd.xsd.ismrmrdHeader:
    """The ISMRMRD (v1) XML header of an MRD v2 ``Header`` (None: an empty header without encoding)."""
    if header is None:
        return _XSD.ismrmrdHeader(
            experimentalConditions=_XSD.experimentalConditionsType(H1resonanceFrequency_Hz=0)
        )
    return _convert(header, _XSD.ismrmrdHeader)


def header_from_ismrmrd(header: ismrmrd.xsd.ismrmrdHeader) -> mrd.Header:
    """The MRD v2 ``Header`` of an ISMRMRD (v1) XML header."""
    return _convert(header, mrd.Header)


# ---- items ------------------------------------------------------------------------------------------

_COUNTERS = (
    "kspace_encode_step_1",
    "kspace_encode_step_2",
    "average",
    "slice",
    "contrast",
    "phase",
    "repetition",
    "set",
    "segment",
)
_OPTIONAL = (
    "scan_counter",
    "acquisition_time_stamp",
    "discard_pre",
    "discard_post",
    "center_sample",
    "encoding_space_ref",
    "sample_time_us",
)
_VECTORS = ("position", "read_dir", "phase_dir", "slice_dir", "patient_table_position")
_LISTS = ("physiology_time_stamp", "user_int", "user_float")


def _fill(dst: Any, values: list[Any] | Any) -> None:
    """Copy a list into a fixed-length ctypes array (missing entries 0, extra entries dropped)."""
    vals = list(values)[: len(dst)]
    for i in range(len(dst)):
        dst[i] = vals[i] if i < len(vals) else 0


def _channel_order(head: ismrmrd.AcquisitionHeader) -> list[int]:
    """MRD v2 ``channel_order`` of the v1 channel mask (``range(active_channels)`` when the mask is unset)."""
    mask = [int(m) for m in head.channel_mask]
    order = [64 * w + b for w, m in enumerate(mask) for b in range(64) if m >> b & 1]
    return (
        order if order and len(order) == int(head.active_channels) else list(range(int(head.active_channels)))
    )


def acquisition_to_ismrmrd(acq: mrd.Acquisition) -> ismrmrd.Acquisition:
    """An ``ismrmrd.Acquisition`` of an MRD v2 acquisition (None fields become 0).

    Raises
    ------
    ValueError
        For values MRD v1 cannot hold (more than 65535 samples, counters above 65535).
    """
    h = acq.head
    data = np.ascontiguousarray(acq.data, dtype=np.complex64)
    n_ch, n_s = data.shape
    traj = np.asarray(acq.trajectory, dtype=np.float32)
    n_t = int(traj.shape[0]) if traj.size else 0
    if n_t and traj.shape[1] != n_s:
        raise ValueError(f"trajectory of {traj.shape[1]} samples for {n_s} data samples")
    v1 = ismrmrd.AcquisitionHeader()
    v1.version = 1
    v1.flags = int(h.flags)
    v1.measurement_uid = int(h.measurement_uid)
    for name in _OPTIONAL:
        setattr(v1, name, getattr(h, name) or 0)
    _fill(v1.physiology_time_stamp, h.physiology_time_stamp)
    if max(n_s, n_ch) > 0xFFFF:
        raise ValueError(f"{n_ch} coils x {n_s} samples: MRD v1 holds at most 65535 of each")
    v1.number_of_samples, v1.available_channels, v1.active_channels = n_s, n_ch, n_ch
    if h.channel_order and list(h.channel_order) != list(range(n_ch)):
        if max(h.channel_order) >= 64 * len(v1.channel_mask):
            raise ValueError(f"channel {max(h.channel_order)} beyond MRD v1's channel mask")
        for c in h.channel_order:
            v1.channel_mask[c // 64] |= 1 << (c % 64)
    v1.trajectory_dimensions = n_t
    for name in _VECTORS:
        _fill(getattr(v1, name), np.asarray(getattr(h, name), dtype=np.float32).tolist())
    for name in _COUNTERS:
        v = getattr(h.idx, name) or 0
        if v > 0xFFFF:
            raise ValueError(f"counter {name} = {v} above 65535 cannot be written to MRD v1")
        setattr(v1.idx, name, v)
    _fill(v1.idx.user, h.idx.user)
    _fill(v1.user_int, h.user_int)
    _fill(v1.user_float, h.user_float)
    t = np.ascontiguousarray(traj.T) if n_t else np.zeros((n_s, 0), dtype=np.float32)
    return ismrmrd.Acquisition(v1, data.copy(), t)


def _restore(values: list[Any], template: list[Any], capacity: int) -> list[Any]:
    """A v1 fixed array back to the length of the template's v2 list (entries beyond v1's from it)."""
    if len(template) > capacity:
        return values + list(template[capacity:])
    if all(v == 0 for v in values[len(template) :]):
        return values[: len(template)]
    return values


def acquisition_from_ismrmrd(
    acq: ismrmrd.Acquisition, template: mrd.AcquisitionHeader | None = None
) -> mrd.Acquisition:
    """The MRD v2 acquisition of an ``ismrmrd.Acquisition``.

    ``template``: the MRD v2 header this acquisition was read as; its None fields stay None where the v1
    value is 0, its lists keep their length, its ``channel_order`` is kept (so an unchanged acquisition is
    written back exactly as it was read).
    """
    h = acq.getHead()
    n_ch, n_s, n_t = int(h.active_channels), int(h.number_of_samples), int(h.trajectory_dimensions)
    head = mrd.AcquisitionHeader(
        flags=mrd.AcquisitionFlags(int(h.flags)),
        idx=mrd.EncodingCounters(
            **{n: int(getattr(h.idx, n)) for n in _COUNTERS}, user=[int(u) for u in h.idx.user]
        ),
        measurement_uid=int(h.measurement_uid),
        physiology_time_stamp=[int(v) for v in h.physiology_time_stamp],
        channel_order=_channel_order(h),
        user_int=[int(v) for v in h.user_int],
        user_float=[float(v) for v in h.user_float],
        **{n: getattr(h, n) for n in _OPTIONAL},
        **{n: np.array(getattr(h, n)[:], dtype=np.float32) for n in _VECTORS},
    )
    if template is not None:
        for name in _OPTIONAL:
            if getattr(template, name) is None and getattr(head, name) == 0:
                setattr(head, name, None)
        for name in _COUNTERS:
            if getattr(template.idx, name) is None and getattr(head.idx, name) == 0:
                setattr(head.idx, name, None)
        head.idx.user = _restore(head.idx.user, template.idx.user, 8)
        for name in _LISTS:
            setattr(head, name, _restore(getattr(head, name), getattr(template, name), len(getattr(h, name))))
        if len(template.channel_order) == n_ch:
            head.channel_order = list(template.channel_order)
    data = np.ascontiguousarray(np.asarray(acq.data).reshape(n_ch, n_s), dtype=np.complex64)
    traj = (
        np.ascontiguousarray(np.asarray(acq.traj, dtype=np.float32).reshape(n_s, n_t).T)
        if n_t
        else np.zeros((0, 0), dtype=np.float32)
    )
    return mrd.Acquisition(head=head, data=data, trajectory=traj)


def waveform_to_ismrmrd(w: mrd.WaveformUint32) -> ismrmrd.Waveform:
    """An ``ismrmrd.Waveform`` of an MRD v2 waveform (data ``(channels, samples)`` uint32)."""
    data = np.ascontiguousarray(w.data, dtype=np.uint32)
    head = ismrmrd.WaveformHeader()
    head.version = 1
    head.flags, head.measurement_uid, head.scan_counter = (
        int(w.flags),
        int(w.measurement_uid),
        int(w.scan_counter),
    )
    head.time_stamp, head.sample_time_us, head.waveform_id = (
        int(w.time_stamp),
        float(w.sample_time_us),
        int(w.waveform_id),
    )
    head.channels, head.number_of_samples = data.shape
    return ismrmrd.Waveform(head, data)


def waveform_from_ismrmrd(w: ismrmrd.Waveform) -> mrd.WaveformUint32:
    """The MRD v2 waveform of an ``ismrmrd.Waveform``."""
    h = w.getHead()
    return mrd.WaveformUint32(
        flags=int(h.flags),
        measurement_uid=int(h.measurement_uid),
        scan_counter=int(h.scan_counter),
        time_stamp=int(h.time_stamp),
        sample_time_us=float(h.sample_time_us),
        waveform_id=int(h.waveform_id),
        data=np.ascontiguousarray(w.data, dtype=np.uint32).reshape(int(h.channels), int(h.number_of_samples)),
    )


_IMAGE_CASES: dict[np.dtype[Any], Any] = {
    np.dtype(np.uint16): mrd.StreamItem.ImageUint16,
    np.dtype(np.int16): mrd.StreamItem.ImageInt16,
    np.dtype(np.uint32): mrd.StreamItem.ImageUint32,
    np.dtype(np.int32): mrd.StreamItem.ImageInt32,
    np.dtype(np.float32): mrd.StreamItem.ImageFloat,
    np.dtype(np.float64): mrd.StreamItem.ImageDouble,
    np.dtype(np.complex64): mrd.StreamItem.ImageComplexFloat,
    np.dtype(np.complex128): mrd.StreamItem.ImageComplexDouble,
}
_IMAGE_COUNTERS = ("average", "slice", "contrast", "phase", "repetition", "set")
_IMAGE_OPTIONAL = (*_IMAGE_COUNTERS, "acquisition_time_stamp", "image_index", "image_series_index")
_IMAGE_DIRS = (
    ("position", "position"),
    ("col_dir", "read_dir"),
    ("line_dir", "phase_dir"),
    ("slice_dir", "slice_dir"),
    ("patient_table_position", "patient_table_position"),
    ("field_of_view", "field_of_view"),
)


def _meta_value(text: str) -> Any:
    """An MRD v2 meta value of an ISMRMRD meta string (int64, float64 or string)."""
    try:
        return mrd.ImageMetaValue.Int64(int(text))
    except ValueError:
        pass
    try:
        return mrd.ImageMetaValue.Float64(float(text))
    except ValueError:
        return mrd.ImageMetaValue.String(text)


def image_to_ismrmrd(img: mrd.Image[Any]) -> ismrmrd.Image:
    """An ``ismrmrd.Image`` of an MRD v2 image (data ``(channel, z, y, x)``; meta values as text)."""
    h = img.head
    head = ismrmrd.ImageHeader()
    head.version = 1
    head.flags, head.measurement_uid = int(h.flags), int(h.measurement_uid)
    head.image_type = int(h.image_type.value)
    for name in _IMAGE_OPTIONAL:
        setattr(head, name, getattr(h, name) or 0)
    for v2, v1 in _IMAGE_DIRS:
        _fill(getattr(head, v1), np.asarray(getattr(h, v2), dtype=np.float32).tolist())
    _fill(head.physiology_time_stamp, h.physiology_time_stamp)
    _fill(head.user_int, h.user_int)
    _fill(head.user_float, h.user_float)
    meta = ismrmrd.Meta()
    for k, values in (img.meta or {}).items():
        texts = [str(v.value) for v in values]
        meta[k] = texts[0] if len(texts) == 1 else texts
    return ismrmrd.Image(head, meta=meta, data=np.ascontiguousarray(img.data))


def image_from_ismrmrd(img: ismrmrd.Image) -> Any:
    """The MRD v2 ``StreamItem`` (``ImageFloat``, ``ImageComplexFloat``, ...) of an ``ismrmrd.Image``."""
    h = img.getHead()
    data = np.ascontiguousarray(img.data)
    case = _IMAGE_CASES.get(data.dtype)
    if case is None:
        raise ValueError(f"image data type {data.dtype} has no MRD v2 image type")
    head = mrd.ImageHeader(
        image_type=mrd.ImageType(int(h.image_type)),
        flags=mrd.ImageFlags(int(h.flags)),
        measurement_uid=int(h.measurement_uid),
        physiology_time_stamp=[int(v) for v in h.physiology_time_stamp],
        user_int=[int(v) for v in h.user_int],
        user_float=[float(v) for v in h.user_float],
        **{n: int(getattr(h, n)) for n in _IMAGE_OPTIONAL},
        **{v2: np.array(getattr(h, v1)[:], dtype=np.float32) for v2, v1 in _IMAGE_DIRS},
    )
    meta = {
        str(k): [_meta_value(str(x)) for x in (v if isinstance(v, list) else [v])]
        for k, v in img.meta.items()
    }
    return case(mrd.Image(head=head, data=data, meta=meta))


def item_to_ismrmrd(item: Any) -> Any:
    """The ismrmrd-python object of an MRD v2 ``StreamItem`` (acquisition, waveform, image); any other
    item (buckets, recon data, arrays) is returned as it is."""
    value = item.value
    if isinstance(item, mrd.StreamItem.Acquisition):
        return acquisition_to_ismrmrd(value)
    if isinstance(item, mrd.StreamItem.WaveformUint32):
        return waveform_to_ismrmrd(value)
    if isinstance(value, mrd.Image):
        return image_to_ismrmrd(value)
    return item


class Mrd2Context:
    """What an MRD v2 reader hands to the writer so that unchanged items go out exactly as they came in.

    ``header``: the MRD v2 header read and ``header_xml`` the v1 XML it became; ``templates``: the MRD v2
    header of every acquisition read, by the bytes of the v1 header it became (trajectory dimensions
    excluded: the trajectory output mode adds a trajectory).
    """

    def __init__(self) -> None:
        self.header: mrd.Header | None = None
        self.header_xml: str | None = None
        self.templates: dict[bytes, deque[mrd.AcquisitionHeader]] = {}

    @staticmethod
    def key(acq: ismrmrd.Acquisition) -> bytes:
        h = acq.getHead()
        h.trajectory_dimensions = 0
        return bytes(h)

    def remember(self, acq: ismrmrd.Acquisition, head: mrd.AcquisitionHeader) -> None:
        self.templates.setdefault(self.key(acq), deque()).append(head)

    def template(self, acq: ismrmrd.Acquisition) -> mrd.AcquisitionHeader | None:
        q = self.templates.get(self.key(acq))
        if not q:
            return None
        head = q.popleft()
        if not q:
            del self.templates[self.key(acq)]
        return head


def item_from_ismrmrd(item: Any, context: Mrd2Context | None = None) -> Any:
    """The MRD v2 ``StreamItem`` of an ismrmrd-python object (an MRD v2 item is returned as it is).

    Raises
    ------
    TypeError
        For anything else (text, reports).
    """
    if isinstance(item, ismrmrd.Acquisition):
        template = context.template(item) if context is not None else None
        return mrd.StreamItem.Acquisition(acquisition_from_ismrmrd(item, template))
    if isinstance(item, ismrmrd.Waveform):
        return mrd.StreamItem.WaveformUint32(waveform_from_ismrmrd(item))
    if isinstance(item, ismrmrd.Image):
        return image_from_ismrmrd(item)
    if isinstance(item, mrd.StreamItem):
        return item
    raise TypeError(f"no MRD v2 stream item for an item of type {type(item).__name__}")


# ---- streams: the MRD v1 message interface over MRD v2 ---------------------------------------------------


def _reader_error(exc: Exception, peer: str, n: int) -> ProtocolError:
    # mrd-python 2.1 reports the end of input inside an item as EOFError, or as BufferError when the
    # last (short) read left bytes to move in its buffer
    if isinstance(exc, EOFError | BufferError):
        return TruncatedMessageError(
            f"{peer}: MRD v2 stream truncated after {n} item(s) (stream ended early)"
        )
    return ProtocolError(f"{peer}: MRD v2 stream: {type(exc).__name__}: {exc}")


class Mrd2MessageReader:
    """An MRD v2 stream read as :class:`~kmotion.io.mrd_v1.MessageReader` messages: HEADER (XML), then an
    ACQUISITION / WAVEFORM / IMAGE message per item, then CLOSE at the end of the stream.

    Items MRD v1 cannot hold (other item kinds, values beyond v1's ranges) come as messages with id 0 and
    the MRD v2 item as value when ``keep_other`` (MRD v2 output: they pass through untouched); otherwise
    they are dropped with a WARNING each.  A malformed or truncated stream raises
    :class:`~kmotion.io.mrd_v1.ProtocolError`.
    """

    def __init__(self, stream: BinaryIO, context: Mrd2Context, keep_other: bool, peer: str = "input stream"):
        self.context = context
        self.keep_other = keep_other
        self.peer = peer
        self.n_messages = 0
        self._stream = stream
        self._reader: mrd.BinaryMrdReader | None = None
        self._items: Iterator[Any] | None = None
        self._done = False

    def read_message(self) -> Message | None:
        """The next message; None after CLOSE."""
        if self._done:
            return None
        try:
            if self._reader is None:  # yardl raises RuntimeError/EOFError for a bad magic, version or schema
                self._reader = mrd.BinaryMrdReader(self._stream)
            if self._items is None:
                header = self._reader.read_header()
                xsd = header_to_ismrmrd(header)
                self.context.header = header
                self.context.header_xml = ismrmrd.xsd.ToXML(xsd)
                self._items = iter(self._reader.read_data())
                self.n_messages += 1
                return Message(MessageId.HEADER, self.context.header_xml)
            while True:
                item = next(self._items, None)
                if item is None:
                    self._done = True
                    return Message(MessageId.CLOSE, None)
                self.n_messages += 1
                msg = self._message(item)
                if msg is not None:
                    return msg
        except ProtocolError:
            raise
        except Exception as exc:
            raise _reader_error(exc, self.peer, self.n_messages) from exc

    def _message(self, item: Any) -> Message | None:
        try:
            value = item_to_ismrmrd(item)
        except (ValueError, OverflowError) as exc:
            value, why = item, f"not representable in MRD v1 ({exc})"
        else:
            why = "an MRD v2 item kind without an MRD v1 counterpart"
        if isinstance(value, ismrmrd.Acquisition):
            self.context.remember(value, item.value.head)
            return Message(MessageId.ACQUISITION, value)
        if isinstance(value, ismrmrd.Waveform):
            return Message(MessageId.WAVEFORM, value)
        if isinstance(value, ismrmrd.Image):
            return Message(MessageId.IMAGE, value)
        if self.keep_other:
            return Message(0, item)
        log.warning(
            "%s: item %d (%s): %s; MRD v1 output cannot hold it, dropped",
            self.peer,
            self.n_messages,
            type(item).__name__,
            why,
        )
        return None


class Mrd2MessageWriter:
    """The :class:`~kmotion.io.mrd_v1.MessageWriter` methods (``header``, ``item``, ``text``, ``error``,
    ``close``) writing an MRD v2 stream.  TEXT and ERROR have no MRD v2 message: they are counted, not
    written (the estimates are in the log and the images' meta; errors in the log and the exit status)."""

    def __init__(self, stream: BinaryIO, context: Mrd2Context | None = None) -> None:
        self.context = context
        self.counts: dict[str, int] = {}
        self._writer = mrd.BinaryMrdWriter(stream)
        self._header_written = False
        self._data_written = False

    def _count(self, what: str) -> None:
        self.counts[what] = self.counts.get(what, 0) + 1

    def header(self, header: ismrmrd.xsd.ismrmrdHeader | str | None) -> None:
        """Write the header (the MRD v2 header read, when ``header`` is its unchanged conversion)."""
        if header is not None and not isinstance(header, str):
            header = ismrmrd.xsd.ToXML(header)
        ctx = self.context
        if ctx is not None and ctx.header_xml is not None and header == ctx.header_xml:
            out = ctx.header
        else:
            out = None if header is None else header_from_ismrmrd(ismrmrd.xsd.CreateFromDocument(header))
        self._writer.write_header(out)
        self._header_written = True
        self._count("header")

    def item(self, item: Any) -> None:
        """An acquisition, waveform or image (ismrmrd-python), or an MRD v2 item passed through."""
        if not self._header_written:
            self.header(None)
        self._writer.write_data([item_from_ismrmrd(item, self.context)])
        self._data_written = True
        self._count("item")

    def text(self, text: str) -> None:
        """TEXT: no MRD v2 message (counted only)."""
        self._count("text")

    def error(self, text: str) -> None:
        """ERROR: no MRD v2 message (counted only)."""
        self._count("error")

    def close(self) -> None:
        """End the stream (an empty header and data when nothing was written)."""
        if not self._header_written:
            self.header(None)
        if not self._data_written:
            self._writer.write_data([])
        self._writer.close()


# ---- files: kmotion replay ---------------------------------------------------------------------------


class Mrd2Source:
    """An MRD v2 file opened for ``kmotion replay`` (the interface of
    :class:`~kmotion.io.ismrmrd_reader.IsmrmrdSource`): header, counts, items in stream order.

    Attributes ``header`` (ISMRMRD v1), ``xml``, ``n_acquisitions``, ``n_waveforms``, ``n_other`` (items
    that are neither; not replayed) and ``context`` (for :class:`Mrd2FileWriter`).
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.dataset = ""
        self.context = Mrd2Context()
        self.n_acquisitions = self.n_waveforms = self.n_other = 0
        self._remember = True
        with open(path, "rb") as f:
            reader = Mrd2MessageReader(f, Mrd2Context(), keep_other=True, peer=str(path))
            while (m := reader.read_message()) is not None:
                if m.mid == MessageId.HEADER:
                    self.xml = m.value
                elif m.mid == MessageId.ACQUISITION:
                    self.n_acquisitions += 1
                elif m.mid == MessageId.WAVEFORM:
                    self.n_waveforms += 1
                elif m.mid != MessageId.CLOSE:
                    self.n_other += 1
        self.header = ismrmrd.xsd.CreateFromDocument(self.xml)

    def items(self, chunk: int = 256) -> Iterator[object]:
        """Acquisitions and waveforms in stream order (``chunk`` is unused: the stream is read item by item).

        The first call also keeps each acquisition's MRD v2 header in ``context``."""
        ctx = self.context if self._remember else Mrd2Context()
        self._remember = False
        with open(self.path, "rb") as f:
            reader = Mrd2MessageReader(f, ctx, keep_other=True, peer=str(self.path))
            while (m := reader.read_message()) is not None:
                if m.mid in (MessageId.ACQUISITION, MessageId.WAVEFORM):
                    yield m.value


def open_mrd2(path: str | Path) -> Mrd2Source:
    """Open an MRD v2 file (read once to count and check it); bad input raises :class:`InputError`."""
    p = Path(path)
    if not p.is_file():
        raise InputError(f"{p}: expected an MRD v2 file, got no such file")
    try:
        return Mrd2Source(p)
    except ProtocolError as exc:
        raise InputError(str(exc)) from exc


class Mrd2FileWriter:
    """Writes ``kmotion replay``'s output as an MRD v2 file (the interface of
    :class:`~kmotion.io.ismrmrd_writer.IsmrmrdWriter`): header, acquisitions and waveforms in stream order,
    then the images (in the order they were given; ``group`` is not stored: the image series index tells
    them apart)."""

    def __init__(
        self, path: str | Path, header: ismrmrd.xsd.ismrmrdHeader | str, context: Mrd2Context | None
    ):
        self.path = Path(path)
        self._file = open(self.path, "wb")  # noqa: SIM115 - closed in close()
        self._writer = Mrd2MessageWriter(self._file, context)
        self._writer.header(header)
        self._images: list[ismrmrd.Image] = []
        self.n_acquisitions = self.n_waveforms = 0

    def append(self, item: object) -> None:
        """Write an acquisition or a waveform (anything else is ignored)."""
        if isinstance(item, ismrmrd.Acquisition):
            self.n_acquisitions += 1
        elif isinstance(item, ismrmrd.Waveform):
            self.n_waveforms += 1
        else:
            return
        self._writer.item(item)

    def append_image(self, group: str, image: ismrmrd.Image) -> None:
        """Queue an image (written on close)."""
        self._images.append(image)

    def close(self) -> None:
        """Write the images and end the stream."""
        if self._file.closed:
            return
        for img in self._images:
            self._writer.item(img)
        self._images = []
        self._writer.close()
        self._file.close()

    def __enter__(self) -> Mrd2FileWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
