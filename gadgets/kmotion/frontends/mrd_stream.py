"""``kmotion stream``: an MRD stream (stdin) through the motion-correction pipeline to an MRD stream (stdout).

:func:`read_preamble` reads what comes before the data (CONFIG_FILE / CONFIG_TEXT, HEADER, TEXT parameters);
:class:`Feed` yields the data items until CLOSE and keeps a protocol error for after the flush;
:func:`run_stream` runs the pipeline and writes its output.  The FIRE server shares the first two.  The wire
formats are :mod:`kmotion.io.mrd_v1` and MRD v2 (:mod:`kmotion.io.mrd_v2`, the ``mrd-python`` package): the
input's format is detected from its first bytes (:func:`~kmotion.io.mrd_v2.sniff`), the output's is the
input's or the one asked for (:func:`stream_endpoints`); an MRD v2 stream is read and written through the
same message interface, so both run the same code.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, BinaryIO

import ismrmrd
import ismrmrd.xsd

from kmotion.frontends.properties import (
    Pipeline,
    PipelineFactory,
    kmotion_pipeline,
    properties_from_config_text,
    properties_from_json,
)
from kmotion.io.estimates import row_from_report, write_motion_csv
from kmotion.io.ismrmrd_header import LenientHeader, read_header
from kmotion.io.mrd_v1 import (
    FileSource,
    Limits,
    Message,
    MessageId,
    MessageReader,
    MessageWriter,
    ProtocolError,
    StreamEndedError,
    estimate_text,
    message_name,
)
from kmotion.io.mrd_v2 import Mrd2Context, Mrd2MessageReader, Mrd2MessageWriter, sniff
from kmotion.physics.validate import InputError

__all__ = ["FORMATS", "Feed", "read_preamble", "run_stream", "stream_endpoints"]

log = logging.getLogger("kmotion.gadget")


class Feed:
    """Data items of a stream after the preamble, until CLOSE; a ProtocolError ends it (kept in ``error``)."""

    def __init__(self, first: list[object], reader: MessageReader) -> None:
        self.first = first
        self.reader = reader
        self.error: ProtocolError | None = None
        self.closed = False
        self.n = 0

    def __iter__(self) -> Iterator[object]:
        for item in self.first:
            self.n += 1
            yield item
        try:
            while True:
                m = self.reader.read_message()
                if m is None:
                    raise StreamEndedError(
                        f"{self.reader.peer}: end of input without CLOSE after {self.reader.n_messages} "
                        "message(s) (stream ended early)"
                    )
                if m.mid == MessageId.CLOSE:
                    self.closed = True
                    return
                if m.mid in (MessageId.HEADER, MessageId.CONFIG_FILE, MessageId.CONFIG_TEXT):
                    raise ProtocolError(
                        f"{self.reader.peer}: unexpected {message_name(m.mid)} after the data began"
                    )
                if m.mid == MessageId.ERROR:
                    log.error("%s sent ERROR: %s", self.reader.peer, m.value)
                    continue
                self.n += 1
                yield m.value
        except ProtocolError as exc:
            self.error = exc
            log.error("%s; flushing the %d item(s) received so far", exc, self.n)


def read_preamble(
    reader: MessageReader, check_config: Callable[[str], object] | None = None
) -> tuple[ismrmrd.xsd.ismrmrdHeader, str, dict[str, str], list[object]]:
    """CONFIG_FILE / CONFIG_TEXT (optional), HEADER, then TEXT parameters (JSON) before the first data.

    Returns
    -------
    header (read leniently: :class:`~kmotion.io.ismrmrd_header.LenientHeader`, the text as received and
    what could be read from it), config name ("" if none), properties (CONFIG_TEXT then TEXT, later ones
    win), and the first
    data items already read (at most one, or none when CLOSE came right away).  ``check_config`` is
    called with a CONFIG_FILE name as soon as it arrives (it raises to refuse it).
    """
    config_name = ""
    props: dict[str, str] = {}
    header: LenientHeader | None = None
    while header is None:
        m = reader.read_message()
        if m is None:
            raise StreamEndedError(f"{reader.peer}: end of input before HEADER")
        if m.mid == MessageId.CONFIG_FILE:
            config_name = m.value
            if check_config is not None:
                check_config(config_name)
        elif m.mid == MessageId.CONFIG_TEXT:
            props.update(properties_from_config_text(m.value))
        elif m.mid == MessageId.TEXT:
            props.update(properties_from_json(m.value))
        elif m.mid == MessageId.HEADER:
            header = read_header(m.value, f"{reader.peer}: HEADER")  # leniently; never raises
        else:
            raise ProtocolError(
                f"{reader.peer}: expected CONFIG or HEADER first, got message {message_name(m.mid)}"
            )
    first: list[object] = []
    while True:
        m = reader.read_message()
        if m is None or m.mid == MessageId.CLOSE:
            break
        if m.mid == MessageId.TEXT:
            props.update(properties_from_json(m.value))
            continue
        first.append(m.value)
        break
    return header, config_name, props, first


def _header_out(header: LenientHeader, fmt: str) -> ismrmrd.xsd.ismrmrdHeader | str | None:
    """What to write as the output's header: with the defaults filled when any were (strict readers
    downstream read it), else the text as received (an MRD v2 input's own header then goes back unchanged);
    MRD v2 output of a header that cannot be read at all: none."""
    if fmt != "mrd1" and header.header is None:
        return None
    return header.output_xml


FORMATS = ("auto", "mrd1", "mrd2")
"""Output formats of :func:`run_stream`: ``auto`` (the input's), MRD v1, MRD v2."""


class _NotAStream:
    """The reader of an input that is an HDF5 file: its first read says so (a protocol error)."""

    peer = "input stream"
    n_messages = 0

    def read_message(self) -> Message | None:
        raise ProtocolError(
            "input stream: expected an MRD v1 or MRD v2 stream, got an HDF5 file (an ISMRMRD .h5 file: "
            "run kmotion replay IN.h5 OUT.h5 on it)"
        )


def stream_endpoints(
    inp: BinaryIO, out: BinaryIO, limits: Limits, out_format: str = "auto"
) -> tuple[Any, Any, str, str]:
    """The message reader of ``inp`` (MRD v1 or v2, from its first bytes) and the writer of ``out``.

    Returns ``(reader, writer, input format, output format)``; ``out_format`` is one of :data:`FORMATS`.
    MRD v2 items that MRD v1 cannot hold pass through untouched to MRD v2 output and are dropped, each
    with a WARNING, from MRD v1 output.
    """
    if out_format not in FORMATS:
        raise ValueError(f"output format: expected one of {FORMATS}, got {out_format!r}")
    in_format, stream = sniff(inp)
    fmt = out_format if out_format != "auto" else ("mrd2" if in_format == "mrd2" else "mrd1")
    context = Mrd2Context()
    reader: Any
    if in_format == "mrd2":
        reader = Mrd2MessageReader(stream, context, keep_other=fmt == "mrd2", peer="input stream")
    elif in_format == "hdf5":
        reader = _NotAStream()
    else:
        reader = MessageReader(FileSource(stream), limits, peer="input stream")
    writer: Any = Mrd2MessageWriter(out, context) if fmt == "mrd2" else MessageWriter(out.write, out.flush)
    return reader, writer, in_format, fmt


def run_stream(
    inp: BinaryIO,
    out: BinaryIO,
    properties: Mapping[str, str] | None = None,
    factory: PipelineFactory = kmotion_pipeline,
    images: bool = False,
    limits: Limits | None = None,
    out_format: str = "auto",
    motion_csv: str | Path | None = None,
) -> int:
    """``kmotion stream``: an MRD v1 or MRD v2 stream on ``inp`` through the pipeline to ``out``.

    Output (MRD v1): HEADER, every item the pipeline yields (corrected acquisitions, waveforms, ...) with one
    TEXT ``{"kmotion_estimate": {...}}`` before each slice's lines, optionally the reconstructed images (after
    all data), then CLOSE.  MRD v2 output (``out_format``, default: the input's format): the header and the
    same items (MRD v2 has no TEXT: the estimates are in the log, in ``motion_csv`` and, with ``images``, in
    the images' meta).  ``motion_csv``: also write the estimates as CSV (:mod:`kmotion.io.estimates`).
    ``properties`` (command line) override those of the stream (CONFIG_TEXT, TEXT).
    When the pipeline cannot be set up (bad property, missing model), the data pass through untouched.
    Errors are logged and sent as TEXT ``ERROR ...`` (``ProtocolDeserializer`` reads TEXT, not ERROR).

    Returns
    -------
    int
        0, or 2 after an error.
    """
    reader, writer, in_format, fmt = stream_endpoints(inp, out, limits or Limits(), out_format)
    errors: list[str] = []
    reports: list[Any] = []
    try:
        header, config_name, props, first = read_preamble(reader)
    except ProtocolError as exc:
        log.error("%s", exc)
        writer.text(f"ERROR kmotion stream: {exc}")
        writer.close()
        return 2
    if config_name:
        log.info("CONFIG_FILE %r (the stream command always runs kmotion)", config_name)
    props.update(properties or {})
    feed = Feed(first, reader)
    writer.header(_header_out(header, fmt))
    pipeline: Pipeline
    try:
        pipeline = factory(props)
        outputs = pipeline(feed, header)
    except InputError as exc:
        errors.append(f"pipeline not set up, data passed through untouched: {exc}")
        log.error("kmotion stream: %s", errors[-1])
        outputs = iter(feed)
    kept: list[object] = []
    n_out = n_reports = 0
    try:
        for item in outputs:
            if hasattr(item, "as_dict") and hasattr(item, "log_line"):
                n_reports += 1
                reports.append(item)
                log.debug("%s", item.log_line())  # the pipeline logs it at INFO
                writer.text(estimate_text(item))
            elif isinstance(item, str):
                writer.text(item)
            else:
                writer.item(item)
                n_out += 1
            if images:
                kept.append(item)
    except Exception as exc:  # the pipeline itself failed: nothing more can come out of it
        errors.append(f"pipeline failed: {type(exc).__name__}: {exc}")
        log.exception("kmotion stream: %s", errors[-1])
    if feed.error is not None:
        errors.append(str(feed.error))
    if images and kept:
        from kmotion.gadget.pipeline import check_header
        from kmotion.gadget.recon import reconstruct_images

        if check_header(header).geometry is None or header.header is None:
            log.debug("kmotion stream: no images of data passed through untouched")  # the pipeline said why
        else:
            try:
                for img in reconstruct_images(kept, header.header):
                    if isinstance(img, ismrmrd.Image):
                        writer.item(img)
            except Exception as exc:
                errors.append(f"image reconstruction failed: {type(exc).__name__}: {exc}")
                log.error("kmotion stream: %s", errors[-1])
    counts = (feed.n, in_format, n_out, fmt, n_reports)
    log.info("kmotion stream: %d items in (%s), %d out (%s), %d estimates", *counts)
    if motion_csv is not None:
        write_motion_csv([row_from_report(r.as_dict()) for r in reports], motion_csv)
    for e in errors:
        writer.text(f"ERROR kmotion stream: {e}")
    writer.close()
    return 2 if errors else 0
