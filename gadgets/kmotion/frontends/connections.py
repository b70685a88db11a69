"""The socket side shared by the servers: one accept loop (:func:`serve_connections`) and a graceful close."""

from __future__ import annotations

import logging
import socket
import threading
from collections.abc import Callable
from typing import Any

__all__ = ["close_gracefully", "serve_connections"]

log = logging.getLogger("kmotion.gadget")


def close_gracefully(sock: socket.socket, linger: float = 2.0) -> None:
    """Shut the write side, drain what the peer still sends (at most ``linger`` s), close.

    Closing with unread input makes the kernel send RST, which can destroy the last messages in flight.
    """
    try:
        sock.shutdown(socket.SHUT_WR)
        sock.settimeout(linger)
        for _ in range(64):
            if not sock.recv(1 << 16):
                break
    except OSError:
        pass
    try:
        sock.close()
    except OSError:
        pass


def serve_connections(
    srv: socket.socket,
    handle: Callable[[socket.socket, Any], bool],
    name: str,
    max_connections: int | None = None,
    stop: threading.Event | None = None,
) -> int:
    """Accept connections on the listening ``srv`` (1 s accept timeout) and run ``handle(sock, addr)`` in a
    thread of its own for each; ``handle`` returns whether the connection succeeded, an exception counts as
    a failure and never ends the loop.  Stops after ``max_connections`` connections or within a second of
    ``stop`` being set; closes ``srv`` and joins the threads.  Returns the number of failed connections.
    """
    failures = 0
    n = 0
    lock = threading.Lock()
    threads: list[threading.Thread] = []

    def run(sock: socket.socket, addr: Any) -> None:
        nonlocal failures
        ok = False
        try:
            ok = handle(sock, addr)
        except Exception:  # never take the server down
            log.exception("%s: connection from %s failed", name, addr)
        if not ok:
            with lock:
                failures += 1

    try:
        while (max_connections is None or n < max_connections) and not (stop is not None and stop.is_set()):
            try:
                sock, addr = srv.accept()
            except TimeoutError:
                continue
            n += 1
            log.info("%s: connection %d from %s", name, n, addr)
            t = threading.Thread(target=run, args=(sock, addr), daemon=True, name=f"{name}-{n}")
            t.start()
            threads.append(t)
    finally:
        srv.close()
        for t in threads:
            t.join()
    return failures
