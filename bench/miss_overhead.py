"""Benchmark 3: miss overhead.

A blocking Python client (pinned to CPU 0) sends one query at a time for a name nobody has
asked before (answered by nsd's `*.w.bench.test` wildcard) to each cache, and the same kind of
fresh name straight to nsd. Queries are interleaved (direct, cache A, cache B, ...) so all
targets see the same background. Overhead = median(cache) - median(direct) in the same round.

    python -m bench.miss_overhead [--rounds 3] [--queries 300]
"""

from __future__ import annotations

import argparse
import os
import socket
import time

from . import common, peers, zone


def ask_timed(sock: socket.socket, port: int, name: str, qid: int) -> float | None:
    q = common.build_query(name, 1, qid)
    t0 = time.perf_counter_ns()
    sock.sendto(q, ("127.0.0.1", port))
    while True:
        try:
            data, _ = sock.recvfrom(4096)
        except TimeoutError:
            return None
        if data[:2] == q[:2]:
            t1 = time.perf_counter_ns()
            return (t1 - t0) / 1e3 if common.rcode_of(data) == 0 and common.ancount_of(data) else None


def run(nsd: peers.Server, names: list[str], rounds: int = 3, queries: int = 300) -> dict:
    if common.have_cpus() > 1:
        os.sched_setaffinity(0, {common.LOAD_CPU})
    servers: dict[str, peers.Server] = {}
    targets = ["direct"] + names
    out: dict = {"config": {"rounds": rounds, "queries": queries},
                 "peers": {n: [] for n in targets}}
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.settimeout(2.0)
    try:
        for n in names:
            servers[n] = peers.start_peer(n, nsd.port)
        ports = {"direct": nsd.port} | {n: s.port for n, s in servers.items()}
        tag = f"m{os.getpid()}x{int(time.time()) % 100000}"
        for rnd in range(rounds):
            lat: dict[str, list[float]] = {n: [] for n in targets}
            fails = dict.fromkeys(targets, 0)
            for i in range(queries):
                for k, n in enumerate(targets):
                    name = f"{tag}r{rnd}q{i}t{k}.w.{zone.ZONE}"
                    v = ask_timed(sock, ports[n], name, (i * 16 + k) & 0xFFFF)
                    if v is None:
                        fails[n] += 1
                    else:
                        lat[n].append(v)
            base = common.median(lat["direct"])
            for n in targets:
                m = {"round": rnd, "answered": len(lat[n]), "failed": fails[n],
                     "p50_us": common.pct(lat[n], 50), "p90_us": common.pct(lat[n], 90),
                     "p99_us": common.pct(lat[n], 99),
                     "overhead_p50_us": common.pct(lat[n], 50) - base}
                out["peers"][n].append(m)
            line = ", ".join(f"{n} {out['peers'][n][-1]['p50_us']:.0f}us" for n in targets)
            common.log(f"miss_overhead round {rnd}: {line}")
    finally:
        sock.close()
        for s in servers.values():
            s.stop()
    out["summary"] = {n: {k: common.summarize([r[k] for r in runs])
                          for k in ("p50_us", "p99_us", "overhead_p50_us")}
                      | {"failed": sum(r["failed"] for r in runs)}
                      for n, runs in out["peers"].items()}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--queries", type=int, default=300)
    ap.add_argument("--peers", default=",".join(peers.CACHES))
    a = ap.parse_args()
    peers.run_against_nsd("miss_overhead", run, a.peers.split(","), a.rounds, a.queries)


if __name__ == "__main__":
    main()
