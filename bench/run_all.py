"""Run the whole benchmark suite in one command and regenerate docs/benchmarks.md.

    sudo bash bench/setup.sh                 # once: dnsperf/resperf, dnsmasq, unbound, nsd, nginx, matplotlib
    python -m bench.run_all [--rounds 3] [--out docs]
    python -m bench.run_all --smoke          # seconds per benchmark, < 2 minutes, no thresholds

Results go to bench/results/*.json (gitignored); with --out the report is rewritten there
(docs/benchmarks.md, docs/img/*.png). A smoke run writes its report to bench/results/smoke/
unless --out is given, so it never overwrites the published numbers by accident.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import shutil
import sys
import time
import traceback
from pathlib import Path

if __package__ in (None, ""):  # `python -m bench.run_all`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    __package__ = "bench"

from bench import (
    coalescing,
    common,
    crawler_burst,
    hit_latency,
    hit_throughput,
    miss_overhead,
    miss_throughput,
    peers,
    profile,
    report,
    scale,
)

ALL = ["hit_throughput", "hit_latency", "miss_overhead", "miss_throughput", "coalescing",
       "crawler_burst", "scale", "profile"]


def meta(args, argv: list[str]) -> dict:
    mem = "?"
    with contextlib.suppress(OSError), open("/proc/meminfo") as f:
        mem = f"{int(f.readline().split()[1]) / 2**20:.1f} GiB"
    osname = platform.platform()
    with contextlib.suppress(OSError), open("/etc/os-release") as f:
        for line in f:
            if line.startswith("PRETTY_NAME="):
                osname = line.split("=", 1)[1].strip().strip('"') + f", kernel {platform.release()}"
    return {
        "date": time.strftime("%Y-%m-%d %H:%M %Z"),
        "command": "python -m bench.run_all " + " ".join(argv),
        "smoke": args.smoke,
        "cpu": common.cpu_model(),
        "cpus": os.cpu_count(),
        "memory": mem,
        "os": osname,
        "loadavg": open("/proc/loadavg").read().strip(),
        "versions": peers.versions(),
    }


def check_tools() -> list[str]:
    return [t for t in ("dnsperf", "resperf", "nsd", "dnsmasq", "unbound", "taskset", "ip")
            if shutil.which(t) is None]


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="a seconds-long run of everything")
    ap.add_argument("--rounds", type=int, default=None, help="rounds (default 3; smoke 1)")
    ap.add_argument("--out", default=None, help="where benchmarks.md and img/ go (default docs/)")
    ap.add_argument("--only", default=",".join(ALL), help="comma-separated subset of " + ",".join(ALL))
    ap.add_argument("--scale-levels", default=None, help="default 10000,100000,1000000")
    args = ap.parse_args(argv)
    common.install_signal_handlers()
    missing = check_tools()
    if missing:
        print(f"missing tools: {', '.join(missing)}; run: sudo bash bench/setup.sh", file=sys.stderr)
        return 1
    smoke = args.smoke
    rounds = args.rounds or (1 if smoke else 3)
    results = common.RESULTS_DIR / "smoke" if smoke else common.RESULTS_DIR
    out = Path(args.out) if args.out else (results if smoke else common.REPO_DIR / "docs")
    common.RESULTS_DIR = results
    results.mkdir(parents=True, exist_ok=True)
    only = set(args.only.split(","))

    have_sidecar = peers.sidecar_available()
    caches = [p for p in peers.CACHES if have_sidecar or not p.startswith("sidecar")]
    if not have_sidecar:
        common.log("dns-sidecar is not installed: running the peers only")
    common.save_json("meta", meta(args, argv))
    failures = []
    t_start = time.monotonic()
    nsd = peers.start_nsd()
    try:
        steps = [
            ("hit_throughput", lambda: hit_throughput.run(
                nsd, caches + peers.BASELINES, rounds, 1.5 if smoke else 10.0)),
            ("hit_latency", lambda: hit_latency.run(
                nsd, caches + peers.BASELINES, rounds, 1.5 if smoke else 10.0, 5000)),
            ("miss_overhead", lambda: miss_overhead.run(nsd, caches, rounds, 30 if smoke else 300)),
            ("miss_throughput", lambda: miss_throughput.run(
                nsd, [p for p in miss_throughput.MISS_PEERS if p in caches], rounds,
                2.0 if smoke else 10.0, 40000)),
            ("coalescing", lambda: coalescing.run(nsd, caches, rounds, 1000, 100.0)),
            ("scale", lambda: scale.run(
                nsd, [int(x) for x in (args.scale_levels or (
                    "2000,10000" if smoke else "10000,100000,1000000")).split(",")],
                lat_seconds=1.5 if smoke else 5.0) if have_sidecar else
                {"missing": "dns-sidecar not installed"}),
            ("profile", lambda: profile.run(nsd, 2 if smoke else 8) if have_sidecar else
                {"missing": "dns-sidecar not installed"}),
        ]
        for name, fn in steps:
            if name not in only:
                continue
            common.log(f"=== {name}")
            try:
                common.save_json(name, fn())
            except Exception:
                failures.append(name)
                traceback.print_exc()
    finally:
        nsd.stop()
    if "crawler_burst" in only:
        common.log("=== crawler_burst")
        try:
            hosts = 100 if smoke else 500
            main_server = crawler_burst.default_http_server()
            common.save_json("crawler_burst", crawler_burst.run(rounds, hosts, 50.0,
                                                                http_server=main_server))
            if main_server == "nginx":
                # The earlier layout (web servers in Python), same run, for comparison.
                common.save_json("crawler_burst_aiohttp", crawler_burst.run(
                    rounds, hosts, 50.0, http_server="aiohttp"))
        except Exception:
            failures.append("crawler_burst")
            traceback.print_exc()
    md = report.write(results, out)
    common.log(f"report: {md}; {time.monotonic() - t_start:.0f} s"
               + (f"; FAILED: {', '.join(failures)}" if failures else ""))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
