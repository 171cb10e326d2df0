"""How long a lease waiter answers after the holder: the fleet cache's coalescing on a quiet
machine (docs/fleet.md, issue 18).

Two sidecars (uvloop, CPU 1) share one redis-server; a fake upstream on loopback answers
after ``--latency-ms``. For each of ``--names`` fresh names, one at a time, the client (CPU 0)
asks sidecar A, then ``--gap-ms`` later sidecar B: A takes the lease and resolves upstream, B
waits for A's value. Recorded per name: A's answer time, B's answer time, and B's answer
after A's (what the wait adds to the holder's answer: A's write, and the notice or poll that
brings it to B). Both sidecars' shared_cache counters come from /stats.

    python -m bench.fleet_wait [--names 200] [--latency-ms 50] [--gap-ms 2]

Bounded: every query has a 2 s timeout, every process is stopped at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request

from sidecar.testing.redisserver import RedisServer, available, free_port

from . import common, peers, zone


def _ms(xs: list[float], p: float) -> float:
    return round(common.pct(xs, p) * 1000, 3)


def _stats(port: int) -> dict:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/stats", timeout=2) as r:
        return json.load(r)["shared_cache"]


def measure(a: int, b: int, names: int, gap: float, tag: str) -> dict:
    if (os.cpu_count() or 1) > 1:
        os.sched_setaffinity(0, {0})
    sa = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sb = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sa.settimeout(2.0)
    sb.settimeout(2.0)
    ta, tb, after = [], [], []
    lost = 0
    try:
        for i in range(names):
            q = common.build_query(f"{tag}{i}.{zone.ZONE}", 1, i & 0xFFFF)
            t0 = time.perf_counter()
            sa.sendto(q, ("127.0.0.1", a))
            time.sleep(gap)  # B must ask after A took the lease
            sb.sendto(q, ("127.0.0.1", b))
            try:
                sa.recv(4096)
                t_a = time.perf_counter()
                sb.recv(4096)
                t_b = time.perf_counter()
            except TimeoutError:
                lost += 1
                continue
            ta.append(t_a - t0)
            tb.append(t_b - t0 - gap)
            after.append(t_b - t_a)
    finally:
        sa.close()
        sb.close()
    out = {"names": names, "lost": lost}
    for key, xs in (("holder_ms", ta), ("waiter_ms", tb), ("waiter_after_holder_ms", after)):
        out[key] = {"p50": _ms(xs, 50), "p90": _ms(xs, 90), "p99": _ms(xs, 99)}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--names", type=int, default=200)
    ap.add_argument("--latency-ms", type=float, default=50.0)
    ap.add_argument("--gap-ms", type=float, default=2.0)
    a = ap.parse_args()
    if available() is not None:
        raise SystemExit(f"fleet_wait: {available()}")
    up_port = free_port()
    zfile = os.path.join(common.tmpdir("fleet-wait-"), "zone")
    with open(zfile, "w") as f:
        f.write(f"{zone.ZONE}. 3600 IN SOA ns.{zone.ZONE}. h.{zone.ZONE}. 1 3600 600 86400 60\n")
        for n in ["h0"] + [f"w{i}" for i in range(a.names)]:
            f.write(f"{n}.{zone.ZONE}. 300 IN A 127.0.0.1\n")
    upstream = subprocess.Popen([sys.executable, "-m", "sidecar.testing.fakeupstream",
                                 "--port", str(up_port), "--latency", str(a.latency_ms / 1000),
                                 "--zone-file", zfile, "--no-default-zone"],
                                stdout=subprocess.DEVNULL)
    servers = []
    try:
        with RedisServer() as redis:
            url = redis.url
            ports = []
            for name in ("fleet-a", "fleet-b"):
                port, http = free_port(), free_port()
                servers.append(peers.start_sidecar(
                    up_port, port=port, name=name, http=True, http_port=http,
                    extra_args=["--shared-cache", url, "--shared-cache-timeout", "200"]))
                ports.append((port, http))
            result = measure(ports[0][0], ports[1][0], a.names, a.gap_ms / 1000, "w")
            result["shared_cache"] = {n: _stats(h) for n, (_p, h) in zip("ab", ports, strict=True)}
            for side in result["shared_cache"].values():
                for k in ("url", "prefix", "errors", "rejected", "rtt_ms"):
                    side.pop(k, None)
            print(json.dumps(result, indent=1))
    finally:
        for s in servers:
            common.stop(s.proc)
        upstream.terminate()
        upstream.wait(5)


if __name__ == "__main__":
    main()
