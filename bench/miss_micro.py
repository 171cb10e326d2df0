"""Sidecar CPU per cache miss: an in-process sidecar, a minimal upstream in another process.

The upstream (this script with ``--responder``, pinned to CPU 0) answers every A query with
127.0.0.1 and every other type with NODATA plus an SOA in the authority section, at once, so
what is measured is the sidecar's own work. The sidecar (pinned to CPU 1) gets distinct
never-seen names, half A and half AAAA:

* sequential: one query at a time, median and p90 latency (client in the same process);
* burst: ``--burst`` queries sent at once; process CPU per miss (all threads: c-ares' event
  thread, where a channel still has one) and main-thread CPU per miss.

    python -m bench.miss_micro [--burst 1000] [--rounds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Coroutine, Iterator
from typing import Any, TypeVar

from sidecar import Config, HostPort, Sidecar
from sidecar.server import tune_gc

T = TypeVar("T")

_SOA_RDATA = b"\x02ns\x00\x02hm\x00" + struct.pack(">IIIII", 1, 60, 60, 60, 60)
_SOA_RR = b"\x04test\x00" + struct.pack(">HHIH", 6, 1, 60, len(_SOA_RDATA)) + _SOA_RDATA


class _Responder(asyncio.DatagramProtocol):
    def connection_made(self, transport) -> None:
        self.t = transport

    def datagram_received(self, d: bytes, addr) -> None:
        end = d.find(b"\x00", 12) + 5
        if end < 17:
            return
        qtype = struct.unpack_from(">H", d, end - 4)[0]
        if qtype == 1:
            tail = struct.pack(">HHHH", 1, 1, 0, 0) + d[12:end] + b"\xc0\x0c" + struct.pack(
                ">HHIH", 1, 1, 300, 4) + b"\x7f\x00\x00\x01"
        else:
            tail = struct.pack(">HHHH", 1, 0, 1, 0) + d[12:end] + _SOA_RR
        self.t.sendto(d[:2] + b"\x81\x80" + tail, addr)


def responder(port: int, seconds: float) -> None:
    async def main() -> None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
        sock.bind(("127.0.0.1", port))
        await asyncio.get_running_loop().create_datagram_endpoint(_Responder, sock=sock)
        await asyncio.sleep(seconds)  # bounded: the benchmark never outlives this

    asyncio.run(main())


def _query(name: str, qtype: int, qid: int) -> bytes:
    labels = b"".join(bytes((len(x),)) + x.encode() for x in name.split("."))
    return struct.pack(">HHHHHH", qid, 0x0100, 1, 0, 0, 0) + labels + b"\x00" + struct.pack(
        ">HH", qtype, 1)


def client_socket(port: int) -> socket.socket:
    """A non-blocking UDP socket connected to the sidecar on ``port``, with room for a burst."""
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
    s.setblocking(False)
    s.connect(("127.0.0.1", port))
    return s


async def sequential(s: socket.socket, prefix: str, n: int = 300) -> list[float]:
    """Latencies (seconds, sorted) of ``n`` never-seen names asked one at a time, half A and
    half AAAA."""
    loop = asyncio.get_running_loop()
    lat = []
    for i in range(n):
        t0 = time.perf_counter()
        await loop.sock_sendall(s, _query(f"s{i}.{prefix}.test", 1 if i % 2 else 28, i))
        await asyncio.wait_for(loop.sock_recv(s, 4096), 5)
        lat.append(time.perf_counter() - t0)
    lat.sort()
    return lat


async def burst_cost(s: socket.socket, prefix: str, burst: int,
                     settle: Callable[[], Awaitable[None]] | None = None
                     ) -> tuple[float, float, float]:
    """``burst`` never-seen names sent at once and all answered (then ``settle``, work the
    misses left behind): wall seconds, process CPU seconds, main-thread CPU seconds."""
    loop = asyncio.get_running_loop()
    c0, m0, t0 = time.process_time(), time.thread_time(), time.perf_counter()
    for i in range(burst):
        s.send(_query(f"b{i}.{prefix}.test", 1 if i % 2 else 28, i & 0xFFFF))
    for _ in range(burst):
        await asyncio.wait_for(loop.sock_recv(s, 4096), 10)
    if settle is not None:
        await settle()
    return time.perf_counter() - t0, time.process_time() - c0, time.thread_time() - m0


async def measure(port: int, burst: int, rounds: int) -> None:
    sc = Sidecar(Config(listen=(HostPort("127.0.0.1", 0),), http=None,
                        upstreams=(HostPort("127.0.0.1", port),), timeout=2.0, tries=2))
    await sc.start()
    tune_gc()  # as the dns-sidecar process does once it has started
    s = client_socket(sc.dns_addresses[0].port)
    tag = f"m{os.getpid()}"
    try:
        for rnd in range(rounds):
            lat = await sequential(s, f"r{rnd}.{tag}")
            wall, cpu, main_cpu = await burst_cost(s, f"r{rnd}.{tag}", burst)
            print(f"round {rnd}: sequential p50 {lat[150] * 1e6:.0f} us, p90 "
                  f"{lat[270] * 1e6:.0f} us; burst of {burst}: {wall * 1e3:.0f} ms, "
                  f"CPU/miss {cpu / burst * 1e6:.0f} us (main thread {main_cpu / burst * 1e6:.0f})",
                  flush=True)
    finally:
        s.close()
        await sc.stop()


def _wait_ready(port: int, deadline: float = 10.0) -> None:
    probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    probe.settimeout(0.2)
    end = time.monotonic() + deadline
    try:
        while time.monotonic() < end:
            probe.sendto(_query("ready.test", 1, 1), ("127.0.0.1", port))
            try:
                probe.recv(512)
                return
            except OSError:
                continue
        raise SystemExit(f"responder on 127.0.0.1:{port} did not answer")
    finally:
        probe.close()


@contextlib.contextmanager
def responder_process(port: int) -> Iterator[bool]:
    """The responder in its own process on CPU 0 and this process on CPU 1 (where there are
    two); yields whether they were pinned apart. Stopped on exit."""
    two = (os.cpu_count() or 1) > 1
    cmd = [sys.executable, os.path.abspath(__file__), "--responder", "--port", str(port)]
    proc = subprocess.Popen((["taskset", "-c", "0"] if two else []) + cmd)
    try:
        if two:
            os.sched_setaffinity(0, {1})
        _wait_ready(port)
        yield two
    finally:
        proc.terminate()
        proc.wait(5)


def run_loop(coro: Coroutine[Any, Any, T]) -> T:
    """Run ``coro`` on uvloop when installed (as the dns-sidecar process does), else asyncio."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    return uvloop.run(coro)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--burst", type=int, default=1000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--port", type=int, default=25390, help="the responder's UDP port")
    ap.add_argument("--responder", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.responder:
        responder(a.port, 120.0)
        return
    with responder_process(a.port):
        run_loop(measure(a.port, a.burst, a.rounds))

if __name__ == "__main__":
    main()
