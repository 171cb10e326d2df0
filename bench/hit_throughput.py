"""Benchmark 1: cache-hit throughput and server CPU per query.

dnsperf (pinned to CPU 0) sends UDP queries for a warm set of names as fast as it can to each
cache (pinned to CPU 1), in alternating rounds (A B C ... A B C ...). Reported per peer and
round: answered queries/s, lost queries, and the server's CPU time per answered query
(utime+stime of the server's process tree from /proc/PID/stat over the run / answered queries).

    python -m bench.hit_throughput [--rounds 3] [--seconds 10] [--peers sidecar-uvloop,dnsmasq]
"""

from __future__ import annotations

import argparse
import resource
import time

from . import common, peers, zone

WARM_NAMES = 1000


def _children_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def _machine_busy() -> float:
    """Busy CPU seconds of the whole machine so far (all CPUs)."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    idle = v[3] + v[4]
    return (sum(v[:8]) - idle) / common.CLK_TCK


def measure(srv: peers.Server, qfile: str, seconds: float, **kw) -> dict:
    c0, d0, m0, t0 = srv.cpu(), _children_cpu(), _machine_busy(), time.monotonic()
    r = common.dnsperf(srv.port, qfile, seconds=seconds, **kw)
    c1, d1, m1, t1 = srv.cpu(), _children_cpu(), _machine_busy(), time.monotonic()
    cpu = c1 - c0
    load = d1 - d0
    return {
        "qps": r.qps,
        "completed": r.completed,
        "lost": r.lost,
        "sent": r.sent,
        "avg_latency_s": r.avg_lat,
        "server_cpu_s": cpu,
        "server_cpu_us_per_query": cpu / r.completed * 1e6 if r.completed else None,
        "server_cpu_share": cpu / (t1 - t0),
        "dnsperf_cpu_s": load,
        # CPU used by anything else on the machine during the run (other jobs, kernel threads)
        "foreign_cpu_s": max(0.0, (m1 - m0) - cpu - load),
        "wall_s": t1 - t0,
        "loadavg": open("/proc/loadavg").read().split()[0],
        "rcodes": r.rcodes,
    }


def run(nsd: peers.Server, names: list[str], rounds: int = 3, seconds: float = 10.0,
        warm_names: int = WARM_NAMES) -> dict:
    d = common.tmpdir("hits-")
    qfile = str(zone.write_queries(f"{d}/queries.txt", zone.hit_names(warm_names)))
    servers: dict[str, peers.Server] = {}
    out: dict = {"config": {"rounds": rounds, "seconds": seconds, "warm_names": warm_names,
                            "dnsperf": "-c 10 -q 200 (UDP), pinned CPU 0; servers pinned CPU 1"},
                 "peers": {n: [] for n in names}}
    try:
        for n in names:
            servers[n] = peers.start_peer(n, nsd.port)
            # warm every name once at a gentle rate, then check they all answer
            common.dnsperf(servers[n].port, qfile, seconds=10, maxruns=1, qps=20000)
        for rnd in range(rounds):
            for n in common.rotated(names, rnd):
                common.dnsperf(servers[n].port, qfile, seconds=common.LEAD_IN_S)
                common.drained(servers[n].port, zone.hit_names(1)[0])
                m = measure(servers[n], qfile, seconds)
                m["round"] = rnd
                out["peers"][n].append(m)
                common.log(f"hit_throughput round {rnd} {n}: {m['qps']:.0f} q/s, "
                           f"{m['server_cpu_us_per_query'] or 0:.1f} us/q, lost {m['lost']}, "
                           f"foreign cpu {m['foreign_cpu_s']:.1f}s")
    finally:
        for s in servers.values():
            s.stop()
    out["summary"] = summarize(out["peers"])
    return out


def summarize(per_peer: dict) -> dict:
    s = {}
    for n, runs in per_peer.items():
        s[n] = {
            "qps": common.summarize([r["qps"] for r in runs]),
            "cpu_us": common.summarize([r["server_cpu_us_per_query"] for r in runs
                                        if r["server_cpu_us_per_query"] is not None]),
            "lost": sum(r["lost"] for r in runs),
        }
    # ratios to dnsmasq computed per round (same round = same background), then the median
    for n, summary in common.ratios_to(per_peer, "qps").items():
        s[n]["qps_vs_dnsmasq"] = summary
    for n, summary in common.ratios_to(per_peer, "server_cpu_us_per_query").items():
        s[n]["cpu_vs_dnsmasq"] = summary
    return s


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--peers", default=",".join(peers.CACHES + peers.BASELINES))
    a = ap.parse_args()
    peers.run_against_nsd("hit_throughput", run, a.peers.split(","), a.rounds, a.seconds)


if __name__ == "__main__":
    main()
