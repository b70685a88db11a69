"""Stage 1 of the streaming gadget: echo trains -> slice groups (:func:`buffer_slices`), and their batches.

Each stage is a plain function over Python objects and knows nothing of sockets.  :func:`batch_slices`
groups the completed slices that the estimator runs on together (``docs/gadget.md``, Batching).

Ownership of acquisitions
-------------------------
Every input item leaves :func:`buffer_slices` exactly once: items that are not imaging lines are yielded
immediately (in their arrival order), imaging lines are yielded *inside* exactly one :class:`SliceBuffer`
(``SliceBuffer.acquisitions``, in arrival order).  The buffer owns them; the stage downstream of the
estimation/correction re-emits them.  Imaging lines are held back until their slice is complete, so
their order relative to pass-through items changes, never their order within a slice.

Completion rule
---------------
A group (slice, contrast, repetition, set) is complete at the first line flagged ``ACQ_LAST_IN_SLICE``,
or, while the stream has not yet shown that it sets that flag, when every expected
``(kspace_encode_step_1, average)`` pair has arrived.  Expected lines are those in
``encodingLimits.kspace_encoding_step_1 [minimum, maximum]`` with ``(ky - ky_first) % R == 0``, where R
is the header's ``parallelImaging`` acceleration in step 1 and ``ky_first`` is the first line of the group
that is not a calibration-and-imaging (ACS) line: the acquired parity may be either one relative to the
centre line, so it is read from the data, not assumed.  Averages come from
``encodingLimits.average.maximum``.  Once a ``ACQ_LAST_IN_SLICE`` flag has been seen, count completion is
switched off (flags are then trusted; this keeps late ACS lines and averages in their slice).  A line
arriving for a key whose group has already completed starts a new group.  Groups still open at the end of
the stream are flushed with ``complete=False`` (never dropped) and a warning is logged.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import NamedTuple

import ismrmrd
import ismrmrd.xsd

from kmotion.io.ismrmrd_h5 import SKIP_FLAGS, HeaderEncoding, parse_encoding
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
    """Counters that separate the images of a stream."""

    slice: int
    contrast: int
    repetition: int
    set: int


@dataclass(frozen=True)
class SliceGeometry:
    """Header-derived geometry shared by all slices of a stream."""

    encoding: HeaderEncoding
    acceleration: int  # parallelImaging accelerationFactor.kspace_encoding_step_1 (1 if absent)
    step1_range: tuple[int, int, int]  # (minimum, maximum, center) of kspace_encode_step_1
    n_averages: int  # encodingLimits.average.maximum + 1 (1 if absent)
    echo_train_length: int | None  # encoding echoTrainLength, if given

    @classmethod
    def from_header(cls, header: ismrmrd.xsd.ismrmrdHeader) -> SliceGeometry:
        """Read the geometry from the first encoding of ``header`` (raises :class:`InputError`)."""
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
        accel = 1
        pi = getattr(e0, "parallelImaging", None)
        if pi is not None and pi.accelerationFactor is not None:
            accel = max(1, int(pi.accelerationFactor.kspace_encoding_step_1))
        n_avg = 1
        lim = getattr(e0, "encodingLimits", None)
        if lim is not None and lim.average is not None:
            n_avg = max(1, int(lim.average.maximum) + 1)
        etl = getattr(e0, "echoTrainLength", None)
        return cls(enc, accel, step1, n_avg, None if etl is None else int(etl))


@dataclass
class SliceBuffer:
    """The imaging lines of one (slice, contrast, repetition, set), in arrival order.

    The buffer owns ``acquisitions``: they are not yielded elsewhere; the stage downstream re-emits them.
    Each acquisition keeps its echo-train identity in ``idx.segment``.
    """

    key: SliceKey
    acquisitions: list[ismrmrd.Acquisition]
    geometry: SliceGeometry
    complete: bool = True
    expected_ky: frozenset[int] = field(default_factory=frozenset)


def is_imaging(item: object) -> bool:
    """True for an ``ismrmrd.Acquisition`` that is an imaging line of encoding space 0."""
    if not isinstance(item, ismrmrd.Acquisition):
        return False
    if any(item.is_flag_set(f) for f in SKIP_FLAGS):
        return False
    if item.is_flag_set(ismrmrd.ACQ_IS_PARALLEL_CALIBRATION) and not item.is_flag_set(
        ismrmrd.ACQ_IS_PARALLEL_CALIBRATION_AND_IMAGING
    ):
        return False
    return int(item.encoding_space_ref) == 0


def _key(acq: ismrmrd.Acquisition) -> SliceKey:
    i = acq.idx
    return SliceKey(int(i.slice), int(i.contrast), int(i.repetition), int(i.set))


class _Group:
    def __init__(self) -> None:
        self.acqs: list[ismrmrd.Acquisition] = []
        self.seen: set[tuple[int, int]] = set()
        self.expected: frozenset[int] | None = None


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
        the completion rule.
    """
    geo = SliceGeometry.from_header(header)
    lo, hi, _ = geo.step1_range
    r = geo.acceleration
    open_groups: dict[SliceKey, _Group] = {}
    flags_seen = False
    for item in items:
        if not is_imaging(item):
            yield item
            continue
        assert isinstance(item, ismrmrd.Acquisition)
        key = _key(item)
        grp = open_groups.setdefault(key, _Group())
        grp.acqs.append(item)
        ky = int(item.idx.kspace_encode_step_1)
        grp.seen.add((ky, int(item.idx.average)))
        if grp.expected is None and not item.is_flag_set(ismrmrd.ACQ_IS_PARALLEL_CALIBRATION_AND_IMAGING):
            grp.expected = frozenset(k for k in range(lo, hi + 1) if (k - ky) % r == 0)
        done = False
        if item.is_flag_set(ismrmrd.ACQ_LAST_IN_SLICE):
            flags_seen = done = True
        elif not flags_seen and grp.expected is not None:
            done = all((k, a) in grp.seen for k in grp.expected for a in range(geo.n_averages))
        if done:
            del open_groups[key]
            log.debug("slice %s complete: %d lines", tuple(key), len(grp.acqs))
            yield SliceBuffer(key, grp.acqs, geo, True, grp.expected or frozenset())
    for key, grp in open_groups.items():
        log.warning(
            "end of stream: slice %s incomplete (%d lines, %d expected), flushed with complete=False",
            tuple(key),
            len(grp.acqs),
            len(grp.expected or ()) * geo.n_averages,
        )
        yield SliceBuffer(key, grp.acqs, geo, False, grp.expected or frozenset())


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
