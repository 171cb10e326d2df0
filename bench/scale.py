"""Benchmark 6: memory and hit latency with 10k, 100k and 1M cached entries.

The real dns-sidecar process (uvloop, --cache-size above the largest level) is filled through
DNS: dnsperf sends each name of a generated set once (cold names under the `*.w.bench.test`
wildcard, one A record each) at a bounded rate, so every entry goes through the normal miss
path. At each level: cache entries (from GET /stats), VmRSS of the process, bytes per entry
((RSS - RSS before filling) / entries), and hit latency at a fixed rate (dnsperf -Q, p50/p99)
over 1,000 names drawn at random from the filled set.

    python -m bench.scale [--levels 10000,100000,1000000] [--fill-rate 2500]
"""

from __future__ import annotations

import argparse
import random
import time

from . import common, peers, zone


def run(nsd: peers.Server, levels: list[int], fill_rate: int = 2500, lat_seconds: float = 5.0,
        rate: int = 5000) -> dict:
    d = common.tmpdir("scale-")
    out: dict = {"config": {"levels": levels, "fill_rate": fill_rate, "lat_seconds": lat_seconds,
                            "rate": rate}, "levels": []}
    sc = peers.start_sidecar(nsd.port, uvloop=True, http=True, cache_size=max(levels) + 10000)
    try:
        tag = f"s{int(time.time()) % 100000}x"
        probe = str(zone.write_queries(f"{d}/probe.txt", zone.hit_names(1000)))
        common.dnsperf(sc.port, probe, seconds=5, maxruns=1, qps=5000)
        time.sleep(0.5)
        base_entries = sc.http_json("/stats")["cache"]["entries"]
        rss0 = sc.rss()
        out["rss_start_bytes"] = rss0
        out["entries_start"] = base_entries
        filled = 0
        for level in levels:
            n = level - filled
            names = zone.cold_names(tag, n, start=filled)
            qfile = str(zone.write_queries(f"{d}/fill.txt", names))
            t0 = time.monotonic()
            r = common.dnsperf(sc.port, qfile, seconds=n / fill_rate * 3 + 30, maxruns=1,
                               qps=fill_rate, outstanding=500, timeout_s=5)
            fill_s = time.monotonic() - t0
            filled = level
            time.sleep(0.5)
            st = sc.http_json("/stats")["cache"]
            entries = st["entries"] - base_entries
            rss = sc.rss()
            sample = random.Random(level).sample(zone.cold_names(tag, level), min(1000, level))
            lfile = str(zone.write_queries(f"{d}/lat.txt", sample))
            common.dnsperf(sc.port, lfile, seconds=5, maxruns=1, qps=10000)  # re-fetch any lost
            lr = common.dnsperf(sc.port, lfile, seconds=lat_seconds, qps=rate, clients=1,
                                outstanding=100, verbose=True)
            m = {"level": level, "entries": entries, "cache_entries_total": st["entries"],
                 "evictions": st.get("evictions"), "rss_bytes": rss,
                 "bytes_per_entry": (rss - rss0) / entries if entries else None,
                 "fill_seconds": fill_s, "fill_completed": r.completed, "fill_lost": r.lost,
                 "fill_qps": r.qps, "hit_p50_us": common.pct(lr.latencies, 50) * 1e6,
                 "hit_p99_us": common.pct(lr.latencies, 99) * 1e6, "hit_lost": lr.lost,
                 "hit_rcodes": lr.rcodes}
            out["levels"].append(m)
            common.log(f"scale {level}: entries {entries}, rss {rss / 2**20:.0f} MiB, "
                       f"{m['bytes_per_entry'] or 0:.0f} B/entry, hit p50 {m['hit_p50_us']:.0f} us "
                       f"p99 {m['hit_p99_us']:.0f} us, fill {fill_s:.0f}s ({r.qps:.0f}/s, lost {r.lost})")
    finally:
        sc.stop()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--levels", default="10000,100000,1000000")
    ap.add_argument("--fill-rate", type=int, default=2500)
    ap.add_argument("--lat-seconds", type=float, default=5.0)
    a = ap.parse_args()
    common.install_signal_handlers()
    nsd = peers.start_nsd()
    try:
        res = run(nsd, [int(x) for x in a.levels.split(",")], a.fill_rate, a.lat_seconds)
    finally:
        nsd.stop()
    print(common.save_json("scale", res))


if __name__ == "__main__":
    main()
