"""Benchmark 3b: cache-miss throughput, the crawler's fan-out capacity (resperf).

resperf (pinned to CPU 0, beside nsd) sends never-seen names (the zone's ``*.w`` wildcard, a
fresh set per peer and round, so every query is a miss that the cache must forward to nsd) at
a rate it ramps from zero to ``--max-qps`` over ``--ramp`` seconds, and reports the highest
rate of answers it saw. Each cache is pinned to CPU 1. Before that, in the same round, dnsperf sends
other never-seen names at a fixed rate every peer sustains (``--steady-qps``, 5 s): the cache's
CPU time per answered miss there (utime+stime from /proc / answers) is the cost of one miss end
to end (client query in, upstream query out, reply in, entry built, answer out), without the
work an overloaded server spends on queries it answers too late.

    python -m bench.miss_throughput [--rounds 3] [--ramp 10] [--max-qps 40000] [--steady-qps 5000]

Bounded: resperf stops after ``--ramp`` seconds (plus its 2 s query timeout) and sends at most
``ramp * max_qps / 2`` queries; the steady run sends each of its names once, for 5 s.
"""

from __future__ import annotations

import argparse
import re
import time

from . import common, peers, zone

MISS_PEERS = ["sidecar-uvloop", "dnsmasq", "unbound"]

_RE = {
    "max_qps": re.compile(r"Maximum throughput:\s+([\d.]+)\s+qps"),
    "lost_at_max": re.compile(r"Lost at that point:\s+(\d+)\s+queries"),
    "sent": re.compile(r"Queries sent:\s+(\d+)"),
    "completed": re.compile(r"Queries completed:\s+(\d+)"),
}


def resperf(port: int, datafile: str, *, ramp_s: float, max_qps: int, workdir: str,
            cpu: int | None = common.LOAD_CPU) -> dict:
    """Run resperf once (bounded by -r and -t); its summary numbers as a dict."""
    argv = common.taskset_prefix(cpu) + [
        "resperf", "-s", "127.0.0.1", "-p", str(port), "-d", datafile, "-m", str(max_qps),
        "-r", f"{ramp_s:g}", "-c", "0", "-t", "2", "-b", "4096", "-P", f"{workdir}/plot.txt"]
    out = common.run_bounded(argv, ramp_s + 60)
    res: dict = {"raw": out[-1500:]}
    for k, rx in _RE.items():
        m = rx.search(out)
        res[k] = float(m.group(1)) if m else None
    return res


STEADY_S = 5.0


def measure(srv: peers.Server, names: list[str], steady: list[str], ramp_s: float,
            max_qps: int, steady_qps: int) -> dict:
    d = common.tmpdir("resperf-")
    # The steady run first: after the ramp an overloaded server still works off its backlog.
    sfile = str(zone.write_queries(f"{d}/steady.txt", steady))
    c1 = srv.cpu()
    p = common.dnsperf(srv.port, sfile, seconds=STEADY_S, qps=steady_qps, maxruns=1)
    steady_cpu = srv.cpu() - c1
    time.sleep(0.5)
    qfile = str(zone.write_queries(f"{d}/queries.txt", names))
    c0, t0 = srv.cpu(), time.monotonic()
    r = resperf(srv.port, qfile, ramp_s=ramp_s, max_qps=max_qps, workdir=d)
    cpu, wall = srv.cpu() - c0, time.monotonic() - t0
    done = r.get("completed") or 0
    if r.get("max_qps"):
        r.pop("raw", None)
    time.sleep(2.0)  # the ramp's backlog is worked off before the next peer runs
    return {**r, "server_cpu_s": cpu, "wall_s": wall,
            "server_cpu_us_per_answer": cpu / done * 1e6 if done else None,
            "steady_qps": p.qps, "steady_completed": p.completed, "steady_lost": p.lost,
            "steady_cpu_us_per_miss": steady_cpu / p.completed * 1e6 if p.completed else None}


def run(nsd: peers.Server, names: list[str], rounds: int = 3, ramp_s: float = 10.0,
        max_qps: int = 40000, steady_qps: int = 5000) -> dict:
    per_run = int(ramp_s * max_qps / 2) + 1000  # resperf's ramp sends about half of r x m
    per_steady = int(STEADY_S * steady_qps) + 1000
    servers: dict[str, peers.Server] = {}
    out: dict = {"config": {"rounds": rounds, "ramp_s": ramp_s, "max_qps": max_qps,
                            "steady_qps": steady_qps, "steady_s": STEADY_S,
                            "resperf": f"-m {max_qps} -r {ramp_s:g} -t 2 (UDP), pinned CPU 0 "
                                       "with nsd; caches pinned CPU 1; every query a miss"},
                 "peers": {n: [] for n in names}}
    try:
        for n in names:
            servers[n] = peers.start_peer(n, nsd.port)
        for rnd in range(rounds):
            for n in common.rotated(names, rnd):
                tag = f"{rnd}{n.replace('-', '')}"
                m = measure(servers[n], zone.cold_names(f"rp{tag}", per_run),
                            zone.cold_names(f"st{tag}", per_steady), ramp_s, max_qps, steady_qps)
                m["round"] = rnd
                out["peers"][n].append(m)
                common.log(f"miss_throughput round {rnd} {n}: max {m['max_qps'] or 0:.0f} q/s "
                           f"(completed {m['completed']} of {m['sent']}); at {steady_qps} q/s "
                           f"{m['steady_cpu_us_per_miss'] or 0:.1f} us CPU per miss, "
                           f"lost {m['steady_lost']}")
    finally:
        for s in servers.values():
            s.stop()
    out["summary"] = summarize(out["peers"])
    return out


def summarize(per_peer: dict) -> dict:
    s = {}
    for n, runs in per_peer.items():
        s[n] = {
            "max_qps": common.summarize([r["max_qps"] for r in runs if r.get("max_qps")]),
            "cpu_us": common.summarize([r["steady_cpu_us_per_miss"] for r in runs
                                        if r.get("steady_cpu_us_per_miss")]),
            "steady_lost": sum(r.get("steady_lost") or 0 for r in runs),
        }
    for n, summary in common.ratios_to(per_peer, "max_qps").items():
        s[n]["qps_vs_dnsmasq"] = summary
    for n, summary in common.ratios_to(per_peer, "steady_cpu_us_per_miss").items():
        s[n]["cpu_vs_dnsmasq"] = summary
    return s


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--ramp", type=float, default=10.0, help="resperf's ramp time, seconds")
    ap.add_argument("--max-qps", type=int, default=40000, help="the ramp's final rate")
    ap.add_argument("--steady-qps", type=int, default=5000,
                    help="rate of the fixed-rate run that measures CPU per miss")
    ap.add_argument("--peers", default=",".join(MISS_PEERS))
    a = ap.parse_args()
    peers.run_against_nsd("miss_throughput", run, a.peers.split(","), a.rounds, a.ramp,
                          a.max_qps, a.steady_qps)


if __name__ == "__main__":
    main()
