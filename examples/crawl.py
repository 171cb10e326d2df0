#!/usr/bin/env python3
"""A small concurrent crawler on the dns-sidecar client.

It resolves through the sidecar with failover (the sidecar, then the system resolver;
nameservers you name with --fallback in between), optionally pre-warms every host in one
call, fetches the URLs
with bounded concurrency, classifies every failure by phase, and prints a summary: counts
per outcome class (DNS classes apart), which resolver answered, and percentiles of the
phase durations of the successful requests.

    python examples/crawl.py --prewarm https://example.com/ https://example.org/
    python examples/crawl.py --urls urls.txt --concurrency 100 --timeout 10
    python examples/crawl.py --no-fallback --urls urls.txt      # sidecar only

Run from the repository root (or with the package installed).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
from aiohttp.resolver import AsyncResolver, ThreadedResolver

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from client import (  # noqa: E402
    DNS_CLASSES,
    ClassCounters,
    FailoverResolver,
    FetchResult,
    fetch,
    sidecar_connector,
    sidecar_resolver,
    trace_config,
)

PHASE_FIELDS = ("queued", "namelookup", "connect", "tls", "starttransfer", "transfer", "total")


@dataclass
class Report:
    """What a crawl produced."""

    results: list[FetchResult] = field(default_factory=list)
    counters: ClassCounters = field(default_factory=ClassCounters)
    resolvers: list[dict] = field(default_factory=list)
    answered_by: Counter = field(default_factory=Counter)
    prewarm: object | None = None
    elapsed: float = 0.0


async def crawl(
    urls: list[str],
    *,
    sidecar: str = "127.0.0.1:5353",
    api_url: str | None = "http://127.0.0.1:8053",
    api_token: str | None = None,
    fallback: list[str] | None = None,
    threaded: bool = True,
    concurrency: int = 50,
    timeout: float = 10.0,
    prewarm: bool = False,
) -> Report:
    """Fetch ``urls`` and return a :class:`Report` (see the module docstring)."""
    resolvers: list = [sidecar_resolver(sidecar, api_url=api_url, api_token=api_token)]
    names = ["sidecar"]
    if fallback:
        resolvers.append(AsyncResolver(nameservers=fallback, timeout=2.0, tries=2))
        names.append("fallback")
    if threaded:
        resolvers.append(ThreadedResolver())
        names.append("system")
    report = Report()
    resolver = FailoverResolver(
        *resolvers,
        names=names,
        on_lookup=lambda rec: report.answered_by.update([rec.resolver or "none"]),
    )
    connector = sidecar_connector(resolver=resolver, limit=concurrency)
    session = aiohttp.ClientSession(
        connector=connector,
        trace_configs=[trace_config()],
        timeout=aiohttp.ClientTimeout(total=timeout),
    )
    started = time.perf_counter()
    try:
        async with session:
            if prewarm and api_url:
                report.prewarm = await resolver.prewarm(urls)
            gate = asyncio.Semaphore(concurrency)

            async def one(url: str) -> FetchResult:
                async with gate:
                    return await fetch(session, url, counters=report.counters)

            report.results = await asyncio.gather(*(one(u) for u in urls))
    finally:
        report.elapsed = time.perf_counter() - started
        report.resolvers = resolver.status()
        await resolver.close()
    return report


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))]


def format_report(report: Report) -> str:
    """The summary tables as text."""
    out: list[str] = []
    total = report.counters.total
    out.append(f"{total} requests in {report.elapsed:.2f} s")
    if report.prewarm is not None:
        pw = report.prewarm
        out.append(f"prewarm: {pw.warmed}/{pw.requested} hosts warmed in {pw.elapsed * 1000:.0f} ms"
                   + (f" (error: {pw.error})" if pw.error else ""))
    out.append("")
    out.append(f"{'class':<22}{'count':>7}  phases")
    by_phase = report.counters.by_phase()
    snapshot = report.counters.snapshot()
    dns_names = {k.value for k in DNS_CLASSES}
    for kind, n in snapshot.items():
        if not n:
            continue
        label = f"{kind} (dns)" if kind in dns_names else kind
        phases = ", ".join(f"{p}={c}" for p, c in by_phase.get(kind, {}).items())
        out.append(f"{label:<22}{n:>7}  {phases}")
    out.append(f"{'dns failures':<22}{report.counters.dns_failures:>7}")
    out.append("")
    out.append("lookups answered by: " + (", ".join(
        f"{name}={n}" for name, n in report.answered_by.most_common()) or "none (cached)"))
    for state in report.resolvers:
        flag = "in use" if state["available"] else f"set aside {state['aside_for']:.0f} s"
        out.append(f"  {state['name']:<10} {flag:<16} answers={state['answers']} "
                   f"failures={state['failures']} set_aside={state['set_aside']}")
    ok = [r.timings for r in report.results if r.ok]
    out.append("")
    if ok:
        out.append(f"phase durations of {len(ok)} successful requests (ms)")
        out.append(f"{'phase':<15}{'p50':>9}{'p90':>9}{'p99':>9}{'max':>9}")
        for name in PHASE_FIELDS:
            values = [getattr(t, name) for t in ok]
            values = [v for v in values if v is not None]
            if not values:
                out.append(f"{name:<15}{'n/a':>9}")
                continue
            row = [_pct(values, q) * 1000 for q in (50, 90, 99)] + [max(values) * 1000]
            out.append(f"{name:<15}" + "".join(f"{v:>9.1f}" for v in row))
    failed = [r for r in report.results if not r.ok]
    if failed:
        out.append("")
        out.append("failures (first 10)")
        for r in failed[:10]:
            out.append(f"  {r.url}  {r.failure}")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("url", nargs="*", help="URLs to fetch")
    parser.add_argument("--urls", type=Path, help="file with one URL per line")
    parser.add_argument("--sidecar", default="127.0.0.1:5353", help="sidecar DNS address")
    parser.add_argument("--api", default="http://127.0.0.1:8053", help="sidecar API URL")
    parser.add_argument("--api-token", default=None)
    parser.add_argument("--fallback", default="",
                        help="nameservers to try after the sidecar, before the system resolver "
                             "(none by default: internal names must not leave the network)")
    parser.add_argument("--no-fallback", action="store_true",
                        help="sidecar only: no public nameservers, no system resolver")
    parser.add_argument("--concurrency", type=int, default=50)
    parser.add_argument("--timeout", type=float, default=10.0, help="total per request, s")
    parser.add_argument("--prewarm", action="store_true", help="pre-warm all hosts first")
    args = parser.parse_args(argv)
    urls = list(args.url)
    if args.urls:
        urls += [line.strip() for line in args.urls.read_text().splitlines() if line.strip()]
    if not urls:
        parser.error("no URLs given")
    fallback = None if args.no_fallback else [a for a in args.fallback.split(",") if a]
    report = asyncio.run(crawl(
        urls,
        sidecar=args.sidecar,
        api_url=args.api or None,
        api_token=args.api_token,
        fallback=fallback,
        threaded=not args.no_fallback,
        concurrency=args.concurrency,
        timeout=args.timeout,
        prewarm=args.prewarm,
    ))
    print(format_report(report))
    return 0 if report.counters.failures == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
