"""What a second core would buy a node-local sidecar: its share of one core under a
crawler's mix of hits and cold misses (issue 19, "Scale and cores").

The real dns-sidecar process (uvloop, compiled UDP path where built) on CPU 1, nsd for
bench.test on CPU 0 with dnsperf. The hot set (1,000 names) is cached first. Then, per
offered rate, one pass of dnsperf at that rate (-Q) over a query file in which every
``--miss-every``-th query is a name nobody asked before (the ``*.w`` wildcard: a real
upstream query through nsd) and the rest are hot-set hits. Recorded per rate: queries
completed and lost, the sidecar's CPU seconds over the wall time of the pass (its share of
one core), the upstream queries it sent (/stats), and the rate one core would carry at that
mix (offered rate / share).

    python -m bench.core_share [--rates 5000,20000,50000] [--seconds 5] [--miss-every 10]
                               [--server sidecar|dnsmasq|unbound]

``--server`` runs the same passes against a peer (dnsmasq, Unbound with one thread) on the
same core, for the same share (upstream queries are then not counted).

Bounded: each pass is one run of dnsperf over a file of rate x seconds queries (-n 1, -l as
a cap); every process is stopped at the end.
"""

from __future__ import annotations

import argparse
import json
import time

from . import common, peers, zone


def upstream_queries(sc: peers.Server) -> int | None:
    if sc.http_port is None:
        return None
    st = sc.http_json("/stats")
    return sum(int(u.get("queries", 0)) for u in st.get("upstreams", []))


def one_rate(sc: peers.Server, rate: int, seconds: float, miss_every: int, tag: str) -> dict:
    hot = zone.hit_names(1000)
    n = int(rate * seconds)
    cold = zone.cold_names(tag, n // miss_every + 1)
    names = [cold[i // miss_every] if i % miss_every == miss_every - 1 else hot[i % len(hot)]
             for i in range(n)]
    qfile = str(zone.write_queries(f"{common.tmpdir('core-share-')}/q.txt", names))
    up0, cpu0, t0 = upstream_queries(sc), sc.cpu(), time.monotonic()
    up_end = None
    r = common.dnsperf(sc.port, qfile, seconds=seconds * 3, qps=rate, maxruns=1)
    wall = time.monotonic() - t0
    cpu = sc.cpu() - cpu0
    share = cpu / wall
    if up0 is not None:
        up_end = (upstream_queries(sc) or 0) - up0
    return {"offered_qps": rate, "completed": r.completed, "lost": r.lost,
            "achieved_qps": round(r.qps), "avg_latency_us": round(r.avg_lat * 1e6),
            "misses": n // miss_every, "upstream_queries": up_end,
            "cpu_s": round(cpu, 3), "wall_s": round(wall, 3),
            "core_share": round(share, 3),
            "one_core_qps_at_this_mix": round(r.qps / share) if share else None}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rates", default="5000,20000,50000")
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--miss-every", type=int, default=10)
    ap.add_argument("--server", choices=("sidecar", "dnsmasq", "unbound"), default="sidecar")
    a = ap.parse_args()
    common.install_signal_handlers()
    nsd = peers.start_nsd()
    sc = None
    try:
        sc = (peers.start_sidecar(nsd.port, uvloop=True, http=True) if a.server == "sidecar"
              else peers.start_peer(a.server, nsd.port))
        warm = str(zone.write_queries(f"{common.tmpdir('core-share-')}/hot.txt",
                                      zone.hit_names(1000)))
        common.dnsperf(sc.port, warm, seconds=10, maxruns=1, qps=5000)
        out = {"server": a.server, "miss_every": a.miss_every, "seconds": a.seconds,
               "udp_path": (sc.http_json("/stats").get("udp", {}).get("path")
                            if sc.http_port is not None else None), "rates": []}
        tag = f"cs{int(time.time()) % 100000}x"
        for i, rate in enumerate(int(x) for x in a.rates.split(",")):
            res = one_rate(sc, rate, a.seconds, a.miss_every, f"{tag}{i}r")
            common.log(f"core_share {rate} q/s: {res}")
            out["rates"].append(res)
        print(json.dumps(out, indent=1))
    finally:
        if sc is not None:
            sc.stop()
        nsd.stop()


if __name__ == "__main__":
    main()
