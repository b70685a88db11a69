"""``kmotion serve``: the FIRE (python-ismrmrd-server) protocol over real sockets, server in this process."""

from __future__ import annotations

import io
import json
import socket
import struct
import threading
from collections.abc import Callable, Iterator
from queue import Queue

import ismrmrd
import numpy as np
import pytest
from fake_gadgetron import echo_factory, simulated_stream
from ismrmrd.serialization import ConfigFile, ConfigText, ProtocolSerializer

from kmotion.frontends.fire_server import serve
from kmotion.io.mrd_v1 import Message, MessageId, MessageReader, SocketSource

TIMEOUT = 60.0

#: The ids the python-ismrmrd-server client's ``Connection`` has handlers for (``connection.py``: CONFIG_FILE,
#: CONFIG_TEXT, METADATA_XML_TEXT, CLOSE, TEXT, acquisition, image, waveform); any other id makes its
#: ``next`` log "Received unknown message type" and raise, which ends (crashes) its receive loop.
FIRE_CLIENT_IDS = frozenset({1, 2, 3, 4, 5, 1008, 1022, 1026})


def _start(**kwargs: object) -> Iterator[int]:
    ports: Queue[int] = Queue()
    stop = threading.Event()
    t = threading.Thread(
        target=serve, kwargs={"port": 0, "on_ready": ports.put, "stop": stop, **kwargs}, daemon=True
    )
    t.start()
    yield ports.get(timeout=TIMEOUT)
    stop.set()
    t.join(TIMEOUT)
    assert not t.is_alive()


@pytest.fixture(scope="module")
def echo_server() -> Iterator[int]:
    """Port of a server running the pass-through test double of the pipeline (idle timeout 2 s)."""
    yield from _start(factory=echo_factory, idle_timeout=2.0, recon_iterations=3)


@pytest.fixture(scope="module")
def kmotion_server() -> Iterator[int]:
    """Port of a server running the real pipeline."""
    yield from _start(recon_iterations=5)


def fire_client_bytes(
    header: object, items: list[object], config: object = ConfigFile("kmotion"), params: dict | None = None
) -> bytes:
    """What the python-ismrmrd-server client sends: config, header (NUL-terminated), JSON text, data."""
    buf = io.BytesIO()
    s = ProtocolSerializer(buf)
    if config is not None:
        s.serialize(config)
    xml = ismrmrd.xsd.ToXML(header).encode() + b"\0"
    buf.write(struct.pack("<HI", 3, len(xml)) + xml)
    if params is not None:
        s.serialize(json.dumps({"version": "1.0", "parameters": {"config": "kmotion", **params}}) + "\0")
    for i in items:
        s.serialize(i)
    s.close()
    return buf.getvalue()


def session(
    port: int, data: bytes, after_send: Callable[[socket.socket], None] | None = None
) -> list[Message]:
    """Send ``data`` (in a thread) and read every message until CLOSE or end of input."""
    sock = socket.create_connection(("127.0.0.1", port), TIMEOUT)

    def send() -> None:
        try:
            sock.sendall(data)
            if after_send is not None:
                after_send(sock)
        except OSError:
            pass

    t = threading.Thread(target=send, daemon=True)
    t.start()
    out: list[Message] = []
    reader = MessageReader(SocketSource(sock, TIMEOUT, "server"))
    while (m := reader.read_message()) is not None:
        out.append(m)
        if m.mid == MessageId.CLOSE:
            break
    t.join(TIMEOUT)
    sock.close()
    unknown = [m.mid for m in out if m.mid not in FIRE_CLIENT_IDS]
    assert unknown == [], f"messages the python-ismrmrd-server client cannot read: {unknown}"
    return out


def _small(ism, n_reps: int = 2) -> tuple[object, list[object]]:
    hdr = ism.make_header(n_ky=16, n_kx=16, n_slices=1, n_reps=n_reps)
    k = ism.known_kspace(2, 16, 16)
    items: list[object] = []
    for rep in range(n_reps):
        items += ism.slice_lines(k, ism.undersampled_rows(16, 0), 8, rep=rep)
    items.insert(1, ismrmrd.Waveform.from_array(np.arange(8, dtype=np.uint32).reshape(2, 4)))
    return hdr, items


def _images(out: list[Message]) -> list[ismrmrd.Image]:
    return [m.value for m in out if m.mid == MessageId.IMAGE]


def _texts(out: list[Message]) -> list[str]:
    return [m.value for m in out if m.mid == MessageId.TEXT]


def _errors(out: list[Message]) -> list[str]:
    return [t for t in _texts(out) if t.startswith("ERROR")]


def _error_then_close(out: list[Message]) -> bool:
    """The FIRE way to end with an error: TEXT ``ERROR ...`` then CLOSE, never ERROR (id 8), which the
    python-ismrmrd-server client's ``Connection.next`` has no handler for (it raises StopIteration)."""
    return (
        len(out) >= 2
        and out[-1].mid == MessageId.CLOSE
        and out[-2].mid == MessageId.TEXT
        and out[-2].value.startswith("ERROR")
        and all(m.mid != MessageId.ERROR for m in out)
    )


def test_round_trip_real_pipeline(kmotion_server: int) -> None:
    """Images with headers and estimates as meta attributes, then TEXT estimates and CLOSE."""
    raw = simulated_stream()
    data = fire_client_bytes(raw.header, raw.items, params={"sense_iterations": 3})
    out = session(kmotion_server, data)
    assert out[-1].mid == MessageId.CLOSE and _errors(out) == []
    imgs = _images(out)
    assert [(i.image_series_index, i.slice, i.repetition) for i in imgs] == [(1, 0, 0), (1, 0, 1), (1, 0, 2)]
    assert imgs[0].data.dtype == np.float32 and tuple(imgs[0].matrix_size)[:2] == (64, 128)
    acq0 = raw.acquisitions[-1]
    np.testing.assert_allclose(np.array(imgs[1].slice_dir), np.array(acq0.slice_dir), atol=1e-6)
    est = json.loads(_texts(out)[-1])["kmotion_estimates"]
    assert [e["repetition"] for e in est] == [0, 1, 2]
    for t in raw.truth[1:]:
        e = est[t.repetition]
        assert abs(e["dx_px"] - t.dx_px) < 1.0 and abs(e["dy_px"] - t.dy_px) < 1.0
        assert abs(e["rot_deg"] - t.phi_deg) < 3.0
        meta = ismrmrd.Meta.deserialize(imgs[t.repetition].attribute_string)
        assert any("kmotion" in k for k in meta), meta


def test_missing_model_in_text_parameters(kmotion_server: int, ism, tmp_path) -> None:
    hdr, items = _small(ism)
    out = session(
        kmotion_server, fire_client_bytes(hdr, items, params={"model": str(tmp_path / "x.safetensors")})
    )
    assert "x.safetensors" in _errors(out)[0]
    assert _error_then_close(out) and "x.safetensors" in out[-2].value


def test_clients_in_a_row_and_at_once(echo_server: int, ism) -> None:
    hdr, items = _small(ism)
    data = fire_client_bytes(hdr, items, config=ConfigText("<configuration/>"))
    results: Queue[list[Message]] = Queue()
    threads = [threading.Thread(target=lambda: results.put(session(echo_server, data))) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(TIMEOUT)
    for out in [results.get_nowait() for _ in threads] + [session(echo_server, data)]:
        assert out[-1].mid == MessageId.CLOSE and _errors(out) == []
        assert [i.repetition for i in _images(out)] == [0, 1]
        assert len(json.loads(_texts(out)[-1])["kmotion_estimates"]) == 2


def test_unknown_config_name_is_answered_and_the_server_survives(echo_server: int, ism) -> None:
    hdr, items = _small(ism)
    out = session(echo_server, fire_client_bytes(hdr, items, config=ConfigFile("invertcontrast")))
    assert _images(out) == []
    assert "unknown configuration 'invertcontrast'" in _errors(out)[0]
    assert _error_then_close(out)
    ok = session(echo_server, fire_client_bytes(hdr, items))
    assert ok[-1].mid == MessageId.CLOSE and len(_images(ok)) == 2


@pytest.mark.parametrize(
    ("tail", "words"),
    [
        (struct.pack("<H", 4242), "unknown message id 4242"),
        (struct.pack("<H", 1008) + b"\x00" * 30, "truncated"),
        (b"", "end of input without CLOSE"),
    ],
)
def test_bad_input_mid_stream_flushes_then_errors(echo_server: int, ism, tail: bytes, words: str) -> None:
    hdr, items = _small(ism)
    data = fire_client_bytes(hdr, items)[:-2] + tail

    def hang_up(sock: socket.socket) -> None:
        sock.shutdown(socket.SHUT_WR)

    out = session(echo_server, data, after_send=hang_up)
    assert len(_images(out)) == 2  # what arrived is still answered
    assert words in _errors(out)[0] and _error_then_close(out)


def test_oversized_length_field(echo_server: int, ism) -> None:
    hdr, items = _small(ism)
    data = fire_client_bytes(hdr, items)[:-2] + struct.pack("<HI", 5, 0xFFFFFFFF)
    out = session(echo_server, data)
    assert "exceeds the limit" in _errors(out)[0] and len(_images(out)) == 2


def test_silent_client_times_out_and_vanished_client_is_harmless(echo_server: int, ism) -> None:
    hdr, items = _small(ism)
    out = session(echo_server, fire_client_bytes(hdr, items)[:-2])  # no CLOSE, connection kept open
    assert "no data for 2 s" in _errors(out)[0] and len(_images(out)) == 2
    sock = socket.create_connection(("127.0.0.1", echo_server), TIMEOUT)
    sock.sendall(fire_client_bytes(hdr, items)[:500])
    sock.close()  # vanishes mid-header
    ok = session(echo_server, fire_client_bytes(hdr, items))
    assert ok[-1].mid == MessageId.CLOSE and len(_images(ok)) == 2
