"""FIRE-style MRD server (``kmotion serve``): the protocol of the python-ismrmrd-server client.

Per connection (one thread each; one failing connection never stops the server):

1. CONFIG_FILE (id 1, 1024-byte NUL-padded name; ``kmotion`` selects this pipeline, any other name is
   answered with a TEXT ``ERROR ...`` and CLOSE) or CONFIG_TEXT (id 2: a ``<configuration>`` of
   ``<property>`` elements or a chain XML with the kmotion ``<external>``);
2. HEADER (id 3; the XML may end in a NUL byte; read leniently, ``kmotion.io.ismrmrd_header``);
3. optional TEXT (id 5) with JSON parameters (flat, or python-ismrmrd-server's ``{"parameters": {...}}``)
   for ``GadgetParams.from_properties``;
4. acquisitions (1008) and waveforms (1026) until CLOSE (4).

Answer: the motion-corrected images (1022, float32 magnitude; ``image_series_index``, slice, repetition and
geometry from the acquisitions; the estimates as ``kmotion_*`` meta attributes) as each slice completes,
then one TEXT ``{"kmotion_estimates": [...]}`` and CLOSE.  Data the gadget does not handle (an unusable
header, a trajectory other than Cartesian) come back untouched instead of images (acquisitions 1008 and
waveforms 1026, which the client stores), with a TEXT ``WARNING kmotion serve: ...`` naming the reason.
Errors are sent as TEXT ``ERROR ...`` (what the python-ismrmrd-server client prints) followed by CLOSE —
never ERROR (id 8): the client's ``Connection.next`` has no handler for it and ends its receive loop with
an exception.  A protocol error mid-stream (unknown id, oversized length, truncated message, peer gone,
silence longer than ``idle_timeout``) first flushes the images of what arrived.
"""

from __future__ import annotations

import json
import logging
import socket
import threading
from collections.abc import Callable, Mapping
from typing import Any

import ismrmrd

from kmotion.frontends.connections import close_gracefully, serve_connections
from kmotion.frontends.mrd_stream import Feed, read_preamble
from kmotion.frontends.properties import PipelineFactory, kmotion_pipeline
from kmotion.io.mrd_v1 import Limits, MessageReader, MessageWriter, ProtocolError, SocketSource
from kmotion.physics.validate import InputError

__all__ = ["CONFIG_NAMES", "handle_connection", "serve"]

log = logging.getLogger("kmotion.gadget")

#: CONFIG_FILE names that select the motion-correction pipeline.
CONFIG_NAMES = ("kmotion",)


class UnknownConfigError(ProtocolError):
    """A CONFIG_FILE name this server does not run."""


def _check_config(name: str) -> None:
    if name.strip() not in CONFIG_NAMES:
        raise UnknownConfigError(
            f"unknown configuration {name.strip()!r}: this server runs {', '.join(CONFIG_NAMES)} "
            "(motion-corrected images)"
        )


def handle_connection(
    sock: socket.socket,
    peer: str = "client",
    properties: Mapping[str, str] | None = None,
    factory: PipelineFactory = kmotion_pipeline,
    idle_timeout: float | None = 300.0,
    limits: Limits | None = None,
    recon_iterations: int = 20,
) -> bool:
    """Serve one FIRE connection (see the module docstring); never raises.

    ``properties`` are the server's defaults (command line); the client's CONFIG_TEXT / TEXT override
    them.  Returns True when the connection ended with CLOSE and no error.
    """
    reader = MessageReader(SocketSource(sock, idle_timeout, peer), limits or Limits(), peer)
    writer = MessageWriter(sock.sendall)
    errors: list[str] = []
    reports: list[dict[str, object]] = []
    n_images = n_back = 0

    def fail(msg: str) -> None:
        errors.append(msg)
        log.error("kmotion serve %s: %s", peer, msg)

    try:
        try:
            header, config_name, props, first = read_preamble(reader, _check_config)
        except ProtocolError as exc:
            fail(str(exc))
            return False
        settings = {**(properties or {}), **props}
        log.info("kmotion serve %s: config %r, parameters %s", peer, config_name or "(text)", settings)
        feed = Feed(first, reader)
        try:
            pipeline = factory(settings)
            corrected = pipeline(feed, header)
        except InputError as exc:
            fail(f"pipeline not set up: {exc}")
            return False
        from kmotion.gadget.pipeline import check_header
        from kmotion.gadget.recon import reconstruct_images

        check = check_header(header)
        if check.warning() is not None:  # the pipeline logs it; the client prints TEXT
            writer.text(f"WARNING kmotion serve: {check.warning()}")
        outputs = (
            reconstruct_images(corrected, check.header, iterations=recon_iterations)
            if check.geometry is not None and check.header is not None
            else corrected  # passed through untouched: the items go back as they came
        )
        try:
            for out in outputs:
                if isinstance(out, ismrmrd.Image):
                    writer.item(out)
                    n_images += 1
                elif isinstance(out, ismrmrd.Acquisition | ismrmrd.Waveform):
                    writer.item(out)
                    n_back += 1
                elif hasattr(out, "as_dict") and hasattr(out, "log_line"):
                    log.debug("kmotion serve %s: %s", peer, out.log_line())  # the pipeline logs it
                    reports.append(out.as_dict())
        except OSError as exc:
            fail(f"connection lost while answering: {exc}")
            return False
        except Exception as exc:
            fail(f"pipeline failed: {type(exc).__name__}: {exc}")
            log.debug("traceback", exc_info=True)
        if feed.error is not None:
            fail(str(feed.error))
        log.info(
            "kmotion serve %s: %d items in, %d images and %d items passed back out, %d estimates",
            peer,
            feed.n,
            n_images,
            n_back,
            len(reports),
        )
        return not errors
    finally:
        try:
            if reports or not errors:
                writer.text(json.dumps({"kmotion_estimates": reports}))
            for e in errors:
                writer.text(f"ERROR kmotion serve: {e}")
            writer.close()  # no ERROR (id 8): FIRE clients do not know it
        except OSError as exc:
            log.info("kmotion serve %s: could not answer (%s)", peer, exc)
        close_gracefully(sock)


def serve(
    port: int,
    host: str = "127.0.0.1",
    properties: Mapping[str, str] | None = None,
    factory: PipelineFactory = kmotion_pipeline,
    max_connections: int | None = None,
    on_ready: Callable[[int], object] | None = None,
    stop: threading.Event | None = None,
    idle_timeout: float | None = 300.0,
    limits: Limits | None = None,
    **kwargs: Any,
) -> int:
    """Listen on ``host:port`` and serve each connection in its own thread.

    ``port=0`` binds a free port (``on_ready`` gets it); ``max_connections`` stops after that many
    connections, ``stop`` within a second of being set.  Returns the number of failed connections.
    """
    srv = socket.create_server((host, port))
    srv.settimeout(1.0)
    bound = srv.getsockname()[1]
    log.info("kmotion serve: listening on %s:%d (config name: %s)", host, bound, ", ".join(CONFIG_NAMES))
    if on_ready is not None:
        on_ready(bound)

    def run(sock: socket.socket, addr: Any) -> bool:
        return handle_connection(
            sock, f"client {addr[0]}:{addr[1]}", properties, factory, idle_timeout, limits, **kwargs
        )

    return serve_connections(srv, run, "kmotion serve", max_connections, stop)
