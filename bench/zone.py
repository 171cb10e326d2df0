"""Generate the benchmark zone `bench.test` and dnsperf query files.

Zone content (all addresses are in 127.0.0.0/8, so nothing a benchmark resolves can send
traffic off the machine):

    @            SOA  (negative TTL = SOA minimum = 60 s)
    h<i>         A    127.1.x.y        i in [0, names)          warm sets for hit benchmarks
    *.w          A    127.2.0.1        any name below w.bench.test: endless cold names
    c<i>.crawl   A    127.0.0.(10+i%8) i in [0, crawl)          the crawler-burst hosts
    nx.*         nothing: NXDOMAIN with the SOA
"""

from __future__ import annotations

import argparse
from pathlib import Path

ZONE = "bench.test"
TTL = 3600
NEG_TTL = 60
CRAWL_IPS = [f"127.0.0.{10 + k}" for k in range(8)]


def crawl_ip(i: int) -> str:
    return CRAWL_IPS[i % len(CRAWL_IPS)]


def write_zone(path: str | Path, names: int = 10000, crawl: int = 5000) -> Path:
    path = Path(path)
    lines = [
        f"$ORIGIN {ZONE}.",
        f"$TTL {TTL}",
        f"@ IN SOA ns.{ZONE}. hostmaster.{ZONE}. 1 3600 600 86400 {NEG_TTL}",
        f"@ IN NS ns.{ZONE}.",
        "ns IN A 127.0.0.1",
        "*.w IN A 127.2.0.1",
    ]
    lines += [f"h{i} IN A 127.1.{(i >> 8) & 255}.{i & 255}" for i in range(names)]
    lines += [f"c{i}.crawl IN A {crawl_ip(i)}" for i in range(crawl)]
    path.write_text("\n".join(lines) + "\n")
    return path


def write_queries(path: str | Path, names: list[str], qtype: str = "A") -> Path:
    path = Path(path)
    path.write_text("".join(f"{n} {qtype}\n" for n in names))
    return path


def hit_names(n: int) -> list[str]:
    return [f"h{i}.{ZONE}" for i in range(n)]


def cold_names(tag: str, n: int, start: int = 0) -> list[str]:
    """Names nobody has asked for yet (answered by the *.w wildcard)."""
    return [f"{tag}{i}.w.{ZONE}" for i in range(start, start + n)]


def crawl_names(n: int, start: int = 0) -> list[str]:
    return [f"c{i}.crawl.{ZONE}" for i in range(start, start + n)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("zonefile")
    ap.add_argument("--names", type=int, default=10000)
    ap.add_argument("--crawl", type=int, default=5000)
    a = ap.parse_args()
    print(write_zone(a.zonefile, a.names, a.crawl))


if __name__ == "__main__":
    main()
