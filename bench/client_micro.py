"""Crawler CPU per lookup through the client: aiodns's default channel vs the client's own.

A minimal DNS responder (``python -m bench.miss_micro --responder``, pinned to CPU 1) answers every
A query with 127.0.0.1 and AAAA with NODATA, at once. In this process (pinned to CPU 0), for
each variant and round: 500 ``resolve(host, 80, AF_UNSPEC)`` at once on never-seen names
(what a crawler burst does: c-ares sends A and AAAA for each), process CPU per lookup (all
threads) and wall time, then 200 sequential lookups (median latency). Variants:

* ``aiodns-thread``: aiohttp's ``AsyncResolver`` with the client's options, on aiodns's
  default channel (c-ares' event thread hands every reply to the loop);
* ``client``: ``client.sidecar_resolver()`` (the channel's sockets are watched by the loop,
  ``sidecar.upstream.cares.LoopResolver``).

    python -m bench.client_micro [--lookups 500] [--rounds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import subprocess
import sys
import time

from aiohttp.resolver import AsyncResolver

from bench.miss_micro import _wait_ready
from client import sidecar_resolver
from client.resolver import DEFAULT_FLAGS, DEFAULT_RECEIVE_BUFFER, DEFAULT_TRIES

VARIANTS = ("aiodns-thread", "client")


def make(variant: str, port: int) -> AsyncResolver:
    address = f"127.0.0.1:{port}"
    if variant == "client":
        return sidecar_resolver(address, api_url=None)
    return AsyncResolver(nameservers=[address], timeout=0.5, tries=DEFAULT_TRIES, flags=DEFAULT_FLAGS,
                         socket_receive_buffer_size=DEFAULT_RECEIVE_BUFFER)


async def one(variant: str, port: int, rnd: int, lookups: int) -> None:
    r = make(variant, port)
    tag = f"{variant}.r{rnd}.p{os.getpid()}.test"
    try:
        await r.resolve(f"warm.{tag}", 80, socket.AF_UNSPEC)  # socket open, RTT known
        c0, t0 = time.process_time(), time.perf_counter()
        got = await asyncio.gather(*(r.resolve(f"b{i}.{tag}", 80, socket.AF_UNSPEC)
                                     for i in range(lookups)), return_exceptions=True)
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        errors = sum(isinstance(x, BaseException) for x in got)
        lat = []
        for i in range(200):
            t = time.perf_counter()
            await r.resolve(f"s{i}.{tag}", 80, socket.AF_UNSPEC)
            lat.append(time.perf_counter() - t)
        lat.sort()
        print(f"round {rnd} {variant:13s}: {lookups} at once in {wall * 1e3:.0f} ms, CPU/lookup "
              f"{cpu / lookups * 1e6:.0f} us, errors {errors}; sequential p50 "
              f"{lat[100] * 1e6:.0f} us", flush=True)
    finally:
        await r.close()


async def measure(port: int, lookups: int, rounds: int) -> None:
    for rnd in range(rounds):
        order = VARIANTS if rnd % 2 == 0 else VARIANTS[::-1]
        for variant in order:
            await one(variant, port, rnd, lookups)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lookups", type=int, default=500)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--port", type=int, default=25391, help="the responder's UDP port")
    a = ap.parse_args()
    two = (os.cpu_count() or 1) > 1
    responder = os.path.join(os.path.dirname(os.path.abspath(__file__)), "miss_micro.py")
    cmd = [sys.executable, responder, "--responder", "--port", str(a.port)]
    proc = subprocess.Popen((["taskset", "-c", "1"] if two else []) + cmd)
    try:
        if two:
            os.sched_setaffinity(0, {0})
        _wait_ready(a.port)
        asyncio.run(measure(a.port, a.lookups, a.rounds))  # plain asyncio, like the crawler
    finally:
        proc.terminate()
        proc.wait(5)


if __name__ == "__main__":
    main()
