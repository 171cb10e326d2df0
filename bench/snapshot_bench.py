"""Cache snapshot: file size, save and load time, and the longest event-loop pause a save causes.

Fills a real Cache with N entries of realistic shapes (A/AAAA answers of 1-4 records, CNAME
chains ending in addresses, NXDOMAIN and NODATA with their SOA), encoded by the miss path's own
``build_entry``, then saves it with ``SnapshotStore.save()`` on a running event loop while a
probe task measures the gaps between two of its turns (``await asyncio.sleep(0)`` in a
loop: the time the loop could not run anything else, which a DNS datagram would wait; in
wall-clock time and in the loop thread's CPU time),
and loads it back into an empty cache. No sockets, no network: the file goes to a temporary
folder on the local disk (``--dir`` to choose one), removed at the end.

    python -m bench.snapshot_bench [--sizes 100000,1000000] [--no-uvloop] [--dir PATH]

Run time is bounded: the cache is filled from a pool of distinct answers (names differ per
entry, bodies repeat), each size is saved and loaded once.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import random
import shutil
import statistics
import sys
import tempfile
import time

from sidecar.dns.cache import Cache
from sidecar.dns.types import Rcode, RRType
from sidecar.dns.wire import make_key
from sidecar.miss.entry import TtlPolicy, build_entry
from sidecar.persist.store import SnapshotStore
from sidecar.upstream.records import Answer, Rec

#: Distinct answers the entries are drawn from (building every one is the slow part).
POOL = 20_000
_SOA_RDATA = (b"\x03ns1\x07example\x03net\x00" + b"\x0ahostmaster\x07example\x03net\x00"
              + (2024010101).to_bytes(4, "big") + (7200).to_bytes(4, "big")
              + (3600).to_bytes(4, "big") + (1209600).to_bytes(4, "big")
              + (300).to_bytes(4, "big"))


def _name(rng: random.Random, i: int) -> str:
    return f"h{i}-{rng.randrange(10**6)}.svc{rng.randrange(5000)}.example{rng.randrange(300)}.com"


def _answers(rng: random.Random) -> list[tuple[int, Answer, Rec | None]]:
    """(qtype, answer, soa) shapes: 55% A, 20% AAAA, 10% CNAME chains, 15% negative."""
    out: list[tuple[int, Answer, Rec | None]] = []
    for i in range(POOL):
        name = _name(rng, i)
        ttl = rng.choice((60, 300, 300, 600, 3600, 86400))
        roll = rng.random()
        if roll < 0.55:
            recs = [Rec(name, RRType.A, ttl, rng.randbytes(4)) for _ in range(rng.randint(1, 4))]
            out.append((RRType.A, Answer(Rcode.NOERROR, recs), None))
        elif roll < 0.75:
            recs = [Rec(name, RRType.AAAA, ttl, rng.randbytes(16))
                    for _ in range(rng.randint(1, 4))]
            out.append((RRType.AAAA, Answer(Rcode.NOERROR, recs), None))
        elif roll < 0.85:
            chain, owner = [], name
            for hop in range(rng.randint(1, 2)):
                target = f"edge{hop}-{rng.randrange(10**6)}.cdn{rng.randrange(50)}.net"
                chain.append(Rec(owner, RRType.CNAME, ttl,
                                 b"".join(bytes((len(p),)) + p.encode()
                                          for p in target.split(".")) + b"\x00"))
                owner = target
            chain += [Rec(owner, RRType.A, 60, rng.randbytes(4)) for _ in range(rng.randint(1, 3))]
            out.append((RRType.A, Answer(Rcode.NOERROR, chain), None))
        else:
            soa = Rec("example.com", RRType.SOA, 3600, _SOA_RDATA)
            rcode = Rcode.NXDOMAIN if rng.random() < 0.7 else Rcode.NOERROR
            out.append((RRType.A, Answer(rcode, [], [soa]), None))
    return out


def fill(cache: Cache, n: int, rng: random.Random) -> float:
    """Put ``n`` entries in ``cache``; returns their mean body length."""
    policy = TtlPolicy(prefetch=True)
    pool = _answers(rng)
    now = time.monotonic()
    built = []
    for j, (qtype, answer, soa) in enumerate(pool):
        key = make_key(f"p{j}.pool.test", qtype)
        built.append(build_entry(key, qtype, answer, soa, policy, now - rng.uniform(0, 50)))
    body_total = 0
    for i in range(n):
        e = built[i % POOL]
        key = make_key(f"n{i}.w{i % 977}.example{i % 301}.com", RRType.A if i % 4 else RRType.AAAA)
        cache.put(key, e)
        body_total += len(e[2])
    return body_total / max(n, 1)


async def save_with_probe(store: SnapshotStore) -> dict:
    """One save with the probe running: its seconds, and the loop's pauses (longest and
    99th percentile, wall clock and the loop thread's own CPU time: on a shared machine a
    wall-clock pause much longer than its CPU time is the thread waiting for a core)."""
    gaps: list[tuple[float, float]] = []
    done = False

    async def probe() -> None:
        perf, cpu = time.perf_counter, time.thread_time
        last, last_cpu = perf(), cpu()
        while not done:
            await asyncio.sleep(0)
            now, now_cpu = perf(), cpu()
            gaps.append((now - last, now_cpu - last_cpu))
            last, last_cpu = now, now_cpu

    task = asyncio.get_running_loop().create_task(probe())
    await asyncio.sleep(0)
    t = time.perf_counter()
    result = await store.save()
    took = time.perf_counter() - t
    done = True
    await task
    if not result.ok:
        raise SystemExit(f"save failed: {result.error}")
    walls = sorted(g[0] for g in gaps)
    cpus = sorted(g[1] for g in gaps)
    p99 = max(0, int(len(walls) * 0.99) - 1)
    return {"save_s": took, "turns": len(gaps), "max_ms": walls[-1] * 1e3,
            "p99_ms": walls[p99] * 1e3, "max_cpu_ms": cpus[-1] * 1e3,
            "median_ms": statistics.median(walls) * 1e3}


def run_size(n: int, folder: str) -> dict:
    rng = random.Random(n)
    cache = Cache(n, memory_limit=8 << 30)
    t = time.perf_counter()
    mean_body = fill(cache, n, rng)
    fill_s = time.perf_counter() - t
    path = os.path.join(folder, f"cache-{n}.snap")
    store = SnapshotStore(path, 0, cache)
    gc.collect()
    gc.freeze()  # as the server does after start: the entries are not the GC's work
    probe = asyncio.run(save_with_probe(store))
    size = os.path.getsize(path)
    fresh = Cache(n, memory_limit=8 << 30)
    loader = SnapshotStore(path, 0, fresh)
    t = time.perf_counter()
    loaded = loader.load()
    load_s = time.perf_counter() - t
    if loaded.loaded != len(cache) or loaded.stopped_reason != "complete":
        raise SystemExit(f"load mismatch: {loaded}")
    os.unlink(path)
    gc.unfreeze()
    return {"entries": n, "mean_body": mean_body, "bytes": size, "fill_s": fill_s,
            "load_s": load_s, **probe}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", default="100000,1000000")
    ap.add_argument("--no-uvloop", action="store_true")
    ap.add_argument("--dir", default=None, help="folder for the snapshot files")
    args = ap.parse_args(argv)
    if not args.no_uvloop:
        try:
            import uvloop

            asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
            loop_name = "uvloop"
        except ImportError:
            loop_name = "asyncio"
    else:
        loop_name = "asyncio"
    folder = tempfile.mkdtemp(prefix="snapbench-", dir=args.dir)
    print(f"python {sys.version.split()[0]}, loop {loop_name}, folder {folder},"
          f" load average {os.getloadavg()[0]:.2f} (other work on the machine shows up"
          " as longer pauses)")
    print(f"{'entries':>9} {'body B':>7} {'file MB':>8} {'B/entry':>8} {'save s':>7}"
          f" {'pause max ms':>12} {'p99 ms':>7} {'max cpu ms':>10} {'load s':>7}"
          f" {'load us/entry':>13}")
    try:
        for n in (int(x) for x in args.sizes.split(",")):
            r = run_size(n, folder)
            print(f"{r['entries']:>9} {r['mean_body']:>7.0f} {r['bytes'] / 1e6:>8.1f}"
                  f" {r['bytes'] / n:>8.0f} {r['save_s']:>7.2f} {r['max_ms']:>12.2f}"
                  f" {r['p99_ms']:>7.2f} {r['max_cpu_ms']:>10.2f} {r['load_s']:>7.2f}"
                  f" {r['load_s'] / n * 1e6:>13.2f}", flush=True)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
