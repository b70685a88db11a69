"""The Gadgetron external gadget against a fake Gadgetron faithful to its External node (real sockets).

The shipped ``<execute>`` chain is run as Gadgetron runs it (a ``python -m gadgetron PORT MODULE TARGET``
subprocess) with the real pipeline on simulated data with known motion.  The protocol and bad-input tests
use the ``<connect>`` chain against :func:`serve_gadgetron` running in this process (same adapter code, no
interpreter start-up per test) with a pass-through test double of the pipeline
(``fake_gadgetron.echo_factory``) or the real one (model errors); ``kmotion gadgetron`` is run as a command.
"""

from __future__ import annotations

import json
import os
import re
import socket
import struct
import subprocess
import sys
import threading
import time
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from queue import Queue

import ismrmrd
import numpy as np
import pytest
from _helpers import REPO_ROOT
from fake_gadgetron import ACQ_HEADER_SIZE, FakeGadgetron, echo_factory, simulated_stream

from kmotion.frontends.gadgetron import ADAPTER_PROPERTIES, serve_gadgetron

CHAIN = REPO_ROOT / "config_xml" / "kmotion_cartesian_grappa.xml"
CHAIN_CONNECT = REPO_ROOT / "config_xml" / "kmotion_cartesian_grappa_connect.xml"
TIMEOUT = 30.0


def _stream(ism, n_reps: int = 2) -> tuple[object, list[object]]:
    hdr = ism.make_header(n_ky=16, n_kx=16, n_slices=1, n_reps=n_reps)
    k = ism.known_kspace(2, 16, 16)
    items: list[object] = []
    for rep in range(n_reps):
        items += ism.slice_lines(k, ism.undersampled_rows(16, 0), 8, rep=rep)
    wav = ismrmrd.Waveform.from_array(np.arange(12, dtype=np.uint32).reshape(2, 6))
    items.insert(3, wav)
    return hdr, items


def _config(**props: str) -> str:
    body = "".join(f'<property name="{k}" value="{v}"/>' for k, v in props.items())
    return f'<?xml version="1.0"?>\n<configuration>{body}</configuration>'


@pytest.fixture(scope="module")
def echo_port() -> Iterator[int]:
    """Port of an in-process ``serve_gadgetron`` with the pass-through pipeline (``<connect>`` mode)."""
    ports: Queue[int] = Queue()
    stop = threading.Event()
    kwargs = {"port": 0, "factory": echo_factory, "on_ready": ports.put, "stop": stop}
    t = threading.Thread(target=serve_gadgetron, kwargs=kwargs, daemon=True)
    t.start()
    yield ports.get(timeout=TIMEOUT)
    stop.set()
    t.join(TIMEOUT)


@pytest.fixture
def echo(echo_port: int):  # noqa: ANN201
    """``echo(conf=None, accept_text=False)``: the fake Gadgetron on the connect chain."""

    def make(conf: str | None = None, accept_text: bool = False) -> FakeGadgetron:
        return FakeGadgetron(
            CHAIN_CONNECT, port=echo_port, accept_text=accept_text, configuration=conf, timeout=TIMEOUT
        )

    return make


def _acqs(items: list[object]) -> list[ismrmrd.Acquisition]:
    return [i for i in items if isinstance(i, ismrmrd.Acquisition)]


def _same_acquisitions(sent: list[object], got: list[object]) -> None:
    a, b = _acqs(sent), _acqs(got)
    assert len(a) == len(b)
    key = lambda x: (int(x.idx.repetition), int(x.idx.kspace_encode_step_1))  # noqa: E731
    for x, y in zip(sorted(a, key=key), sorted(b, key=key), strict=True):
        assert y.data.dtype == np.complex64
        np.testing.assert_array_equal(x.data, y.data)
        assert x.getHead() == y.getHead()


def test_chain_xml_is_complete_and_documents_every_property() -> None:
    """Both chains: version 2, readers/writers, the gadget, standard downstream gadgets, every property."""
    from kmotion.gadget.params import GadgetParams

    params = set(GadgetParams.__dataclass_fields__)
    doc = (REPO_ROOT / "docs" / "gadget.md").read_text()
    for path in (CHAIN, CHAIN_CONNECT):
        root = ET.parse(path).getroot()
        assert root.findtext("version") == "2"
        assert root.find("readers/reader") is not None and root.find("writers/writer") is not None
        classes = [g.findtext("classname") for g in root.iter("gadget")]
        for needed in (
            "NoiseAdjustGadget",
            "AcquisitionAccumulateTriggerGadget",
            "BucketToBufferGadget",
            "GenericReconCartesianGrappaGadget",
            "ImageArraySplitGadget",
            "ImageFinishGadget",
        ):
            assert needed in classes, (path.name, needed)
        ext = root.find("stream/external")
        assert ext is not None
        props = {p.get("name") for p in ext.iter("property")}
        assert props == params | set(ADAPTER_PROPERTIES), path.name
        for p in props:
            assert f"`{p}`" in doc, f"docs/gadget.md does not document property {p}"
    execute = ET.parse(CHAIN).getroot().find("stream/external/execute")
    assert execute is not None
    assert (execute.get("name"), execute.get("target"), execute.get("type")) == (
        "kmotion.frontends.gadgetron",
        "motion_correction",
        "python",
    )
    assert ET.parse(CHAIN_CONNECT).getroot().find("stream/external/connect").get("port") == "18000"


def test_text_estimates_when_enabled_and_gadgetron_refuses_text(ism, echo) -> None:
    """send_text=true: TEXT (id 5) with JSON estimates; Gadgetron's External node refuses id 5."""
    hdr, items = _stream(ism)
    conf = _config(send_text="true")
    res = echo(conf, accept_text=True).run(hdr, items)
    assert res.closed and res.errors == [] and len(_acqs(res.items)) == len(_acqs(items))
    est = [json.loads(t)["kmotion_estimate"] for t in res.texts]
    assert [e["repetition"] for e in est] == [0, 1]
    strict = echo(conf).run(hdr, items)
    assert strict.failure is not None and "illegal message id from external peer: 5" in strict.failure


def test_pipeline_failure_sends_error_then_close(ism, echo) -> None:
    hdr, items = _stream(ism)
    res = echo(_config(fail_after="5")).run(hdr, items)
    assert res.closed and len(res.errors) == 1 and "echo pipeline failed after 5 items" in res.errors[0]


def test_bad_property_gives_error_before_any_data(ism, echo) -> None:
    hdr, items = _stream(ism)
    res = echo(_config(colour="red")).run(hdr, items)
    assert res.closed and res.items == []
    assert len(res.errors) == 1 and "colour" in res.errors[0]
    res = echo(_config(send_text="maybe")).run(hdr, items)
    assert len(res.errors) == 1 and "send_text" in res.errors[0]


def test_unknown_message_id_is_reported_and_nothing_is_lost(ism, echo) -> None:
    hdr, items = _stream(ism)
    res = echo().run(hdr, items, raw_input=struct.pack("<H", 999) + b"xx")
    assert res.closed and len(res.errors) == 1
    assert "unknown message id 999" in res.errors[0]
    assert len(res.items) == len(items)


def test_oversized_length_field_is_rejected(ism, echo) -> None:
    hdr, items = _stream(ism)
    head = ismrmrd.AcquisitionHeader()
    head.number_of_samples = 65535
    head.active_channels = 65535
    raw = struct.pack("<H", 1008) + bytes(head)
    assert len(raw) == 2 + ACQ_HEADER_SIZE
    res = echo().run(hdr, items, raw_input=raw)
    assert res.closed and len(res.errors) == 1 and "exceeds the limit" in res.errors[0]
    assert len(res.items) == len(items)


def test_truncated_message_and_vanished_peer_do_not_block(ism, echo) -> None:
    hdr, items = _stream(ism)
    acq = _acqs(items)[0]
    raw = struct.pack("<H", 1008) + acq.to_bytes()[:100]
    res = echo().run(hdr, items, raw_input=raw)
    assert len(res.errors) == 1 and "truncated" in res.errors[0]
    assert len(res.items) == len(items)
    res = echo().run(hdr, items, hang_up_after=6)
    assert len(res.errors) == 1 and "without CLOSE" in res.errors[0]
    assert len(res.items) == 6


def test_silent_peer_times_out(ism, echo) -> None:
    hdr, items = _stream(ism)
    conf = _config(idle_timeout_s="1")
    res = echo(conf).run(hdr, items, stall_after=4)
    assert len(res.errors) == 1 and "no data for 1 s" in res.errors[0]
    assert len(res.items) == 4


def test_numpy2_dtypes_are_sent_as_complex64(ism, echo) -> None:
    """The pipeline may yield complex128 data; the wire carries complex64 (not corrupted bytes)."""
    hdr, items = _stream(ism)
    res = echo(_config(complex128="true")).run(hdr, items)
    assert res.closed and res.errors == []
    _same_acquisitions(items, res.items)


def test_connect_mode_serves_connections_in_a_row_and_at_once(ism, echo) -> None:
    """``<connect port=...>``: the module listens, Gadgetron connects (several times, concurrently)."""
    hdr, items = _stream(ism)
    results: Queue[object] = Queue()
    threads = [threading.Thread(target=lambda: results.put(echo().run(hdr, items))) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(TIMEOUT)
    res = echo().run(hdr, items)  # and one more after them
    for r in [res, *(results.get_nowait() for _ in threads)]:
        assert r.closed and r.errors == [] and len(r.items) == len(items)  # type: ignore[attr-defined]
        _same_acquisitions(items, r.items)  # type: ignore[attr-defined]


@pytest.fixture
def simulated() -> object:
    return simulated_stream()


@pytest.mark.slow
def test_chain_with_real_pipeline(simulated) -> None:
    """The shipped chain as Gadgetron runs it (``python -m gadgetron PORT MODULE TARGET``), on data with known
    motion: every item back, CLOSE, no TEXT (Gadgetron refuses it), estimates in the module's log.

    Only ``sense_iterations`` is lowered (time); all other properties are the chain's.
    """
    raw = simulated
    conf_node = ET.parse(CHAIN).getroot().find("stream/external/configuration")
    node_conf = ET.tostring(conf_node, encoding="unicode")
    node_conf = node_conf.replace('name="sense_iterations" value="20"', 'name="sense_iterations" value="3"')
    fake = FakeGadgetron(CHAIN, configuration='<?xml version="1.0"?>\n' + node_conf, timeout=120)
    res = fake.run(raw.header, raw.items)
    assert res.failure is None and res.errors == [] and res.closed and res.returncode == 0, res.log[-3000:]
    assert res.texts == [] and res.sent == len(raw.items) and len(res.items) == len(raw.items)
    sent, got = _acqs(raw.items), _acqs(res.items)
    key = lambda a: (int(a.scan_counter), int(a.idx.repetition), int(a.idx.kspace_encode_step_1))  # noqa: E731
    assert sorted(map(key, got)) == sorted(map(key, sent))
    assert sum(isinstance(i, ismrmrd.Waveform) for i in res.items) == len(raw.waveforms)
    for a, b in zip(sorted(sent, key=key), sorted(got, key=key), strict=True):
        assert a.getHead() == b.getHead() and b.data.dtype == np.complex64
    line = re.compile(
        r"rep (\d+) set 0 \(ref rep 0\): dx ([-+.\d]+) px .*? dy ([-+.\d]+) px .*? rot ([-+.\d]+) deg"
    )
    est = {int(m[0]): tuple(map(float, m[1:])) for m in line.findall(res.log)}
    assert sorted(est) == [0, 1, 2], res.log[-3000:]
    for t in raw.truth[1:]:
        dx, dy, rot = est[t.repetition]
        assert abs(dx - t.dx_px) < 1.0 and abs(dy - t.dy_px) < 1.0 and abs(rot - t.phi_deg) < 3.0, (est, t)


@pytest.fixture(scope="module")
def kmotion_port() -> Iterator[int]:
    """Port of an in-process ``serve_gadgetron`` with the real pipeline factory."""
    ports: Queue[int] = Queue()
    stop = threading.Event()
    t = threading.Thread(
        target=serve_gadgetron, kwargs={"port": 0, "on_ready": ports.put, "stop": stop}, daemon=True
    )
    t.start()
    yield ports.get(timeout=TIMEOUT)
    stop.set()
    t.join(TIMEOUT)


def test_missing_or_corrupt_model_gives_a_clear_error(ism, kmotion_port, tmp_path) -> None:
    hdr, items = _stream(ism)
    bad = tmp_path / "corrupt.safetensors"
    bad.write_bytes(b"\x00garbage" * 10)
    for path in (tmp_path / "missing.safetensors", bad):
        res = FakeGadgetron(
            CHAIN_CONNECT, port=kmotion_port, configuration=_config(model=str(path)), timeout=TIMEOUT
        )
        out = res.run(hdr, items)
        assert out.closed and out.items == [] and len(out.errors) == 1, out
        assert path.name in out.errors[0]


def test_kmotion_gadgetron_command_connect_mode(ism, tmp_path) -> None:
    """``kmotion gadgetron --port N`` as documented for the ``<connect>`` chain: it survives a peer that
    vanishes during the handshake, answers the next one (here: a missing model -> ERROR), then stops."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT / "gadgets"))
    cmd = [sys.executable, "-m", "kmotion.cli", "gadgetron", "--port", str(port), "--max-connections", "2"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + TIMEOUT
        while True:  # connection 1: a probe that vanishes before CONFIG
            try:
                socket.create_connection(("127.0.0.1", port), 1).close()
                break
            except OSError:
                assert proc.poll() is None and time.monotonic() < deadline, "kmotion gadgetron did not start"
                time.sleep(0.2)
        hdr, items = _stream(ism)
        conf = _config(model=str(tmp_path / "absent.safetensors"))
        res = FakeGadgetron(CHAIN_CONNECT, port=port, configuration=conf, timeout=TIMEOUT).run(hdr, items)
        assert res.closed and len(res.errors) == 1 and "absent.safetensors" in res.errors[0]
        assert proc.wait(TIMEOUT) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    log = proc.stdout.read().decode() if proc.stdout else ""
    assert "connection 1" in log and "connection 2" in log, log
