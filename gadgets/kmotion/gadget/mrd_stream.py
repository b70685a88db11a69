"""MRD v1 / Gadgetron message framing: bounded reader, writer, message ids and the shared session loop.

Wire format (little endian, the framing of ``ismrmrd.ProtocolSerializer`` and of Gadgetron):
every message starts with a ``uint16`` id.

=====  ==============  =====================================================================
id     name            payload
=====  ==============  =====================================================================
1      CONFIG_FILE     1024 bytes, a NUL-padded configuration name
2      CONFIG_TEXT     ``uint32`` length + text (Gadgetron: the ``<configuration>`` XML)
3      HEADER          ``uint32`` length + ISMRMRD XML header (may end in a NUL byte)
4      CLOSE           none
5      TEXT            ``uint32`` length + UTF-8 text
8      ERROR           ``uint64`` length + UTF-8 text (Gadgetron's error message)
1008   ACQUISITION     ``AcquisitionHeader`` + float32 trajectory + complex64 data
1022   IMAGE           ``ImageHeader`` + ``uint64`` attribute length + attributes + data
1026   WAVEFORM        ``WaveformHeader`` + uint32 data
=====  ==============  =====================================================================

Every read is bounded: a length field (or a size implied by a header) above :class:`Limits` raises
:class:`MessageTooLargeError` before anything is allocated; end of input inside a message raises
:class:`TruncatedMessageError`; an id outside the table raises :class:`UnknownMessageError`; a socket
that stays silent longer than its timeout raises :class:`PeerTimeoutError`.  All are
:class:`ProtocolError` (an :class:`~kmotion.physics.validate.InputError`): the message names the problem.
"""

from __future__ import annotations

import ctypes
import json
import logging
import socket
import struct
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from enum import IntEnum
from typing import Any, BinaryIO, NamedTuple, Protocol

import ismrmrd
import ismrmrd.xsd
import numpy as np
from ismrmrd.image import get_dtype_from_data_type

from kmotion.physics.validate import InputError

__all__ = [
    "FileSource",
    "Limits",
    "Message",
    "MessageId",
    "MessageReader",
    "MessageTooLargeError",
    "MessageWriter",
    "PeerTimeoutError",
    "ProtocolError",
    "SocketSource",
    "StreamEndedError",
    "TruncatedMessageError",
    "UnknownMessageError",
    "estimate_text",
    "parse_header",
    "wire_item",
]

log = logging.getLogger("kmotion.gadget")


class MessageId(IntEnum):
    """Message ids of the MRD v1 / Gadgetron protocol."""

    CONFIG_FILE = 1
    CONFIG_TEXT = 2
    HEADER = 3
    CLOSE = 4
    TEXT = 5
    QUERY = 6
    RESPONSE = 7
    ERROR = 8
    ACQUISITION = 1008
    IMAGE = 1022
    WAVEFORM = 1026


CONFIG_FILE_SIZE = 1024

#: Properties of the Gadgetron adapter itself (not GadgetParams), with defaults; other modes ignore them.
ADAPTER_PROPERTIES = {"send_text": "false", "idle_timeout_s": "1800", "max_message_mb": "1024"}
_U16 = struct.Struct("<H")
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")


def _name(mid: int) -> str:
    try:
        return f"{mid} ({MessageId(mid).name})"
    except ValueError:
        return str(mid)


class ProtocolError(InputError):
    """A malformed, oversized, truncated or unexpected message, or a silent/vanished peer."""


class UnknownMessageError(ProtocolError):
    """A message id this reader does not know (the rest of the stream cannot be framed)."""


class TruncatedMessageError(ProtocolError):
    """End of input inside a message: the peer disconnected mid-message."""


class StreamEndedError(ProtocolError):
    """End of input between messages but before CLOSE: the peer disconnected mid-stream."""


class MessageTooLargeError(ProtocolError):
    """A length field (or a size implied by a header) above the configured limit."""


class PeerTimeoutError(ProtocolError):
    """No byte arrived within the socket timeout."""


@dataclass(frozen=True)
class Limits:
    """Upper bounds for one read.

    ``max_bytes`` bounds any single length-driven read (acquisition data, image data, attributes),
    ``max_text_bytes`` the text messages (CONFIG_TEXT, HEADER, TEXT, ERROR).
    """

    max_bytes: int = 1 << 30
    max_text_bytes: int = 64 << 20


class ByteSource(Protocol):
    """Something that returns up to ``n`` bytes (fewer only at end of input)."""

    def read(self, n: int) -> bytes: ...


class FileSource:
    """A binary file (e.g. ``sys.stdin.buffer``) as a :class:`ByteSource`."""

    def __init__(self, stream: BinaryIO) -> None:
        self.stream = stream

    def read(self, n: int) -> bytes:
        """Read ``n`` bytes, fewer only at end of file."""
        chunks: list[bytes] = []
        got = 0
        while got < n:
            b = self.stream.read(n - got)
            if not b:
                break
            chunks.append(b)
            got += len(b)
        return b"".join(chunks)


class SocketSource:
    """A connected socket as a :class:`ByteSource`; every ``recv`` waits at most ``timeout`` seconds.

    ``timeout=None`` waits forever (not recommended: a half-open connection would then block).
    """

    def __init__(
        self,
        sock: socket.socket,
        timeout: float | None = 600.0,
        peer: str = "peer",
        timeout_hint: str = "giving up on this connection",
    ) -> None:
        self.sock = sock
        self.timeout = timeout
        self.peer = peer
        self.timeout_hint = timeout_hint
        sock.settimeout(timeout)

    def read(self, n: int) -> bytes:
        """Read ``n`` bytes, fewer only when the peer closed the connection."""
        buf = bytearray()
        while len(buf) < n:
            try:
                b = self.sock.recv(min(n - len(buf), 1 << 20))
            except TimeoutError as exc:
                raise PeerTimeoutError(
                    f"{self.peer}: no data for {self.timeout:g} s (expected {n - len(buf)} more bytes); "
                    f"{self.timeout_hint}"
                ) from exc
            except OSError as exc:  # connection reset
                log.debug("%s: socket error %s", self.peer, exc)
                break
            if not b:
                break
            buf += b
        return bytes(buf)


class Message(NamedTuple):
    """One decoded message: its id and value (str, Acquisition, Image, Waveform or None)."""

    mid: int
    value: Any


def _strip_nul(b: bytes) -> str:
    return b.split(b"\0", 1)[0].decode("utf-8", errors="replace")


class MessageReader:
    """Decode messages from a :class:`ByteSource` with bounded reads.

    Parameters
    ----------
    source
        Where the bytes come from.
    limits
        Size limits (see :class:`Limits`).
    peer
        Name used in error messages.
    """

    def __init__(self, source: ByteSource, limits: Limits = Limits(), peer: str = "peer") -> None:
        self.source = source
        self.limits = limits
        self.peer = peer
        self.n_messages = 0
        self._mid = 0

    def read_exactly(self, n: int, what: str, limit: int | None = None) -> bytes:
        """Exactly ``n`` bytes of ``what`` (bounded by ``limit``, default ``limits.max_bytes``)."""
        return self._exactly(n, what, limit)

    def _exactly(self, n: int, what: str, limit: int | None = None) -> bytes:
        lim = self.limits.max_bytes if limit is None else limit
        if n > lim:
            raise MessageTooLargeError(
                f"{self.peer}: message {_name(self._mid)}: {what} of {n} bytes exceeds the limit of "
                f"{lim} bytes (corrupt or hostile length field); closing the connection"
            )
        b = self.source.read(n) if n else b""
        if len(b) < n:
            raise TruncatedMessageError(
                f"{self.peer}: message {_name(self._mid)} truncated: expected {n} bytes of {what}, "
                f"got {len(b)} (peer disconnected mid-message)"
            )
        return b

    def _text(self, length_struct: struct.Struct, what: str) -> str:
        (n,) = length_struct.unpack(self._exactly(length_struct.size, f"{what} length"))
        return _strip_nul(self._exactly(n, what, self.limits.max_text_bytes))

    def read_id(self) -> int | None:
        """The next message id, or None at end of input on a message boundary."""
        b = self.source.read(2)
        if not b:
            return None
        if len(b) < 2:
            raise TruncatedMessageError(f"{self.peer}: end of input inside a message id (1 of 2 bytes)")
        (mid,) = _U16.unpack(b)
        return int(mid)

    def read_message(self) -> Message | None:
        """The next message, or None at end of input on a message boundary (no CLOSE seen).

        Raises
        ------
        ProtocolError
            Unknown id, oversized length, truncated message, socket timeout.
        """
        mid = self.read_id()
        if mid is None:
            return None
        self._mid = mid
        value: Any
        if mid == MessageId.CONFIG_FILE:
            value = _strip_nul(self._exactly(CONFIG_FILE_SIZE, "configuration name"))
        elif mid in (MessageId.CONFIG_TEXT, MessageId.HEADER, MessageId.TEXT):
            value = self._text(_U32, "text")
        elif mid == MessageId.ERROR:
            value = self._text(_U64, "error text")
        elif mid == MessageId.CLOSE:
            value = None
        elif mid == MessageId.ACQUISITION:
            value = self.acquisition()
        elif mid == MessageId.IMAGE:
            value = self.image()
        elif mid == MessageId.WAVEFORM:
            value = self.waveform()
        else:
            known = ", ".join(f"{int(m)} {m.name}" for m in MessageId if m not in (6, 7))
            raise UnknownMessageError(
                f"{self.peer}: unknown message id {mid} after {self.n_messages} message(s); expected one "
                f"of {known}; the rest of the stream cannot be framed"
            )
        self.n_messages += 1
        return Message(mid, value)

    def acquisition(self) -> ismrmrd.Acquisition:
        """The payload of an ACQUISITION message (after its id); sizes checked before allocation."""
        head_bytes = self._exactly(ctypes.sizeof(ismrmrd.AcquisitionHeader), "acquisition header")
        head = ismrmrd.AcquisitionHeader.from_buffer_copy(head_bytes)
        n_s, n_ch, n_t = (
            int(head.number_of_samples),
            int(head.active_channels),
            int(head.trajectory_dimensions),
        )
        traj = self._exactly(4 * n_s * n_t, "acquisition trajectory")
        data = self._exactly(8 * n_s * n_ch, "acquisition data")
        return ismrmrd.Acquisition(
            head,
            np.frombuffer(data, dtype=np.complex64).reshape(n_ch, n_s).copy(),
            np.frombuffer(traj, dtype=np.float32).reshape(n_s, n_t).copy(),
        )

    def waveform(self) -> ismrmrd.Waveform:
        """The payload of a WAVEFORM message (after its id); sizes checked before allocation."""
        head_bytes = self._exactly(ctypes.sizeof(ismrmrd.WaveformHeader), "waveform header")
        head = ismrmrd.WaveformHeader.from_buffer_copy(head_bytes)
        data = self._exactly(4 * int(head.channels) * int(head.number_of_samples), "waveform data")
        return ismrmrd.Waveform(head_bytes, np.frombuffer(data, dtype=np.uint32))

    def image(self) -> ismrmrd.Image:
        """The payload of an IMAGE message (after its id); sizes checked before allocation."""
        head_bytes = self._exactly(ctypes.sizeof(ismrmrd.ImageHeader), "image header")
        head = ismrmrd.ImageHeader.from_buffer_copy(head_bytes)
        try:
            dtype = np.dtype(get_dtype_from_data_type(head.data_type))
        except (KeyError, TypeError) as exc:
            raise ProtocolError(f"{self.peer}: image header: unknown data_type {head.data_type}") from exc
        (n_attr,) = _U64.unpack(self._exactly(8, "image attribute length"))
        attrs = _strip_nul(self._exactly(n_attr, "image attributes", self.limits.max_text_bytes))
        n = int(head.channels) * int(np.prod([int(m) for m in head.matrix_size]))
        data = self._exactly(n * dtype.itemsize, "image data")
        img = ismrmrd.Image(head_bytes, attrs)
        img.data.ravel()[:] = np.frombuffer(data, dtype=dtype)
        return img

    def __iter__(self) -> Iterator[Message]:
        while (m := self.read_message()) is not None:
            yield m


def parse_header(text: str, what: str = "HEADER") -> ismrmrd.xsd.ismrmrdHeader:
    """Parse an ISMRMRD XML header (trailing NUL bytes allowed) or raise :class:`ProtocolError`."""
    text = text.split("\0", 1)[0].strip()
    if not text:
        raise ProtocolError(f"{what}: expected an ISMRMRD XML header, got empty text")
    try:
        return ismrmrd.xsd.CreateFromDocument(text)
    except Exception as exc:  # pyxb raises many types
        raise ProtocolError(
            f"{what}: not a valid ISMRMRD XML header: {str(exc).splitlines()[0][:200]}"
        ) from exc


def wire_item(item: object) -> object:
    """``item`` with arrays of the wire dtypes (complex64 data, float32 trajectory, C order).

    ``Acquisition.serialize_into`` writes ``data.tobytes()`` as it is, so complex128 data would corrupt
    the stream silently; numpy 2 also refuses the implicit ``copy=False`` conversions of gadgetron 1.4.1.
    Items already in the wire dtypes are returned unchanged.
    """
    if isinstance(item, ismrmrd.Acquisition):
        data, traj = item.data, item.traj
        n_ch, n_s, n_t = (
            int(item.active_channels),
            int(item.number_of_samples),
            int(item.trajectory_dimensions),
        )
        if (
            data.dtype == np.complex64
            and traj.dtype == np.float32
            and data.flags.c_contiguous
            and traj.flags.c_contiguous
            and data.shape == (n_ch, n_s)
            and traj.shape == (n_s, n_t)
        ):
            return item
        d = np.ascontiguousarray(np.asarray(data).reshape(n_ch, n_s), dtype=np.complex64)
        t = np.ascontiguousarray(np.asarray(traj).reshape(n_s, n_t), dtype=np.float32)
        return ismrmrd.Acquisition(item.getHead(), d, t)
    if isinstance(item, ismrmrd.Image):
        arr = item.data
        target = {np.dtype(np.complex128): np.complex64, np.dtype(np.float64): np.float32}.get(arr.dtype)
        if target is None and arr.flags.c_contiguous:
            return item
        out = ismrmrd.Image(
            item.getHead(), item.attribute_string, data=np.ascontiguousarray(arr, dtype=target or arr.dtype)
        )
        return out
    return item


class MessageWriter:
    """Encode messages; thread safe (one lock per writer).

    Parameters
    ----------
    write
        Function that writes all given bytes (``sock.sendall``, ``stream.write``).
    flush
        Optional function called after each message.
    """

    def __init__(self, write: Callable[[bytes], object], flush: Callable[[], object] | None = None) -> None:
        self._write = write
        self._flush = flush
        self.lock = threading.Lock()
        self.counts: dict[int, int] = {}

    def _send(self, mid: int, *parts: bytes) -> None:
        with self.lock:
            self._write(_U16.pack(mid) + b"".join(parts))
            if self._flush is not None:
                self._flush()
            self.counts[mid] = self.counts.get(mid, 0) + 1

    def config_file(self, name: str) -> None:
        """CONFIG_FILE (1): ``name`` NUL-padded to 1024 bytes."""
        b = name.encode()
        if len(b) >= CONFIG_FILE_SIZE:
            raise ValueError(f"configuration name of {len(b)} bytes; at most {CONFIG_FILE_SIZE - 1}")
        self._send(MessageId.CONFIG_FILE, b.ljust(CONFIG_FILE_SIZE, b"\0"))

    def config_text(self, text: str) -> None:
        """CONFIG_TEXT (2)."""
        b = text.encode()
        self._send(MessageId.CONFIG_TEXT, _U32.pack(len(b)), b)

    def header(self, header: ismrmrd.xsd.ismrmrdHeader | str) -> None:
        """HEADER (3)."""
        text = header if isinstance(header, str) else ismrmrd.xsd.ToXML(header)
        b = text.encode()
        self._send(MessageId.HEADER, _U32.pack(len(b)), b)

    def text(self, text: str) -> None:
        """TEXT (5): ``uint32`` length + UTF-8 text (no NUL)."""
        b = text.encode()
        self._send(MessageId.TEXT, _U32.pack(len(b)), b)

    def error(self, text: str) -> None:
        """ERROR (8): ``uint64`` length + UTF-8 text, as Gadgetron reads it."""
        b = text.encode()
        self._send(MessageId.ERROR, _U64.pack(len(b)), b)

    def close(self) -> None:
        """CLOSE (4)."""
        self._send(MessageId.CLOSE)

    def item(self, item: object) -> None:
        """An Acquisition (1008), Image (1022) or Waveform (1026), in the wire dtypes."""
        item = wire_item(item)
        chunks: list[bytes] = []
        if isinstance(item, ismrmrd.Acquisition):
            mid = MessageId.ACQUISITION
        elif isinstance(item, ismrmrd.Image):
            mid = MessageId.IMAGE
        elif isinstance(item, ismrmrd.Waveform):
            mid = MessageId.WAVEFORM
        else:
            raise TypeError(f"no MRD message for an item of type {type(item).__name__}")
        item.serialize_into(lambda b: chunks.append(bytes(b)))
        self._send(mid, *chunks)


def estimate_text(report: Any) -> str:
    """The TEXT payload of one slice's estimate: ``{"kmotion_estimate": report.as_dict()}``."""
    return json.dumps({"kmotion_estimate": report.as_dict()})


def properties_from_xml(root: Any) -> dict[str, str]:
    """``<property name=... value=...>`` children of an ElementTree element (v2 and legacy forms).

    The legacy form ``<property><name>n</name><value>v</value></property>`` is read as well, as Gadgetron
    does.  ``root`` None (Gadgetron sends an empty configuration when ``<external>`` has none) gives {}.
    """
    props: dict[str, str] = {}
    if root is None:
        return props
    for p in root.iter("property"):
        name = p.get("name")
        value = p.get("value")
        if name is None:
            name = p.findtext("name")
            value = p.findtext("value")
        if name is None or value is None:
            raise ProtocolError("configuration: a <property> needs a name and a value (attributes)")
        props[name.strip()] = value.strip()
    return props


def properties_from_json(text: str) -> dict[str, str]:
    """Gadget properties from a JSON TEXT message (flat, or python-ismrmrd-server's ``{"parameters": ...}``).

    FIRE's own keys ``config`` and ``customconfig`` are ignored; booleans become ``true``/``false``.
    """
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ProtocolError(f"TEXT parameters: expected a JSON object, got invalid JSON ({exc})") from exc
    if not isinstance(obj, dict):
        raise ProtocolError(f"TEXT parameters: expected a JSON object, got {type(obj).__name__}")
    params = obj.get("parameters", obj)
    if not isinstance(params, dict):
        raise ProtocolError("TEXT parameters: 'parameters' must be a JSON object")
    out: dict[str, str] = {}
    for k, v in params.items():
        if k in ("config", "customconfig", "version"):
            continue
        if isinstance(v, bool):
            out[k] = "true" if v else "false"
        elif v is None:
            continue
        else:
            out[k] = str(v)
    return out


#: A configured pipeline: (items, header) -> output items (see :func:`kmotion_pipeline`).
Pipeline = Callable[[Iterable[object], ismrmrd.xsd.ismrmrdHeader], Iterator[object]]
#: Builds a :data:`Pipeline` from gadget properties; raises InputError for bad properties.
PipelineFactory = Callable[[Mapping[str, str]], Pipeline]


def kmotion_pipeline(properties: Mapping[str, str]) -> Pipeline:
    """The motion-correction pipeline configured by ``properties`` (``GadgetParams.from_properties``).

    Bad properties raise :class:`InputError` here, before any data is read.
    """
    from kmotion.gadget import GadgetParams, motion_correct

    params = GadgetParams.from_properties(dict(properties))

    def run(items: Iterable[object], header: ismrmrd.xsd.ismrmrdHeader) -> Iterator[object]:
        return motion_correct(items, header, params)

    return run


def properties_from_config_text(text: str) -> dict[str, str]:
    """Gadget properties from a CONFIG_TEXT: a ``<configuration>`` of properties or a whole chain XML.

    In a chain, the ``<configuration>`` of the ``<external>`` node that runs ``kmotion`` is used; a text
    that is not XML gives {} (it names a configuration, as Gadgetron's CONFIG_FILE does).  The Gadgetron
    adapter's own properties (:data:`ADAPTER_PROPERTIES`) are dropped.
    """
    import xml.etree.ElementTree as ET

    try:
        root = ET.fromstring(text.split("\0", 1)[0].strip())
    except ET.ParseError:
        log.info("CONFIG_TEXT is not XML; ignored")
        return {}
    props: dict[str, str] = {}
    externals = root.findall(".//external")
    if not externals and root.find("property") is not None:
        props = properties_from_xml(root)
    for ext in externals:
        ex = ext.find("execute")
        if ex is None or "kmotion" in (ex.get("name") or ""):
            props = properties_from_xml(ext.find("configuration"))
            break
    return {k: v for k, v in props.items() if k not in ADAPTER_PROPERTIES}


class _Feed:
    """Data items of a stream after the preamble, until CLOSE; a ProtocolError ends it (kept in ``error``)."""

    def __init__(self, first: list[object], reader: MessageReader) -> None:
        self.first = first
        self.reader = reader
        self.error: ProtocolError | None = None
        self.closed = False
        self.n = 0

    def __iter__(self) -> Iterator[object]:
        for item in self.first:
            self.n += 1
            yield item
        try:
            while True:
                m = self.reader.read_message()
                if m is None:
                    raise StreamEndedError(
                        f"{self.reader.peer}: end of input without CLOSE after {self.reader.n_messages} "
                        "message(s) (stream ended early)"
                    )
                if m.mid == MessageId.CLOSE:
                    self.closed = True
                    return
                if m.mid in (MessageId.HEADER, MessageId.CONFIG_FILE, MessageId.CONFIG_TEXT):
                    raise ProtocolError(f"{self.reader.peer}: unexpected {_name(m.mid)} after the data began")
                if m.mid == MessageId.ERROR:
                    log.error("%s sent ERROR: %s", self.reader.peer, m.value)
                    continue
                self.n += 1
                yield m.value
        except ProtocolError as exc:
            self.error = exc
            log.error("%s; flushing the %d item(s) received so far", exc, self.n)


def read_preamble(
    reader: MessageReader, check_config: Callable[[str], object] | None = None
) -> tuple[ismrmrd.xsd.ismrmrdHeader, str, dict[str, str], list[object]]:
    """CONFIG_FILE / CONFIG_TEXT (optional), HEADER, then TEXT parameters (JSON) before the first data.

    Returns
    -------
    header, config name ("" if none), properties (CONFIG_TEXT then TEXT, later ones win), and the first
    data items already read (at most one, or none when CLOSE came right away).  ``check_config`` is
    called with a CONFIG_FILE name as soon as it arrives (it raises to refuse it).
    """
    config_name = ""
    props: dict[str, str] = {}
    header = None
    while header is None:
        m = reader.read_message()
        if m is None:
            raise StreamEndedError(f"{reader.peer}: end of input before HEADER")
        if m.mid == MessageId.CONFIG_FILE:
            config_name = m.value
            if check_config is not None:
                check_config(config_name)
        elif m.mid == MessageId.CONFIG_TEXT:
            props.update(properties_from_config_text(m.value))
        elif m.mid == MessageId.TEXT:
            props.update(properties_from_json(m.value))
        elif m.mid == MessageId.HEADER:
            header = parse_header(m.value)
        else:
            raise ProtocolError(f"{reader.peer}: expected CONFIG or HEADER first, got message {_name(m.mid)}")
    first: list[object] = []
    while True:
        m = reader.read_message()
        if m is None or m.mid == MessageId.CLOSE:
            break
        if m.mid == MessageId.TEXT:
            props.update(properties_from_json(m.value))
            continue
        first.append(m.value)
        break
    return header, config_name, props, first


def run_stream(
    inp: BinaryIO,
    out: BinaryIO,
    properties: Mapping[str, str] | None = None,
    factory: PipelineFactory = kmotion_pipeline,
    images: bool = False,
    limits: Limits | None = None,
) -> int:
    """``kmotion stream``: an MRD v1 stream on ``inp`` through the pipeline to ``out``.

    Output: HEADER, every item the pipeline yields (corrected acquisitions, waveforms, ...) with one TEXT
    ``{"kmotion_estimate": {...}}`` before each slice's lines, optionally the reconstructed images (after
    all data), then CLOSE.  ``properties`` (command line) override those of the stream (CONFIG_TEXT, TEXT).
    When the pipeline cannot be set up (bad property, missing model), the data pass through untouched.
    Errors are logged and sent as TEXT ``ERROR ...`` (``ProtocolDeserializer`` reads TEXT, not ERROR).

    Returns
    -------
    int
        0, or 2 after an error.
    """
    reader = MessageReader(FileSource(inp), limits or Limits(), peer="input stream")
    writer = MessageWriter(out.write, out.flush)
    errors: list[str] = []
    try:
        header, config_name, props, first = read_preamble(reader)
    except ProtocolError as exc:
        log.error("%s", exc)
        writer.text(f"ERROR kmotion stream: {exc}")
        writer.close()
        return 2
    if config_name:
        log.info("CONFIG_FILE %r (the stream command always runs kmotion)", config_name)
    props.update(properties or {})
    feed = _Feed(first, reader)
    writer.header(header)
    pipeline: Pipeline
    try:
        pipeline = factory(props)
        outputs = pipeline(feed, header)
    except InputError as exc:
        errors.append(f"pipeline not set up, data passed through untouched: {exc}")
        log.error("kmotion stream: %s", errors[-1])
        outputs = iter(feed)
    kept: list[object] = []
    n_out = n_reports = 0
    try:
        for item in outputs:
            if hasattr(item, "as_dict") and hasattr(item, "log_line"):
                n_reports += 1
                log.debug("%s", item.log_line())  # the pipeline logs it at INFO
                writer.text(estimate_text(item))
            elif isinstance(item, str):
                writer.text(item)
            else:
                writer.item(item)
                n_out += 1
            if images:
                kept.append(item)
    except Exception as exc:  # the pipeline itself failed: nothing more can come out of it
        errors.append(f"pipeline failed: {type(exc).__name__}: {exc}")
        log.exception("kmotion stream: %s", errors[-1])
    if feed.error is not None:
        errors.append(str(feed.error))
    if images and kept:
        from kmotion.gadget.recon import reconstruct_images

        try:
            for img in reconstruct_images(kept, header):
                if isinstance(img, ismrmrd.Image):
                    writer.item(img)
        except Exception as exc:
            errors.append(f"image reconstruction failed: {type(exc).__name__}: {exc}")
            log.error("kmotion stream: %s", errors[-1])
    log.info("kmotion stream: %d items in, %d out, %d estimates", feed.n, n_out, n_reports)
    for e in errors:
        writer.text(f"ERROR kmotion stream: {e}")
    writer.close()
    return 2 if errors else 0


def serve_connections(
    srv: socket.socket,
    handle: Callable[[socket.socket, Any], bool],
    name: str,
    max_connections: int | None = None,
    stop: threading.Event | None = None,
) -> int:
    """Accept connections on the listening ``srv`` (1 s accept timeout) and run ``handle(sock, addr)`` in a
    thread of its own for each; ``handle`` returns whether the connection succeeded, an exception counts as
    a failure and never ends the loop.  Stops after ``max_connections`` connections or within a second of
    ``stop`` being set; closes ``srv`` and joins the threads.  Returns the number of failed connections.
    """
    failures = 0
    n = 0
    lock = threading.Lock()
    threads: list[threading.Thread] = []

    def run(sock: socket.socket, addr: Any) -> None:
        nonlocal failures
        ok = False
        try:
            ok = handle(sock, addr)
        except Exception:  # never take the server down
            log.exception("%s: connection from %s failed", name, addr)
        if not ok:
            with lock:
                failures += 1

    try:
        while (max_connections is None or n < max_connections) and not (stop is not None and stop.is_set()):
            try:
                sock, addr = srv.accept()
            except TimeoutError:
                continue
            n += 1
            log.info("%s: connection %d from %s", name, n, addr)
            t = threading.Thread(target=run, args=(sock, addr), daemon=True, name=f"{name}-{n}")
            t.start()
            threads.append(t)
    finally:
        srv.close()
        for t in threads:
            t.join()
    return failures
