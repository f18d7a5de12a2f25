"""The delaying TCP relay (``deploy.relay``): each direction delayed, bytes intact, no rate cap."""

from __future__ import annotations

import socket
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from deploy.relay import parse_address, relay_command
from tools.launch import free_port

DELAY_MS = 50.0


def _echo_server() -> tuple[socket.socket, int]:
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()

    def serve() -> None:
        while True:
            try:
                connection, _ = server.accept()
            except OSError:
                return
            with connection:
                while data := connection.recv(1 << 16):
                    connection.sendall(data)

    threading.Thread(target=serve, daemon=True).start()
    return server, server.getsockname()[1]


def _receive(sock: socket.socket, size: int) -> bytes:
    parts, got = [], 0
    while got < size:
        part = sock.recv(min(1 << 16, size - got))
        assert part, "connection closed early"
        parts.append(part)
        got += len(part)
    return b"".join(parts)


@pytest.fixture
def relay():  # noqa: ANN201
    server, target = _echo_server()
    port = free_port()
    command = [sys.executable, *relay_command(f"127.0.0.1:{port}", f"127.0.0.1:{target}", DELAY_MS)]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    try:
        assert process.stdout is not None and "relay ready" in process.stdout.readline()
        yield port
    finally:
        process.terminate()
        process.wait(10)
        server.close()


def test_each_exchange_takes_one_round_trip_and_bytes_arrive_intact(relay):
    with socket.create_connection(("127.0.0.1", relay)) as sock:
        times = []
        for i in range(5):
            message = f"ping {i}".encode()
            started = time.monotonic()
            sock.sendall(message)
            assert _receive(sock, len(message)) == message
            times.append(time.monotonic() - started)
    rtt = 2 * DELAY_MS / 1e3
    assert min(times) >= rtt * 0.98  # both directions held
    assert float(np.median(times)) < rtt + 0.05


def test_bulk_data_is_pipelined_not_held_chunk_by_chunk(relay):
    """4 MB each way: dozens of chunks, but the transfer takes about one round trip, not one
    delay per chunk (that would be >= 64 x 50 ms)."""
    payload = np.random.default_rng(0).integers(0, 256, 4 << 20, dtype=np.uint8).tobytes()
    with socket.create_connection(("127.0.0.1", relay)) as sock:
        started = time.monotonic()
        sender = threading.Thread(target=sock.sendall, args=(payload,))
        sender.start()
        echoed = _receive(sock, len(payload))
        sender.join()
        elapsed = time.monotonic() - started
    assert echoed == payload
    assert 2 * DELAY_MS / 1e3 <= elapsed < 1.5


@pytest.mark.parametrize("text", ["9000", "host:", ":80", "host:0", "host:x"])
def test_bad_addresses_are_refused(text):
    with pytest.raises(ValueError, match="HOST:PORT"):
        parse_address(text)


def test_a_delay_file_reshapes_a_running_relay(tmp_path):
    from deploy.relay import Delay

    path = tmp_path / "delay"
    delay = Delay(0.05, path)
    assert delay.now() == 0.05  # no file yet: the fixed delay
    path.write_text("20\n")
    delay._read_at = -1.0  # skip the 0.2 s re-read interval
    assert delay.now() == pytest.approx(0.02)
    path.write_text("not a number")
    delay._read_at = -1.0
    assert delay.now() == pytest.approx(0.02)  # a bad file keeps the last delay
    with pytest.raises(ValueError, match=">= 0"):
        Delay(-1.0)
