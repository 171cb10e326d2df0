"""Python work per cache hit: QueryHandler.handle in a loop, no sockets (microseconds).

Starts a fake upstream and an in-process sidecar on loopback, caches one name, then calls the
handler 7 x 100,000 times per variant (no EDNS / EDNS) and prints the best per-call time.

    python -m bench.hit_micro
"""

from __future__ import annotations

import asyncio
import time

import dns.asyncquery
import dns.message

from sidecar import Config, HostPort, Sidecar
from sidecar.testing.fakeupstream import FakeUpstream


async def main(n: int = 100_000, repeat: int = 7) -> None:
    up = FakeUpstream(log_queries=False)
    await up.start()
    sc = Sidecar(Config(listen=(HostPort("127.0.0.1", 0),), http=None,
                        upstreams=(HostPort("127.0.0.1", up.port),)))
    await sc.start()
    try:
        await dns.asyncquery.udp(dns.message.make_query("www.example.test", "A"), "127.0.0.1",
                                 port=sc.dns_addresses[0].port, timeout=5)
        handle = sc.handler.handle
        for edns in (False, True):
            wire = dns.message.make_query("www.example.test", "A",
                                          use_edns=0 if edns else False).to_wire()
            best = float("inf")
            for _ in range(repeat):
                t = time.perf_counter()
                for _ in range(n):
                    handle(wire, "127.0.0.1", False)
                best = min(best, (time.perf_counter() - t) / n)
            print(f"hit, {'EDNS' if edns else 'no EDNS'}: {best * 1e6:.2f} us per query")
    finally:
        await sc.stop()
        await up.stop()


if __name__ == "__main__":
    asyncio.run(main())
