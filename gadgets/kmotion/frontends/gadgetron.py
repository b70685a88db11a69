"""Gadgetron external Python gadget (``gadgetron`` 1.4.1): the motion-correction pipeline in a chain.

In a version-2 chain XML::

    <external>
        <execute name="kmotion.frontends.gadgetron" target="motion_correction" type="python"/>
        <configuration>
            <property name="device" value="auto"/>
        </configuration>
    </external>

Gadgetron listens on a free port and starts ``python -m gadgetron PORT MODULE TARGET``; the module
connects back, reads CONFIG (id 2: the ``<configuration>`` element) and HEADER (id 3), then
:func:`motion_correction` runs the stages on the acquisitions and sends every item back.  With
``<connect port="N"/>`` instead of ``<execute>``, Gadgetron connects to a module already listening:
:func:`serve_gadgetron` (``kmotion gadgetron --port N``).

Pitfalls of ``gadgetron`` 1.4.1 handled here (each has a test in ``tests/frontends/test_gadgetron.py``):

- it never sends ERROR (id 8, ``uint64`` length + text): :func:`run_connection` sends one on any failure,
  then CLOSE; Gadgetron reports it as a remote error of the chain;
- its ``Connection`` parses HEADER with the strict ``ismrmrd.xsd.CreateFromDocument``, which refuses
  headers of older writers and other tools: in the connect mode kmotion reads it leniently instead
  (``kmotion.io.ismrmrd_header``); in the execute mode gadgetron's ``__main__`` parses it before this module
  is imported (``docs/gadget.md``, "Headers and data the gadget does not handle");
- data the gadget does not handle (a trajectory other than Cartesian, an unusable header) pass through
  untouched with one WARNING, and the chain gets every item back (no ERROR);
- its socket reads spin forever when the peer vanishes without CLOSE (``recv`` returns ``b""`` in a loop)
  and block forever on a half-open connection: reads here raise at end of input and after
  ``idle_timeout_s`` seconds of silence;
- an unknown message id silently ends its iteration: reported here as an ERROR naming the id;
- numpy 2 refuses its implicit dtype conversions, and ``Acquisition.serialize_into`` writes whatever
  dtype the data have: items are sent as complex64 / float32 (:func:`~kmotion.io.mrd_v1.wire_item`);
- it has no writer for TEXT (id 5): one is added (``send_text`` property) — directly into
  ``connection.writers``, because its ``add_writer`` registers a wrapper that ``send`` cannot call.
  Gadgetron's own External node refuses TEXT from a module ("Received illegal message id from external
  peer: 5"), so ``send_text`` is
  off by default and the estimates go to the log (the module's stderr, i.e. Gadgetron's log).
"""

from __future__ import annotations

import logging
import socket
import struct
import threading
from collections.abc import Callable, Iterator
from typing import Any

import ismrmrd

from kmotion.frontends.connections import close_gracefully, serve_connections
from kmotion.frontends.properties import (
    ADAPTER_PROPERTIES,
    PipelineFactory,
    kmotion_pipeline,
    properties_from_xml,
)
from kmotion.io.ismrmrd_header import LenientHeader, read_header
from kmotion.io.mrd_v1 import (
    Limits,
    MessageId,
    MessageReader,
    ProtocolError,
    SocketSource,
    StreamEndedError,
    UnknownMessageError,
    estimate_text,
    message_name,
    wire_item,
)
from kmotion.physics.validate import InputError

__all__ = [
    "ADAPTER_PROPERTIES",
    "GuardedSocket",
    "TextMessage",
    "motion_correction",
    "run_connection",
    "serve_gadgetron",
    "write_error",
    "write_text",
]

log = logging.getLogger("kmotion.gadget")


_U16 = struct.Struct("<H")
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")


class TextMessage(str):
    """A string to be sent as TEXT (id 5) through ``connection.send``."""


def write_text(destination: Any, text: str) -> None:
    """gadgetron writer for TEXT (id 5): ``uint16`` id, ``uint32`` length, UTF-8 text."""
    b = str(text).encode()
    destination.write(_U16.pack(MessageId.TEXT) + _U32.pack(len(b)) + b)


def write_error(destination: Any, text: str) -> None:
    """ERROR (id 8) as Gadgetron reads it: ``uint16`` id, ``uint64`` length, UTF-8 text."""
    b = str(text).encode()
    destination.write(_U16.pack(MessageId.ERROR) + _U64.pack(len(b)) + b)


class GuardedSocket:
    """A socket for ``gadgetron.external.Connection`` whose reads are bounded.

    ``recv(n)`` returns exactly ``n`` bytes or raises :class:`ProtocolError` (end of input, ``n`` above
    the limit, no data for ``timeout`` seconds); ``settimeout(None)`` (which gadgetron calls) keeps the
    timeout.  Sends go to ``sendall`` and become no-ops once the peer is known to be gone.
    """

    def __init__(
        self, sock: Any, timeout: float | None, limits: Limits | None = None, peer: str = "Gadgetron"
    ) -> None:
        self.raw = sock
        self.dead = False
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        except OSError:
            pass
        self._source = SocketSource(
            sock, timeout, peer, "(idle_timeout_s); the peer vanished or stalled without CLOSE"
        )
        self.reader = MessageReader(self._source, limits or Limits(), peer)

    @property
    def timeout(self) -> float | None:
        """Seconds a read may wait (``None``: forever); setting it applies it to the socket."""
        return self._source.timeout

    @timeout.setter
    def timeout(self, value: float | None) -> None:
        self._source.timeout = value
        self.raw.settimeout(value)

    def settimeout(self, value: float | None) -> None:
        """Keep the bounded timeout when gadgetron asks for ``None``."""
        self.raw.settimeout(self.timeout if value is None else value)

    def recv(self, n: int, flags: int = 0) -> bytes:
        """Exactly ``n`` bytes, or :class:`ProtocolError`."""
        return self.reader.read_exactly(n, "message payload")

    def read_id(self) -> int:
        """The next message id; :class:`StreamEndedError` at end of input (no CLOSE)."""
        mid = self.reader.read_id()
        if mid is None:
            raise StreamEndedError(
                f"{self.reader.peer}: connection closed without CLOSE after {self.reader.n_messages} "
                "message(s) (peer disconnected mid-stream)"
            )
        self.reader.begin_message(mid)
        return mid

    def send(self, data: Any) -> int:
        """Send all of ``data`` (no-op once the peer is gone)."""
        if self.dead:
            return 0
        try:
            self.raw.sendall(data)
        except OSError:  # includes the send timeout
            self.dead = True
            raise
        return memoryview(data).nbytes

    sendall = send
    write = send

    def close(self, linger: float = 2.0) -> None:
        """Close gracefully: shut the write side, drain what the peer still sends (at most ``linger`` s).

        Closing with unread bytes in the receive buffer makes the kernel send RST, which can destroy the
        last messages (ERROR, CLOSE) before the peer reads them.
        """
        close_gracefully(self.raw, min(linger, self.timeout or linger))


def _is_report(item: object) -> bool:
    return hasattr(item, "as_dict") and hasattr(item, "log_line") and hasattr(item, "key")


def _split_properties(props: dict[str, str]) -> tuple[dict[str, str], bool, float | None, Limits]:
    own = {k: props.pop(k, v) for k, v in ADAPTER_PROPERTIES.items()}
    send_text = own["send_text"].strip().lower()
    if send_text not in ("true", "false", "1", "0", "yes", "no"):
        raise InputError(f"property send_text: expected true or false, got '{own['send_text']}'")
    try:
        timeout = float(own["idle_timeout_s"])
        max_mb = float(own["max_message_mb"])
    except ValueError as exc:
        raise InputError(f"property idle_timeout_s / max_message_mb: expected numbers ({exc})") from exc
    if max_mb <= 0:
        raise InputError(f"property max_message_mb: expected > 0, got {max_mb:g}")
    return (
        props,
        send_text in ("true", "1", "yes"),
        None if timeout <= 0 else timeout,
        Limits(max_bytes=int(max_mb * (1 << 20))),
    )


class _Input:
    """Items read from a connection until CLOSE.

    A :class:`ProtocolError` (unknown id, oversized or truncated message, peer gone or silent) ends the
    iteration as if CLOSE had come, so that the pipeline flushes what it holds (nothing is lost); the
    error is kept in ``error`` and reported after the flush.
    """

    def __init__(self, connection: Any, guard: GuardedSocket) -> None:
        self.connection = connection
        self.guard = guard
        self.error: ProtocolError | None = None
        self.n = 0

    def __iter__(self) -> Iterator[object]:
        try:
            for item in _items(self.connection, self.guard):
                self.n += 1
                yield item
        except ProtocolError as exc:
            self.error = exc
            log.error("%s; flushing the %d item(s) received so far", exc, self.n)


def _items(connection: Any, guard: GuardedSocket) -> Iterator[object]:
    """Items read from ``connection`` until CLOSE; unknown ids and silent peers raise ProtocolError."""
    while True:
        mid = guard.read_id()
        if mid == MessageId.CLOSE:
            log.debug("Gadgetron sent CLOSE")
            return
        reader = connection.readers.get(mid)
        if reader is None:
            known = sorted(int(k) for k in connection.readers)
            raise UnknownMessageError(
                f"Gadgetron: unknown message id {mid} (message {guard.reader.n_messages}); this gadget "
                f"reads {known}; the rest of the stream cannot be framed"
            )
        item = reader(connection.socket)
        if all(pred(item) for pred in connection.filters):
            yield item
        else:
            connection.send(item)


def run_connection(connection: Any, factory: PipelineFactory = kmotion_pipeline) -> bool:
    """Run the pipeline built by ``factory`` on an open ``gadgetron.external.Connection``.

    Properties come from ``connection.config`` (``<property name=... value=...>``); the adapter's own
    (:data:`ADAPTER_PROPERTIES`) are removed before the rest reach ``factory``.  Every item the pipeline
    yields is sent back; a MotionReport is logged and, with ``send_text``, sent as TEXT.  On failure an
    ERROR (id 8) naming the problem is sent.  The caller (gadgetron's ``__main__``) sends CLOSE.

    Returns
    -------
    bool
        True when the stream ended with CLOSE and no error.
    """
    guard = GuardedSocket(connection.socket.socket, float(ADAPTER_PROPERTIES["idle_timeout_s"]))
    connection.socket.socket = guard
    # not connection.add_writer: in 1.4.1 it wraps the writer in a one-argument lambda that send() calls
    # with two arguments (TypeError); insert the (predicate, writer) pair directly
    connection.writers.insert(0, (lambda item: isinstance(item, TextMessage), write_text))
    connection.filter(lambda item: isinstance(item, ismrmrd.Acquisition | ismrmrd.Waveform))
    # ismrmrd's deserialize_from allocates what a header claims before reading: bounded readers instead
    connection.readers[MessageId.ACQUISITION] = lambda _src: guard.reader.acquisition()
    connection.readers[MessageId.WAVEFORM] = lambda _src: guard.reader.waveform()
    connection.readers[MessageId.IMAGE] = lambda _src: guard.reader.image()
    n_out = n_reports = 0
    source = _Input(connection, guard)
    try:
        if connection.config is None:
            log.warning("Gadgetron CONFIG is not XML (empty <configuration>?): default properties")
        props, send_text, timeout, limits = _split_properties(properties_from_xml(connection.config))
        guard.timeout = timeout
        guard.reader.limits = limits
        pipeline = factory(props)
        log.info("kmotion gadget: properties %s, send_text=%s, idle timeout %s s", props, send_text, timeout)

        for out in pipeline(source, connection.header):
            if _is_report(out):
                n_reports += 1
                log.debug("%s", out.log_line())  # type: ignore[attr-defined]
                if send_text:
                    connection.send(TextMessage(estimate_text(out)))
                continue
            connection.send(wire_item(out))
            n_out += 1
        log.info("kmotion gadget: %d items in, %d out, %d estimates", source.n, n_out, n_reports)
        if source.error is not None:
            raise source.error
        return True
    except Exception as exc:
        msg = f"kmotion gadget: {exc}" if isinstance(exc, InputError) else f"kmotion gadget: {exc!r}"
        trace = not isinstance(exc, InputError)
        log.error("%s (%d items in, %d sent back)", msg, source.n, n_out, exc_info=trace)
        if not guard.dead:
            try:
                write_error(connection.socket, msg)
            except OSError:
                guard.dead = True
        return False


def motion_correction(connection: Any) -> None:
    """Gadgetron target: ``<execute name="kmotion.frontends.gadgetron" target="motion_correction"/>``."""
    run_connection(connection, kmotion_pipeline)


def serve_gadgetron(
    port: int,
    host: str = "127.0.0.1",
    factory: PipelineFactory = kmotion_pipeline,
    max_connections: int | None = None,
    handshake_timeout: float = 60.0,
    on_ready: Callable[[int], object] | None = None,
    stop: threading.Event | None = None,
) -> int:
    """Listen for Gadgetron ``<connect port=...>`` connections and run the pipeline on each.

    Each connection runs in its own thread; CONFIG and HEADER are read with bounded reads (gadgetron's
    own constructor would spin forever on a peer that vanishes there).  ``max_connections`` stops the
    server after that many connections (None: forever); ``on_ready`` gets the bound port (``port=0``:
    any free one); setting ``stop`` ends the server within a second.

    Returns
    -------
    int
        The number of connections that failed.
    """
    from gadgetron.external import Connection
    from gadgetron.external.readers import read_byte_string

    class LenientConnection(Connection):  # type: ignore[misc]
        """gadgetron's Connection, with the HEADER read leniently (``kmotion.io.ismrmrd_header``).

        gadgetron's own reads it with the strict ``CreateFromDocument`` and fails on headers that older
        writers and other tools produce; ``header`` is a :class:`LenientHeader` here.
        """

        def _read_header(self) -> tuple[LenientHeader, bytes]:
            mid = self._read_message_identifier()
            if mid != MessageId.HEADER:
                raise ProtocolError(f"Gadgetron: expected HEADER after CONFIG, got {message_name(mid)}")
            raw = read_byte_string(self.socket)
            return read_header(raw, "Gadgetron HEADER"), raw

    srv = socket.create_server((host, port), reuse_port=False)
    srv.settimeout(1.0)
    log.info("kmotion gadgetron: listening on %s:%d", host, srv.getsockname()[1])
    if on_ready is not None:
        on_ready(srv.getsockname()[1])

    def handle(sock: socket.socket, addr: Any) -> bool:
        guard = GuardedSocket(sock, handshake_timeout)
        ok = False
        try:
            conn = LenientConnection(guard)  # reads CONFIG and HEADER through the guard (bounded)
            conn.socket.socket = sock  # run_connection installs its own guard with the configured timeout
            ok = run_connection(conn, factory)
            try:
                conn.socket.close()  # sends CLOSE (a no-op once the peer is gone)
            except OSError:
                pass
        except Exception as exc:  # handshake failures: nothing to run on
            log.error("kmotion gadgetron: connection from %s failed: %s", addr, exc)
            try:
                write_error(guard, f"kmotion gadget: {exc}")
                guard.send(_U16.pack(MessageId.CLOSE))
            except OSError:
                pass
        finally:
            guard.close()
        return ok

    return serve_connections(srv, handle, "kmotion gadgetron", max_connections, stop)
