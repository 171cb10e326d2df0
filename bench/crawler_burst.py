"""Benchmark 5: the crawler burst (the field report's scenario).

500 distinct cold hostnames are fetched at once with aiohttp from local HTTP servers, while the
upstream DNS server adds 50 ms to every query. Everything runs inside a network namespace this
script creates (`ip netns add`), which has its own loopback: the upstream listens there on
127.0.0.1:53 and /etc/netns/NAME/resolv.conf says `nameserver 127.0.0.1`, so getaddrinfo() in
scenario A reaches it while the machine's own resolver configuration is never read or touched.

    upstream   nsd (authoritative, bench.test) <- delay_proxy.py on 127.0.0.1:53 (+50 ms/query)
    HTTP       nginx (one worker) on 127.0.0.10-17:8080 (c<i>.crawl.bench.test -> one of them);
               --http-server aiohttp: an aiohttp.web process instead (the layout before
               2026-12-01: Python web servers cost the sidecar's core ~5x nginx's CPU)
    A          aiohttp ThreadedResolver: getaddrinfo in the default thread pool (glibc stub,
               resolv.conf -> 127.0.0.1:53)
    B cold     client.sidecar_connector() -> dns-sidecar (uvloop) -> 127.0.0.1:53, new names
    B warm     the same names again through a new connector (sidecar cache warm; client empty)
    B prewarm  new names: `await connector.resolver.prewarm(hosts)` (one POST /prewarm), then crawl
    C floor    literal IP URLs, no DNS at all

Per scenario and round: median / p90 / p99 / max time-to-first-byte (request start to response
headers), total wall time of the burst, errors by class, and the namespace's kernel UDP drops
(/proc/net/snmp Udp: RcvbufErrors, InErrors) before/after. The crawler is pinned to CPU 0; the
sidecar, the HTTP servers, the proxy and nsd to CPU 1. The crawler uses the plain asyncio loop.

    python -m bench.crawler_burst [--rounds 3] [--hosts 500] [--delay-ms 50] [--timeline]

With --timeline every request is traced (when its lookup started and ended, when it connected)
and each scenario logs those percentiles: where a burst's time goes, at some cost in crawler CPU.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import os
import shutil
import subprocess
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

from . import common, netns, peers, zone

HTTP_PORT = 8080
SIDECAR_PORT = 5353
SIDECAR_HTTP = 8053
UPSTREAM_PORT = 53
SCENARIOS = ["A-threaded", "B-cold", "B-warm", "B-prewarm", "C-floor"]


# ---------------------------------------------------------------------------------------------
# HTTP servers (a child process inside the namespace)


def serve_http(ips: list[str], port: int) -> None:
    from aiohttp import web

    async def handler(request: web.Request) -> web.Response:
        return web.Response(text="ok\n")

    async def main() -> None:
        app = web.Application()
        app.router.add_get("/{tail:.*}", handler)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        for ip in ips:
            await web.TCPSite(runner, ip, port, backlog=4096).start()
        await asyncio.Event().wait()

    with contextlib.suppress(ImportError):
        import uvloop

        uvloop.install()
    asyncio.run(main())


NGINX_CONF = """\
worker_processes 1;
daemon off;
pid {d}/nginx.pid;
error_log {d}/error.log warn;
events {{ worker_connections 8192; multi_accept on; }}
http {{
    access_log off;
    client_body_temp_path {d}/body;
    proxy_temp_path {d}/proxy;
    fastcgi_temp_path {d}/fastcgi;
    uwsgi_temp_path {d}/uwsgi;
    scgi_temp_path {d}/scgi;
    server {{
{listen}
        location / {{ default_type text/plain; return 200 "ok\\n"; }}
    }}
}}
"""


def start_nginx(ips: list[str], port: int, cpu: int | None):
    """nginx (one worker) answering 200 "ok" on every ``ip:port``: the same replies as
    :func:`serve_http`, at a fraction of the CPU (it shares a core with the sidecar)."""
    d = common.tmpdir("nginx-")
    listen = "\n".join(f"        listen {ip}:{port} backlog=4096;" for ip in ips)
    conf = Path(d) / "nginx.conf"
    conf.write_text(NGINX_CONF.format(d=d, listen=listen))
    return common.spawn([shutil.which("nginx") or "nginx", "-p", d, "-c", str(conf)], cpu=cpu,
                        log=f"{d}/stdout.log")


# ---------------------------------------------------------------------------------------------
# the crawl


TIMELINE_QUANTILES = (0, 10, 50, 90, 99)


def _tracer(t0: list[float], marks: dict[str, list[float]]):
    """An aiohttp TraceConfig noting, per request, when its DNS lookup started and ended and
    when its connection was made (seconds since the burst started)."""
    import aiohttp

    def note(what: str):
        async def on(_session, _ctx, _params) -> None:
            marks[what].append(time.perf_counter() - t0[0])
        return on

    tc = aiohttp.TraceConfig()
    tc.on_dns_resolvehost_start.append(note("dns_start"))
    tc.on_dns_resolvehost_end.append(note("dns_end"))
    tc.on_connection_create_end.append(note("connected"))
    return tc


async def crawl(urls: list[str], connector, timeout_s: float = 30.0,
                timeline: bool = False) -> dict:
    import aiohttp

    ttfb: list[float] = []
    errors: collections.Counter[str] = collections.Counter()
    t0 = [time.perf_counter()]
    marks: dict[str, list[float]] = collections.defaultdict(list)
    traces = [_tracer(t0, marks)] if timeline else []

    async def one(session: aiohttp.ClientSession, url: str) -> None:
        t0 = time.perf_counter()
        try:
            async with session.get(url) as resp:
                ttfb.append(time.perf_counter() - t0)
                await resp.read()
                if resp.status != 200:
                    errors[f"http_{resp.status}"] += 1
        except Exception as e:  # noqa: BLE001 - every failure is counted by class
            errors[type(e).__name__] += 1

    t0[0] = time.perf_counter()
    async with aiohttp.ClientSession(connector=connector, trace_configs=traces,
                                     timeout=aiohttp.ClientTimeout(total=timeout_s)) as session:
        await asyncio.gather(*(one(session, u) for u in urls))
        wall = time.perf_counter() - t0[0]
    if timeline:
        marks["ttfb"] = list(ttfb)
    timeline_ms = {k: [round(common.pct(v, q) * 1e3, 1) for q in TIMELINE_QUANTILES]
                   for k, v in marks.items() if v}
    return {
        "timeline_ms": timeline_ms or None,
        "requests": len(urls),
        "ok": len(ttfb),
        "errors": sum(errors.values()),
        "error_classes": dict(errors),
        "wall_s": wall,
        "ttfb_p50_ms": common.pct(ttfb, 50) * 1e3 if ttfb else None,
        "ttfb_p90_ms": common.pct(ttfb, 90) * 1e3 if ttfb else None,
        "ttfb_p99_ms": common.pct(ttfb, 99) * 1e3 if ttfb else None,
        "ttfb_max_ms": max(ttfb) * 1e3 if ttfb else None,
        "_ttfb": ttfb,
    }


async def scenario(kind: str, hosts: list[str], limit: int, timeline: bool = False) -> dict:
    import aiohttp
    from aiohttp.resolver import ThreadedResolver

    extra: dict = {}
    if kind == "C-floor":
        urls = [f"http://{zone.crawl_ip(int(h.split('.')[0][1:]))}:{HTTP_PORT}/{h}" for h in hosts]
    else:
        urls = [f"http://{h}:{HTTP_PORT}/" for h in hosts]
    if kind == "A-threaded":
        conn = aiohttp.TCPConnector(resolver=ThreadedResolver(), limit=limit, use_dns_cache=True)
    elif kind == "C-floor":
        conn = aiohttp.TCPConnector(limit=limit)
    else:
        from client import sidecar_connector

        conn = sidecar_connector(f"127.0.0.1:{SIDECAR_PORT}",
                                 api_url=f"http://127.0.0.1:{SIDECAR_HTTP}", limit=limit)
        if kind == "B-prewarm":
            t0 = time.perf_counter()
            res = await conn.resolver.prewarm(hosts)
            extra["prewarm_s"] = time.perf_counter() - t0
            extra["prewarm_result"] = str(res)[:300]
    u0 = common.udp_counters()
    r = await crawl(urls, conn, timeline=timeline)
    u1 = common.udp_counters()
    r.update(extra)
    r["udp_rcvbuf_errors"] = u1.get("RcvbufErrors", 0) - u0.get("RcvbufErrors", 0)
    r["udp_in_errors"] = u1.get("InErrors", 0) - u0.get("InErrors", 0)
    return r


def _cpu_by_role(sidecar, proxy, http, nsd) -> dict[str, float]:
    """CPU seconds used so far by each process of the scenario (crawler = this process)."""
    return {"crawler": time.process_time(),
            "sidecar": sidecar.cpu() if sidecar is not None else 0.0,
            "delay_proxy": proxy.cpu(), "http_servers": common.cpu_seconds(http.pid),
            "nsd": nsd.cpu()}


def start_upstream_and_web(nsd_port: int, delay_ms: float, http_server: str,
                           cpu: int | None) -> tuple[peers.Server, subprocess.Popen]:
    """The delay proxy in front of nsd on ``UPSTREAM_PORT`` and the crawl's web servers on
    ``zone.CRAWL_IPS``:``HTTP_PORT``, answering (both stopped again if either fails)."""
    proxy = peers.start_proxy(nsd_port, delay_ms=delay_ms, port=UPSTREAM_PORT, cpu=cpu)
    http = None
    try:
        if http_server == "nginx":
            http = start_nginx(zone.CRAWL_IPS, HTTP_PORT, cpu)
        else:
            http = common.spawn([common.python_exe(), "-m", "bench.crawler_burst", "--serve-http"],
                                cpu=cpu, cwd=str(common.REPO_DIR))
        netns.wait_http(http, zone.CRAWL_IPS[-1], HTTP_PORT)
    except BaseException:
        common.stop(http)
        proxy.stop()
        raise
    return proxy, http


def alternating_rounds(kinds: Sequence[str], rounds: int, hosts: int, until: float,
                       budget: float, bench: str, skipped: list[dict],
                       label: str = "scenario") -> Iterator[tuple[int, str, list[str]]]:
    """``(round, kind, hosts)`` for every kind of every round, ``hosts`` fresh names each
    time, the kinds in reverse order every other round (the first of a round does not
    always meet the same background). A kind that could not end by ``until`` (monotonic
    time; ``budget`` seconds each) is skipped, logged and added to ``skipped``."""
    next_name = 0
    for rnd in range(rounds):
        for kind in kinds if rnd % 2 == 0 else list(reversed(kinds)):
            if time.monotonic() + budget > until:
                skipped.append({"round": rnd, label: kind, "why": "deadline"})
                common.log(f"{bench} round {rnd} {kind}: skipped (deadline)")
                continue
            names = zone.crawl_names(hosts, next_name)
            next_name += hosts
            yield rnd, kind, names


def burst_args(description: str | None, rounds: int, kinds: str,
               deadline: bool = True) -> argparse.ArgumentParser:
    """The command line every namespace burst takes: rounds, hosts per burst, the upstream
    delay, the crawler's connection limit, the whole run's deadline (``kinds`` names what
    it skips), the web servers, and the hidden ``--inner``."""
    ap = argparse.ArgumentParser(description=description,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=rounds)
    ap.add_argument("--hosts", type=int, default=500, help="hosts per burst (default 500)")
    ap.add_argument("--delay-ms", type=float, default=50.0,
                    help="added to every upstream query by the delay proxy (default 50)")
    ap.add_argument("--limit", type=int, default=500,
                    help="TCPConnector limit of each crawler (default 500)")
    if deadline:
        ap.add_argument("--deadline", type=float, default=900.0,
                        help=f"seconds for the whole run; {kinds} that would not finish by "
                             "then are skipped (default 900)")
    ap.add_argument("--http-server", choices=("nginx", "aiohttp"), default=None,
                    help="the emulated web servers: nginx (default when installed) or "
                         "aiohttp.web (Python, ~4x the CPU on the sidecar's core)")
    ap.add_argument("--inner", action="store_true", help=argparse.SUPPRESS)
    return ap


def inner(a: argparse.Namespace) -> dict:
    """Runs inside the namespace: start everything, run the scenarios in alternating rounds."""
    if common.have_cpus() > 1:
        os.sched_setaffinity(0, {common.LOAD_CPU})
    cpu = common.SERVER_CPU
    n_names = a.rounds * len(SCENARIOS) * a.hosts + a.hosts
    nsd = peers.start_nsd(names=10, crawl=n_names, port=5300, cpu=cpu)
    try:
        proxy, http = start_upstream_and_web(nsd.port, a.delay_ms, a.http_server, cpu)
    except BaseException:
        nsd.stop()
        raise
    sidecar = None
    out: dict = {"config": {k: v for k, v in vars(a).items() if k not in ("inner", "serve_http")},
                 "scenarios": {s: [] for s in SCENARIOS}, "samples": {}}
    try:
        have_sidecar = peers.sidecar_available()
        if have_sidecar:
            sidecar = peers.start_sidecar(UPSTREAM_PORT, uvloop=True, port=SIDECAR_PORT, http=True,
                                          cpu=cpu, name="sidecar-uvloop", http_port=SIDECAR_HTTP)
        else:
            out["missing"] = "dns-sidecar not installed: B scenarios skipped"
        next_name = 0

        def take(n: int) -> list[str]:
            nonlocal next_name
            names = zone.crawl_names(n, next_name)
            next_name += n
            return names

        for rnd in range(a.rounds):
            cold_b: list[str] = []
            for s in SCENARIOS:
                if s.startswith("B") and sidecar is None:
                    continue
                hosts = cold_b if s == "B-warm" else take(a.hosts)
                if s == "B-cold":
                    cold_b = hosts
                cpu0 = _cpu_by_role(sidecar, proxy, http, nsd)
                r = asyncio.run(scenario(s, hosts, a.limit, a.timeline))
                cpu1 = _cpu_by_role(sidecar, proxy, http, nsd)
                r["cpu_s"] = {k: round(cpu1[k] - cpu0[k], 3) for k in cpu1}
                ttfb = r.pop("_ttfb")
                r["round"] = rnd
                out["scenarios"][s].append(r)
                if rnd == 0:
                    out["samples"][s] = [round(x * 1e3, 2) for x in sorted(ttfb)]
                common.log(f"crawler_burst round {rnd} {s}: p50 {r['ttfb_p50_ms'] or 0:.1f} ms, "
                           f"p99 {r['ttfb_p99_ms'] or 0:.1f} ms, wall {r['wall_s']:.2f} s, "
                           f"errors {r['errors']} {r['error_classes']}, drops {r['udp_rcvbuf_errors']}")
                if r.get("timeline_ms"):
                    common.log(f"  timeline ms (p{'/p'.join(map(str, TIMELINE_QUANTILES))}): "
                               + "; ".join(f"{k} {v}" for k, v in r["timeline_ms"].items()))
                time.sleep(0.2)
        out["upstream_queries"] = peers.proxy_counts(proxy)["total"]
        if sidecar is not None:
            with contextlib.suppress(Exception):
                out["sidecar_stats"] = sidecar.http_json("/stats")
    finally:
        if sidecar is not None:
            sidecar.stop()
        common.stop(http)
        proxy.stop()
        nsd.stop()
    return out


def run(rounds: int = 3, hosts: int = 500, delay_ms: float = 50.0, limit: int = 500,
        timeline: bool = False, http_server: str | None = None) -> dict:
    """Create the namespace, run `inner` in it, delete it."""
    if (why := netns.missing()) is not None:
        return {"missing": why}
    env = dict(os.environ, BENCH_BASE_PORT=str(peers.BASE_PORT))
    res = netns.run_inner("dnsbench", "bench.crawler_burst", [
        "--rounds", str(rounds), "--hosts", str(hosts), "--delay-ms", str(delay_ms),
        "--limit", str(limit), "--http-server", http_server or default_http_server()]
        + (["--timeline"] if timeline else []), timeout=600 + rounds * 120, env=env)
    if "missing" in res:
        return res
    res["summary"] = summarize(res.get("scenarios", {}))
    return res


def summarize(sc: dict) -> dict:
    s = {}
    for name, runs in sc.items():
        if not runs:
            continue
        s[name] = {k: common.summarize([r[k] for r in runs if r.get(k) is not None])
                   for k in ("ttfb_p50_ms", "ttfb_p99_ms", "ttfb_max_ms", "wall_s", "errors",
                             "udp_rcvbuf_errors", "prewarm_s")}
    for name, runs in sc.items():
        if not runs or name not in s:
            continue
        for ref, key in (("A-threaded", "p99_vs_A"), ("C-floor", "p99_vs_floor")):
            ratios = []
            for r in runs:
                x = next((y for y in sc.get(ref, []) if y["round"] == r["round"]), None)
                if x and x.get("ttfb_p99_ms") and r.get("ttfb_p99_ms"):
                    ratios.append(r["ttfb_p99_ms"] / x["ttfb_p99_ms"])
            s[name][key] = common.summarize(ratios)
    return s


def default_http_server() -> str:
    return "nginx" if shutil.which("nginx") else "aiohttp"


def main() -> None:
    ap = burst_args(__doc__, 3, "scenarios", deadline=False)
    ap.add_argument("--timeline", action="store_true",
                    help="trace every request (aiohttp TraceConfig): when its DNS lookup "
                         "started and ended and when it connected; percentiles per scenario. "
                         "The tracing costs the crawler CPU, so results go to "
                         "crawler_burst_timeline.json, not the published file")
    ap.add_argument("--serve-http", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.serve_http:
        serve_http(zone.CRAWL_IPS, HTTP_PORT)
        return
    common.install_signal_handlers()
    if a.inner:
        netns.report(inner(a))
        return
    res = run(a.rounds, a.hosts, a.delay_ms, a.limit, a.timeline, a.http_server)
    print(common.save_json("crawler_burst_timeline" if a.timeline else "crawler_burst", res))


if __name__ == "__main__":
    main()
