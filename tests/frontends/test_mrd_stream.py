"""``kmotion stream``: MRD v1 stream in (``ismrmrd.ProtocolSerializer``) -> corrected stream out."""

from __future__ import annotations

import io
import json
import os
import struct
import subprocess
import sys

import ismrmrd
import numpy as np
import pytest
from _helpers import REPO_ROOT
from fake_gadgetron import echo_factory, simulated_stream
from ismrmrd.serialization import ConfigFile, ConfigText, ProtocolDeserializer, ProtocolSerializer

from kmotion.frontends.mrd_stream import run_stream
from kmotion.frontends.properties import kmotion_pipeline, properties_from_config_text
from kmotion.gadget.buffer import is_imaging
from kmotion.io.mrd_v1 import Limits

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
    s.close()
    rc, out = _run(buf.getvalue())
    assert rc == 2 and "not a valid ISMRMRD XML header" in _errors(out)[0]
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
