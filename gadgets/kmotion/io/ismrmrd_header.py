"""Lenient reading of ISMRMRD XML headers: the documented defaults where older writers and other tools
left the schema's required fields out.

``ismrmrd.xsd.CreateFromDocument`` (ismrmrd-python, an ``xsdata`` parser) refuses any header that misses a
field the schema requires (``measurementInformation`` without ``patientPosition``, an encoding without
``trajectory`` or ``reconSpace``, no ``experimentalConditions``, ...), that holds an element it does not
know, or a value outside an enumeration; the ISMRMRD C++ reader (``ISMRMRD::deserialize``, used by
Gadgetron) throws for the same missing fields.  Headers written by older ISMRMRD versions, converters and
hand-made scripts often have such gaps, although everything the data need is there.

:func:`read_header` first tries the strict parser; if it refuses, the XML is repaired against the
schema's own data classes (``ismrmrd.xsd.ismrmrdschema``) and parsed again:

* a missing required value gets the default of :data:`DEFAULTS` (``docs/gadget.md``, "Headers");
* an element the schema does not know, a second copy of a single-valued element, and an optional element
  whose value cannot be read (or that misses a required part without a default) are left out;
* enumerations are matched ignoring case; an unknown value becomes ``other`` where the enumeration has it;
* integers written as floats (``"128.0"``) are read as integers; a missing or foreign namespace becomes
  the ISMRMRD namespace.

Every change is named in :attr:`LenientHeader.filled` (one phrase each).  What cannot be repaired — text
that is not XML, a root other than ``ismrmrdHeader``, an encoding without a usable ``encodedSpace`` —
leaves :attr:`LenientHeader.header` ``None`` with the reason in :attr:`LenientHeader.problem`; a header
with no ``<encoding>`` at all is read (``encoding == []``) and refused by the gadget's geometry check.
:func:`read_header` never raises for the content of the text.

:func:`fill_limits_from_data` fills missing ``encodingLimits`` from the counters of the acquisitions
(files, where all of them are known before streaming).
"""

from __future__ import annotations

import base64
import copy
import dataclasses
import enum
import functools
import typing
import warnings
import xml.etree.ElementTree as ET
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import ismrmrd
import ismrmrd.xsd
import numpy as np
from ismrmrd.xsd.ismrmrdschema import ismrmrd as schema
from xsdata.models.datatype import XmlDate, XmlTime

from kmotion.physics.validate import InputError

__all__ = [
    "DEFAULTS",
    "ISMRMRD_NAMESPACE",
    "LIMIT_COUNTERS",
    "HeaderEncoding",
    "LenientHeader",
    "counter_ranges",
    "encoding_of",
    "fill_limits_from_data",
    "read_header",
]

ISMRMRD_NAMESPACE = "http://www.ismrm.org/ISMRMRD"

#: Gyromagnetic ratio of 1H [Hz/T] (CODATA 2018), for ``H1resonanceFrequency_Hz`` from the field strength.
_GAMMA_1H_HZ_PER_T = 42.577478e6

#: Defaults of required values that a header may miss, by schema path (``/``-separated element names;
#: ``encoding`` stands for every encoding).  Entries with a value in angle brackets are computed:
#: ``<encodedSpace>`` copies the encoding's encodedSpace, ``<field strength>`` is
#: ``round(42.577478 MHz/T x systemFieldStrength_T)`` (0 = unknown without a field strength), ``<empty>``
#: is the element without content (all its parts optional).
DEFAULTS: dict[str, str] = {
    "measurementInformation/patientPosition": "HFS",
    "measurementInformation/relativeTablePosition/x": "0",
    "measurementInformation/relativeTablePosition/y": "0",
    "measurementInformation/relativeTablePosition/z": "0",
    "experimentalConditions": "<empty>",
    "experimentalConditions/H1resonanceFrequency_Hz": "<field strength>",
    "encoding/reconSpace": "<encodedSpace>",
    "encoding/encodingLimits": "<empty>",
    "encoding/trajectory": "cartesian",
    "encoding/encodedSpace/matrixSize/z": "1",
    "encoding/encodedSpace/fieldOfView_mm/z": "0",
    "encoding/reconSpace/matrixSize/z": "1",
    "encoding/reconSpace/fieldOfView_mm/z": "0",
    "encoding/parallelImaging/accelerationFactor": "<empty>",
    "encoding/parallelImaging/accelerationFactor/kspace_encoding_step_1": "1",
    "encoding/parallelImaging/accelerationFactor/kspace_encoding_step_2": "1",
    "waveformInformation/userParameters": "<empty>",
}

#: The ``encodingLimits`` counters and the acquisition ``idx`` field of each.
LIMIT_COUNTERS: dict[str, str] = {
    "kspace_encoding_step_1": "kspace_encode_step_1",
    "kspace_encoding_step_2": "kspace_encode_step_2",
    "average": "average",
    "slice": "slice",
    "contrast": "contrast",
    "phase": "phase",
    "repetition": "repetition",
    "set": "set",
    "segment": "segment",
}


@dataclass(frozen=True)
class HeaderEncoding:
    """The parts of an ISMRMRD header's first ``<encoding>`` that the loaders use (x, y, z order)."""

    encoded_matrix: tuple[int, int, int]
    encoded_fov_mm: tuple[float, float, float]
    recon_matrix: tuple[int, int, int]
    recon_fov_mm: tuple[float, float, float]
    step1_limits: tuple[int, int, int] | None  # (minimum, maximum, center) of kspace_encoding_step_1
    trajectory: str


@dataclass(frozen=True)
class LenientHeader:
    """An ISMRMRD XML header as received, and what could be read from it.

    Attributes
    ----------
    xml
        The text as received (trailing NUL bytes removed).
    header
        The parsed header (defaults filled where needed); ``None`` when the text cannot be read as one.
    filled
        One phrase per default filled or element left out (empty for a header the schema accepts).
    problem
        Why ``header`` is ``None``; ``None`` otherwise.
    """

    xml: str
    header: ismrmrd.xsd.ismrmrdHeader | None
    filled: tuple[str, ...] = ()
    problem: str | None = None

    @property
    def output_xml(self) -> str:
        """The header to write downstream: with the defaults filled when any were (schema-valid, so the
        strict readers of the ecosystem read it), else the text as received."""
        if self.filled and self.header is not None:
            return str(ismrmrd.xsd.ToXML(self.header))
        return self.xml


class _Unusable(Exception):
    """A required part is missing and has no default (the message names it)."""


def _local(tag: str) -> str:
    return tag.rsplit("}", 1)[-1]


def _q(name: str) -> str:
    return f"{{{ISMRMRD_NAMESPACE}}}{name}"


@dataclass(frozen=True)
class _Field:
    name: str
    kind: type  # the data class or leaf type
    required: bool
    repeated: bool


@functools.cache
def _fields(cls: type) -> dict[str, _Field]:
    """The XML elements of a schema data class: name -> (type, required, repeated)."""
    hints = typing.get_type_hints(cls)
    out: dict[str, _Field] = {}
    for f in dataclasses.fields(cls):
        if f.metadata.get("type", "Element") != "Element":
            continue
        t = hints[f.name]
        repeated = typing.get_origin(t) is list
        args = [a for a in typing.get_args(t) if a is not type(None)] if typing.get_args(t) else [t]
        base = args[0]
        if typing.get_origin(base) is list:
            repeated, base = True, typing.get_args(base)[0]
        no_default = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        required = (no_default and not repeated) or int(f.metadata.get("min_occurs", 0)) > 0
        out[str(f.metadata.get("name", f.name))] = _Field(f.name, base, required, repeated)
    return out


def _leaf_text(text: str, kind: type) -> tuple[str | None, str | None]:
    """(value to keep or None when unreadable, what was changed or None) for a leaf of type ``kind``."""
    if isinstance(kind, type) and issubclass(kind, enum.Enum):
        values = [str(e.value) for e in kind]
        if text in values:
            return text, None
        match = next((v for v in values if v.lower() == text.lower()), None)
        if match is not None:
            return match, f"'{text}' read as '{match}'"
        if "other" in values and text:
            return "other", f"'{text}' is not one of {values}: read as 'other'"
        return None, f"'{text}' is not one of {values}"
    try:
        if kind is int:
            try:
                int(text)
                return text, None
            except ValueError:
                v = float(text)
                if v.is_integer():
                    return str(int(v)), f"'{text}' read as {int(v)}"
                raise
        if kind is float:
            float(text)
        elif kind is bytes:
            base64.b64decode(text, validate=True)
        elif kind is XmlDate:
            XmlDate.from_string(text)
        elif kind is XmlTime:
            XmlTime.from_string(text)
    except (ValueError, TypeError) as exc:
        return None, f"'{text}' is not a valid {getattr(kind, '__name__', kind)} ({exc})"
    return text, None


class _Repair:
    """Walk the XML against the schema's data classes, filling defaults and dropping what cannot be read."""

    def __init__(self, root: ET.Element) -> None:
        self.root = root
        self.notes: list[str] = []

    def default_for(self, key: str, parent: ET.Element) -> tuple[ET.Element, str] | None:
        """The default element for schema path ``key`` inside ``parent`` and how to name it (None: none)."""
        spec = DEFAULTS.get(key)
        name = key.rsplit("/", 1)[-1]
        if spec is None:
            return None
        el = ET.Element(_q(name))
        if spec == "<encodedSpace>":
            src = parent.find(_q("encodedSpace"))
            if src is None:
                return None
            el = copy.deepcopy(src)
            el.tag = _q(name)
            return el, "= encodedSpace"
        if spec == "<field strength>":
            b0 = self.root.find(f"{_q('acquisitionSystemInformation')}/{_q('systemFieldStrength_T')}")
            try:
                el.text = (
                    str(round(_GAMMA_1H_HZ_PER_T * float((b0.text or "").strip()))) if b0 is not None else "0"
                )
            except ValueError:
                el.text = "0"
            return el, el.text + (" (from systemFieldStrength_T)" if el.text != "0" else " (unknown)")
        if spec == "<empty>":
            return el, "empty"
        el.text = spec
        return el, spec

    def walk(self, el: ET.Element, cls: type, path: str, key: str) -> None:
        """Repair ``el`` (an instance of schema class ``cls``) in place; raise _Unusable if impossible."""
        fields = _fields(cls)
        seen: dict[str, int] = {}
        for child in list(el):
            if not isinstance(child.tag, str):  # comments, processing instructions
                continue
            name = _local(child.tag)
            child.tag = _q(name)
            where = f"{path}/{name}" if path else name
            f = fields.get(name)
            if f is None:
                el.remove(child)
                self.notes.append(f"{where}: element not in the ISMRMRD schema, left out")
                continue
            n = seen.get(name, 0)
            seen[name] = n + 1
            if n and not f.repeated:
                el.remove(child)
                self.notes.append(f"{where}: second copy left out")
                continue
            item = f"{where}[{n}]" if f.repeated else where
            child_key = f"{key}/{name}" if key else name
            try:
                if dataclasses.is_dataclass(f.kind):
                    self.walk(child, f.kind, item, child_key)  # type: ignore[arg-type]
                else:
                    self.leaf(child, el, f.kind, item, child_key, f.required)
            except _Unusable as exc:
                if f.required:
                    raise
                el.remove(child)
                seen[name] -= 1
                self.notes.append(f"{item}: left out ({exc})")
        for name, f in fields.items():
            if not f.required or seen.get(name, 0):
                continue
            where = f"{path}/{name}" if path else name
            child_key = f"{key}/{name}" if key else name
            if f.repeated:  # min_occurs >= 1 (encoding): read without one, refused by the geometry check
                continue
            got = self.default_for(child_key, el)
            if got is None:
                raise _Unusable(f"{where} missing (no default)")
            default, shown = got
            el.append(default)
            self.notes.append(f"{where} missing: {shown}")
            if dataclasses.is_dataclass(f.kind) and shown != "= encodedSpace":
                self.walk(default, f.kind, where, child_key)  # type: ignore[arg-type]

    def leaf(
        self, el: ET.Element, parent: ET.Element, kind: type, where: str, key: str, required: bool
    ) -> None:
        """Check the text of a leaf element; normalise it, or replace it by its default when required."""
        for sub in list(el):
            el.remove(sub)
        text = (el.text or "").strip()
        value, change = _leaf_text(text, kind)
        if value is not None:
            el.text = value
            if change is not None:
                self.notes.append(f"{where}: {change}")
            return
        if not required:
            raise _Unusable(str(change))
        got = self.default_for(key, parent)
        if got is None:
            raise _Unusable(f"{where}: {change}, no default")
        el.text = got[0].text
        self.notes.append(f"{where}: {change}; default {got[1]}")


def _strict(text: str) -> ismrmrd.xsd.ismrmrdHeader | None:
    """The strict parse, or None when it fails or has to convert a value (``xsdata`` ConverterWarning)."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        try:
            return ismrmrd.xsd.CreateFromDocument(text)
        except Exception:  # noqa: BLE001 - xsdata raises several unrelated types
            return None


def read_header(xml: bytes | str, source: str = "ISMRMRD header") -> LenientHeader:
    """Read an ISMRMRD XML header leniently (see the module docstring); never raises for its content.

    Parameters
    ----------
    xml
        The header text (bytes are decoded as UTF-8; a NUL byte and what follows it are removed).
    source
        Named in :attr:`LenientHeader.problem` (e.g. the file and dataset, or ``HEADER``).
    """
    text = xml.decode("utf-8", "replace") if isinstance(xml, bytes | bytearray) else str(xml)
    text = text.split("\0", 1)[0]
    body = text.strip()  # an XML declaration must come first
    if not body:
        return LenientHeader(
            text, None, (), f"{source}: ISMRMRD XML header: expected an XML header, got empty text"
        )
    try:
        root = ET.fromstring(body)
    except ET.ParseError as exc:
        return LenientHeader(
            text, None, (), f"{source}: ISMRMRD XML header: expected valid XML, got a parse error ({exc})"
        )
    if _local(root.tag) != "ismrmrdHeader":
        why = f"expected the root element ismrmrdHeader, got {_local(root.tag)!r}"
        return LenientHeader(text, None, (), f"{source}: ISMRMRD XML header: {why}")
    repair = _Repair(root)
    if root.tag != _q("ismrmrdHeader"):
        ns = root.tag[1:].partition("}")[0] if root.tag.startswith("{") else "(none)"
        repair.notes.append(f"namespace {ns} read as {ISMRMRD_NAMESPACE}")
        root.tag = _q("ismrmrdHeader")
    try:
        repair.walk(root, schema.ismrmrdHeader, "", "")
    except _Unusable as exc:
        return LenientHeader(text, None, tuple(repair.notes), f"{source}: ISMRMRD XML header: {exc}")
    # the strict parser on the text itself when nothing needed a change (it accepts empty values silently,
    # which the walk above does not), else on the repaired text
    fixed = body if not repair.notes else ET.tostring(root, encoding="unicode")
    header = _strict(fixed)
    if header is None:
        try:
            ismrmrd.xsd.CreateFromDocument(fixed)
            why = "a value needed conversion"
        except Exception as exc:  # noqa: BLE001
            why = str(exc).splitlines()[0][:200]
        return LenientHeader(
            text,
            None,
            tuple(repair.notes),
            f"{source}: ISMRMRD XML header: not readable even with defaults: {why}",
        )
    return LenientHeader(text, header, tuple(repair.notes))


def encoding_of(header: ismrmrd.xsd.ismrmrdHeader, source: str = "ISMRMRD header") -> HeaderEncoding:
    """The first encoding of a parsed header as :class:`HeaderEncoding`.

    Raises
    ------
    InputError
        No ``<encoding>``, or an encodedSpace without a positive matrix or FOV (names ``source``).
    """
    if not header.encoding:
        raise InputError(f"{source}: ISMRMRD XML header: expected at least one <encoding>, got none")
    enc = header.encoding[0]
    es = enc.encodedSpace
    rs = enc.reconSpace if enc.reconSpace is not None else es
    lim = enc.encodingLimits.kspace_encoding_step_1 if enc.encodingLimits is not None else None
    traj = (
        enc.trajectory.value if isinstance(enc.trajectory, enum.Enum) else str(enc.trajectory or "cartesian")
    )

    def m3(space: Any) -> tuple[int, int, int]:
        m = space.matrixSize
        return int(m.x), int(m.y), int(m.z)

    def f3(space: Any) -> tuple[float, float, float]:
        f = space.fieldOfView_mm
        return float(f.x), float(f.y), float(f.z)

    try:
        result = HeaderEncoding(
            m3(es),
            f3(es),
            m3(rs),
            f3(rs),
            None if lim is None else (int(lim.minimum), int(lim.maximum), int(lim.center)),
            traj,
        )
    except (AttributeError, TypeError, ValueError) as exc:
        raise InputError(
            f"{source}: ISMRMRD XML header: encoding has a missing or bad field ({exc}); expected "
            "encodedSpace with matrixSize and fieldOfView_mm"
        ) from exc
    if min(result.encoded_matrix) < 1 or min(result.encoded_fov_mm[:2]) <= 0:
        raise InputError(
            f"{source}: ISMRMRD XML header: encodedSpace: expected positive matrixSize and fieldOfView_mm, "
            f"got matrix {result.encoded_matrix}, FOV {result.encoded_fov_mm}"
        )
    return result


def counter_ranges(heads: np.ndarray) -> dict[str, tuple[int, int]]:
    """(minimum, maximum) of each :data:`LIMIT_COUNTERS` counter over acquisition headers.

    ``heads`` is a structured array of ISMRMRD ``AcquisitionHeader`` records (the ``head`` field of a
    file's ``data`` dataset).  Noise measurements and lines of other encoding spaces than 0 are left out.
    """
    flags = heads["flags"].astype(np.uint64)
    noise = (flags >> np.uint64(ismrmrd.ACQ_IS_NOISE_MEASUREMENT - 1)) & np.uint64(1)
    use = (noise == 0) & (heads["encoding_space_ref"] == 0)
    idx = heads["idx"][use]
    if idx.size == 0:
        return {}
    return {name: (int(idx[f].min()), int(idx[f].max())) for name, f in LIMIT_COUNTERS.items()}


def fill_limits_from_data(
    header: ismrmrd.xsd.ismrmrdHeader, ranges: Mapping[str, tuple[int, int]]
) -> tuple[str, ...]:
    """Fill the first encoding's missing ``encodingLimits`` counters from the data, in place.

    ``ranges`` from :func:`counter_ranges`.  The centre of ``kspace_encoding_step_1`` / ``_2`` is the
    ISMRMRD convention ``encodedSpace.matrixSize // 2`` (clipped to the range), that of the other counters
    their minimum.  Returns one phrase per filled counter.
    """
    if not header.encoding or not ranges:
        return ()
    enc = header.encoding[0]
    if enc.encodingLimits is None:
        enc.encodingLimits = schema.encodingLimitsType()
    m = enc.encodedSpace.matrixSize
    centres = {"kspace_encoding_step_1": int(m.y) // 2, "kspace_encoding_step_2": int(m.z) // 2}
    notes = []
    for name, (lo, hi) in ranges.items():
        if getattr(enc.encodingLimits, name, None) is not None:
            continue
        centre = min(max(centres.get(name, lo), lo), hi)
        setattr(enc.encodingLimits, name, schema.limitType(minimum=lo, maximum=hi, center=centre))
        notes.append(f"encodingLimits/{name} from the data: {lo}..{hi}, centre {centre}")
    return tuple(notes)
