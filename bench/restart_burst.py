"""The crawler burst right after a sidecar restart: cold versus warm from the snapshot.

Same layout as bench.crawler_burst (whose functions this imports): a network namespace this
script creates, nsd for bench.test behind bench/delay_proxy.py on 127.0.0.1:53 adding 50 ms per
upstream query, nginx (or aiohttp.web) answering on 127.0.0.10-17:8080, the crawler fetching
through `client.sidecar_connector()` from dns-sidecar (uvloop) on 127.0.0.1:5353 with
`--cache-file F`.

One variant of a round:

    fill      start a sidecar on an empty F, crawl N new hosts (the cache fills)
    restart   SIGTERM it, wait for its exit (code 0 expected; it writes F), then
                warm: keep F          cold: delete F
              and start a new process with the very same flags
    burst     crawl the same N hosts again through a new connector (client caches empty)

Both variants run in every round, in alternating order (no variant is always first after a
pause), each on its own N hosts. Recorded per burst: p50/p90/p99/max time-to-first-byte, wall
time, errors; upstream queries during the burst, from the new sidecar's /stats
(`upstreams[].queries`, exact) and from the delay proxy's counters (what reached the upstream,
as a cross-check); the new process's time from spawn to `/readyz` 200, `snapshot.entries_loaded`
and `snapshot.load_seconds`; the old process's exit code and SIGTERM-to-exit time, and the
snapshot file's size. Upstream query counts do not depend on the machine's load; the times do.

    python -m bench.restart_burst [--rounds 2] [--hosts 500] [--delay-ms 50] [--deadline 900]

Bounded: every crawl has a 30 s client timeout, every process start and stop a deadline, and
the whole run `--deadline` seconds (variants not started by then are skipped). Every process is
stopped and the namespace deleted at the end, also on error or SIGTERM/SIGINT.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

from . import common, crawler_burst, netns, peers
from .crawler_burst import SIDECAR_HTTP, SIDECAR_PORT, UPSTREAM_PORT

VARIANTS = ("warm", "cold")
STOP_DEADLINE_S = 30.0
READY_DEADLINE_S = 30.0
# what one variant may take at worst: two crawls (30 s client timeout each), a stop, two starts
VARIANT_BUDGET_S = 2 * 30 + STOP_DEADLINE_S + 2 * READY_DEADLINE_S


# ---------------------------------------------------------------------------------------------
# the sidecar process, started and restarted with the same flags


def _http_get(path: str, timeout: float = 2.0) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{SIDECAR_HTTP}{path}",  # noqa: S310
                                    timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def wait_ready(proc: subprocess.Popen, t_spawn: float, deadline_s: float = READY_DEADLINE_S) -> float:
    """Seconds from ``t_spawn`` until ``/readyz`` says 200. The API binds after the snapshot
    load and the DNS listeners, so 200 means the process answers DNS from the loaded cache."""
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise RuntimeError(f"the sidecar exited with code {proc.returncode} before ready")
        with contextlib.suppress(OSError):
            status, _ = _http_get("/readyz", timeout=0.5)
            if status == 200:
                return time.perf_counter() - t_spawn
        time.sleep(0.005)
    raise RuntimeError(f"the sidecar was not ready within {deadline_s:g} s")


def start_sidecar(argv: list[str], log: str, cpu: int | None) -> tuple[subprocess.Popen, float]:
    """Spawn the sidecar (uvloop) and wait for ready; (process, seconds from spawn to ready).
    Not peers.start_sidecar: its readiness probe is a DNS query for h0.bench.test, which would
    be an upstream query on a cold start and none on a warm one, skewing the counts."""
    env = dict(os.environ)
    env.pop("DNS_SIDECAR_NO_UVLOOP", None)
    if not common.port_free(SIDECAR_PORT):
        raise RuntimeError(f"127.0.0.1:{SIDECAR_PORT} is still in use")
    t0 = time.perf_counter()
    proc = common.spawn(argv, cpu=cpu, env=env, log=log)
    return proc, wait_ready(proc, t0)


def sigterm_and_wait(proc: subprocess.Popen, deadline_s: float = STOP_DEADLINE_S) -> dict:
    """SIGTERM (the sidecar saves its snapshot, drains, saves again, exits) and wait for the
    exit; SIGKILL only past the deadline, which the result then says."""
    t0 = time.perf_counter()
    os.kill(proc.pid, signal.SIGTERM)  # taskset execs, so the pid is the sidecar's
    try:
        rc = proc.wait(deadline_s)
        killed = False
    except subprocess.TimeoutExpired:
        rc, killed = None, True
    stop_s = time.perf_counter() - t0
    common.stop(proc)  # reaps whatever is left in its process group
    return {"exit_code": rc, "killed": killed, "stop_s": round(stop_s, 3)}


def sidecar_stats() -> dict:
    status, body = _http_get("/stats", timeout=10)
    if status != 200:
        raise RuntimeError(f"/stats answered {status}")
    return json.loads(body)


def upstream_queries(stats: dict) -> int:
    return sum(u.get("queries", 0) for u in stats.get("upstreams", []))


# ---------------------------------------------------------------------------------------------
# one variant: fill, restart, burst


def variant(kind: str, hosts: list[str], a: argparse.Namespace, proxy: peers.Server,
            workdir: str, cpu: int | None) -> dict:
    cache_file = Path(workdir) / "cache.snapshot"
    cache_file.unlink(missing_ok=True)  # every fill starts from an empty cache
    argv = peers.sidecar_argv() + [
        "--listen", f"127.0.0.1:{SIDECAR_PORT}", "--http", f"127.0.0.1:{SIDECAR_HTTP}",
        "--upstream", f"127.0.0.1:{UPSTREAM_PORT}", "--min-ttl", "30",
        "--cache-size", "100000", "--log-level", "warning", "--cache-file", str(cache_file),
    ]
    log = f"{workdir}/sidecar-{kind}.log"
    out: dict = {"variant": kind, "hosts": len(hosts)}
    old = new = None
    try:
        old, out["first_start_ready_s"] = start_sidecar(argv, log, cpu)
        fill = asyncio.run(crawler_burst.scenario("B-cold", hosts, a.limit))
        fill.pop("_ttfb")
        out["fill"] = fill
        out["fill_upstream_queries"] = upstream_queries(sidecar_stats())
        out["cache_entries_before_restart"] = sidecar_stats()["cache"]["entries"]

        out["stop"] = sigterm_and_wait(old)
        old = None
        out["snapshot_bytes"] = cache_file.stat().st_size if cache_file.exists() else None
        if kind == "cold":
            cache_file.unlink(missing_ok=True)

        new, out["start_to_ready_s"] = start_sidecar(argv, log, cpu)
        s0 = sidecar_stats()
        p0 = peers.proxy_counts(proxy)["total"]
        burst = asyncio.run(crawler_burst.scenario("B-warm", hosts, a.limit))
        p1 = peers.proxy_counts(proxy)["total"]
        s1 = sidecar_stats()
        ttfb = burst.pop("_ttfb")
        out["burst"] = burst
        # everything the new process sent upstream from its start to the end of the burst
        # (nothing else queries it: the readiness check is HTTP, not DNS)
        out["upstream_queries"] = upstream_queries(s1)
        out["upstream_queries_at_proxy"] = p1 - p0
        out["entries_loaded"] = s1.get("snapshot", {}).get("entries_loaded")
        out["snapshot_load_s"] = s1.get("snapshot", {}).get("load_seconds")
        out["burst_cache"] = {k: s1["cache"].get(k, 0) - s0["cache"].get(k, 0)
                              for k in ("hits", "misses", "coalesced")}
        out["_ttfb"] = ttfb
        out["final_stop"] = sigterm_and_wait(new)
        new = None
    finally:
        for p in (old, new):
            common.stop(p)
    return out


def inner(a: argparse.Namespace) -> dict:
    """Runs inside the namespace: the upstream and the web servers once, then the rounds."""
    t_end = time.monotonic() + a.deadline
    if common.have_cpus() > 1:
        os.sched_setaffinity(0, {common.LOAD_CPU})
    cpu = common.SERVER_CPU
    nsd = peers.start_nsd(names=10, crawl=a.rounds * len(VARIANTS) * a.hosts, port=5300, cpu=cpu)
    proxy = http = None
    out: dict = {"config": {k: v for k, v in vars(a).items() if k != "inner"},
                 "runs": {v: [] for v in VARIANTS}, "samples": {}, "skipped": []}
    try:
        proxy, http = crawler_burst.start_upstream_and_web(nsd.port, a.delay_ms, a.http_server,
                                                           cpu)
        workdir = common.tmpdir("restart-burst-")
        for rnd, kind, hosts in crawler_burst.alternating_rounds(
                VARIANTS, a.rounds, a.hosts, t_end, VARIANT_BUDGET_S, "restart_burst",
                out["skipped"], label="variant"):
            r = variant(kind, hosts, a, proxy, workdir, cpu)
            r["round"] = rnd
            ttfb = r.pop("_ttfb")
            if rnd == 0:
                out["samples"][kind] = [round(x * 1e3, 2) for x in sorted(ttfb)]
            out["runs"][kind].append(r)
            b = r["burst"]
            common.log(
                f"restart_burst round {rnd} {kind}: ready {r['start_to_ready_s']:.3f} s, "
                f"loaded {r['entries_loaded']}, p50 {b['ttfb_p50_ms'] or 0:.1f} ms, "
                f"p99 {b['ttfb_p99_ms'] or 0:.1f} ms, wall {b['wall_s']:.2f} s, "
                f"errors {b['errors']} {b['error_classes']}, upstream {r['upstream_queries']} "
                f"(proxy {r['upstream_queries_at_proxy']}), old exit {r['stop']['exit_code']}")
            time.sleep(0.2)
    finally:
        common.stop(http)
        if proxy is not None:
            proxy.stop()
        nsd.stop()
    return out


def run(rounds: int = 2, hosts: int = 500, delay_ms: float = 50.0, limit: int = 500,
        http_server: str | None = None, deadline: float = 900.0) -> dict:
    """Create the namespace, run `inner` in it, delete it (also on error)."""
    if (why := netns.missing()) is not None:
        return {"missing": why}
    env = dict(os.environ, BENCH_BASE_PORT=str(peers.BASE_PORT))
    # the inner run stops itself at --deadline; the margin covers one variant in progress
    res = netns.run_inner("dnsrestart", "bench.restart_burst", [
        "--rounds", str(rounds), "--hosts", str(hosts), "--delay-ms", str(delay_ms),
        "--limit", str(limit), "--deadline", str(deadline),
        "--http-server", http_server or crawler_burst.default_http_server()],
        timeout=deadline + VARIANT_BUDGET_S + 60, env=env)
    if "missing" in res:
        return res
    res["summary"] = summarize(res.get("runs", {}))
    res["host"] = {"cpu_model": common.cpu_model(), "cpus": os.cpu_count(),
                   "loadavg_after": os.getloadavg()}
    return res


SUMMARY_KEYS = {
    "burst": ("ttfb_p50_ms", "ttfb_p90_ms", "ttfb_p99_ms", "ttfb_max_ms", "wall_s", "errors"),
    "": ("upstream_queries", "upstream_queries_at_proxy", "start_to_ready_s", "entries_loaded",
         "snapshot_load_s", "snapshot_bytes"),
}


def summarize(runs: dict) -> dict:
    """Median, min and max over the rounds of each number, per variant."""
    s: dict = {}
    for kind, rs in runs.items():
        if not rs:
            continue
        d: dict = {}
        for where, keys in SUMMARY_KEYS.items():
            for k in keys:
                vals = [(r[where] if where else r).get(k) for r in rs]
                d[k] = common.summarize([v for v in vals if v is not None])
        d["old_exit_codes"] = [r["stop"]["exit_code"] for r in rs]
        s[kind] = d
    # within a round both variants saw the same background load, so their ratio is steadier
    # on a shared machine than either time alone
    ratios = []
    for w in runs.get("warm", []):
        c = next((x for x in runs.get("cold", []) if x["round"] == w["round"]), None)
        if c and c["burst"].get("ttfb_p99_ms") and w["burst"].get("ttfb_p99_ms"):
            ratios.append(w["burst"]["ttfb_p99_ms"] / c["burst"]["ttfb_p99_ms"])
    if ratios:
        s["p99_warm_over_cold"] = common.summarize(ratios)
    return s


def main() -> None:
    a = crawler_burst.burst_args(__doc__, 2, "variants").parse_args()
    common.install_signal_handlers()
    if a.inner:
        netns.report(inner(a))
        return
    res = run(a.rounds, a.hosts, a.delay_ms, a.limit, a.http_server, a.deadline)
    if "missing" in res:
        common.log(f"restart_burst: {res['missing']}")
    print(common.save_json("restart_burst", res))


if __name__ == "__main__":
    main()
