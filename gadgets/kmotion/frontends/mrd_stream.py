"""``kmotion stream``: an MRD v1 stream (stdin) through the motion-correction pipeline to an MRD v1 stream.

:func:`read_preamble` reads what comes before the data (CONFIG_FILE / CONFIG_TEXT, HEADER, TEXT parameters);
:class:`Feed` yields the data items until CLOSE and keeps a protocol error for after the flush;
:func:`run_stream` runs the pipeline and writes its output.  The FIRE server shares the first two.  The wire
format itself is :mod:`kmotion.io.mrd_v1`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Mapping
from typing import BinaryIO

import ismrmrd
import ismrmrd.xsd

from kmotion.frontends.properties import (
    Pipeline,
    PipelineFactory,
    kmotion_pipeline,
    properties_from_config_text,
    properties_from_json,
)
from kmotion.io.mrd_v1 import (
    FileSource,
    Limits,
    MessageId,
    MessageReader,
    MessageWriter,
    ProtocolError,
    StreamEndedError,
    estimate_text,
    message_name,
    parse_header,
)
from kmotion.physics.validate import InputError

__all__ = ["Feed", "read_preamble", "run_stream"]

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
    header, config name ("" if none), properties (CONFIG_TEXT then TEXT, later ones win), and the first
    data items already read (at most one, or none when CLOSE came right away).  ``check_config`` is
    called with a CONFIG_FILE name as soon as it arrives (it raises to refuse it).
    """
    config_name = ""
    props: dict[str, str] = {}
    header = None
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
            header = parse_header(m.value)
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


def run_stream(
    inp: BinaryIO,
    out: BinaryIO,
    properties: Mapping[str, str] | None = None,
    factory: PipelineFactory = kmotion_pipeline,
    images: bool = False,
    limits: Limits | None = None,
) -> int:
    """``kmotion stream``: an MRD v1 stream on ``inp`` through the pipeline to ``out``.

    Output: HEADER, every item the pipeline yields (corrected acquisitions, waveforms, ...) with one TEXT
    ``{"kmotion_estimate": {...}}`` before each slice's lines, optionally the reconstructed images (after
    all data), then CLOSE.  ``properties`` (command line) override those of the stream (CONFIG_TEXT, TEXT).
    When the pipeline cannot be set up (bad property, missing model), the data pass through untouched.
    Errors are logged and sent as TEXT ``ERROR ...`` (``ProtocolDeserializer`` reads TEXT, not ERROR).

    Returns
    -------
    int
        0, or 2 after an error.
    """
    reader = MessageReader(FileSource(inp), limits or Limits(), peer="input stream")
    writer = MessageWriter(out.write, out.flush)
    errors: list[str] = []
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
    writer.header(header)
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
        from kmotion.gadget.recon import reconstruct_images

        try:
            for img in reconstruct_images(kept, header):
                if isinstance(img, ismrmrd.Image):
                    writer.item(img)
        except Exception as exc:
            errors.append(f"image reconstruction failed: {type(exc).__name__}: {exc}")
            log.error("kmotion stream: %s", errors[-1])
    log.info("kmotion stream: %d items in, %d out, %d estimates", feed.n, n_out, n_reports)
    for e in errors:
        writer.text(f"ERROR kmotion stream: {e}")
    writer.close()
    return 2 if errors else 0
