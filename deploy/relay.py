"""A TCP relay that delays each direction by a fixed time: round-trip time where ``netem`` is not.

    python -m deploy.relay --listen 127.0.0.1:9301 --to 10.77.0.1:9092 --delay-ms 50 \\
        [--delay-file PATH]

Shaped links (``deploy.netns.Lab.shape``) get their rate from ``tbf``; their delay needs the
kernel's ``netem`` qdisc, which some kernels (these machines') lack. Run inside a SuperNode's
namespace, this relay accepts the node's connection on a local port and forwards it to the
SuperLink, holding every chunk ``--delay-ms`` before passing it on, in both directions. So each
request/response exchange of the node takes 2 x delay longer, as over a path with RTT =
2 x delay. Chunks are pipelined (a chunk waits for its own deadline, not for the previous
chunk's delivery), so the relay adds latency without capping throughput; the rate limit stays
with ``tbf`` on the node's interface. Unlike ``netem`` it delays data, not TCP's own ACKs, so
slow start on the shaped hop sees the short RTT (the difference is part of what the link
validation measures).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import time
from collections.abc import Sequence
from pathlib import Path

CHUNK = 1 << 16


def parse_address(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"address must be HOST:PORT, got {text!r}")
    return host, int(port)


class Delay:
    """The one-way delay in seconds: fixed, or read from ``path`` (milliseconds as text) at
    most every 0.2 s, so a running relay can be re-shaped between runs."""

    def __init__(self, seconds: float, path: Path | None = None) -> None:
        if seconds < 0:
            raise ValueError(f"delay must be >= 0, got {seconds}")
        self.seconds, self.path, self._read_at = seconds, path, -1.0

    def now(self) -> float:
        if self.path is not None and time.monotonic() - self._read_at > 0.2:
            self._read_at = time.monotonic()
            with contextlib.suppress(OSError, ValueError):
                self.seconds = max(0.0, float(self.path.read_text().strip()) / 1e3)
        return self.seconds


async def _pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, delay: Delay) -> None:
    """Copy ``reader`` to ``writer``, each chunk written the delay after it was read."""
    queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()

    async def deliver() -> None:
        while True:
            due, chunk = await queue.get()
            wait = due - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
            if not chunk:  # end of stream, after everything before it
                with contextlib.suppress(OSError):
                    writer.write_eof()
                return
            writer.write(chunk)
            await writer.drain()

    delivery = asyncio.create_task(deliver())
    try:
        while True:
            chunk = await reader.read(CHUNK)
            await queue.put((time.monotonic() + delay.now(), chunk))
            if not chunk:
                break
        await delivery
    finally:
        delivery.cancel()


async def _connection(
    client_reader: asyncio.StreamReader,
    client_writer: asyncio.StreamWriter,
    target: tuple[str, int],
    delay: Delay,
) -> None:
    try:
        upstream_reader, upstream_writer = await asyncio.open_connection(*target)
    except OSError:
        client_writer.close()
        return
    try:
        await asyncio.gather(
            _pump(client_reader, upstream_writer, delay),
            _pump(upstream_reader, client_writer, delay),
            return_exceptions=True,
        )
    finally:
        for writer in (upstream_writer, client_writer):
            writer.close()


async def serve(listen: tuple[str, int], target: tuple[str, int], delay: Delay) -> None:
    """Relay connections on ``listen`` to ``target``, ``delay`` each way, until cancelled."""
    connections: set[asyncio.Task[None]] = set()  # strong references until each one ends

    def accept(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.ensure_future(_connection(reader, writer, target, delay))
        connections.add(task)
        task.add_done_callback(connections.discard)

    server = await asyncio.start_server(accept, listen[0], listen[1])
    async with server:
        print(f"relay ready {listen[0]}:{listen[1]} -> {target[0]}:{target[1]}", flush=True)
        await server.serve_forever()


def relay_command(
    listen: str, target: str, delay_ms: float, delay_file: Path | None = None
) -> list[str]:
    """The command line of a relay process (run it with the project's interpreter)."""
    command = ["-m", "deploy.relay", "--listen", listen, "--to", target]
    command += ["--delay-ms", str(delay_ms)]
    return command + (["--delay-file", str(delay_file)] if delay_file else [])


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--listen", required=True, help="HOST:PORT to accept on")
    parser.add_argument("--to", required=True, help="HOST:PORT to forward to")
    parser.add_argument("--delay-ms", type=float, required=True, help="one-way delay")
    parser.add_argument(
        "--delay-file", type=Path, default=None, help="a file whose number (ms) overrides it"
    )
    args = parser.parse_args(argv)
    listen, target = parse_address(args.listen), parse_address(args.to)
    delay = Delay(args.delay_ms / 1e3, args.delay_file)
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve(listen, target, delay))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
