"""Instructions per cache hit and per cache miss, counted by callgrind (valgrind).

Wall-clock and CPU times on a shared host move with whatever else runs; instruction counts
do not. Each workload runs twice under ``valgrind --tool=callgrind`` with two lengths, and
the difference of the two totals divided by the difference of the lengths is the cost of
one operation, start-up and imports cancelled out:

* ``hit``: ``QueryHandler.handle`` on a cached name in a loop, no EDNS and with EDNS;
* ``miss``: sequential never-seen names through the real UDP listener, an in-process
  responder on loopback answering at once (A: one address; other types: NODATA + SOA).

It uses only ``Sidecar(Config(...))``, ``start``, ``handler.handle``, ``dns_addresses`` and
``stop``, so ``PYTHONPATH=/path/to/old/tree python bench/instructions.py`` (from outside that
tree) measures an older commit the same way (before/after tables in docs/benchmarks.md).

    python -m bench.instructions [--workload hit|miss|all] [--short N] [--long N]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import shutil
import socket
import struct
import subprocess
import sys
import tempfile

DEFAULTS = {"hit": (20_000, 120_000), "miss": (200, 1_200)}

try:
    from bench.miss_micro import _Responder
except ImportError:  # run as a script (an older tree on PYTHONPATH): bench/ is sys.path[0]
    from miss_micro import _Responder  # type: ignore[no-redef]


def _query(name: str, qtype: int, qid: int, edns: bool = False) -> bytes:
    wire = b"".join(bytes((len(p),)) + p.encode() for p in name.split(".")) + b"\x00"
    opt = b"\x00\x00\x29\x04\xd0\x00\x00\x00\x00\x00\x00" if edns else b""
    return (struct.pack(">HHHHHH", qid, 0x0100, 1, 0, 0, 1 if edns else 0) + wire
            + struct.pack(">HH", qtype, 1) + opt)


async def _workload(kind: str, n: int) -> None:
    from sidecar import Config, HostPort, Sidecar

    loop = asyncio.get_running_loop()
    transport, _ = await loop.create_datagram_endpoint(_Responder, local_addr=("127.0.0.1", 0))
    port = transport.get_extra_info("sockname")[1]
    sc = Sidecar(Config(listen=(HostPort("127.0.0.1", 0),), http=None,
                        upstreams=(HostPort("127.0.0.1", port),)))
    await sc.start()
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setblocking(False)
    await loop.sock_connect(sock, ("127.0.0.1", sc.dns_addresses[0].port))
    try:
        if kind == "hit":
            q = _query("www.example.test", 1, 1)
            await loop.sock_sendall(sock, q)
            await loop.sock_recv(sock, 4096)
            handle = sc.handler.handle
            for edns in (False, True):
                wire = _query("www.example.test", 1, 7, edns)
                for _ in range(n):
                    handle(wire, "127.0.0.1", False)
        else:
            for i in range(n):
                await loop.sock_sendall(sock, _query(f"n{i}.example.test", 1, i & 0xFFFF))
                await loop.sock_recv(sock, 4096)
    finally:
        sock.close()
        await sc.stop(drain=0)
        transport.close()


def _instructions(kind: str, n: int) -> int:
    with tempfile.TemporaryDirectory() as tmp:
        # Run as a script: ``sidecar`` then comes from PYTHONPATH or the installed package,
        # never from the working directory.
        cmd = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={tmp}/cg.out",
               sys.executable, os.path.abspath(__file__), "--run", kind, "--n", str(n)]
        env = {**os.environ, "PYTHONHASHSEED": "0"}
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1800)
        found = re.search(r"Collected : (\d+)", proc.stderr)
        if proc.returncode or not found:
            raise SystemExit(f"callgrind run failed ({proc.returncode}):\n{proc.stderr[-2000:]}")
        return int(found.group(1))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workload", choices=("hit", "miss", "all"), default="all")
    ap.add_argument("--short", type=int, help="operations in the short run")
    ap.add_argument("--long", type=int, help="operations in the long run")
    ap.add_argument("--run", choices=("hit", "miss"), help=argparse.SUPPRESS)
    ap.add_argument("--n", type=int, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.run:
        asyncio.run(_workload(a.run, a.n))
        return
    if shutil.which("valgrind") is None:
        raise SystemExit("valgrind is not installed (apt-get install valgrind)")
    import sidecar

    print(f"sidecar from {os.path.dirname(sidecar.__file__)}")
    for kind in (("hit", "miss") if a.workload == "all" else (a.workload,)):
        short, long = a.short or DEFAULTS[kind][0], a.long or DEFAULTS[kind][1]
        lo, hi = _instructions(kind, short), _instructions(kind, long)
        ops = (long - short) * (2 if kind == "hit" else 1)  # hit: both EDNS variants
        print(f"{kind}: {(hi - lo) / ops:,.0f} instructions per operation"
              f" ({short} and {long} operations: {lo:,} and {hi:,})")


if __name__ == "__main__":
    main()
