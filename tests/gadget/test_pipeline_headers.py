"""``MotionCorrector`` and headers: never raises for a header or data problem; pass-through with one
WARNING; a header read with defaults is corrected exactly as the complete one (``check_header``)."""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator

import ismrmrd
import ismrmrd.xsd
import pytest

from kmotion.gadget import GadgetParams, MotionCorrector, MotionReport
from kmotion.gadget.pipeline import PASS_THROUGH, check_header
from kmotion.io.ismrmrd_header import read_header
from kmotion.physics import InputError

CPU = GadgetParams(device="cpu")


def _warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]


def _xml(header: ismrmrd.xsd.ismrmrdHeader) -> str:
    return str(ismrmrd.xsd.ToXML(header))


def _sparse(xml: str) -> str:
    """``xml`` as an older writer would have it: no namespace, no measurementInformation/patientPosition,
    trajectory, reconSpace, encodingLimits or experimentalConditions."""
    xml = re.sub(r' xmlns(:\w+)?="[^"]*"', "", xml)
    xml = re.sub(r"<\?xml[^>]*\?>", "", xml)
    for tag in ("trajectory", "reconSpace", "encodingLimits", "experimentalConditions"):
        xml = re.sub(rf"<{tag}>.*?</{tag}>", "", xml, flags=re.S)
    return xml.replace("<encoding>", "<measurementInformation/><encoding>", 1)


@pytest.mark.parametrize(
    ("make", "words"),
    [
        (lambda x: x.replace(">cartesian<", ">epi<"), "trajectory: expected 'cartesian', got 'epi'"),
        (lambda x: x.replace(">cartesian<", ">spiral<"), "got 'spiral'"),
        (lambda x: re.sub(r"<encoding>.*</encoding>", "", x, flags=re.S), "expected at least one <encoding>"),
        (lambda x: "Dummy XML header", "expected valid XML"),
        (
            lambda x: x.replace("<encodedSpace>", "<encodedSpaceX>").replace(
                "</encodedSpace>", "</encodedSpaceX>"
            ),
            "encoding[0]/encodedSpace missing (no default)",
        ),
        (lambda x: None, "no ISMRMRD header"),
    ],
)
def test_pass_through_keeps_every_item_with_one_warning(
    ism,
    caplog: pytest.LogCaptureFixture,
    make,
    words: str,  # noqa: ANN001
) -> None:
    hdr = ism.make_header(n_ky=16, n_kx=16, n_slices=1, n_reps=2)
    k = ism.known_kspace(2, 16, 16)
    items: list[object] = [*ism.slice_lines(k, ism.undersampled_rows(16, 0), 8, rep=0), "anything", 42]
    items += ism.slice_lines(k, ism.undersampled_rows(16, 0), 8, rep=1)
    corrector = MotionCorrector(make(_xml(hdr)), CPU)  # never raises for the header
    assert corrector.passthrough is not None and words in corrector.passthrough
    for _ in range(2):  # every stream of the corrector: one WARNING each
        caplog.clear()
        out = list(corrector(iter(items)))
        assert len(out) == len(items) and all(a is b for a, b in zip(out, items, strict=True))
        warnings = _warnings(caplog)
        assert len(warnings) == 1 and warnings[0].startswith(PASS_THROUGH) and words in warnings[0]


def test_pass_through_re_raises_a_failing_input(ism) -> None:
    def broken() -> Iterator[object]:
        yield "first"
        raise ConnectionResetError("peer gone")

    corrector = MotionCorrector("Dummy XML header", CPU)
    seen: list[object] = []
    with pytest.raises(ConnectionResetError, match="peer gone"):
        for item in corrector(broken()):
            seen.append(item)
    assert seen == ["first"]


def test_model_and_device_errors_stay_errors_whatever_the_header(tmp_path) -> None:  # noqa: ANN001
    for header in ("Dummy XML header", None):
        with pytest.raises(InputError, match="none.safetensors"):
            MotionCorrector(header, GadgetParams(model=str(tmp_path / "none.safetensors"), device="cpu"))
        with pytest.raises(InputError, match="device"):
            MotionCorrector(header, GadgetParams(device="tpu"))


def test_check_header_accepts_every_form(ism) -> None:
    hdr = ism.make_header(n_ky=16, n_kx=16)
    xml = _xml(hdr)
    for form in (hdr, xml, xml.encode(), read_header(xml)):
        got = check_header(form)
        assert got.geometry is not None and got.problem is None and got.filled == () and got.warning() is None
    sparse = check_header(_sparse(xml))
    assert sparse.geometry is not None and sparse.problem is None
    assert sparse.geometry.encoding.encoded_matrix == check_header(hdr).geometry.encoding.encoded_matrix  # type: ignore[union-attr]
    assert sparse.warning() is not None and "patientPosition missing: HFS" in sparse.warning()  # type: ignore[operator]


def test_a_header_read_with_defaults_is_corrected_as_the_complete_one(
    stream_factory, caplog: pytest.LogCaptureFixture
) -> None:
    """The same stream with its complete header and with the sparse one an older writer would produce:
    the same estimates (the defaults equal what the complete header says), and one WARNING naming them."""
    s = stream_factory(motions=((0.0, 0.0, 0.0), (2.0, -1.5, 6.0)))
    caplog.clear()
    full = [r for r in MotionCorrector(s.header, CPU)(s.items) if isinstance(r, MotionReport)]
    full_warnings = _warnings(caplog)
    caplog.clear()
    s = stream_factory(motions=((0.0, 0.0, 0.0), (2.0, -1.5, 6.0)))  # the same again (corrected in place)
    out = list(MotionCorrector(_sparse(_xml(s.header)), CPU)(s.items))
    sparse = [r for r in out if isinstance(r, MotionReport)]
    assert len(out) == len(s.items) + len(sparse)
    header_warnings = [
        w for w in _warnings(caplog) if w not in full_warnings
    ]  # the rest: as with the full one
    assert len(header_warnings) == 1 and header_warnings[0].startswith("ISMRMRD header read with defaults: ")
    assert sorted(set(_warnings(caplog)) - set(header_warnings)) == sorted(set(full_warnings))
    warnings = header_warnings
    for part in ("patientPosition missing: HFS", "trajectory missing: cartesian", "reconSpace missing"):
        assert part in warnings[0]
    assert [r.key for r in sparse] == [r.key for r in full] and len(full) == 2
    for a, b in zip(full, sparse, strict=True):
        assert (a.dx_px, a.dy_px, a.rot_deg, a.corrected) == pytest.approx(
            (b.dx_px, b.dy_px, b.rot_deg, b.corrected)
        )
    moved = full[1]
    assert abs(moved.dx_px - 2.0) < 0.5 and abs(moved.dy_px + 1.5) < 0.5 and abs(moved.rot_deg - 6.0) < 1.0
