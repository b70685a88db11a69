"""Lenient ISMRMRD header reading (``kmotion.io.ismrmrd_header``): the documented defaults, what stays
unusable, and the encodingLimits taken from the data."""

from __future__ import annotations

import re
import typing

import h5py
import ismrmrd
import ismrmrd.xsd
import numpy as np
import pytest
from _helpers import REPO_ROOT, SHARED_DIR

from kmotion.io.ismrmrd_h5 import parse_encoding
from kmotion.io.ismrmrd_header import (
    DEFAULTS,
    counter_ranges,
    encoding_of,
    fill_limits_from_data,
    read_header,
)
from kmotion.physics.validate import InputError

NS = "http://www.ismrm.org/ISMRMRD"
CASE_09 = SHARED_DIR / "field_cases" / "09_header_without_patient_position" / "input.h5"

SPACE = (
    "<matrixSize><x>{x}</x><y>{y}</y><z>1</z></matrixSize>"
    "<fieldOfView_mm><x>{fx}</x><y>{fy}</y><z>5</z></fieldOfView_mm>"
)
FULL = f"""<?xml version="1.0"?>
<ismrmrdHeader xmlns="{NS}">
  <measurementInformation><patientPosition>HFS</patientPosition></measurementInformation>
  <experimentalConditions><H1resonanceFrequency_Hz>123200000</H1resonanceFrequency_Hz></experimentalConditions>
  <encoding>
    <encodedSpace>{SPACE.format(x=256, y=128, fx=440.0, fy=220.0)}</encodedSpace>
    <reconSpace>{SPACE.format(x=256, y=128, fx=440.0, fy=220.0)}</reconSpace>
    <encodingLimits>
      <kspace_encoding_step_1><minimum>0</minimum><maximum>127</maximum><center>64</center></kspace_encoding_step_1>
    </encodingLimits>
    <trajectory>cartesian</trajectory>
    <parallelImaging><accelerationFactor><kspace_encoding_step_1>2</kspace_encoding_step_1>
      <kspace_encoding_step_2>1</kspace_encoding_step_2></accelerationFactor></parallelImaging>
  </encoding>
</ismrmrdHeader>"""


def _strict_refuses(text: str) -> bool:
    try:
        ismrmrd.xsd.CreateFromDocument(text)
    except Exception:  # noqa: BLE001 - the premise: ismrmrd-python's parser refuses the header
        return True
    return False


def test_a_schema_valid_header_is_read_as_the_strict_parser_reads_it() -> None:
    got = read_header(FULL.encode() + b"\0\0", "full")
    assert got.problem is None and got.filled == ()
    assert got.xml == FULL  # the text as received, NULs removed
    assert ismrmrd.xsd.ToXML(got.header) == ismrmrd.xsd.ToXML(ismrmrd.xsd.CreateFromDocument(FULL))


def test_missing_patient_position_gets_hfs() -> None:
    text = FULL.replace("<patientPosition>HFS</patientPosition>", "<protocolName>old</protocolName>")
    assert _strict_refuses(text)
    got = read_header(text, "old writer")
    assert got.header is not None and got.problem is None
    assert got.header.measurementInformation.patientPosition.value == "HFS"
    assert got.header.measurementInformation.protocolName == "old"
    assert got.filled == ("measurementInformation/patientPosition missing: HFS",)
    assert encoding_of(got.header) == parse_encoding(FULL, "full")  # nothing else changed


def test_every_gap_of_a_sparse_header_is_filled_as_documented() -> None:
    """No namespace, no trajectory, no reconSpace, no encodingLimits, no experimentalConditions, an element
    the schema does not know, an enumeration in the wrong case, an integer written as a float, a second
    copy of a single-valued element, a coil label without its number."""
    text = f"""<ismrmrdHeader>
      <vendorExtension><x>1</x></vendorExtension>
      <measurementInformation><patientPosition>ffs</patientPosition></measurementInformation>
      <acquisitionSystemInformation><systemFieldStrength_T>1.5</systemFieldStrength_T>
        <coilLabel><coilName>body</coilName></coilLabel></acquisitionSystemInformation>
      <encoding>
        <encodedSpace>{SPACE.format(x="256.0", y=128, fx=440.0, fy=220.0)}</encodedSpace>
        <parallelImaging><accelerationFactor><kspace_encoding_step_1>2</kspace_encoding_step_1>
          </accelerationFactor></parallelImaging>
        <echoTrainLength>8</echoTrainLength><echoTrainLength>9</echoTrainLength>
      </encoding>
    </ismrmrdHeader>"""
    assert _strict_refuses(text)
    got = read_header(text, "sparse")
    assert got.problem is None and got.header is not None
    h = got.header
    enc = encoding_of(h)
    assert enc.trajectory == "cartesian"
    assert enc.recon_matrix == enc.encoded_matrix == (256, 128, 1)  # reconSpace = encodedSpace
    assert enc.recon_fov_mm == enc.encoded_fov_mm == (440.0, 220.0, 5.0)
    assert enc.step1_limits is None  # empty encodingLimits: the gadget's defaults apply (test_buffer)
    assert h.measurementInformation.patientPosition.value == "FFS"
    assert h.encoding[0].parallelImaging.accelerationFactor.kspace_encoding_step_2 == 1
    assert h.encoding[0].echoTrainLength == 8
    assert h.experimentalConditions.H1resonanceFrequency_Hz == round(42.577478e6 * 1.5)
    assert h.acquisitionSystemInformation.coilLabel == []
    notes = "\n".join(got.filled)
    for phrase in (
        "namespace (none)",
        "vendorExtension: element not in the ISMRMRD schema, left out",
        "patientPosition: 'ffs' read as 'FFS'",
        "coilLabel[0]: left out (",
        "matrixSize/x: '256.0' read as 256",
        "echoTrainLength: second copy left out",
        "encoding[0]/trajectory missing: cartesian",
        "encoding[0]/reconSpace missing: = encodedSpace",
        "encoding[0]/encodingLimits missing: empty",
        "kspace_encoding_step_2 missing: 1",
        "H1resonanceFrequency_Hz missing: 63866217 (from systemFieldStrength_T)",
    ):
        assert phrase in notes, phrase
    # the repaired header is a valid one: it survives the strict parser's round trip
    again = ismrmrd.xsd.CreateFromDocument(ismrmrd.xsd.ToXML(h))
    assert encoding_of(again) == enc


def test_empty_required_values_get_their_defaults() -> None:
    """The strict parser takes empty enumerations and integers as '' without a word: they get defaults."""
    text = FULL.replace("<patientPosition>HFS</patientPosition>", "<patientPosition></patientPosition>")
    text = text.replace("123200000", "")
    got = read_header(text, "empty")
    assert got.header is not None
    assert got.header.measurementInformation.patientPosition.value == "HFS"
    assert got.header.experimentalConditions.H1resonanceFrequency_Hz == 0
    assert [n.split(":")[0] for n in got.filled] == [
        "measurementInformation/patientPosition",
        "experimentalConditions/H1resonanceFrequency_Hz",
    ]


@pytest.mark.parametrize(
    ("traj", "read_as"), [("EPI", "epi"), ("Cartesian", "cartesian"), ("zigzag", "other"), ("", "cartesian")]
)
def test_trajectory_values(traj: str, read_as: str) -> None:
    text = FULL.replace("<trajectory>cartesian</trajectory>", f"<trajectory>{traj}</trajectory>")
    got = read_header(text, "t")
    assert got.header is not None and encoding_of(got.header).trajectory == read_as
    assert len(got.filled) == 1 and got.filled[0].startswith("encoding[0]/trajectory: ")


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("", "expected an XML header, got empty text"),
        ("Dummy XML header", "expected valid XML, got a parse error"),
        ("<ismrmrdHeader><encoding>", "expected valid XML, got a parse error"),
        (f'<other xmlns="{NS}"/>', "expected the root element ismrmrdHeader, got 'other'"),
        (
            f'<ismrmrdHeader xmlns="{NS}"><encoding><trajectory>epi</trajectory></encoding></ismrmrdHeader>',
            "encoding[0]/encodedSpace missing (no default)",
        ),
        (
            FULL.replace("<x>256</x>", "", 1).replace("<fieldOfView_mm><x>440.0</x>", "<fieldOfView_mm>", 1),
            "encoding[0]/encodedSpace/fieldOfView_mm/x missing (no default)",
        ),
    ],
)
def test_unusable_headers_name_the_reason_and_never_raise(text: str, words: str) -> None:
    got = read_header(text, "in.h5: 'dataset/xml'")
    assert got.header is None and got.xml == text
    assert got.problem is not None and got.problem.startswith("in.h5: 'dataset/xml': ISMRMRD XML header: ")
    assert words in got.problem
    with pytest.raises(InputError, match=re.escape(words)):
        parse_encoding(text, "in.h5: 'dataset/xml'")


def test_a_header_without_encoding_is_read_and_refused_by_the_geometry() -> None:
    text = f'<ismrmrdHeader xmlns="{NS}"><measurementInformation/></ismrmrdHeader>'
    got = read_header(text, "x")
    assert got.header is not None and got.header.encoding == []
    assert "measurementInformation/patientPosition missing: HFS" in got.filled
    with pytest.raises(InputError, match="expected at least one <encoding>, got none"):
        encoding_of(got.header, "x")


def test_defaults_table_names_schema_paths_and_the_manual_lists_them() -> None:
    """Every default is for a required element of the schema, and docs/gadget.md's table names each."""
    from ismrmrd.xsd.ismrmrdschema import ismrmrd as schema

    manual = (REPO_ROOT / "docs" / "gadget.md").read_text()
    for path in DEFAULTS:
        cls: object = schema.ismrmrdHeader
        for name in path.split("/"):
            hints = typing.get_type_hints(cls)
            assert name in hints, path
            args = [a for a in typing.get_args(hints[name]) if a is not type(None)]
            cls = args[0] if args else hints[name]
            if typing.get_origin(cls) is list:
                cls = typing.get_args(cls)[0]
        assert f"`{path}`" in manual, f"docs/gadget.md lacks the default of {path}"


def _heads(rows: list[dict[str, int]]) -> np.ndarray:
    """Acquisition header records as a file's ``data['head']`` holds them."""
    heads = np.zeros(len(rows), dtype=ismrmrd.hdf5.acquisition_header_dtype)
    for h, row in zip(heads, rows, strict=True):
        for k, v in row.items():
            if k in ("flags", "encoding_space_ref"):
                h[k] = v
            else:
                h["idx"][k] = v
    return heads


def test_encoding_limits_from_the_data() -> None:
    noise = 1 << (ismrmrd.ACQ_IS_NOISE_MEASUREMENT - 1)
    rows = [{"flags": noise, "kspace_encode_step_1": 500}]  # noise: not counted
    rows += [
        {"kspace_encode_step_1": k, "average": a, "repetition": 2} for k in range(10, 90) for a in (0, 1)
    ]
    rows += [{"kspace_encode_step_1": 120, "encoding_space_ref": 1}]  # another encoding: not counted
    ranges = counter_ranges(_heads(rows))
    assert ranges["kspace_encoding_step_1"] == (10, 89)
    assert ranges["average"] == (0, 1) and ranges["repetition"] == (2, 2) and ranges["slice"] == (0, 0)
    text = FULL.replace(
        "<kspace_encoding_step_1><minimum>0</minimum><maximum>127</maximum><center>64</center>"
        "</kspace_encoding_step_1>",
        "",
    )
    header = read_header(text, "x").header
    assert header is not None and header.encoding[0].encodingLimits.kspace_encoding_step_1 is None
    notes = fill_limits_from_data(header, ranges)
    lim = header.encoding[0].encodingLimits
    assert (lim.kspace_encoding_step_1.minimum, lim.kspace_encoding_step_1.maximum) == (10, 89)
    assert lim.kspace_encoding_step_1.center == 64  # encoded matrix y // 2, the ISMRMRD convention
    assert (lim.average.maximum, lim.repetition.minimum, lim.repetition.maximum) == (1, 2, 2)
    assert any("kspace_encoding_step_1 from the data: 10..89, centre 64" in n for n in notes)
    assert fill_limits_from_data(header, ranges) == ()  # limits that are there are kept


def test_field_case_09_header() -> None:
    if not CASE_09.exists():
        pytest.skip(f"{CASE_09} absent")
    with h5py.File(CASE_09, "r") as f:
        xml = f["dataset/xml"][0]
    assert _strict_refuses(xml.decode())
    got = read_header(xml, str(CASE_09))
    assert got.filled == ("measurementInformation/patientPosition missing: HFS",)
    enc = encoding_of(got.header)
    assert enc.encoded_matrix == (128, 128, 1) and enc.step1_limits == (0, 127, 64)
