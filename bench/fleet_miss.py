"""Sidecar CPU per cache miss with the fleet's shared cache on a loopback redis-server.

``bench.miss_micro``'s layout (its minimal responder pinned to CPU 0, an in-process sidecar
pinned to CPU 1, distinct never-seen names, half A and half AAAA), plus a redis-server on
CPU 0 as ``--shared-cache``. Every miss is a shared miss: it pays the lookup and the lease
before asking upstream, and a background write after. ``--no-shared`` runs the same
measurement without the shared cache, for the difference on the same machine and moment.

    python -m bench.fleet_miss [--burst 250] [--rounds 3] [--no-shared]

Per round: sequential p50/p90 latency and CPU per miss (this process's: the client's
share is the same with and without), burst CPU per miss (process and main thread), and
the redis commands and the shared cache's batch counters (cumulative: lookup batches,
write batches, polls), so the round trips of a burst are a count, not a time.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import time
from typing import Any

from bench import common
from bench.miss_micro import burst_cost, client_socket, responder_process, run_loop, sequential
from sidecar import Config, HostPort, Sidecar
from sidecar.server import tune_gc
from sidecar.testing.redisserver import RedisServer


def _commands(srv: RedisServer) -> dict[str, int]:
    """The server's per-command call counts (INFO commandstats)."""
    out: dict[str, int] = {}
    for line in srv.cli("info", "commandstats").splitlines():
        if line.startswith("cmdstat_"):
            name, _, rest = line.partition(":")
            calls = rest.split(",")[0].partition("=")[2]
            out[name[len("cmdstat_"):]] = int(calls)
    return out


def _round_trips(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    return {k: after.get(k, 0) - before.get(k, 0) for k in after
            if after.get(k, 0) != before.get(k, 0)}


async def measure(port: int, burst: int, rounds: int, srv: RedisServer | None,
                  deadline: float) -> list[dict]:
    sc = Sidecar(Config(listen=(HostPort("127.0.0.1", 0),), http=None,
                        upstreams=(HostPort("127.0.0.1", port),), timeout=2.0, tries=2,
                        shared_cache=srv.url if srv is not None else None,
                        shared_cache_timeout=deadline))
    await sc.start()
    tune_gc()
    s = client_socket(sc.dns_addresses[0].port)
    tag = f"f{os.getpid()}"
    results = []
    try:
        # One unmeasured burst first: it opens the client's pool of connections, whose
        # set-up (and the deadlines it may blow) is not a miss's steady cost.
        await burst_cost(s, f"w.{tag}", burst, lambda: _settle(sc))
        for rnd in range(rounds):
            c0 = time.process_time()
            lat = await sequential(s, f"r{rnd}.{tag}")
            await _settle(sc)  # the background writes are part of a miss's cost
            seq_cpu = (time.process_time() - c0) / len(lat)
            cmds0 = _commands(srv) if srv is not None else {}
            # the background writes are part of a miss's cost
            wall, cpu, main_cpu = await burst_cost(s, f"r{rnd}.{tag}", burst,
                                                   lambda: _settle(sc))
            row: dict[str, Any] = {
                "seq_p50_us": lat[150] * 1e6, "seq_p90_us": lat[270] * 1e6,
                "seq_cpu_per_miss_us": seq_cpu * 1e6,
                "burst_ms": wall * 1e3, "cpu_per_miss_us": cpu / burst * 1e6,
                "main_cpu_per_miss_us": main_cpu / burst * 1e6}
            if srv is not None:
                row["redis_calls"] = _round_trips(cmds0, _commands(srv))
                st = sc.shared.stats() if sc.shared is not None else {}
                row["shared"] = {k: st[k] for k in ("busy", "skipped", "write_drops", "state",
                                                    "errors", "batches")}
            results.append(row)
            print(f"round {rnd}: sequential p50 {row['seq_p50_us']:.0f} us, p90 "
                  f"{row['seq_p90_us']:.0f} us, CPU/miss {row['seq_cpu_per_miss_us']:.0f} us; burst of {burst}: {row['burst_ms']:.0f} ms, "
                  f"CPU/miss {row['cpu_per_miss_us']:.0f} us (main thread "
                  f"{row['main_cpu_per_miss_us']:.0f}) {row.get('redis_calls', '')} "
                  f"{row.get('shared', '')}", flush=True)
    finally:
        s.close()
        await sc.stop()
    return results


async def _settle(sc: Sidecar, seconds: float = 10.0) -> None:
    """Wait (bounded) for the shared cache's background writes."""
    if sc.shared is not None:
        await sc.shared.flush(seconds)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--burst", type=int, default=250,
                    help="misses sent at once (default 250)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--port", type=int, default=25391, help="the responder's UDP port")
    ap.add_argument("--no-shared", action="store_true", help="without the shared cache")
    ap.add_argument("--deadline-ms", type=float, default=1000.0,
                    help="--shared-cache-timeout: long by default, so that a burst that "
                         "saturates the CPU still takes the whole shared path per miss "
                         "instead of skipping it (counted as busy)")
    ap.add_argument("--save", action="store_true", help="save bench/results/fleet_miss.json")
    a = ap.parse_args()
    srv = None if a.no_shared else RedisServer()
    try:
        with responder_process(a.port) as two:
            if srv is not None:
                srv.start()
                if two:
                    subprocess.run(["taskset", "-p", "-c", "0", str(srv.proc.pid)],
                                   capture_output=True, check=False)
            rows = run_loop(measure(a.port, a.burst, a.rounds, srv, a.deadline_ms / 1000))
        if a.save:
            path = common.save_json("fleet_miss", {
                "config": {"burst": a.burst, "rounds": a.rounds, "shared": srv is not None,
                           "deadline_ms": a.deadline_ms},
                "rounds": rows})
            print(f"saved {path}")
    finally:
        if srv is not None:
            srv.cleanup()

if __name__ == "__main__":
    main()
