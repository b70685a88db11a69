"""A fake Gadgetron for the tests, faithful to Gadgetron 4's ``External`` node.

What it does, after Gadgetron's ``connection/nodes/External.cpp``, ``common/ExternalChannel.cpp``,
``common/Serialization.cpp`` and ``config/Config.cpp``:

- parses a version-2 chain XML and takes its ``<external>`` node;
- ``<execute name= target= type="python">``: listens on a free loopback port and starts
  ``python -m gadgetron PORT NAME [TARGET]``; the module connects back;
  ``<connect port= [address=]>``: connects to a module that already listens (address default localhost);
- sends CONFIG (id 2: the ``<configuration>`` child of ``<external>`` as its own XML document, or an
  empty document when there is none) and HEADER (id 3), ``uint32`` lengths;
- an input thread sends the items an external accepts (acquisitions, waveforms, images) and then CLOSE;
  other items bypass the module;
- reads the answer until CLOSE: ERROR (id 8, ``uint64`` length) is recorded and closes the outbound
  side (CLOSE is sent, further input is dropped as Gadgetron's ChannelClosed); at CLOSE, recorded errors
  fail the chain (Gadgetron's RemoteError); FILENAME, CONFIG, HEADER, TEXT, QUERY, RESPONSE and unknown
  ids are "illegal message id from external peer" — except TEXT when ``accept_text`` (a peer that
  reads it, unlike Gadgetron).

Every socket read and the child process are bounded by ``timeout``.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import os
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import xml.etree.ElementTree as ET
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import ismrmrd
import ismrmrd.xsd
import numpy as np

_U16 = struct.Struct("<H")
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")
CLOSE, TEXT, ERROR = 4, 5, 8
ILLEGAL = {1, 2, 3, 5, 6, 7}
HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]


class IllegalMessage(RuntimeError):
    """Gadgetron: ``Received illegal message id from external peer``."""


@dataclass
class ChainResult:
    """What came back from the external module."""

    items: list[object] = field(default_factory=list)
    texts: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    closed: bool = False  # CLOSE received
    failure: str | None = None  # illegal message, vanished peer, timeout
    bypassed: list[object] = field(default_factory=list)
    sent: int = 0  # items pushed to the module
    returncode: int | None = None
    log: str = ""


@dataclass
class ExternalNode:
    """The ``<external>`` node of a chain."""

    action: str  # execute | connect
    name: str = ""
    target: str | None = None
    type: str = "python"
    address: str = "localhost"
    port: int = 0
    configuration: str = '<?xml version="1.0"?>\n'


def parse_chain(path: Path) -> ExternalNode:
    """The first ``<external>`` node of a version-2 chain XML (as Gadgetron's V2 parser reads it)."""
    root = ET.parse(path).getroot()
    assert root.tag == "configuration" and root.findtext("version") == "2", "not a version-2 chain"
    ext = root.find("stream/external")
    assert ext is not None, "no <external> in the chain's <stream>"
    conf = ext.find("configuration")
    text = '<?xml version="1.0"?>\n' + (ET.tostring(conf, encoding="unicode") if conf is not None else "")
    for child in ext:
        if child.tag == "execute":
            return ExternalNode(
                "execute",
                child.get("name", ""),
                child.get("target") or None,
                child.get("type", ""),
                configuration=text,
            )
        if child.tag == "connect":
            return ExternalNode(
                "connect",
                address=child.get("address") or "localhost",
                port=int(child.get("port", "0")),
                configuration=text,
            )
    raise AssertionError("Unable to parse valid action for external node")


def _recv_exactly(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        b = sock.recv(n - len(buf))
        if not b:
            raise EOFError(f"external closed the connection ({len(buf)} of {n} bytes)")
        buf += b
    return bytes(buf)


def _write_item(sock: socket.socket, item: object) -> None:
    chunks: list[bytes] = []
    mid = {ismrmrd.Acquisition: 1008, ismrmrd.Waveform: 1026, ismrmrd.Image: 1022}[type(item)]
    item.serialize_into(lambda b: chunks.append(bytes(b)))  # type: ignore[attr-defined]
    sock.sendall(_U16.pack(mid) + b"".join(chunks))


def _read_item(sock: socket.socket, mid: int) -> object:
    if mid == 1008:
        return ismrmrd.Acquisition.deserialize_from(lambda n: _recv_exactly(sock, n))
    if mid == 1026:
        return ismrmrd.Waveform.deserialize_from(lambda n: _recv_exactly(sock, n))
    return ismrmrd.Image.deserialize_from(lambda n: _recv_exactly(sock, n))


class FakeGadgetron:
    """Run one stream through the ``<external>`` node of ``chain``.

    Parameters
    ----------
    chain
        Chain XML path.
    module
        ``(name, target)`` replacing the ``<execute>`` ones (e.g. a test double of the pipeline).
    accept_text
        Read TEXT (id 5) instead of failing on it as Gadgetron does.
    port
        Replace the ``<connect port>``.
    timeout
        Bound (s) of every socket operation and of the child process.
    """

    def __init__(
        self,
        chain: Path,
        module: tuple[str, str] | None = None,
        accept_text: bool = False,
        port: int | None = None,
        timeout: float = 30.0,
        configuration: str | None = None,
    ) -> None:
        self.node = parse_chain(chain)
        if module is not None:
            self.node.name, self.node.target = module
        if port is not None:
            self.node.port = port
        if configuration is not None:
            self.node.configuration = configuration
        self.accept_text = accept_text
        self.timeout = timeout

    def _start(self, log_file: object) -> tuple[socket.socket, subprocess.Popen[bytes] | None]:
        if self.node.action == "connect":
            return socket.create_connection((self.node.address, self.node.port), self.timeout), None
        assert self.node.type.lower() == "python"
        srv = socket.create_server(("127.0.0.1", 0))
        srv.settimeout(self.timeout)
        port = srv.getsockname()[1]
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(
            [str(HERE), str(REPO / "gadgets"), *filter(None, [env.get("PYTHONPATH")])]
        )
        env.setdefault("GADGETRON_EXTERNAL_LOG_LEVEL", "INFO")
        args = [sys.executable, "-m", "gadgetron", str(port), self.node.name]
        if self.node.target:
            args.append(self.node.target)
        child = subprocess.Popen(args, env=env, stdout=log_file, stderr=subprocess.STDOUT)  # type: ignore[arg-type]
        try:
            sock, _ = srv.accept()
        except TimeoutError:
            child.kill()
            raise
        finally:
            srv.close()
        return sock, child

    def run(
        self,
        header: ismrmrd.xsd.ismrmrdHeader | str,
        items: Iterable[object],
        raw_input: bytes | None = None,
        hang_up_after: int | None = None,
        stall_after: int | None = None,
    ) -> ChainResult:
        """Send CONFIG, HEADER, ``items``, CLOSE; read until CLOSE.

        ``raw_input``: bytes sent after the items instead of CLOSE, then the write side is shut down.
        ``hang_up_after``: stop after that many items and shut the write side down without CLOSE
        (a vanished Gadgetron).  ``stall_after``: stop sending after that many items, connection open.
        """
        res = ChainResult()
        with tempfile.TemporaryFile() as log_file:
            sock, child = self._start(log_file)
            sock.settimeout(self.timeout)
            lock = threading.Lock()
            outbound_open = [True]
            try:
                conf = self.node.configuration.encode()
                hdr = (header if isinstance(header, str) else ismrmrd.xsd.ToXML(header)).encode()
                sock.sendall(
                    _U16.pack(2) + _U32.pack(len(conf)) + conf + _U16.pack(3) + _U32.pack(len(hdr)) + hdr
                )

                def feed() -> None:
                    try:
                        for i, item in enumerate(items):
                            if hang_up_after is not None and i >= hang_up_after:
                                with lock:
                                    sock.shutdown(socket.SHUT_WR)
                                    outbound_open[0] = False
                                return
                            if stall_after is not None and i >= stall_after:
                                return
                            if not isinstance(item, ismrmrd.Acquisition | ismrmrd.Waveform | ismrmrd.Image):
                                res.bypassed.append(item)
                                continue
                            with lock:
                                if not outbound_open[0]:
                                    return  # ChannelClosed
                                _write_item(sock, item)
                                res.sent += 1
                        with lock:
                            if raw_input is not None and outbound_open[0]:
                                sock.sendall(raw_input)
                                sock.shutdown(socket.SHUT_WR)
                                outbound_open[0] = False
                                return  # the raw bytes end the input (they may be garbage)
                            if outbound_open[0]:
                                sock.sendall(_U16.pack(CLOSE))
                                outbound_open[0] = False
                    except OSError:
                        pass

                feeder = threading.Thread(target=feed, daemon=True)
                feeder.start()
                try:
                    while True:
                        (mid,) = _U16.unpack(_recv_exactly(sock, 2))
                        if mid == CLOSE:
                            res.closed = True
                            break
                        if mid == ERROR:
                            (n,) = _U64.unpack(_recv_exactly(sock, 8))
                            res.errors.append(_recv_exactly(sock, n).decode())
                            with lock:
                                if outbound_open[0]:
                                    sock.sendall(_U16.pack(CLOSE))
                                    outbound_open[0] = False
                            continue
                        if mid == TEXT and self.accept_text:
                            (n,) = _U32.unpack(_recv_exactly(sock, 4))
                            res.texts.append(_recv_exactly(sock, n).decode())
                            continue
                        if mid in ILLEGAL or mid not in (1008, 1026, 1022):
                            raise IllegalMessage(f"Received illegal message id from external peer: {mid}")
                        res.items.append(_read_item(sock, mid))
                except (IllegalMessage, EOFError, OSError) as exc:
                    res.failure = f"{type(exc).__name__}: {exc}"
                feeder.join(self.timeout)
            finally:
                sock.close()
                if child is not None:
                    try:
                        res.returncode = child.wait(self.timeout)
                    except subprocess.TimeoutExpired:
                        child.kill()
                        res.returncode = child.wait(5)
                        res.failure = (res.failure or "") + " | child did not exit in time (killed)"
                log_file.seek(0)  # type: ignore[attr-defined]
                res.log = log_file.read().decode(errors="replace")  # type: ignore[attr-defined]
        return res


# ---- a test double of the pipeline (protocol tests; the real pipeline is tested separately) ---------


@dataclass
class EchoReport:
    """Quacks like ``MotionReport`` (key, as_dict, log_line)."""

    key: tuple[int, int, int, int]

    def as_dict(self) -> dict[str, object]:
        return {"slice": self.key[0], "repetition": self.key[2], "dx_px": 0.0, "echo": True}

    def log_line(self) -> str:
        return f"echo estimate for slice {self.key}"


def _gadget_parameter_names() -> set[str]:
    from kmotion.gadget.params import GadgetParams

    return set(GadgetParams.__dataclass_fields__)


ECHO_PROPERTIES = _gadget_parameter_names() | {"fail_after", "complex128"}


def echo_factory(props: dict[str, str]):  # noqa: ANN201
    """Pass-through pipeline: one EchoReport before the first line of each (slice, repetition).

    Properties: ``fail_after=N`` raises after N items; ``complex128=true`` re-emits acquisitions with
    complex128 data (the numpy-2 pitfall); unknown properties raise InputError like GadgetParams.
    """
    from kmotion.physics.validate import InputError

    unknown = set(props) - ECHO_PROPERTIES
    if unknown:
        raise InputError(f"unknown gadget property {sorted(unknown)[0]!r}")
    fail_after = int(props.get("fail_after", "-1") or -1)
    c128 = props.get("complex128", "false") == "true"

    def run(items: Iterable[object], header: object) -> Iterator[object]:
        seen: set[tuple[int, int, int, int]] = set()
        for i, item in enumerate(items):
            if i == fail_after:
                raise RuntimeError(f"echo pipeline failed after {i} items")
            if isinstance(item, ismrmrd.Acquisition):
                k = (int(item.idx.slice), int(item.idx.contrast), int(item.idx.repetition), int(item.idx.set))
                if k not in seen:
                    seen.add(k)
                    report = EchoReport(k)
                    logging.getLogger("kmotion.gadget").info("%s", report.log_line())  # as the pipeline does
                    yield report
                if c128:
                    item = ismrmrd.Acquisition(item.getHead(), item.data.astype(np.complex128), item.traj)
            yield item

    return run


ACQ_HEADER_SIZE = ctypes.sizeof(ismrmrd.AcquisitionHeader)


@functools.lru_cache(maxsize=1)
def simulated_stream() -> object:
    """1 slice, 3 repetitions (the first the reference), 2 coils, 128 x 64, R = 2, known motion (cached)."""
    from kmotion.simulation.raw import RawConfig, simulate_raw

    motion = ((0.0, 0.0, 0.0), (3.0, -2.0, 4.0), (-2.0, 3.0, -5.0))
    cfg = RawConfig(
        matrix=(128, 64),
        fov_mm=(220.0, 110.0),
        n_coils=2,
        n_slices=1,
        n_repetitions=3,
        readout_oversampling=1,
        motion=motion,
        waveforms=True,
        snr=30.0,
    )
    return simulate_raw(cfg)
