"""Benchmark 2: cache-hit latency at a fixed query rate.

dnsperf -Q RATE -v (pinned to CPU 0) sends UDP queries for a warm set of names to each cache
(pinned to CPU 1) in alternating rounds; every answer's latency is taken from dnsperf's verbose
output, giving p50 / p90 / p99 / p99.9 per run. The latency includes dnsperf's own send and
receive path, the same for every peer.

    python -m bench.hit_latency [--rounds 3] [--seconds 10] [--rate 5000]
"""

from __future__ import annotations

import argparse

from . import common, peers, zone


def run(nsd: peers.Server, names: list[str], rounds: int = 3, seconds: float = 10.0,
        rate: int = 5000, warm_names: int = 1000) -> dict:
    d = common.tmpdir("lat-")
    qfile = str(zone.write_queries(f"{d}/queries.txt", zone.hit_names(warm_names)))
    servers: dict[str, peers.Server] = {}
    out: dict = {"config": {"rounds": rounds, "seconds": seconds, "rate": rate,
                            "warm_names": warm_names},
                 "peers": {n: [] for n in names}, "samples": {}}
    try:
        for n in names:
            servers[n] = peers.start_peer(n, nsd.port)
            common.dnsperf(servers[n].port, qfile, seconds=10, maxruns=1, qps=20000)
        for rnd in range(rounds):
            for n in common.rotated(names, rnd):
                common.dnsperf(servers[n].port, qfile, seconds=common.LEAD_IN_S, qps=rate,
                               clients=1, outstanding=100)
                r = common.dnsperf(servers[n].port, qfile, seconds=seconds, qps=rate,
                                   clients=1, outstanding=100, verbose=True)
                lat = r.latencies
                m = {"round": rnd, "answered": len(lat), "sent": r.sent, "lost": r.lost,
                     "qps": r.qps, "loadavg": open("/proc/loadavg").read().split()[0]}
                for p in (50, 90, 99, 99.9):
                    m[f"p{p:g}_us"] = common.pct(lat, p) * 1e6 if lat else None
                m["max_us"] = max(lat) * 1e6 if lat else None
                out["peers"][n].append(m)
                if rnd == 0 and lat:
                    # a thinned sample for the CDF plot
                    step = max(1, len(lat) // 5000)
                    out["samples"][n] = [round(x * 1e6, 1) for x in sorted(lat)[::step]]
                common.log(f"hit_latency round {rnd} {n}: p50 {m['p50_us'] or 0:.0f} us, "
                           f"p99 {m['p99_us'] or 0:.0f} us, lost {r.lost}")
    finally:
        for s in servers.values():
            s.stop()
    out["summary"] = summarize(out["peers"])
    return out


def summarize(per_peer: dict) -> dict:
    s = {}
    for n, runs in per_peer.items():
        s[n] = {k: common.summarize([r[k] for r in runs if r.get(k) is not None])
                for k in ("p50_us", "p90_us", "p99_us", "p99.9_us", "max_us")}
        s[n]["lost"] = sum(r["lost"] for r in runs)
    for n, summary in common.ratios_to(per_peer, "p50_us").items():
        s[n]["p50_vs_dnsmasq"] = summary
    return s


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--rate", type=int, default=5000)
    ap.add_argument("--peers", default=",".join(peers.CACHES + peers.BASELINES))
    a = ap.parse_args()
    peers.run_against_nsd("hit_latency", run, a.peers.split(","), a.rounds, a.seconds, a.rate)


if __name__ == "__main__":
    main()
