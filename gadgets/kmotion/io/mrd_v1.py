"""MRD v1 / Gadgetron message framing: bounded reader, writer, byte sources, message ids, protocol errors.

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
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from enum import IntEnum
from typing import Any, BinaryIO, NamedTuple, Protocol

import ismrmrd
import ismrmrd.xsd
import numpy as np
from ismrmrd.image import get_dtype_from_data_type

from kmotion.physics.validate import InputError

__all__ = [
    "CONFIG_FILE_SIZE",
    "ByteSource",
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
    "message_name",
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

_U16 = struct.Struct("<H")
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")


def message_name(mid: int) -> str:
    """``"3 (HEADER)"``: a message id with its name, for messages (just the number for unknown ids)."""
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
                f"{self.peer}: message {message_name(self._mid)}: {what} of {n} bytes exceeds the limit of "
                f"{lim} bytes (corrupt or hostile length field); closing the connection"
            )
        b = self.source.read(n) if n else b""
        if len(b) < n:
            raise TruncatedMessageError(
                f"{self.peer}: message {message_name(self._mid)} truncated: expected {n} bytes of {what}, "
                f"got {len(b)} (peer disconnected mid-message)"
            )
        return b

    def _text(self, length_struct: struct.Struct, what: str) -> str:
        (n,) = length_struct.unpack(self._exactly(length_struct.size, f"{what} length"))
        return _strip_nul(self._exactly(n, what, self.limits.max_text_bytes))

    def begin_message(self, mid: int) -> None:
        """Count a message whose id came from :meth:`read_id` and whose payload is read by someone else
        (e.g. gadgetron's readers): later errors name it, and ``n_messages`` includes it."""
        self._mid = mid
        self.n_messages += 1

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
