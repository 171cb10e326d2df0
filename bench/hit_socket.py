"""Instructions per cache hit through the real UDP socket path, counted by callgrind.

``bench/instructions.py --workload hit`` calls ``QueryHandler.handle`` directly, which the
compiled UDP fast path (docs/fastpath.md) bypasses. Here the sidecar runs under
``valgrind --tool=callgrind`` and a client process outside it (not counted) sends cached
queries over loopback, ``--window`` outstanding at a time, and reads every reply. Two runs
with different query counts; the difference of the totals over the difference of the
counts is the server's user-space instructions per hit (event loop, listener, handler or
the compiled path; the kernel's work is not counted). ``--mode`` picks the UDP path, ``--loop`` the event loop (uvloop, the process default,
reads 32 datagrams per wake-up on the fast path; asyncio one).

    python -m bench.hit_socket [--mode fast|python|both] [--loop uvloop|asyncio]
                               [--window 16] [--short N] [--long N]
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
import time

try:
    from bench.miss_micro import _Responder
except ImportError:  # run as a script: bench/ is sys.path[0]
    from miss_micro import _Responder  # type: ignore[no-redef]

NAME = "www.example.test"


def _query(qid: int, edns: bool) -> bytes:
    wire = b"".join(bytes((len(p),)) + p.encode() for p in NAME.split(".")) + b"\x00"
    opt = b"\x00\x00\x29\x04\xd0\x00\x00\x00\x00\x00\x00" if edns else b""
    return (struct.pack(">HHHHHH", qid, 0x0100, 1, 0, 0, 1 if edns else 0) + wire
            + struct.pack(">HH", 1, 1) + opt)


def _write_port(portfile: str, port: int) -> None:
    with open(portfile + ".tmp", "w") as f:
        f.write(str(port))
    os.replace(portfile + ".tmp", portfile)


async def _serve(portfile: str, total: int) -> None:
    """The sidecar (warm with NAME), until it has received ``total`` datagrams."""
    from sidecar import Config, HostPort, Sidecar

    loop = asyncio.get_running_loop()
    transport, _ = await loop.create_datagram_endpoint(_Responder, local_addr=("127.0.0.1", 0))
    sc = Sidecar(Config(listen=(HostPort("127.0.0.1", 0),), http=None,
                        upstreams=(HostPort("127.0.0.1", transport.get_extra_info("sockname")[1]),)))
    await sc.start()
    _write_port(portfile, sc.dns_addresses[0].port)
    for _ in range(12_000):  # at most 600 s
        if sc.udp[0].received >= total:
            break
        await asyncio.sleep(0.05)
    await sc.stop(drain=0)
    transport.close()


def _client(port: int, n: int, window: int) -> None:
    """One miss to warm the cache, then ``n`` hits (EDNS and not, alternating)."""
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.settimeout(60)
    s.connect(("127.0.0.1", port))
    s.send(_query(0, False))
    s.recv(4096)
    sent = got = 0
    while got < n:
        while sent < n and sent - got < window:
            s.send(_query(sent & 0xFFFF, bool(sent & 1)))
            sent += 1
        s.recv(4096)
        got += 1
    s.close()


def _instructions(mode: str, n: int, window: int, loop: str) -> int:
    with tempfile.TemporaryDirectory() as tmp:
        portfile = f"{tmp}/port"
        env = {**os.environ, "PYTHONHASHSEED": "0", "DNS_SIDECAR_NO_UVLOOP": "1"}
        env.pop("DNS_SIDECAR_NO_FASTPATH", None)
        if mode == "python":
            env["DNS_SIDECAR_NO_FASTPATH"] = "1"
        cmd = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={tmp}/cg.out",
               sys.executable, os.path.abspath(__file__), "--serve", portfile,
               "--n", str(n + 1), "--loop", loop]
        proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, env=env)
        try:
            deadline = time.monotonic() + 300
            while not os.path.exists(portfile):
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit(f"server did not start: {proc.stderr.read()[-2000:]}")
                time.sleep(0.2)
            _client(int(open(portfile).read()), n, window)
            _out, err = proc.communicate(timeout=600)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        found = re.search(r"Collected : (\d+)", err)
        if proc.returncode or not found:
            raise SystemExit(f"callgrind run failed ({proc.returncode}):\n{err[-2000:]}")
        return int(found.group(1))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mode", choices=("fast", "python", "both"), default="both")
    ap.add_argument("--window", type=int, default=16, help="queries outstanding")
    ap.add_argument("--loop", choices=("uvloop", "asyncio"), default="uvloop")
    ap.add_argument("--short", type=int, default=5_000)
    ap.add_argument("--long", type=int, default=25_000)
    ap.add_argument("--serve", help=argparse.SUPPRESS)
    ap.add_argument("--n", type=int, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.serve:
        if a.loop == "uvloop":
            import uvloop

            uvloop.run(_serve(a.serve, a.n))
        else:
            asyncio.run(_serve(a.serve, a.n))
        return
    if shutil.which("valgrind") is None:
        raise SystemExit("valgrind is not installed (apt-get install valgrind)")
    for mode in (("fast", "python") if a.mode == "both" else (a.mode,)):
        lo = _instructions(mode, a.short, a.window, a.loop)
        hi = _instructions(mode, a.long, a.window, a.loop)
        print(f"{mode} on {a.loop}: {(hi - lo) / (a.long - a.short):,.0f} instructions per hit"
              f" (window {a.window}; {a.short} and {a.long} hits: {lo:,} and {hi:,})")


if __name__ == "__main__":
    main()
