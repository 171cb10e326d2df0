"""Benchmark 4: coalescing of identical cold queries.

1,000 UDP queries for the same never-seen name are sent at once (100 client sockets x 10
queries, distinct IDs) to each cache, whose upstream is delay_proxy.py (adding --delay-ms, 100
by default, so every query arrives while the first is still in flight) in front of nsd. The
proxy counts how many queries for that name reached the upstream. Also reported: how many of
the 1,000 got an answer (NOERROR with the record) within 5 s.

    python -m bench.coalescing [--rounds 3] [--concurrency 1000] [--delay-ms 100]
"""

from __future__ import annotations

import argparse
import os
import select
import socket
import time

from . import common, peers, zone


def burst(port: int, name: str, n: int, sockets: int = 100, deadline_s: float = 5.0) -> dict:
    socks = []
    for _ in range(min(sockets, n)):
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        s.setblocking(False)
        socks.append(s)
    sent = 0
    t0 = time.monotonic()
    try:
        for i in range(n):
            s = socks[i % len(socks)]
            try:
                s.sendto(common.build_query(name, 1, i), ("127.0.0.1", port))
                sent += 1
            except BlockingIOError:
                pass
        send_s = time.monotonic() - t0
        answered, errors, last = 0, 0, 0.0
        seen: set[int] = set()
        end = t0 + deadline_s
        while answered + errors < sent and time.monotonic() < end:
            ready, _, _ = select.select(socks, [], [], max(0.0, end - time.monotonic()))
            for s in ready:
                while True:
                    try:
                        data = s.recv(4096)
                    except BlockingIOError:
                        break
                    qid = int.from_bytes(data[:2], "big")
                    if qid in seen:
                        continue
                    seen.add(qid)
                    if common.rcode_of(data) == 0 and common.ancount_of(data):
                        answered += 1
                    else:
                        errors += 1
                    last = time.monotonic() - t0
    finally:
        for s in socks:
            s.close()
    return {"sent": sent, "answered": answered, "error_replies": errors,
            "unanswered": sent - answered - errors, "send_s": send_s, "last_answer_s": last}


def run(nsd: peers.Server, names: list[str], rounds: int = 3, concurrency: int = 1000,
        delay_ms: float = 100.0) -> dict:
    if common.have_cpus() > 1:
        os.sched_setaffinity(0, {common.LOAD_CPU})
    proxy = peers.start_proxy(nsd.port, delay_ms=delay_ms)
    servers: dict[str, peers.Server] = {}
    out: dict = {"config": {"rounds": rounds, "concurrency": concurrency, "delay_ms": delay_ms},
                 "peers": {n: [] for n in names}}
    try:
        for n in names:
            servers[n] = peers.start_peer(n, proxy.port)
        tag = f"co{os.getpid()}x{int(time.time()) % 100000}"
        for rnd in range(rounds):
            for n in names:
                name = f"{tag}r{rnd}{n.replace('-', '')}.w.{zone.ZONE}"
                before = peers.proxy_counts(proxy)["counts"].get(f"{name}/1", 0)
                m = burst(servers[n].port, name, concurrency)
                time.sleep(0.3)
                after = peers.proxy_counts(proxy)["counts"].get(f"{name}/1", 0)
                m["upstream_queries"] = after - before
                m["round"] = rnd
                out["peers"][n].append(m)
                common.log(f"coalescing round {rnd} {n}: upstream {m['upstream_queries']}, "
                           f"answered {m['answered']}/{m['sent']}, errors {m['error_replies']}")
    finally:
        for s in servers.values():
            s.stop()
        proxy.stop()
    out["summary"] = {n: {"upstream_queries": common.summarize([r["upstream_queries"] for r in runs]),
                          "answered": common.summarize([r["answered"] for r in runs]),
                          "error_replies": common.summarize([r["error_replies"] for r in runs])}
                      for n, runs in out["peers"].items()}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--concurrency", type=int, default=1000)
    ap.add_argument("--delay-ms", type=float, default=100.0)
    ap.add_argument("--peers", default=",".join(peers.CACHES))
    a = ap.parse_args()
    peers.run_against_nsd("coalescing", run, a.peers.split(","), a.rounds, a.concurrency, a.delay_ms)


if __name__ == "__main__":
    main()
