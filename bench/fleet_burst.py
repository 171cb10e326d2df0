"""The fleet burst: three sidecars, each behind its own crawler, crawling the same cold hosts
at the same moment, with and without the fleet's shared cache (docs/fleet.md, issue 18).

Same layout as bench.restart_burst (whose pieces and bench.crawler_burst's this imports): a
network namespace this script creates, nsd for bench.test behind bench/delay_proxy.py on
127.0.0.1:53 adding 50 ms per upstream query, nginx (or aiohttp.web) on 127.0.0.10-17:8080,
plus one redis-server on 127.0.0.1 inside the namespace. Each crawler is its own process
(``python -m bench.fleet_burst --crawler ...``) fetching through
``client.sidecar_connector(address=its sidecar)`` from its own dns-sidecar (uvloop).

Scenarios of a round, each on its own N fresh hosts, in alternating order between rounds:

    shared     three sidecars with --shared-cache redis://127.0.0.1:PORT and a prefix of
               their own (--shared-cache-prefix fleetburst:R:KIND:), three crawlers
    alone      three sidecars without a shared cache, three crawlers
    single     one sidecar, one crawler: the reference p99 of one sidecar's cold burst
    shared-Tms with --shared-timeout-variant T (repeatable): "shared" with
               --shared-cache-timeout T
    single-shared  with --single-shared: one sidecar with the shared cache, one crawler (the
               shared path's cost to a cold burst without three sidecars on one core)

Start barrier: every crawler builds its connector and says "ready" on its stdout, then waits
for "go" on its stdin; this process writes "go" to all of them once all are ready (the spread
of their wall-clock start times is recorded as `start_skew_ms`).

Recorded per scenario and round: upstream queries during the burst (the sum over the sidecars
of /stats `upstreams[].queries` deltas, cross-checked with the delay proxy's counter), redis
commands (INFO commandstats deltas), time-to-first-byte p50/p90/p99/max per crawler and over
all crawlers, errors, and each sidecar's `shared_cache` counters (hits, misses, leases
won/waited/wait_hits/timeouts, busy, skipped, errors, writes, write_drops), the sidecars' CPU
seconds and each CPU's busy share during the burst (/proc/stat, host-wide).

After every shared burst, the latency a shared hit adds over a local hit: a fourth, fresh
sidecar on the same redis and prefix is asked (one UDP client, one query at a time) for A
records of the burst's hosts (in redis, not in its local cache: shared hits), then for the
same names again (now local hits). Names the burst did not get into redis (`in_redis_after_burst`
counts those it did) are written first through another fresh sidecar, so that the first pass
is all shared hits.

A burst of N hosts asks A and AAAA per host: one cold sidecar sends 2N upstream queries, three
alone 6N; the shared cache's ideal is 2N for the whole fleet.

    python -m bench.fleet_burst [--rounds 2] [--hosts 500] [--delay-ms 50] [--deadline 900]
                                [--shared-timeout-variant 200] [--single-shared]
                                [--only SCENARIO] [--limit 500] [--redis-cpu 0]

Counts (upstream queries, redis commands, shared-cache counters) do not depend on the
machine's load; times do (on a shared 2-core host they are ranges, not constants). Crawlers
and the hit-latency client are pinned to CPU 0, every server (sidecars, redis, nginx, proxy,
nsd) to CPU 1: three sidecars share one core, which a real fleet does not. `--redis-cpu 0`
moves redis-server to the crawlers' core (a fleet's redis runs elsewhere); its CPU seconds
during each burst are recorded as `redis_cpu_s` either way.

Bounded: every crawl has a 30 s client timeout, every process start a deadline, the whole run
`--deadline` seconds (scenarios not started by then are skipped). Every process is stopped and
the namespace and /etc/netns entry deleted at the end, also on error or SIGTERM/SIGINT.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import select
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import TYPE_CHECKING

from . import common, crawler_burst, netns, peers
from .crawler_burst import HTTP_PORT, UPSTREAM_PORT

if TYPE_CHECKING:
    from sidecar.testing.redisserver import RedisServer

BASE_SCENARIOS = ("shared", "alone", "single")
FLEET = 3
DNS_PORTS = (5353, 5354, 5355, 5356)  # the fourth: the fresh sidecar of the hit latency
HTTP_PORTS = (8053, 8054, 8055, 8056)
READY_DEADLINE_S = 30.0
CRAWL_RESULT_DEADLINE_S = 60.0  # the crawl's own client timeout is 30 s
HIT_LATENCY_DEADLINE_S = 30.0
# worst case of one scenario: four starts, the crawl, the hit latency, stops
SCENARIO_BUDGET_S = (4 * READY_DEADLINE_S + CRAWL_RESULT_DEADLINE_S + 2 * HIT_LATENCY_DEADLINE_S
                     + 4 * 10)
SHARED_KEYS = ("hits", "misses", "busy", "skipped", "writes", "write_drops", "unshareable",
               "breaker_opened")


# ---------------------------------------------------------------------------------------------
# the crawler process (--crawler)


async def crawler_main(a: argparse.Namespace, hosts: list[str]) -> dict:
    """One crawler: build the connector, say ready, wait for go, crawl, return the result."""
    from client import sidecar_connector

    urls = [f"http://{h}:{HTTP_PORT}/" for h in hosts]
    conn = sidecar_connector(f"127.0.0.1:{a.dns_port}", api_url=f"http://127.0.0.1:{a.api_port}",
                             limit=a.limit)
    sys.stdout.write("ready\n")
    sys.stdout.flush()
    # A thread reads the pipe so that nothing of the connector's own start-up is blocked.
    line = await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
    if line.strip() != "go":
        raise SystemExit("no go signal")
    go_wall = time.time()
    r = await crawler_burst.crawl(urls, conn)
    r["go_wall"] = go_wall
    r.pop("timeline_ms", None)
    return r


# ---------------------------------------------------------------------------------------------
# sidecars


def _http_get(port: int, path: str, timeout: float = 2.0) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}",  # noqa: S310
                                    timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def stats(http_port: int) -> dict:
    status, body = _http_get(http_port, "/stats", timeout=10)
    if status != 200:
        raise RuntimeError(f"/stats on {http_port} answered {status}")
    return json.loads(body)


def upstream_queries(st: dict) -> int:
    return sum(u.get("queries", 0) for u in st.get("upstreams", []))


def start_sidecars(idx: list[int], extra: list[str], workdir: str, tag: str,
                   cpu: int | None) -> list[subprocess.Popen]:
    """Spawn sidecars ``idx`` (uvloop) all at once, then wait for each one's /readyz 200.
    Readiness is asked over HTTP, never DNS: a DNS probe would be an upstream query (and a
    shared-cache write) of its own."""
    env = dict(os.environ)
    env.pop("DNS_SIDECAR_NO_UVLOOP", None)
    procs = []
    try:
        for i in idx:
            if not common.port_free(DNS_PORTS[i]):
                raise RuntimeError(f"127.0.0.1:{DNS_PORTS[i]} is still in use")
            argv = peers.sidecar_argv() + [
                "--listen", f"127.0.0.1:{DNS_PORTS[i]}", "--http", f"127.0.0.1:{HTTP_PORTS[i]}",
                "--upstream", f"127.0.0.1:{UPSTREAM_PORT}", "--min-ttl", "30",
                "--cache-size", "100000", "--log-level", "warning"] + extra
            procs.append(common.spawn(argv, cpu=cpu, env=env, log=f"{workdir}/sidecar-{tag}-{i}.log"))
        end = time.monotonic() + READY_DEADLINE_S
        for i, p in zip(idx, procs, strict=True):
            while True:
                if p.poll() is not None:
                    raise RuntimeError(f"sidecar {i} exited with code {p.returncode} before ready")
                with contextlib.suppress(OSError):
                    if _http_get(HTTP_PORTS[i], "/readyz", timeout=0.5)[0] == 200:
                        break
                if time.monotonic() > end:
                    raise RuntimeError(f"sidecar {i} not ready within {READY_DEADLINE_S:g} s")
                time.sleep(0.01)
    except BaseException:
        for p in procs:
            common.stop(p)
        raise
    return procs


# ---------------------------------------------------------------------------------------------
# crawlers: spawned, held at the barrier, released together


def _read_line(p: subprocess.Popen, end: float) -> str:
    """One line of ``p``'s stdout before the monotonic time ``end`` ('' on EOF)."""
    assert p.stdout is not None
    while True:
        left = end - time.monotonic()
        if left <= 0:
            raise RuntimeError(f"crawler {p.pid}: no answer in time")
        ready, _, _ = select.select([p.stdout], [], [], left)
        if ready:
            return p.stdout.readline()


def run_crawlers(idx: list[int], hosts_file: str, limit: int, cpu: int | None
                 ) -> tuple[list[dict], dict[str, float]]:
    """The crawlers' results, and the share of each CPU busy from "go" to the last result."""
    procs: list[subprocess.Popen] = []
    try:
        for i in idx:
            argv = common.taskset_prefix(cpu) + [
                common.python_exe(), "-m", "bench.fleet_burst", "--crawler",
                "--dns-port", str(DNS_PORTS[i]), "--api-port", str(HTTP_PORTS[i]),
                "--hosts-file", hosts_file, "--limit", str(limit)]
            p = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                 cwd=str(common.REPO_DIR), start_new_session=True)
            # common.stop_all (atexit, SIGTERM) kills what is on this list: our pipes'
            # processes too, not only those common.spawn started
            common._children.append(p)
            procs.append(p)
        end = time.monotonic() + READY_DEADLINE_S
        for p in procs:
            if _read_line(p, end).strip() != "ready":
                raise RuntimeError(f"crawler {p.pid} did not get ready (exit {p.poll()})")
        busy0 = cpu_busy()
        for p in procs:
            assert p.stdin is not None
            p.stdin.write("go\n")
            p.stdin.flush()
        end = time.monotonic() + CRAWL_RESULT_DEADLINE_S
        out = []
        for p in procs:
            line = _read_line(p, end)
            if not line:
                raise RuntimeError(f"crawler {p.pid} exited with {p.wait(5)} without a result")
            out.append(json.loads(line))
        busy1 = cpu_busy()
        share = {c: round((busy1[c][0] - busy0[c][0]) / max(1, busy1[c][1] - busy0[c][1]), 3)
                 for c in busy1}
        return out, share
    finally:
        for p in procs:
            common.stop(p)


# ---------------------------------------------------------------------------------------------
# the latency a shared hit adds over a local hit


def lookup_times(port: int, names: list[str], deadline_s: float) -> tuple[list[float], int]:
    """Seconds per A lookup, one at a time over one UDP socket; and the count of failures
    (timeouts, non-NOERROR or empty answers)."""
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.connect(("127.0.0.1", port))
    s.settimeout(2.0)
    times: list[float] = []
    failed = 0
    end = time.monotonic() + deadline_s
    try:
        for i, name in enumerate(names):
            if time.monotonic() > end:
                failed += len(names) - i
                break
            qid = i & 0xFFFF
            q = common.build_query(name, 1, qid=qid)
            t0 = time.perf_counter()
            s.send(q)
            try:
                while True:
                    r = s.recv(4096)
                    if int.from_bytes(r[:2], "big") == qid:
                        break
            except OSError:
                failed += 1
                continue
            dt = time.perf_counter() - t0
            if common.rcode_of(r) != 0 or common.ancount_of(r) == 0:
                failed += 1
                continue
            times.append(dt)
    finally:
        s.close()
    return times, failed


def _lat(times: list[float]) -> dict:
    if not times:
        return {"n": 0}
    return {"n": len(times), "p50_us": round(common.pct(times, 50) * 1e6, 1),
            "p90_us": round(common.pct(times, 90) * 1e6, 1),
            "p99_us": round(common.pct(times, 99) * 1e6, 1),
            "max_us": round(max(times) * 1e6, 1)}


def in_redis(url: str, prefix: str, names: list[str]) -> list[bool]:
    """Whether the A value of each name is in the shared cache (the key layout of
    sidecar.fleet.client.SharedCache.data_key)."""
    import redis as redis_py

    with redis_py.Redis.from_url(url) as r:
        pipe = r.pipeline(transaction=False)
        for n in names:
            pipe.exists(f"{prefix}{{{n.lower().rstrip('.')}/1/1}}")
        return [bool(x) for x in pipe.execute()]


def ask_all(port: int, names: list[str], window: int = 50, deadline_s: float = 20.0) -> int:
    """Ask A for ``names``, ``window`` at a time (a small window keeps the shared cache's
    connection pool and write bound far from full); the count answered."""
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.connect(("127.0.0.1", port))
    s.settimeout(3.0)
    answered = 0
    end = time.monotonic() + deadline_s
    try:
        for k in range(0, len(names), window):
            if time.monotonic() > end:
                break
            chunk = names[k:k + window]
            want = set()
            for j, name in enumerate(chunk):
                qid = (k + j) & 0xFFFF
                want.add(qid)
                s.send(common.build_query(name, 1, qid=qid))
            with contextlib.suppress(OSError):
                while want:
                    want.discard(int.from_bytes(s.recv(4096)[:2], "big"))
                    answered += 1
    finally:
        s.close()
    return answered


def hit_latency(extra: list[str], names: list[str], url: str, prefix: str, workdir: str,
                tag: str, cpu: int | None) -> dict:
    """A fourth, fresh sidecar on the same redis and prefix: the names once (shared hits),
    then again (local hits). The burst may not have written every name (writes dropped
    while the breaker was open or 256 were in flight): those are written first through
    another fresh sidecar, so that the first pass is all shared hits, not partly upstream
    misses."""
    present = in_redis(url, prefix, names)
    missing = [n for n, ok in zip(names, present, strict=True) if not ok]
    out: dict = {"names": len(names), "in_redis_after_burst": len(names) - len(missing),
                 "written_before_measuring": len(missing)}
    if missing:
        (w,) = start_sidecars([3], extra, workdir, tag + "-writer", cpu)
        try:
            ask_all(DNS_PORTS[3], missing)
            end = time.monotonic() + 10
            while not all(in_redis(url, prefix, missing)) and time.monotonic() < end:
                time.sleep(0.05)  # the writes run in the background
        finally:
            common.stop(w)
    (p,) = start_sidecars([3], extra, workdir, tag, cpu)
    allowed = os.sched_getaffinity(0)
    try:
        if len(allowed) > 1:
            os.sched_setaffinity(0, {common.LOAD_CPU})  # the client off the sidecar's core
        s0 = stats(HTTP_PORTS[3])
        shared_t, shared_fail = lookup_times(DNS_PORTS[3], names, HIT_LATENCY_DEADLINE_S)
        s1 = stats(HTTP_PORTS[3])
        local_t, local_fail = lookup_times(DNS_PORTS[3], names, HIT_LATENCY_DEADLINE_S)
        s2 = stats(HTTP_PORTS[3])
    finally:
        os.sched_setaffinity(0, allowed)
        common.stop(p)
    sh0, sh1 = s0.get("shared_cache", {}), s1.get("shared_cache", {})
    out.update({
        "shared_hit": _lat(shared_t), "shared_failed": shared_fail,
        "local_hit": _lat(local_t), "local_failed": local_fail,
        # what proves the first pass was shared hits and the second local ones
        "first_pass": {"shared_hits": sh1.get("hits", 0) - sh0.get("hits", 0),
                       "shared_misses": sh1.get("misses", 0) - sh0.get("misses", 0),
                       "upstream_queries": upstream_queries(s1) - upstream_queries(s0)},
        "second_pass": {"cache_hits": s2["cache"].get("hits", 0) - s1["cache"].get("hits", 0),
                        "upstream_queries": upstream_queries(s2) - upstream_queries(s1)},
        "rtt_ms": s2.get("shared_cache", {}).get("rtt_ms"),
    })
    if shared_t and local_t:
        out["added_p50_us"] = round((common.pct(shared_t, 50) - common.pct(local_t, 50)) * 1e6, 1)
        out["added_p99_us"] = round((common.pct(shared_t, 99) - common.pct(local_t, 99)) * 1e6, 1)
    return out


# ---------------------------------------------------------------------------------------------
# one scenario


def _redis_commands(redis: RedisServer) -> dict[str, int]:
    out: dict[str, int] = {}
    for line in redis.cli("info", "commandstats").splitlines():
        if line.startswith("cmdstat_"):
            name, _, rest = line.partition(":")
            out[name[len("cmdstat_"):]] = int(rest.split(",")[0].partition("=")[2])
    return out


def _shared_sum(per: list[dict]) -> dict:
    """The sidecars' shared_cache counters added up (they are fresh processes: totals are
    the burst's)."""
    tot: dict = {k: 0 for k in SHARED_KEYS}
    tot["errors"], tot["leases"], tot["rejected"], tot["batches"] = {}, {}, {}, {}
    for sh in per:
        for k in SHARED_KEYS:
            tot[k] += sh.get(k, 0)
        for group in ("errors", "leases", "rejected", "batches"):
            for k, v in sh.get(group, {}).items():
                tot[group][k] = tot[group].get(k, 0) + v
    tot["states"] = [sh.get("state") for sh in per]
    return tot


def cpu_busy() -> dict[str, tuple[int, int]]:
    """Per CPU of /proc/stat: (busy jiffies, all jiffies)."""
    out = {}
    with open("/proc/stat") as f:
        for line in f:
            if line.startswith("cpu") and line[3].isdigit():
                name, *vals = line.split()
                v = [int(x) for x in vals]
                idle = v[3] + v[4]  # idle, iowait
                out[name] = (sum(v[:8]) - idle, sum(v[:8]))
    return out


def _ttfb_summary(ttfb: list[float]) -> dict:
    return {f"ttfb_{k}_ms": (round(common.pct(ttfb, q) * 1e3, 2) if ttfb else None)
            for k, q in (("p50", 50), ("p90", 90), ("p99", 99), ("max", 100))}


def scenario(kind: str, rnd: int, hosts: list[str], a: argparse.Namespace, proxy: peers.Server,
             redis: RedisServer, workdir: str, cpu: int | None) -> dict:
    """One burst of ``kind`` on ``hosts``: its sidecars started fresh, its crawlers released
    together; the counts, times and (shared kinds) the hit latency."""
    n = 1 if kind.startswith("single") else FLEET
    idx = list(range(n))
    extra: list[str] = []
    prefix = ""
    shared = "shared" in kind
    if shared:
        # a prefix per round and scenario: nothing of an earlier burst is found
        prefix = f"fleetburst:{rnd}:{kind}:"
        extra = ["--shared-cache", redis.url, "--shared-cache-prefix", prefix]
        if kind.startswith("shared-"):
            extra += ["--shared-cache-timeout", kind.removeprefix("shared-").removesuffix("ms")]
    hosts_file = f"{workdir}/hosts-{rnd}-{kind}.txt"
    Path(hosts_file).write_text("\n".join(hosts) + "\n")
    out: dict = {"scenario": kind, "round": rnd, "hosts": len(hosts), "sidecars": n,
                 "sidecar_extra_args": [x if x != redis.url else "redis://127.0.0.1:PORT"
                                        for x in extra]}
    procs = start_sidecars(idx, extra, workdir, f"{rnd}-{kind}", cpu)
    try:
        s0 = [stats(HTTP_PORTS[i]) for i in idx]
        p0 = peers.proxy_counts(proxy)["total"]
        c0 = _redis_commands(redis)
        cpu0 = [common.cpu_seconds(p.pid) for p in procs]
        r0 = common.cpu_seconds(redis.proc.pid, tree=False)
        results, busy = run_crawlers(idx, hosts_file, a.limit, common.LOAD_CPU)
        cpu1 = [common.cpu_seconds(p.pid) for p in procs]
        r1 = common.cpu_seconds(redis.proc.pid, tree=False)
        p1 = peers.proxy_counts(proxy)["total"]
        s1 = [stats(HTTP_PORTS[i]) for i in idx]
        c1 = _redis_commands(redis)
    except BaseException:
        for i, p in zip(idx, procs, strict=True):
            log = Path(f"{workdir}/sidecar-{rnd}-{kind}-{i}.log")
            tail = log.read_text(errors="replace")[-3000:] if log.exists() else ""
            common.log(f"sidecar {i} (exit code {p.poll()}), end of its log:\n{tail}")
        raise
    finally:
        for p in procs:
            common.stop(p)
    per_sidecar = [upstream_queries(y) - upstream_queries(x) for x, y in zip(s0, s1, strict=True)]
    out["upstream_queries"] = sum(per_sidecar)
    out["upstream_queries_per_sidecar"] = per_sidecar
    out["upstream_queries_at_proxy"] = p1 - p0
    # a lease waiter's plain-miss estimate is at least its upstream's recent p90 (the rest
    # of the wait is measured inside the sidecar: docs/fleet.md, "How long a waiter waits")
    out["upstream_latency_ms"] = [[u.get("latency_ms") for u in y.get("upstreams", [])]
                                  for y in s1]
    out["redis_commands"] = {k: c1.get(k, 0) - c0.get(k, 0) for k in c1
                             if k != "info" and c1.get(k, 0) != c0.get(k, 0)}
    ttfb_all: list[float] = []
    crawlers = []
    for r in results:
        t = r.pop("_ttfb")
        ttfb_all += t
        crawlers.append({"errors": r["errors"], "error_classes": r["error_classes"],
                         "wall_s": round(r["wall_s"], 3), **_ttfb_summary(t)})
    out["crawlers"] = crawlers
    out["all"] = {"requests": sum(r["requests"] for r in results),
                  "errors": sum(r["errors"] for r in results),
                  "wall_s": round(max(r["wall_s"] for r in results), 3), **_ttfb_summary(ttfb_all)}
    gos = [r["go_wall"] for r in results]
    out["start_skew_ms"] = round((max(gos) - min(gos)) * 1e3, 2)
    # whether the servers' core was saturated (host-wide: other tenants included), and what
    # the sidecars used of it
    out["sidecar_cpu_s"] = [round(y - x, 3) for x, y in zip(cpu0, cpu1, strict=True)]
    out["cpu_busy_during"] = busy
    out["redis_cpu_s"] = round(r1 - r0, 3)
    out["local_cache"] = {k: sum(y["cache"].get(k, 0) - x["cache"].get(k, 0)
                                 for x, y in zip(s0, s1, strict=True))
                          for k in ("hits", "misses", "coalesced")}
    if shared:
        per = [y.get("shared_cache", {}) for y in s1]
        out["shared_cache"] = _shared_sum(per)
        out["shared_cache_per_sidecar"] = [
            {k: sh.get(k) for k in (*SHARED_KEYS, "errors", "leases", "rejected", "batches",
                                    "rtt_ms", "state")}
            for sh in per]
    if kind.startswith("shared"):
        out["hit_latency"] = hit_latency(extra, hosts, redis.url, prefix, workdir,
                                         f"{rnd}-{kind}-hit", cpu)
    out["_ttfb"] = ttfb_all
    return out


def _log_scenario(r: dict) -> None:
    al = r["all"]
    msg = (f"fleet_burst round {r['round']} {r['scenario']}: upstream {r['upstream_queries']} "
           f"{r['upstream_queries_per_sidecar']} (proxy {r['upstream_queries_at_proxy']}), "
           f"p50 {al['ttfb_p50_ms']} p99 {al['ttfb_p99_ms']} max {al['ttfb_max_ms']} ms, "
           f"errors {al['errors']}, skew {r['start_skew_ms']} ms")
    msg += (f", sidecar CPU {r['sidecar_cpu_s']} s, redis CPU {r['redis_cpu_s']} s, "
            f"busy {r['cpu_busy_during']}")
    if "shared_cache" in r:
        sh = r["shared_cache"]
        msg += (f"; shared hits {sh['hits']} misses {sh['misses']} busy {sh['busy']} "
                f"skipped {sh['skipped']} leases {sh['leases']} errors {sh['errors']} "
                f"write_drops {sh['write_drops']} batches {sh['batches']} "
                f"redis {r['redis_commands']}")
    if "hit_latency" in r:
        h = r["hit_latency"]
        msg += (f"; in redis after the burst {h['in_redis_after_burst']}/{h['names']}"
                f"; shared hit p50/p99 {h['shared_hit'].get('p50_us')}/"
                f"{h['shared_hit'].get('p99_us')} us, local hit "
                f"{h['local_hit'].get('p50_us')}/{h['local_hit'].get('p99_us')} us")
    common.log(msg)


# ---------------------------------------------------------------------------------------------
# inside the namespace


def inner(a: argparse.Namespace) -> dict:
    """Runs inside the namespace: upstream, web servers and redis once, then the rounds."""
    from sidecar.testing.redisserver import RedisServer

    t_end = time.monotonic() + a.deadline
    kinds = (list(BASE_SCENARIOS) + [f"shared-{t:g}ms" for t in a.shared_timeout_variant]
             + (["single-shared"] if a.single_shared else []))
    if a.only:
        kinds = [k for k in kinds if k in a.only]
    # Not pinned itself (unlike restart_burst): common.taskset_prefix pins a child only while
    # this process may run on more than one CPU, and this one spawns children all along. It
    # sleeps in select() during a burst; its UDP client of the hit latency is pinned apart.
    cpu = common.SERVER_CPU
    nsd = peers.start_nsd(names=10, crawl=a.rounds * len(kinds) * a.hosts, port=5300, cpu=cpu)
    proxy = http = redis = None
    out: dict = {"config": {k: v for k, v in vars(a).items()
                            if k not in ("inner", "crawler", "dns_port", "api_port", "hosts_file")},
                 "runs": {k: [] for k in kinds}, "samples": {}, "skipped": []}
    try:
        proxy, http = crawler_burst.start_upstream_and_web(nsd.port, a.delay_ms, a.http_server,
                                                           cpu)
        redis = RedisServer().start()
        redis_cpu = cpu if a.redis_cpu is None else a.redis_cpu
        if common.taskset_prefix(redis_cpu):
            subprocess.run(["taskset", "-p", "-c", str(redis_cpu), str(redis.proc.pid)],
                           capture_output=True, check=False)
        out["redis_version"] = redis.cli("info", "server").split("redis_version:")[1].split()[0]
        workdir = common.tmpdir("fleet-burst-")
        for rnd, kind, hosts in crawler_burst.alternating_rounds(
                kinds, a.rounds, a.hosts, t_end, SCENARIO_BUDGET_S, "fleet_burst", out["skipped"]):
            r = scenario(kind, rnd, hosts, a, proxy, redis, workdir, cpu)
            ttfb = r.pop("_ttfb")
            if rnd == 0:
                out["samples"][kind] = [round(x * 1e3, 2) for x in sorted(ttfb)]
            out["runs"][kind].append(r)
            _log_scenario(r)
            time.sleep(0.2)
    finally:
        if redis is not None:
            redis.cleanup()
        common.stop(http)
        if proxy is not None:
            proxy.stop()
        nsd.stop()
    return out


def run(a: argparse.Namespace) -> dict:
    """Create the namespace, run `inner` in it, delete it (also on error)."""
    from sidecar.testing import redisserver

    if (why := netns.missing() or redisserver.available()) is not None:
        return {"missing": why}
    args = ["--rounds", str(a.rounds), "--hosts", str(a.hosts), "--delay-ms", str(a.delay_ms),
            "--limit", str(a.limit), "--deadline", str(a.deadline),
            "--http-server", a.http_server or crawler_burst.default_http_server()]
    for t in a.shared_timeout_variant:
        args += ["--shared-timeout-variant", f"{t:g}"]
    if a.single_shared:
        args.append("--single-shared")
    for k in a.only:
        args += ["--only", k]
    if a.redis_cpu is not None:
        args += ["--redis-cpu", str(a.redis_cpu)]
    env = dict(os.environ, BENCH_BASE_PORT=str(peers.BASE_PORT))
    # the inner run stops itself at --deadline; the margin covers one scenario in progress
    res = netns.run_inner("dnsfleet", "bench.fleet_burst", args,
                          timeout=a.deadline + SCENARIO_BUDGET_S + 60, env=env)
    if "missing" in res:
        return res
    res["summary"] = summarize(res.get("runs", {}))
    import sidecar

    # which sidecar code ran (a tree under edit, or a clean copy put first on PYTHONPATH)
    res["code"] = {"sidecar_package": str(Path(sidecar.__file__).parent),
                   "pythonpath": os.environ.get("PYTHONPATH", "")}
    res["host"] = {"cpu_model": common.cpu_model(), "cpus": os.cpu_count(),
                   "loadavg_after": os.getloadavg()}
    return res


def summarize(runs: dict) -> dict:
    """Median, min and max over the rounds, per scenario; p99 ratios within a round."""
    s: dict = {}
    for kind, rs in runs.items():
        if not rs:
            continue
        d: dict = {}
        for k in ("upstream_queries", "upstream_queries_at_proxy", "start_skew_ms"):
            d[k] = common.summarize([r[k] for r in rs])
        for k in ("ttfb_p50_ms", "ttfb_p90_ms", "ttfb_p99_ms", "ttfb_max_ms", "errors", "wall_s"):
            d[k] = common.summarize([r["all"][k] for r in rs if r["all"].get(k) is not None])
        d["crawler_p99_ms"] = common.summarize([c["ttfb_p99_ms"] for r in rs
                                                for c in r["crawlers"] if c["ttfb_p99_ms"]])
        if rs[0].get("shared_cache"):
            for k in ("hits", "misses", "busy", "skipped", "write_drops"):
                d[f"shared_{k}"] = common.summarize([r["shared_cache"][k] for r in rs])
            for k in ("won", "waited", "wait_hits", "timeouts"):
                d[f"leases_{k}"] = common.summarize([r["shared_cache"]["leases"].get(k, 0)
                                                     for r in rs])
        if rs[0].get("hit_latency"):
            for which in ("shared_hit", "local_hit"):
                for q in ("p50_us", "p99_us"):
                    d[f"{which}_{q}"] = common.summarize(
                        [r["hit_latency"][which][q] for r in rs if q in r["hit_latency"][which]])
            d["in_redis_after_burst"] = common.summarize(
                [r["hit_latency"]["in_redis_after_burst"] for r in rs])
            for q in ("added_p50_us", "added_p99_us"):
                d[q] = common.summarize([r["hit_latency"][q] for r in rs
                                         if q in r["hit_latency"]])
        s[kind] = d
    # within a round every scenario saw the same background load: ratios are steadier on a
    # shared machine than the times alone
    for kind, rs in runs.items():
        for ref in ("single", "alone"):
            if kind == ref or kind not in s:
                continue
            ratios = []
            for r in rs:
                x = next((y for y in runs.get(ref, []) if y["round"] == r["round"]), None)
                if x and x["all"].get("ttfb_p99_ms") and r["all"].get("ttfb_p99_ms"):
                    ratios.append(r["all"]["ttfb_p99_ms"] / x["all"]["ttfb_p99_ms"])
            if ratios:
                s[kind][f"p99_over_{ref}"] = common.summarize(ratios)
    return s


def main() -> None:
    ap = crawler_burst.burst_args(__doc__, 2, "scenarios")
    ap.add_argument("--shared-timeout-variant", type=float, action="append", default=[],
                    metavar="MS", help="also run the shared scenario with the sidecars' "
                    "--shared-cache-timeout MS (repeatable; the default scenario uses the "
                    "sidecar's default, 30 ms)")
    ap.add_argument("--single-shared", action="store_true",
                    help="also run one sidecar with the shared cache behind one crawler: what "
                         "the shared path costs a cold burst without the fleet's CPU on its core")
    ap.add_argument("--redis-cpu", type=int, default=None,
                    help="pin redis-server to this CPU instead of the servers' (a fleet's "
                         "redis runs on another host: 0 moves its work off the sidecar's core)")
    ap.add_argument("--only", action="append", default=[], metavar="SCENARIO",
                    help="run only this scenario (repeatable), e.g. --only shared-200ms")
    ap.add_argument("--crawler", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--dns-port", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--api-port", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--hosts-file", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.crawler:
        res = asyncio.run(crawler_main(a, Path(a.hosts_file).read_text().split()))
        sys.stdout.write(json.dumps(res, default=str) + "\n")
        return
    common.install_signal_handlers()
    if a.inner:
        netns.report(inner(a))
        return
    res = run(a)
    if "missing" in res:
        common.log(f"fleet_burst: {res['missing']}")
    print(common.save_json("fleet_burst", res))


if __name__ == "__main__":
    main()
