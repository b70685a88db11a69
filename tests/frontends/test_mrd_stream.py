"""``kmotion stream``: MRD v1 stream in (``ismrmrd.ProtocolSerializer``) -> corrected stream out."""

from __future__ import annotations

import io
import json
import os
import struct
import subprocess
import sys

import ismrmrd
import mrd
import numpy as np
import pytest
from _helpers import REPO_ROOT
from fake_gadgetron import echo_factory, simulated_stream
from ismrmrd.serialization import ConfigFile, ConfigText, ProtocolDeserializer, ProtocolSerializer
from mrd.tools.phantom import generate as mrd_phantom
from mrd.tools.stream_recon import reconstruct_mrd_stream as mrd_stream_recon

from kmotion.frontends.mrd_stream import run_stream
from kmotion.frontends.properties import kmotion_pipeline, properties_from_config_text
from kmotion.gadget.buffer import is_imaging
from kmotion.io.estimates import read_motion_csv
from kmotion.io.mrd_v1 import FileSource, Limits, MessageId, MessageReader
from kmotion.io.mrd_v2 import Mrd2MessageWriter, header_to_ismrmrd

CHAIN = REPO_ROOT / "config_xml" / "kmotion_cartesian_grappa.xml"


def _encode(header: object, items: list[object], config: object = None, texts: tuple[str, ...] = ()) -> bytes:
    buf = io.BytesIO()
    s = ProtocolSerializer(buf)
    if config is not None:
        s.serialize(config)
    s.serialize(header)
    for t in texts:
        s.serialize(t)
    for i in items:
        s.serialize(i)
    s.close()
    return buf.getvalue()


def _decode(data: bytes) -> list[object]:
    return list(ProtocolDeserializer(io.BytesIO(data)).deserialize())


def _small(ism) -> tuple[object, list[object]]:
    hdr = ism.make_header(n_ky=16, n_kx=16, n_slices=1, n_reps=2)
    k = ism.known_kspace(2, 16, 16)
    items: list[object] = []
    for rep in range(2):
        items += ism.slice_lines(k, ism.undersampled_rows(16, 0), 8, rep=rep)
    items.insert(2, ismrmrd.Waveform.from_array(np.arange(8, dtype=np.uint32).reshape(2, 4)))
    return hdr, items


def _run(data: bytes, factory=echo_factory, **kw) -> tuple[int, list[object]]:  # noqa: ANN001
    out = io.BytesIO()
    rc = run_stream(io.BytesIO(data), out, factory=factory, **kw)
    return rc, _decode(out.getvalue())


def _acqs(items: list[object]) -> list[ismrmrd.Acquisition]:
    return [i for i in items if isinstance(i, ismrmrd.Acquisition)]


def _errors(out: list[object]) -> list[str]:
    return [t for t in out if isinstance(t, str) and t.startswith("ERROR")]


@pytest.mark.slow
def test_stream_round_trip_real_pipeline() -> None:
    """Simulated data with known motion: every acquisition and waveform out, estimates as TEXT."""
    raw = simulated_stream()
    conf = ConfigText('<configuration><property name="sense_iterations" value="3"/></configuration>')
    rc, out = _run(_encode(raw.header, raw.items, conf), factory=kmotion_pipeline)
    assert rc == 0
    assert isinstance(out[0], ismrmrd.xsd.ismrmrdHeader)
    assert len(_acqs(out)) == len(raw.acquisitions)
    assert sum(isinstance(i, ismrmrd.Waveform) for i in out) == len(raw.waveforms)
    est = {e["repetition"]: e for e in (json.loads(t)["kmotion_estimate"] for t in out if isinstance(t, str))}
    assert sorted(est) == [0, 1, 2]
    for t in raw.truth[1:]:
        e = est[t.repetition]
        assert e["corrected"] and abs(e["dx_px"] - t.dx_px) < 1.0 and abs(e["dy_px"] - t.dy_px) < 1.0
        assert abs(e["rot_deg"] - t.phi_deg) < 3.0
    # each estimate comes before the imaging lines of its slice
    first_line = {}
    for i, item in enumerate(out):
        if is_imaging(item):
            first_line.setdefault(int(item.idx.repetition), i)
    text_pos = {
        json.loads(t)["kmotion_estimate"]["repetition"]: i for i, t in enumerate(out) if isinstance(t, str)
    }
    assert all(text_pos[r] < first_line[r] for r in (1, 2))


def test_stream_without_config_and_with_parameters(ism) -> None:
    hdr, items = _small(ism)
    rc, out = _run(_encode(hdr, items))
    assert rc == 0 and len(_acqs(out)) == len(_acqs(items))
    for a, b in zip(_acqs(items), _acqs(out), strict=True):
        np.testing.assert_array_equal(a.data, b.data)
    assert len([t for t in out if isinstance(t, str)]) == 2  # one estimate per repetition
    seen: dict[str, str] = {}

    def recording(props):  # noqa: ANN001, ANN202
        seen.update(props)
        return echo_factory(props)

    conf = ConfigText(CHAIN.read_text())
    texts = ('{"parameters": {"config": "x", "min_correction": 0.5}}',)
    rc, out = _run(_encode(hdr, items, conf, texts=texts), recording)
    assert rc == 0 and seen["min_correction"] == "0.5" and seen["device"] == "auto"
    assert "trigger_dimension" not in seen
    rc, out = _run(_encode(hdr, items, ConfigFile("kmotion")), recording, properties={"device": "cpu"})
    assert rc == 0 and seen["device"] == "cpu"


def test_chain_properties_are_those_of_the_kmotion_external() -> None:
    props = properties_from_config_text(CHAIN.read_text())
    assert props["output"] == "cartesian" and "N_dimension" not in props
    assert properties_from_config_text("not xml") == {}


@pytest.mark.parametrize(
    ("tail", "words"),
    [
        (struct.pack("<H", 777) + b"zz", "unknown message id 777"),
        (struct.pack("<H", 1008) + b"\x01" * 50, "truncated"),
        (b"", "end of input without CLOSE"),
    ],
)
def test_stream_errors_flush_everything_first(ism, tail: bytes, words: str) -> None:
    hdr, items = _small(ism)
    data = _encode(hdr, items)[:-2] + tail  # drop CLOSE
    rc, out = _run(data)
    assert rc == 2 and len(_acqs(out)) == len(_acqs(items))
    errs = _errors(out)
    assert len(errs) == 1 and words in errs[0]


def test_stream_rejects_oversized_length(ism) -> None:
    hdr, items = _small(ism)
    head = ismrmrd.AcquisitionHeader()
    head.number_of_samples = 4096
    head.active_channels = 64
    data = _encode(hdr, items)[:-2] + struct.pack("<H", 1008) + bytes(head)
    rc, out = _run(data, limits=Limits(max_bytes=1 << 20))
    assert rc == 2 and len(_acqs(out)) == len(_acqs(items))
    assert "exceeds the limit" in _errors(out)[0]


def test_stream_bad_header_and_bad_parameters(ism) -> None:
    hdr, items = _small(ism)
    buf = io.BytesIO()
    s = ProtocolSerializer(buf)
    buf.write(struct.pack("<HI", 3, 9) + b"<garbage>")
    for i in items:
        s.serialize(i)
    s.close()
    # not an ISMRMRD header: no error; the pipeline gets it (the real one passes the data through:
    # test_headers_and_passthrough) and it is written back as received (ProtocolDeserializer cannot read it)
    res = io.BytesIO()
    assert run_stream(io.BytesIO(buf.getvalue()), res, factory=echo_factory) == 0
    msgs = list(MessageReader(FileSource(io.BytesIO(res.getvalue()))))
    assert msgs[0].value == "<garbage>" and msgs[-1].mid == MessageId.CLOSE
    assert sum(m.mid == MessageId.ACQUISITION for m in msgs) == len(_acqs(items))
    assert not [m for m in msgs if m.mid == MessageId.TEXT and m.value.startswith("ERROR")]
    rc, out = _run(_encode(hdr, items), properties={"colour": "red"})
    assert rc == 2 and len(_acqs(out)) == len(_acqs(items))  # passed through untouched
    assert "colour" in _errors(out)[0]


def test_kmotion_stream_command_missing_model(ism, tmp_path) -> None:
    """The command: binary stdin/stdout, log on stderr, a missing model -> data untouched, exit 2."""
    hdr, items = _small(ism)
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT / "gadgets"))
    proc = subprocess.run(
        [sys.executable, "-m", "kmotion.cli", "stream", "--model", str(tmp_path / "nope.safetensors")],
        input=_encode(hdr, items),
        capture_output=True,
        timeout=120,
        env=env,
    )
    assert proc.returncode == 2, proc.stderr.decode()
    out = _decode(proc.stdout)
    assert len(_acqs(out)) == len(_acqs(items))
    assert "nope.safetensors" in _errors(out)[0]
    assert b"nope.safetensors" in proc.stderr


# ---- MRD v2 (mrd-python) streams -------------------------------------------------------------------------


def _v2_encode(header: object, items: list[object]) -> bytes:
    """An MRD v2 stream of ismrmrd-python objects (converted by kmotion.io.mrd_v2)."""
    buf = io.BytesIO()
    w = Mrd2MessageWriter(buf)
    w.header(header)
    for i in items:
        w.item(i)
    w.close()
    return buf.getvalue()


def _v2_decode(data: bytes) -> tuple[mrd.Header | None, list[mrd.StreamItem]]:
    r = mrd.BinaryMrdReader(io.BytesIO(data))
    return r.read_header(), list(r.read_data())


def _v2_acqs(items: list[mrd.StreamItem]) -> list[mrd.Acquisition]:
    return [i.value for i in items if isinstance(i, mrd.StreamItem.Acquisition)]


def _v2_run(data: bytes, factory=echo_factory, **kw) -> tuple[int, bytes]:  # noqa: ANN001
    out = io.BytesIO()
    rc = run_stream(io.BytesIO(data), out, factory=factory, **kw)
    return rc, out.getvalue()


def test_mrd2_stream_passes_mrd_python_phantom_through_exactly(tmp_path) -> None:
    """An MRD v2 stream of mrd-python's own phantom tool (None counters, short lists) comes out item for item
    as it went in (MRD v2 is detected from the magic bytes), and mrd-python's own recon reads the output."""
    mrd_phantom(str(tmp_path / "p.bin"), 32, 2, 2, 2, 0.05)
    data = (tmp_path / "p.bin").read_bytes()
    csv_path = tmp_path / "m.csv"
    rc, out = _v2_run(data, motion_csv=csv_path)
    assert rc == 0 and out[:5] == b"yardl"
    h_in, items_in = _v2_decode(data)
    h_out, items_out = _v2_decode(out)
    assert h_out == h_in
    assert len(items_out) == len(items_in) == 32 + 2 * 32  # 32 noise lines, repetitions x lines
    assert all(a.value == b.value for a, b in zip(items_in, items_out, strict=True))
    assert [r["repetition"] for r in read_motion_csv(csv_path)] == [0, 1]  # one echo estimate per repetition
    images = io.BytesIO()
    mrd_stream_recon(io.BytesIO(out), images)
    assert len(_v2_decode(images.getvalue())[1]) == 2  # one image per repetition


def test_stream_formats_cross(ism) -> None:
    """MRD v1 in -> MRD v2 out and MRD v2 in -> MRD v1 out: every item, data identical."""
    hdr, items = _small(ism)
    rc, out = _v2_run(_encode(hdr, items), out_format="mrd2")
    assert rc == 0
    h2, items2 = _v2_decode(out)
    assert ismrmrd.xsd.ToXML(header_to_ismrmrd(h2)) == ismrmrd.xsd.ToXML(hdr)
    assert [type(i).__name__ for i in items2] == [
        "StreamItem.Acquisition" if isinstance(i, ismrmrd.Acquisition) else "StreamItem.WaveformUint32"
        for i in items
    ]
    for a, b in zip(_acqs(items), _v2_acqs(items2), strict=True):
        assert np.array_equal(a.data, b.data)
        assert b.head.idx.kspace_encode_step_1 == a.idx.kspace_encode_step_1

    rc, out = _v2_run(_v2_encode(hdr, items), out_format="mrd1")
    assert rc == 0
    back = _decode(out)
    assert ismrmrd.xsd.ToXML(back[0]) == ismrmrd.xsd.ToXML(hdr)
    assert len(_acqs(back)) == len(_acqs(items)) and sum(isinstance(i, ismrmrd.Waveform) for i in back) == 1
    for a, b in zip(_acqs(items), _acqs(back), strict=True):
        assert bytes(a.getHead()) == bytes(b.getHead()) and np.array_equal(a.data, b.data)
    assert len([t for t in back if isinstance(t, str)]) == 2  # MRD v1 output: estimates as TEXT again


@pytest.mark.slow
def test_mrd2_real_pipeline_writes_back_the_corrected_data(tmp_path) -> None:
    """Simulated data with known motion through the real pipeline, once as MRD v1 and once as MRD v2: the
    same lines come out with the same corrected data, and unchanged lines exactly as they came in."""
    raw = simulated_stream()
    props = {"sense_iterations": "3", "device": "cpu"}
    rc1, out1 = _run(_encode(raw.header, raw.items), factory=kmotion_pipeline, properties=props)
    data2 = _v2_encode(raw.header, raw.items)
    rc2, out2 = _v2_run(data2, factory=kmotion_pipeline, properties=props, motion_csv=tmp_path / "m.csv")
    assert rc1 == rc2 == 0
    v1_out, (_, v2_items) = _acqs(out1), _v2_decode(out2)
    v2_out = _v2_acqs(v2_items)
    assert len(v2_out) == len(v1_out) == len(raw.acquisitions)
    assert sum(isinstance(i, mrd.StreamItem.WaveformUint32) for i in v2_items) == len(raw.waveforms)
    for a, b in zip(v1_out, v2_out, strict=True):  # same order, same (corrected) data
        assert b.head.idx.kspace_encode_step_1 == a.idx.kspace_encode_step_1
        assert b.head.idx.repetition == a.idx.repetition
        np.testing.assert_array_equal(b.data, a.data)
    v2_in = {
        (x.head.idx.repetition, x.head.idx.kspace_encode_step_1, int(x.head.flags)): x
        for x in _v2_acqs(_v2_decode(data2)[1])
    }
    changed = 0
    for b in v2_out:
        a = v2_in[(b.head.idx.repetition, b.head.idx.kspace_encode_step_1, int(b.head.flags))]
        assert b.head == a.head  # headers as read
        if np.array_equal(a.data, b.data):
            assert b == a
        else:
            changed += 1
            assert b.head.idx.repetition != 0  # only moved repetitions are corrected
    assert changed > 0
    rows = read_motion_csv(tmp_path / "m.csv")
    assert [r["repetition"] for r in rows] == [0, 1, 2] and all(r["corrected"] for r in rows[1:])


def test_mrd2_bad_streams_flush_and_exit_2(ism, tmp_path) -> None:
    hdr, items = _small(ism)
    data = _v2_encode(hdr, items)
    rc, out = _v2_run(data[: len(data) - 300])  # cut inside the last acquisition
    assert rc == 2
    _, got = _v2_decode(out)  # still a complete MRD v2 stream, with every item that arrived whole
    assert 0 < len(_v2_acqs(got)) < len(_acqs(items))
    h5 = tmp_path / "x.h5"
    h5.write_bytes(b"\x89HDF\r\n\x1a\n" + bytes(100))
    rc, out = _run(h5.read_bytes())
    assert rc == 2 and "HDF5" in _errors(out)[0] and "kmotion replay" in _errors(out)[0]


def test_kmotion_stream_command_mrd2_output(ism, tmp_path) -> None:
    """The command's --format and --motion-csv: MRD v1 in, MRD v2 out on stdout; a missing model passes the
    data through untouched (exit 2, the error in the log: MRD v2 has no TEXT)."""
    hdr, items = _small(ism)
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT / "gadgets"))
    args = ["stream", "--format", "mrd2", "--motion-csv", str(tmp_path / "m.csv")]
    proc = subprocess.run(
        [sys.executable, "-m", "kmotion.cli", *args, "--model", str(tmp_path / "nope.safetensors")],
        input=_encode(hdr, items),
        capture_output=True,
        timeout=120,
        env=env,
    )
    assert proc.returncode == 2 and b"nope.safetensors" in proc.stderr
    _, out = _v2_decode(proc.stdout)
    assert len(_v2_acqs(out)) == len(_acqs(items))
    for a, b in zip(_acqs(items), _v2_acqs(out), strict=True):
        assert np.array_equal(a.data, b.data)
    assert read_motion_csv(tmp_path / "m.csv") == []  # no estimates: the header line only
