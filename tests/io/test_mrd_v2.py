"""MRD v2 (mrd-python) <-> ismrmrd-python: headers, acquisitions, waveforms, images, streams, detection."""

from __future__ import annotations

import io
import logging
from pathlib import Path

import h5py
import ismrmrd
import ismrmrd.xsd
import mrd
import numpy as np
import pytest
from ismrmrd.serialization import ProtocolSerializer
from mrd.tools.phantom import generate as mrd_phantom

from kmotion.io.mrd_v1 import MessageId, ProtocolError, TruncatedMessageError
from kmotion.io.mrd_v2 import (
    Mrd2Context,
    Mrd2MessageReader,
    Mrd2MessageWriter,
    acquisition_from_ismrmrd,
    acquisition_to_ismrmrd,
    header_from_ismrmrd,
    header_to_ismrmrd,
    image_from_ismrmrd,
    image_to_ismrmrd,
    is_mrd2_file,
    item_to_ismrmrd,
    open_mrd2,
    sniff,
    waveform_from_ismrmrd,
    waveform_to_ismrmrd,
)
from kmotion.physics.validate import InputError
from kmotion.simulation.raw import RawConfig, simulate_raw

# An ISMRMRD header using every part of the schema whose MRD v2 counterpart differs in name or type:
# dates and times, enumerations, base64 user parameters, multiband, diffusion, waveform information.
RICH_XML = """<?xml version="1.0"?>
<ismrmrdHeader xmlns="http://www.ismrm.org/ISMRMRD">
  <version>2</version>
  <subjectInformation><patientName>Doe^Jane</patientName><patientWeight_kg>61.5</patientWeight_kg>
    <patientID>P1</patientID><patientBirthdate>1980-02-29</patientBirthdate><patientGender>F</patientGender>
  </subjectInformation>
  <studyInformation><studyDate>2024-05-17</studyDate><studyTime>13:45:07.25</studyTime><studyID>S9</studyID>
    <accessionNumber>42</accessionNumber></studyInformation>
  <measurementInformation><measurementID>M1</measurementID><seriesTime>08:00:00</seriesTime>
    <patientPosition>FFDR</patientPosition><relativeTablePosition><x>0</x><y>1.5</y><z>-20</z></relativeTablePosition>
    <protocolName>t1_tse</protocolName>
    <measurementDependency><dependencyType>Noise</dependencyType><measurementID>M0</measurementID>
    </measurementDependency>
    <referencedImageSequence><referencedSOPInstanceUID>1.2.3</referencedSOPInstanceUID>
      <referencedSOPInstanceUID>1.2.4</referencedSOPInstanceUID></referencedImageSequence>
  </measurementInformation>
  <acquisitionSystemInformation><systemVendor>V</systemVendor><systemFieldStrength_T>2.89</systemFieldStrength_T>
    <receiverChannels>2</receiverChannels><coilLabel><coilNumber>0</coilNumber><coilName>H1</coilName></coilLabel>
    <coilLabel><coilNumber>1</coilNumber><coilName>H2</coilName></coilLabel></acquisitionSystemInformation>
  <experimentalConditions><H1resonanceFrequency_Hz>123251000</H1resonanceFrequency_Hz></experimentalConditions>
  <encoding>
    <encodedSpace><matrixSize><x>128</x><y>64</y><z>1</z></matrixSize>
      <fieldOfView_mm><x>440</x><y>220</y><z>5</z></fieldOfView_mm></encodedSpace>
    <reconSpace><matrixSize><x>64</x><y>64</y><z>1</z></matrixSize>
      <fieldOfView_mm><x>220</x><y>220</y><z>5</z></fieldOfView_mm></reconSpace>
    <encodingLimits><kspace_encoding_step_1><minimum>0</minimum><maximum>63</maximum><center>32</center>
      </kspace_encoding_step_1><phase><minimum>0</minimum><maximum>3</maximum><center>0</center></phase>
      <user_3><minimum>0</minimum><maximum>1</maximum><center>0</center></user_3></encodingLimits>
    <trajectory>goldenangle</trajectory>
    <trajectoryDescription><identifier>ga</identifier>
      <userParameterDouble><name>angle</name><value>111.25</value></userParameterDouble>
      <comment>golden</comment></trajectoryDescription>
    <parallelImaging><accelerationFactor><kspace_encoding_step_1>2</kspace_encoding_step_1>
      <kspace_encoding_step_2>1</kspace_encoding_step_2></accelerationFactor>
      <calibrationMode>embedded</calibrationMode><interleavingDimension>phase</interleavingDimension>
      <multiband><spacing><dZ>1.5</dZ><dZ>-1.5</dZ></spacing><deltaKz>0.25</deltaKz>
        <multiband_factor>2</multiband_factor><calibration>separable2D</calibration>
        <calibration_encoding>1</calibration_encoding></multiband></parallelImaging>
    <echoTrainLength>8</echoTrainLength>
  </encoding>
  <sequenceParameters><TR>500</TR><TE>12</TE><TE>24</TE><flipAngle_deg>90</flipAngle_deg>
    <sequence_type>TSE</sequence_type><diffusionDimension>user_2</diffusionDimension>
    <diffusion><gradientDirection><rl>1</rl><ap>0</ap><fh>0</fh></gradientDirection><bvalue>1000</bvalue></diffusion>
  </sequenceParameters>
  <userParameters><userParameterLong><name>n</name><value>-3</value></userParameterLong>
    <userParameterString><name>s</name><value>text</value></userParameterString>
    <userParameterBase64><name>b</name><value>AAEC/w==</value></userParameterBase64></userParameters>
  <waveformInformation><waveformName>ecg</waveformName><waveformType>ecg</waveformType>
    <userParameters><userParameterLong><name>leads</name><value>4</value></userParameterLong></userParameters>
  </waveformInformation>
</ismrmrdHeader>"""


def _sim():  # noqa: ANN202
    return simulate_raw(RawConfig(matrix=(32, 32), n_coils=2, n_slices=1, n_repetitions=2, waveforms=True))


def _phantom(path: Path, repetitions: int = 2) -> tuple[mrd.Header, list[mrd.StreamItem]]:
    """An MRD v2 file written by mrd-python's own phantom generator, and its contents."""
    mrd_phantom(str(path), 32, 2, 2, repetitions, 0.05)
    with mrd.BinaryMrdReader(str(path)) as r:
        return r.read_header(), list(r.read_data())


def test_header_round_trips() -> None:
    for xsd in (ismrmrd.xsd.CreateFromDocument(RICH_XML), _sim().header):
        v2 = header_from_ismrmrd(xsd)
        assert ismrmrd.xsd.ToXML(header_to_ismrmrd(v2)) == ismrmrd.xsd.ToXML(xsd)
    rich = header_from_ismrmrd(ismrmrd.xsd.CreateFromDocument(RICH_XML))
    assert rich.measurement_information.patient_position == mrd.PatientPosition.F_FDR
    assert rich.subject_information.patient_gender == mrd.PatientGender.F
    assert str(rich.subject_information.patient_birthdate) == "1980-02-29"
    assert rich.study_information.study_time == mrd.Time.from_components(13, 45, 7, 250_000_000)
    assert rich.encoding[0].trajectory == mrd.Trajectory.GOLDENANGLE
    assert rich.encoding[0].parallel_imaging.multiband.calibration == mrd.Calibration.SEPARABLE_2D
    assert rich.encoding[0].encoding_limits.user_3.maximum == 1
    assert rich.sequence_parameters.t_e == [12.0, 24.0]
    assert rich.user_parameters.user_parameter_base64[0].value == "AAEC/w=="
    # and an MRD v2 header of mrd-python's own tool survives the way through MRD v1
    buf = io.BytesIO()
    mrd_phantom(buf, 16, 2, 2, 1, 0.0)
    header = mrd.BinaryMrdReader(io.BytesIO(buf.getvalue())).read_header()
    assert header_from_ismrmrd(header_to_ismrmrd(header)) == header
    assert header_to_ismrmrd(None).encoding == []


def test_acquisitions_both_ways(tmp_path: Path) -> None:
    # MRD v1 -> v2 -> v1: header bytes, data and a 2-D trajectory identical
    for a in (i for i in _sim().items if isinstance(i, ismrmrd.Acquisition)):
        b = acquisition_to_ismrmrd(acquisition_from_ismrmrd(a))
        assert bytes(b.getHead()) == bytes(a.getHead()) and np.array_equal(b.data, a.data)
    rng = np.random.default_rng(0)
    data = (rng.standard_normal((3, 16)) + 1j * rng.standard_normal((3, 16))).astype(np.complex64)
    a = ismrmrd.Acquisition.from_array(data, rng.standard_normal((16, 2)).astype(np.float32))
    a.idx.phase, a.user_float[7] = 3, 2.5
    a.set_flag(ismrmrd.ACQ_IS_REVERSE)
    a.set_flag(ismrmrd.ACQ_USER8)
    v2 = acquisition_from_ismrmrd(a)
    assert v2.trajectory.shape == (2, 16) and v2.trajectory_dimensions() == 2 and v2.head.idx.phase == 3
    assert v2.head.flags & mrd.AcquisitionFlags.IS_REVERSE
    b = acquisition_to_ismrmrd(v2)
    assert bytes(b.getHead()) == bytes(a.getHead())
    assert np.array_equal(b.traj, a.traj) and np.array_equal(b.data, a.data)

    # MRD v2 (None fields, short lists) -> v1 -> v2: identical with the template, None -> 0 without
    _, items = _phantom(tmp_path / "p.bin")
    for item in items:
        v1 = acquisition_to_ismrmrd(item.value)
        assert np.array_equal(v1.data, item.value.data)
        assert acquisition_from_ismrmrd(v1, item.value.head) == item.value
    plain = acquisition_from_ismrmrd(acquisition_to_ismrmrd(items[0].value))
    assert items[0].value.head.idx.slice is None and plain.head.idx.slice == 0
    # a changed data array (a corrected line) is written with the template's header
    v1 = acquisition_to_ismrmrd(items[-1].value)
    v1.data[:] *= 2
    out = acquisition_from_ismrmrd(v1, items[-1].value.head)
    assert out.head == items[-1].value.head and np.array_equal(out.data, 2 * items[-1].value.data)

    big = mrd.Acquisition(data=np.zeros((1, 4), np.complex64))
    big.head.idx.repetition = 70000
    with pytest.raises(ValueError, match="repetition"):
        acquisition_to_ismrmrd(big)


def test_waveforms_and_images_both_ways() -> None:
    w = ismrmrd.Waveform.from_array(np.arange(12, dtype=np.uint32).reshape(3, 4))
    head = w.getHead()
    head.waveform_id, head.time_stamp, head.flags = 2, 1234, 1 << 40
    w.setHead(head)
    w2 = waveform_to_ismrmrd(waveform_from_ismrmrd(w))
    assert bytes(w2.getHead()) == bytes(w.getHead()) and np.array_equal(w2.data, w.data)

    for dtype in (np.float32, np.complex64, np.uint16, np.float64):
        img = ismrmrd.Image.from_array(np.arange(24).reshape(2, 3, 4).astype(dtype))
        h = img.getHead()
        h.image_series_index, h.repetition, h.image_type = 2, 5, ismrmrd.IMTYPE_MAGNITUDE
        h.read_dir[:] = (0.0, 1.0, 0.0)
        img.setHead(h)
        img.meta = {"kmotion_dx_px": 0.25, "kmotion_flag": 1, "kmotion_reason": "none", "v": [1.5, 2.5]}
        item = image_from_ismrmrd(img)
        v2 = item.value
        assert v2.data.dtype == np.dtype(dtype) and v2.data.shape == (1, 2, 3, 4)
        assert list(v2.head.col_dir) == [0.0, 1.0, 0.0] and v2.head.repetition == 5
        assert v2.meta["kmotion_dx_px"] == [mrd.ImageMetaValue.Float64(0.25)]
        assert v2.meta["kmotion_flag"] == [mrd.ImageMetaValue.Int64(1)]
        assert v2.meta["kmotion_reason"] == [mrd.ImageMetaValue.String("none")]
        back = image_to_ismrmrd(v2)
        assert bytes(back.getHead()) == bytes(img.getHead()) and np.array_equal(back.data, img.data)
        assert back.meta["kmotion_reason"] == "none" and back.meta["v"] == ["1.5", "2.5"]
    other = mrd.StreamItem.ArrayComplexFloat(np.zeros((2, 2), np.complex64))
    assert item_to_ismrmrd(other) is other


def _v2_bytes(header: object, items: list[object]) -> bytes:
    buf = io.BytesIO()
    w = Mrd2MessageWriter(buf)
    w.header(header)
    for i in items:
        w.item(i)
    w.text("a TEXT message has no MRD v2 counterpart")
    w.close()
    return buf.getvalue()


def _messages(data: bytes, keep_other: bool = True) -> list[tuple[int, object]]:
    r = Mrd2MessageReader(io.BytesIO(data), Mrd2Context(), keep_other=keep_other)
    out = []
    while (m := r.read_message()) is not None:
        out.append((m.mid, m.value))
    return out


def test_stream_messages_detection_and_bad_streams(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    raw = _sim()
    data = _v2_bytes(raw.header, raw.items)
    kind, stream = sniff(io.BytesIO(data))
    assert kind == "mrd2" and stream.read() == data  # the looked-at bytes are still there
    msgs = _messages(data)
    assert msgs[0][0] == MessageId.HEADER and msgs[-1] == (MessageId.CLOSE, None)
    assert ismrmrd.xsd.ToXML(ismrmrd.xsd.CreateFromDocument(msgs[0][1])) == ismrmrd.xsd.ToXML(raw.header)
    values = [v for _, v in msgs[1:-1]]
    assert [type(v) for v in values] == [type(i) for i in raw.items]
    for got, want in zip(values, raw.items, strict=True):
        assert np.array_equal(got.data, want.data)

    v1 = io.BytesIO()
    s = ProtocolSerializer(v1)
    s.serialize(raw.header)
    s.close()
    assert sniff(io.BytesIO(v1.getvalue()))[0] == "mrd1"
    h5 = tmp_path / "x.h5"
    h5py.File(h5, "w").close()
    with h5.open("rb") as f:
        assert sniff(f)[0] == "hdf5"
    assert sniff(io.BytesIO(b""))[0] == "mrd1"

    with pytest.raises(TruncatedMessageError, match="truncated"):
        _messages(data[: len(data) // 2])
    with pytest.raises(ProtocolError, match="MRD v2"):
        _messages(b"yardl" + b"\x07" * 40)

    # items MRD v1 cannot hold: passed on (MRD v2 output) or dropped with a WARNING (MRD v1 output)
    array = mrd.StreamItem.ArrayComplexFloat(np.ones((2, 3), np.complex64))
    acq = next(i for i in raw.items if isinstance(i, ismrmrd.Acquisition))
    data = _v2_bytes(raw.header, [acq, array])
    kept = _messages(data)
    assert kept[2][0] == 0 and isinstance(kept[2][1], mrd.StreamItem.ArrayComplexFloat)
    with caplog.at_level(logging.WARNING):
        dropped = _messages(data, keep_other=False)
    assert [m for m, _ in dropped] == [MessageId.HEADER, MessageId.ACQUISITION, MessageId.CLOSE]
    assert "ArrayComplexFloat" in caplog.text and "dropped" in caplog.text


def test_mrd2_file_source(tmp_path: Path) -> None:
    path = tmp_path / "p.bin"
    header, items = _phantom(path)
    assert is_mrd2_file(path) and not is_mrd2_file(tmp_path / "absent.bin")
    src = open_mrd2(path)
    assert src.n_acquisitions == len(items) and src.n_waveforms == 0
    assert header_from_ismrmrd(src.header) == header
    got = list(src.items())
    assert len(got) == len(items) and all(
        np.array_equal(g.data, i.value.data) for g, i in zip(got, items, strict=True)
    )
    bad = tmp_path / "cut.bin"
    bad.write_bytes(path.read_bytes()[:5000])
    with pytest.raises(InputError, match="cut.bin"):
        open_mrd2(bad)


def test_docs_output_layout_section_names_existing_tests() -> None:
    """docs/gadget.md, "Output layout": every test a table row names exists in ``tests/``."""
    import re

    from _helpers import REPO_ROOT

    text = (REPO_ROOT / "docs" / "gadget.md").read_text()
    section = text.split("### Output layout", 1)[1].split("\n### ", 1)[0]
    named = set(re.findall(r"`(?:[\w/]+\.py::)?(test_\w+)`", section))
    assert len(named) >= 8
    sources = "\n".join(p.read_text() for p in (REPO_ROOT / "tests").rglob("test_*.py"))
    assert sorted(t for t in named if f"def {t}(" not in sources) == []
    for path in re.findall(r"`(tests/[\w/]+\.py)", section):
        assert (REPO_ROOT / path).is_file(), path
