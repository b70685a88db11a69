"""Nothing that arrived is lost, whatever the header: lenient headers and pass-through of data the gadget
does not handle, in replay, ``kmotion stream``, the FIRE server and the Gadgetron adapter.

Field cases (``../shared/field_cases``; skipped when absent): 09 (a header without ``patientPosition``:
read with the default and corrected) and 05 (single-shot EPI: passed through untouched).  Headers that
cannot be used at all are built here.
"""

from __future__ import annotations

import io
import json
import logging
import socket
import struct
import threading
from collections.abc import Iterator
from pathlib import Path
from queue import Queue

import h5py
import ismrmrd
import numpy as np
import pytest
from _helpers import REPO_ROOT, SHARED_DIR
from fake_gadgetron import FakeGadgetron

from kmotion.cli import main
from kmotion.frontends.fire_server import serve
from kmotion.frontends.gadgetron import serve_gadgetron
from kmotion.frontends.mrd_stream import run_stream
from kmotion.io.estimates import read_motion_csv
from kmotion.io.ismrmrd_reader import open_ismrmrd
from kmotion.io.mrd_v1 import FileSource, Message, MessageId, MessageReader, MessageWriter, SocketSource
from kmotion.simulation.raw import RawConfig, simulate_raw, write_raw

FIELD = SHARED_DIR / "field_cases"
CASE_05 = FIELD / "05_epi" / "epi_series.h5"
CASE_09 = FIELD / "09_header_without_patient_position" / "input.h5"
CHAIN = REPO_ROOT / "config_xml" / "kmotion_cartesian_grappa.xml"
CHAIN_CONNECT = REPO_ROOT / "config_xml" / "kmotion_cartesian_grappa_connect.xml"
TIMEOUT = 120.0
TOL_PX, TOL_DEG = 0.5, 1.0  # estimates of field case 09 against its truth.json

NO_ENCODING = (
    '<?xml version="1.0"?><ismrmrdHeader xmlns="http://www.ismrm.org/ISMRMRD"><experimentalConditions>'
    "<H1resonanceFrequency_Hz>63500000</H1resonanceFrequency_Hz></experimentalConditions></ismrmrdHeader>"
)
NOT_XML = "Dummy XML header"  # what the python-ismrmrd-server client sends for a file without a header
UNUSABLE = {  # header text -> words of the reason
    "no encoding": (NO_ENCODING, "expected at least one <encoding>, got none"),
    "not XML": (NOT_XML, "expected valid XML"),
}


def _need(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"{path} absent (../shared)")
    return path


def _warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.levelno == logging.WARNING and r.name.startswith("kmotion")
    ]


def _truth(case: Path) -> dict[int, dict[str, float]]:
    return {int(t["repetition"]): t for t in json.loads((case.parent / "truth.json").read_text())}


def _h5_acqs(path: Path) -> list[ismrmrd.Acquisition]:
    with ismrmrd.Dataset(str(path), "dataset", create_if_needed=False, mode="r") as ds:
        return [ds.read_acquisition(i) for i in range(ds.number_of_acquisitions())]


def _identical(sent: list[ismrmrd.Acquisition], got: list[object]) -> None:
    """``got`` holds exactly the acquisitions of ``sent``, in order, bit for bit (header, data, traj)."""
    got_acqs = [g for g in got if isinstance(g, ismrmrd.Acquisition)]
    assert len(got_acqs) == len(sent)
    for a, b in zip(sent, got_acqs, strict=True):
        assert a.getHead() == b.getHead()
        np.testing.assert_array_equal(a.data, b.data)
        np.testing.assert_array_equal(a.traj, b.traj)


def _check_09_estimates(rows: list[dict[str, object]], case: Path) -> None:
    """Repetitions 1 and 2 estimated within TOL_PX / TOL_DEG of truth.json and corrected."""
    truth = _truth(case)
    by_rep = {int(r["repetition"]): r for r in rows}  # type: ignore[call-overload]
    assert sorted(by_rep) == [0, 1, 2]
    for rep in (1, 2):
        r, t = by_rep[rep], truth[rep]
        assert abs(float(r["dx_px"]) - t["dx"]) < TOL_PX, (r, t)  # type: ignore[arg-type]
        assert abs(float(r["dy_px"]) - t["dy"]) < TOL_PX, (r, t)  # type: ignore[arg-type]
        assert abs(float(r["rot_deg"]) - t["phi"]) < TOL_DEG, (r, t)  # type: ignore[arg-type]
        assert r["corrected"] is True


def _small_raw_with_header(tmp_path: Path, xml: str) -> Path:
    """A small simulated ISMRMRD file whose header is replaced by ``xml``."""
    raw = simulate_raw(RawConfig(matrix=(32, 32), n_coils=2, n_slices=1, n_repetitions=2, waveforms=True))
    path = write_raw(raw, tmp_path / "raw.h5")
    with h5py.File(path, "r+") as f:
        del f["dataset/xml"]
        f.create_dataset("dataset/xml", data=[xml.encode()], dtype=h5py.string_dtype())
    return path


# ---- replay ------------------------------------------------------------------------------------------


def test_replay_field_case_09_header_read_leniently_and_corrected(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    case = _need(CASE_09)
    out, csv_path = tmp_path / "out.h5", tmp_path / "motion.csv"
    rc = main(
        ["replay", str(case), str(out), "--motion-csv", str(csv_path), "--device", "cpu", "--no-progress"]
    )
    assert rc == 0 and out.exists()
    warnings = _warnings(caplog)
    assert warnings == [
        "ISMRMRD header read with defaults: measurementInformation/patientPosition missing: HFS"
    ]
    sent, got = _h5_acqs(case), _h5_acqs(out)
    assert len(sent) == len(got) == 229
    key = lambda a: int(a.scan_counter)  # noqa: E731 - imaging lines wait for their slice: order may change
    assert [a.getHead() for a in sorted(sent, key=key)] == [a.getHead() for a in sorted(got, key=key)]
    # the output header carries the default: the strict parser (and so mrpro, Gadgetron's readers) reads it
    hdr = ismrmrd.xsd.CreateFromDocument(open_ismrmrd(out).xml)
    assert hdr.measurementInformation.patientPosition.value == "HFS"
    _check_09_estimates(read_motion_csv(csv_path), case)


def test_replay_epi_passes_through_untouched(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    case = _need(CASE_05)
    out = tmp_path / "out.h5"
    assert main(["replay", str(case), str(out), "--device", "cpu", "--no-progress"]) == 0
    warnings = _warnings(caplog)
    assert len(warnings) == 1 and "passed through untouched" in warnings[0] and "'epi'" in warnings[0]
    _identical(_h5_acqs(case), _h5_acqs(out))
    with h5py.File(out, "r") as f:
        assert not [k for k in f["dataset"] if k.startswith("images")]  # nothing to reconstruct them from
        assert f["dataset/xml"][0] == h5py.File(case, "r")["dataset/xml"][0]


@pytest.mark.parametrize("kind", sorted(UNUSABLE))
def test_replay_unusable_header_passes_through(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, kind: str
) -> None:
    xml, words = UNUSABLE[kind]
    raw = _small_raw_with_header(tmp_path, xml)
    out = tmp_path / "out.h5"
    assert main(["replay", str(raw), str(out), "--device", "cpu", "--no-progress"]) == 0
    warnings = _warnings(caplog)
    assert len(warnings) == 1 and "passed through untouched" in warnings[0] and words in warnings[0]
    _identical(_h5_acqs(raw), _h5_acqs(out))
    with h5py.File(out, "r") as f:
        assert f["dataset/xml"][0].decode() == xml  # written back as received
        assert len(f["dataset/waveforms"]) == len(h5py.File(raw, "r")["dataset/waveforms"])


def test_siemens_epi_twix_is_refused_in_one_line(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    """The real Siemens EPI phantom (twix): ``inspect`` refuses the EPI readouts, ``replay`` the format."""
    dat = _need(FIELD / "05_epi" / "siemens_epi_phantom.dat")
    assert main(["inspect", str(dat)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "REFLECT" in err[0] and dat.name in err[0]
    assert main(["replay", str(dat), str(tmp_path / "out.h5")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not HDF5" in err[0]
    assert not (tmp_path / "out.h5").exists()


# ---- kmotion stream ----------------------------------------------------------------------------------


def _encode(xml: str, items: list[object]) -> bytes:
    """An MRD v1 stream with the header text as it is (ProtocolSerializer would need a parsed header)."""
    buf = io.BytesIO()
    w = MessageWriter(buf.write)
    w.header(xml)
    for i in items:
        w.item(i)
    w.close()
    return buf.getvalue()


def _decode(data: bytes) -> list[Message]:
    return list(MessageReader(FileSource(io.BytesIO(data)), peer="output"))


def _file_stream(path: Path) -> tuple[str, list[object]]:
    src = open_ismrmrd(path)
    return src.xml, list(src.items())


def test_stream_field_case_09_every_acquisition_back_and_corrected(caplog: pytest.LogCaptureFixture) -> None:
    case = _need(CASE_09)
    xml, items = _file_stream(case)
    out = io.BytesIO()
    assert run_stream(io.BytesIO(_encode(xml, items)), out, {"device": "cpu"}) == 0
    msgs = _decode(out.getvalue())
    assert msgs[0].mid == MessageId.HEADER and msgs[-1].mid == MessageId.CLOSE
    back = [m.value for m in msgs if m.mid == MessageId.ACQUISITION]
    assert len(back) == len(items) == 229
    assert sorted(a.scan_counter for a in back) == sorted(a.scan_counter for a in items)  # type: ignore[attr-defined]
    texts = [m.value for m in msgs if m.mid == MessageId.TEXT]
    assert not [t for t in texts if t.startswith("ERROR")]
    _check_09_estimates([json.loads(t)["kmotion_estimate"] for t in texts], case)
    assert _warnings(caplog) == [
        "ISMRMRD header read with defaults: measurementInformation/patientPosition missing: HFS"
    ]
    # the HEADER sent downstream has the default filled: ismrmrd's strict ProtocolDeserializer reads it
    from ismrmrd.serialization import ProtocolDeserializer

    assert len(list(ProtocolDeserializer(io.BytesIO(out.getvalue())).deserialize())) == len(msgs) - 1


@pytest.mark.parametrize("kind", ["epi", *sorted(UNUSABLE)])
def test_stream_passes_unsupported_data_through(
    caplog: pytest.LogCaptureFixture, tmp_path: Path, kind: str
) -> None:
    if kind == "epi":
        xml, items = _file_stream(_need(CASE_05))
        words = "'epi'"
    else:
        xml, words = UNUSABLE[kind]
        _, items = _file_stream(_small_raw_with_header(tmp_path, xml))
    out = io.BytesIO()
    rc = run_stream(io.BytesIO(_encode(xml, items)), out, {"device": "cpu"}, images=True)
    assert rc == 0
    msgs = _decode(out.getvalue())
    assert msgs[0].mid == MessageId.HEADER and msgs[0].value == xml and msgs[-1].mid == MessageId.CLOSE
    assert [m.mid for m in msgs if m.mid in (MessageId.TEXT, MessageId.IMAGE, MessageId.ERROR)] == []
    _identical([i for i in items if isinstance(i, ismrmrd.Acquisition)], [m.value for m in msgs])
    n_wav = sum(isinstance(i, ismrmrd.Waveform) for i in items)
    assert sum(m.mid == MessageId.WAVEFORM for m in msgs) == n_wav
    warnings = _warnings(caplog)
    assert len(warnings) == 1 and "passed through untouched" in warnings[0] and words in warnings[0]


# ---- FIRE server -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fire_port() -> Iterator[int]:
    """A FIRE server with the real pipeline (CPU)."""
    ports: Queue[int] = Queue()
    stop = threading.Event()
    kwargs = {"port": 0, "on_ready": ports.put, "stop": stop, "properties": {"device": "cpu"}}
    t = threading.Thread(target=serve, kwargs=kwargs, daemon=True)
    t.start()
    yield ports.get(timeout=TIMEOUT)
    stop.set()
    t.join(TIMEOUT)


def _fire_session(port: int, xml: str, items: list[object]) -> list[Message]:
    """As the python-ismrmrd-server client: CONFIG_FILE, HEADER (NUL-terminated), data, CLOSE; read the
    answer until CLOSE."""
    buf = io.BytesIO()
    w = MessageWriter(buf.write)
    w.config_file("kmotion")
    body = xml.encode() + b"\0"
    buf.write(struct.pack("<HI", MessageId.HEADER, len(body)) + body)
    for i in items:
        w.item(i)
    w.close()
    sock = socket.create_connection(("127.0.0.1", port), TIMEOUT)
    sender = threading.Thread(target=sock.sendall, args=(buf.getvalue(),), daemon=True)
    sender.start()
    out: list[Message] = []
    reader = MessageReader(SocketSource(sock, TIMEOUT, "server"))
    while (m := reader.read_message()) is not None:
        out.append(m)
        if m.mid == MessageId.CLOSE:
            break
    sender.join(TIMEOUT)
    sock.close()
    assert all(m.mid != MessageId.ERROR for m in out)  # the client has no handler for id 8
    return out


@pytest.mark.parametrize("kind", ["epi", "not XML"])
def test_fire_server_sends_unsupported_data_back_untouched(
    fire_port: int, caplog: pytest.LogCaptureFixture, tmp_path: Path, kind: str
) -> None:
    if kind == "epi":
        xml, items = _file_stream(_need(CASE_05))
        words = "'epi'"
    else:
        xml, words = UNUSABLE[kind]
        _, items = _file_stream(_small_raw_with_header(tmp_path, xml))
    out = _fire_session(fire_port, xml, items)
    assert out[-1].mid == MessageId.CLOSE
    _identical([i for i in items if isinstance(i, ismrmrd.Acquisition)], [m.value for m in out])
    assert sum(m.mid == MessageId.WAVEFORM for m in out) == sum(
        isinstance(i, ismrmrd.Waveform) for i in items
    )
    texts = [m.value for m in out if m.mid == MessageId.TEXT]
    assert len(texts) == 2 and texts[0].startswith("WARNING kmotion serve: data passed through untouched")
    assert words in texts[0] and json.loads(texts[1]) == {"kmotion_estimates": []}
    warnings = _warnings(caplog)
    assert len(warnings) == 1 and words in warnings[0]


def test_fire_server_field_case_09_images_and_estimates(
    fire_port: int, caplog: pytest.LogCaptureFixture
) -> None:
    case = _need(CASE_09)
    xml, items = _file_stream(case)
    out = _fire_session(fire_port, xml, items)
    assert out[-1].mid == MessageId.CLOSE
    assert sum(m.mid == MessageId.IMAGE for m in out) == 3  # one per repetition
    texts = [m.value for m in out if m.mid == MessageId.TEXT]
    assert texts[0] == (
        "WARNING kmotion serve: ISMRMRD header read with defaults: measurementInformation/patientPosition "
        "missing: HFS"
    )
    _check_09_estimates(json.loads(texts[-1])["kmotion_estimates"], case)
    assert len(_warnings(caplog)) == 1


# ---- Gadgetron adapter -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def gadgetron_port() -> Iterator[int]:
    """``serve_gadgetron`` (the ``<connect>`` mode) with the real pipeline."""
    ports: Queue[int] = Queue()
    stop = threading.Event()
    kwargs = {"port": 0, "on_ready": ports.put, "stop": stop}
    t = threading.Thread(target=serve_gadgetron, kwargs=kwargs, daemon=True)
    t.start()
    yield ports.get(timeout=TIMEOUT)
    stop.set()
    t.join(TIMEOUT)


CPU = '<?xml version="1.0"?>\n<configuration><property name="device" value="cpu"/></configuration>'


@pytest.mark.parametrize("kind", ["epi", "field case 09", *sorted(UNUSABLE)])
def test_gadgetron_connect_mode_returns_every_item(
    gadgetron_port: int, caplog: pytest.LogCaptureFixture, tmp_path: Path, kind: str
) -> None:
    """Connect mode: kmotion reads the header leniently; every item comes back, CLOSE, no ERROR."""
    if kind == "epi":
        xml, items = _file_stream(_need(CASE_05))
    elif kind == "field case 09":
        xml, items = _file_stream(_need(CASE_09))
    else:
        xml, _ = UNUSABLE[kind]
        _, items = _file_stream(_small_raw_with_header(tmp_path, xml))
    fake = FakeGadgetron(CHAIN_CONNECT, port=gadgetron_port, configuration=CPU, timeout=TIMEOUT)
    res = fake.run(xml, items)
    assert res.failure is None and res.errors == [] and res.closed, res
    assert res.sent == len(items) == len(res.items)
    warnings = _warnings(caplog)
    assert len(warnings) == 1
    if kind == "field case 09":
        assert "patientPosition missing: HFS" in warnings[0]
        key = lambda a: int(a.scan_counter)  # noqa: E731
        got = sorted((i for i in res.items if isinstance(i, ismrmrd.Acquisition)), key=key)
        assert [a.getHead() for a in got] == [a.getHead() for a in sorted(items, key=key)]  # type: ignore[arg-type]
    else:
        assert "passed through untouched" in warnings[0]
        _identical([i for i in items if isinstance(i, ismrmrd.Acquisition)], res.items)


@pytest.mark.slow
def test_gadgetron_execute_mode_passes_epi_through() -> None:
    """Execute mode, as Gadgetron runs it (``python -m gadgetron PORT MODULE TARGET``): EPI comes back
    untouched, CLOSE, no ERROR, the module exits 0 with one WARNING in its log."""
    xml, items = _file_stream(_need(CASE_05))
    res = FakeGadgetron(CHAIN, configuration=CPU, timeout=TIMEOUT).run(xml, items)
    assert res.failure is None and res.errors == [] and res.closed and res.returncode == 0, res.log[-3000:]
    _identical([i for i in items if isinstance(i, ismrmrd.Acquisition)], res.items)
    warn = [ln for ln in res.log.splitlines() if " WARNING " in ln or " ERROR " in ln]
    assert len(warn) == 1 and "passed through untouched" in warn[0] and "'epi'" in warn[0], res.log[-3000:]
