"""Failover latency: p50/p99 of cold queries while one of two upstreams is blackholed.

Starts two fake upstreams on loopback (the first one silent), a sidecar in front of both,
and sends cold (unique-name) queries at a fixed rate with dnspython. Reports latency
percentiles before the silent server is quarantined and after. Bounded in count and time.

    python -m bench.failover_latency [--rate 200] [--seconds 6] [--timeout 0.5] [--tries 2]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time

import dns.asyncquery
import dns.message

from sidecar import Config, HostPort, Sidecar
from sidecar.testing.fakeupstream import FakeUpstream


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    return s[min(len(s) - 1, int(round(q * (len(s) - 1))))]


async def run(rate: float, seconds: float, timeout: float, tries: int) -> dict:
    dead, good = FakeUpstream(log_queries=False), FakeUpstream(log_queries=False)
    await dead.start()
    await good.start()
    dead.drop = True
    sc = Sidecar(Config(listen=(HostPort("127.0.0.1", 0),), http=None,
                        upstreams=(HostPort("127.0.0.1", dead.port),
                                   HostPort("127.0.0.1", good.port)),
                        timeout=timeout, tries=tries))
    await sc.start()
    port = sc.dns_addresses[0].port
    dead_u = sc.pools.default.upstreams[0]
    samples: list[tuple[float, float, bool, str]] = []  # (sent, latency, quarantined, rcode)

    async def one(i: int) -> None:
        q = dns.message.make_query(f"h{i}.example.test", "A")
        quarantined = dead_u.state == "quarantined"
        t0 = time.monotonic()
        try:
            r = await dns.asyncquery.udp(q, "127.0.0.1", port=port, timeout=timeout * tries + 2)
            rc = r.rcode()
        except Exception:
            rc = -1
        samples.append((t0, time.monotonic() - t0, quarantined, str(rc)))

    start = time.monotonic()
    tasks = []
    total = int(rate * seconds)
    quarantined_at = None
    for i in range(total):
        target = start + i / rate
        delay = target - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        if quarantined_at is None and dead_u.state == "quarantined":
            quarantined_at = time.monotonic() - start
        tasks.append(asyncio.ensure_future(one(i)))
    await asyncio.gather(*tasks)
    await sc.stop()
    await dead.stop()
    await good.stop()
    before = [lat for _t, lat, q, _rc in samples if not q]
    after = [lat for _t, lat, q, _rc in samples if q]
    errors = sum(1 for s in samples if s[3] != "0")
    return {
        "rate_qps": rate, "seconds": seconds, "timeout_s": timeout, "tries": tries,
        "queries": len(samples), "errors": errors,
        "quarantined_after_s": quarantined_at,
        "before": {"n": len(before), "p50_ms": pct(before, 0.5) * 1e3,
                   "p99_ms": pct(before, 0.99) * 1e3, "max_ms": max(before, default=0) * 1e3},
        "after": {"n": len(after), "p50_ms": pct(after, 0.5) * 1e3,
                  "p99_ms": pct(after, 0.99) * 1e3, "max_ms": max(after, default=0) * 1e3},
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rate", type=float, default=200.0)
    ap.add_argument("--seconds", type=float, default=6.0)
    ap.add_argument("--timeout", type=float, default=0.5)
    ap.add_argument("--tries", type=int, default=2)
    args = ap.parse_args()
    print(json.dumps(asyncio.run(run(args.rate, args.seconds, args.timeout, args.tries)),
                     indent=2))


if __name__ == "__main__":
    main()
