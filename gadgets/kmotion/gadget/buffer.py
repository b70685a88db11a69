"""Stage 1 of the streaming gadget: echo trains -> slice groups (:func:`buffer_slices`), and their batches.

Each stage is a plain function over Python objects and knows nothing of sockets.  :func:`batch_slices`
groups the completed slices that the estimator runs on together (``docs/gadget.md``, Batching).

Which items are imaging lines: :mod:`kmotion.gadget.classify` (:func:`classify`, table in
``docs/gadget.md``, "Acquisition flags and counters").

Ownership of acquisitions
-------------------------
Every input item leaves :func:`buffer_slices` exactly once: items that are not imaging lines are yielded
immediately (in their arrival order), imaging lines are yielded *inside* exactly one :class:`SliceBuffer`
(``SliceBuffer.acquisitions``, in arrival order).  The buffer owns them; the stage downstream of the
estimation/correction re-emits them.  Imaging lines are held back until their slice is complete, so
their order relative to pass-through items changes, never their order within a slice.

Grouping
--------
One group per :class:`SliceKey` ``(slice, contrast, phase, repetition, set)``: every counter that separates
images.  Averages (``idx.average``) of one key are in one group and averaged row by row in assembly;
``idx.segment`` stays on each line (the echo-train identity); the partitions of a 3D encoding
(``kspace_encode_step_2``) are one group (the whole volume of a repetition); ``idx.user`` is ignored.

Completion rule
---------------
A group is complete at the first line flagged ``ACQ_LAST_IN_SLICE`` that belongs to the last average
(``idx.average == encodingLimits.average.maximum``; a flag on an earlier average does not split the
averages), or, while the stream has not yet shown that it sets that flag, when every expected
``(kspace_encode_step_1, [kspace_encode_step_2,] average)`` has arrived.  Expected lines are those in
``encodingLimits.kspace_encoding_step_1 [minimum, maximum]`` with ``(ky - ky_first) % R == 0``, where R
is the header's ``parallelImaging`` acceleration in step 1 and ``ky_first`` is the first line of the group
that is not a calibration-and-imaging (ACS) line: the acquired parity may be either one relative to the
centre line, so it is read from the data, not assumed.  Partitions are expected too when the group is 3D
(encoded z > 1 and a line with ``kspace_encode_step_2 != 0`` arrived) or the header promises partitions
(``encodingLimits.kspace_encoding_step_2`` with maximum > minimum): those in that range (else ``0 .. z-1``)
with ``(kz - kz_first) % R2 == 0``.  Averages come from ``encodingLimits.average.maximum``.  Once a
``ACQ_LAST_IN_SLICE`` flag has been seen, count completion is switched off (flags are then trusted; this
keeps late ACS lines and averages in their slice).  A line arriving for a key whose group has already
completed starts a new group (with a WARNING: two reports will carry that key).  Groups still open at the
end of the stream are flushed with ``complete=False`` (never dropped) and a warning is logged.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import NamedTuple

import ismrmrd
import ismrmrd.xsd

from kmotion.gadget.classify import IMAGING, classify, is_imaging
from kmotion.io.ismrmrd_h5 import HeaderEncoding, parse_encoding
from kmotion.physics.validate import InputError

__all__ = [
    "SliceBatch",
    "SliceBuffer",
    "SliceGeometry",
    "SliceKey",
    "batch_slices",
    "buffer_slices",
    "is_imaging",
]

log = logging.getLogger("kmotion.gadget")


class SliceKey(NamedTuple):
    """Counters that separate the images of a stream (one slice group, one report per key)."""

    slice: int
    contrast: int
    phase: int
    repetition: int
    set: int

    def label(self) -> str:
        """``slice S contrast C phase P rep R set T`` (the words of the log line)."""
        return (
            f"slice {self.slice} contrast {self.contrast} phase {self.phase} rep {self.repetition} "
            f"set {self.set}"
        )


@dataclass(frozen=True)
class SliceGeometry:
    """Header-derived geometry shared by all slices of a stream (of one encoding space).

    ``others`` holds, for the first encoding, the geometry of every further encoding space of the header
    (index 1, 2, ...) or the reason it is unusable (:meth:`other`).
    """

    encoding: HeaderEncoding
    acceleration: int  # parallelImaging accelerationFactor.kspace_encoding_step_1 (1 if absent)
    step1_range: tuple[int, int, int]  # (minimum, maximum, center) of kspace_encode_step_1
    n_averages: int  # encodingLimits.average.maximum + 1 (1 if absent)
    echo_train_length: int | None  # encoding echoTrainLength, if given
    step2_range: tuple[int, int, int] | None = None  # (minimum, maximum, center) of kspace_encode_step_2
    acceleration2: int = 1  # parallelImaging accelerationFactor.kspace_encoding_step_2 (1 if absent)
    others: tuple[SliceGeometry | str, ...] = field(default=(), compare=False, repr=False)

    @property
    def promises_partitions(self) -> bool:
        """True when ``encodingLimits.kspace_encoding_step_2`` lists more than one partition."""
        return self.step2_range is not None and self.step2_range[1] > self.step2_range[0]

    @property
    def partition_range(self) -> tuple[int, int, int]:
        """(minimum, maximum, center) of ``kspace_encode_step_2``: the limits, else ``0 .. z-1``."""
        if self.step2_range is not None and self.step2_range[1] >= self.step2_range[0]:
            return self.step2_range
        n_z = self.encoding.encoded_matrix[2]
        return 0, n_z - 1, n_z // 2

    def other(self, index: int) -> SliceGeometry | str:
        """Geometry of encoding space ``index`` (0: this one), or why there is none."""
        if index == 0:
            return self
        if not 1 <= index <= len(self.others):
            return f"the header has no encoding space {index} ({len(self.others) + 1} encodings)"
        return self.others[index - 1]

    @classmethod
    def from_header(cls, header: ismrmrd.xsd.ismrmrdHeader, encoding: int = 0) -> SliceGeometry:
        """Read the geometry of encoding ``encoding`` of ``header`` (raises :class:`InputError`).

        For the first encoding, the further encodings are read too (``others``).
        """
        if encoding:
            header = ismrmrd.xsd.CreateFromDocument(ismrmrd.xsd.ToXML(header))
            header.encoding = [header.encoding[encoding]]
        enc = parse_encoding(ismrmrd.xsd.ToXML(header), "ISMRMRD stream header")
        if enc.trajectory.lower() != "cartesian":
            raise InputError(
                f"ISMRMRD stream header: trajectory: expected 'cartesian', got '{enc.trajectory}'"
            )
        n_ky = enc.encoded_matrix[1]
        if enc.step1_limits is not None:
            step1 = enc.step1_limits
        else:
            step1 = (0, n_ky - 1, n_ky // 2)
        e0 = header.encoding[0]
        accel = accel2 = 1
        pi = getattr(e0, "parallelImaging", None)
        if pi is not None and pi.accelerationFactor is not None:
            accel = max(1, int(pi.accelerationFactor.kspace_encoding_step_1))
            accel2 = max(1, int(pi.accelerationFactor.kspace_encoding_step_2 or 1))
        n_avg = 1
        step2 = None
        lim = getattr(e0, "encodingLimits", None)
        if lim is not None and lim.average is not None:
            n_avg = max(1, int(lim.average.maximum) + 1)
        s2 = getattr(lim, "kspace_encoding_step_2", None) if lim is not None else None
        if s2 is not None:
            step2 = (int(s2.minimum), int(s2.maximum), int(s2.center))
        etl = getattr(e0, "echoTrainLength", None)
        others: list[SliceGeometry | str] = []
        if encoding == 0:
            for i in range(1, len(header.encoding)):
                try:
                    others.append(cls.from_header(header, i))
                except Exception as exc:  # any header problem of a further encoding: its reason
                    others.append(f"encoding space {i} unusable: {exc}")
        return cls(enc, accel, step1, n_avg, None if etl is None else int(etl), step2, accel2, tuple(others))


@dataclass
class SliceBuffer:
    """The imaging lines of one :class:`SliceKey`, in arrival order.

    The buffer owns ``acquisitions``: they are not yielded elsewhere; the stage downstream re-emits them.
    Each acquisition keeps its echo-train identity in ``idx.segment``.
    """

    key: SliceKey
    acquisitions: list[ismrmrd.Acquisition]
    geometry: SliceGeometry
    complete: bool = True
    expected_ky: frozenset[int] = field(default_factory=frozenset)


def _key(acq: ismrmrd.Acquisition) -> SliceKey:
    i = acq.idx
    return SliceKey(int(i.slice), int(i.contrast), int(i.phase), int(i.repetition), int(i.set))


class _Group:
    def __init__(self) -> None:
        self.acqs: list[ismrmrd.Acquisition] = []
        self.seen: set[tuple[int, int, int]] = set()  # (ky, kz, average); kz 0 unless partitioned
        self.expected: frozenset[int] | None = None
        self.kz_first = 0
        self.partitioned = False  # a line with kspace_encode_step_2 != 0 on an encoded z > 1

    def count_complete(self, geo: SliceGeometry) -> bool:
        """Every expected (ky, kz, average) arrived (module docstring, Completion rule)."""
        if self.expected is None:
            return False
        kzs: Iterable[int] = (0,)
        if self.partitioned or geo.promises_partitions:
            lo, hi, _ = geo.partition_range
            kzs = [z for z in range(lo, hi + 1) if (z - self.kz_first) % geo.acceleration2 == 0]
        return all((k, z, a) in self.seen for a in range(geo.n_averages) for z in kzs for k in self.expected)


def buffer_slices(items: Iterable[object], header: ismrmrd.xsd.ismrmrdHeader) -> Iterator[object]:
    """Group imaging acquisitions into :class:`SliceBuffer` objects; pass everything else through.

    Parameters
    ----------
    items
        Stream of ISMRMRD objects (acquisitions, waveforms, anything else).
    header
        The stream's ``ismrmrd.xsd`` header (first encoding used).

    Yields
    ------
    object
        Non-imaging items unchanged and in order, and a :class:`SliceBuffer` per completed group; open
        groups are flushed at the end of the stream with ``complete=False``.  See the module docstring for
        the grouping and completion rules.  At the end of the stream, acquisitions of other encoding spaces
        that are not calibration lines (passed through untouched) are named in one WARNING.
    """
    geo = SliceGeometry.from_header(header)
    lo, hi, _ = geo.step1_range
    r = geo.acceleration
    three_d_header = geo.encoding.encoded_matrix[2] > 1
    open_groups: dict[SliceKey, _Group] = {}
    completed: set[SliceKey] = set()
    other_spaces: Counter[str] = Counter()
    flags_seen = False
    for item in items:
        kind = classify(item)
        if kind != IMAGING:
            if kind.startswith("encoding space"):
                other_spaces[kind] += 1
            yield item
            continue
        assert isinstance(item, ismrmrd.Acquisition)
        key = _key(item)
        grp = open_groups.get(key)
        if grp is None:
            grp = open_groups[key] = _Group()
            if key in completed:
                log.warning(
                    "%s: a line (ky %d) arrived after this group completed: it starts a new group (a "
                    "second report with this key)",
                    key.label(),
                    int(item.idx.kspace_encode_step_1),
                )
        grp.acqs.append(item)
        ky, kz, avg = (
            int(v) for v in (item.idx.kspace_encode_step_1, item.idx.kspace_encode_step_2, item.idx.average)
        )
        if kz != 0 and three_d_header:
            grp.partitioned = True
        grp.seen.add((ky, kz if three_d_header else 0, avg))
        if grp.expected is None and not item.is_flag_set(ismrmrd.ACQ_IS_PARALLEL_CALIBRATION_AND_IMAGING):
            grp.expected = frozenset(k for k in range(lo, hi + 1) if (k - ky) % r == 0)
            grp.kz_first = kz if three_d_header else 0
        done = False
        if item.is_flag_set(ismrmrd.ACQ_LAST_IN_SLICE):
            flags_seen = True
            done = avg >= geo.n_averages - 1
        elif not flags_seen:
            done = grp.count_complete(geo)
        if done:
            del open_groups[key]
            completed.add(key)
            log.debug("%s complete: %d lines", key.label(), len(grp.acqs))
            yield SliceBuffer(key, grp.acqs, geo, True, grp.expected or frozenset())
    for key, grp in open_groups.items():
        log.warning(
            "end of stream: %s incomplete (%d lines, %d expected), flushed with complete=False",
            key.label(),
            len(grp.acqs),
            len(grp.expected or ()) * geo.n_averages,
        )
        yield SliceBuffer(key, grp.acqs, geo, False, grp.expected or frozenset())
    if other_spaces:
        log.warning(
            "end of stream: %s passed through untouched (imaging lines of another encoding space than 0; "
            "the gadget corrects encoding space 0)",
            ", ".join(f"{n} line(s) of {k}" for k, n in sorted(other_spaces.items())),
        )


@dataclass
class SliceBatch:
    """Completed slice groups to be estimated and corrected together (yielded by :func:`batch_slices`)."""

    buffers: list[SliceBuffer]


class _Tick:
    """Marker fed after every input item: it passes through ``buffer_slices`` untouched."""


_TICK = _Tick()


class _Source:
    """The input items, each followed by :data:`_TICK`; an exception of the source ends the stream and is
    kept in ``error`` (so the held slices are still emitted before it is re-raised)."""

    def __init__(self, items: Iterable[object]) -> None:
        self.items = items
        self.error: BaseException | None = None

    def __iter__(self) -> Iterator[object]:
        try:
            for item in self.items:
                yield item
                yield _TICK
        except Exception as exc:
            self.error = exc


def batch_slices(
    items: Iterable[object], header: ismrmrd.xsd.ismrmrdHeader, batch_size: int
) -> Iterator[object]:
    """:func:`buffer_slices` with the completed slices gathered into :class:`SliceBatch` objects.

    Completed slices wait while the following input items each complete another slice (up to
    ``batch_size``); any other item (a line that completes nothing, a pass-through item, the end of the
    stream) flushes them first, so no slice waits for more than the next input item.  Pass-through items
    are yielded unchanged, in order, after the batch they flushed.

    An exception raised by ``items`` itself ends the stream: the slices held so far (incomplete ones
    included) are yielded first, then the exception is logged and re-raised.
    """
    pending: list[SliceBuffer] = []
    produced = False
    source = _Source(items)
    for out in buffer_slices(source, header):
        if out is _TICK:
            if not produced and pending:
                yield SliceBatch(pending)
                pending = []
            produced = False
            continue
        produced = True
        if isinstance(out, SliceBuffer):
            pending.append(out)
            if len(pending) >= batch_size:
                yield SliceBatch(pending)
                pending = []
            continue
        if pending:
            yield SliceBatch(pending)
            pending = []
        yield out
    if pending:
        yield SliceBatch(pending)
    if source.error is not None:
        log.warning(
            "input stream failed (%s: %s): everything received was emitted, then the error is re-raised",
            type(source.error).__name__,
            source.error,
        )
        raise source.error
