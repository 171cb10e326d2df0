"""Replacement without a lost query, with real processes: a sidecar (A) is replaced by a new
one (B) on the same address (``--reuse-port``) and the same snapshot (``--cache-file``) while
clients send a steady stream of queries, hits and misses, over UDP and TCP.

Two orders, both documented in docs/operations.md:

- ``new-first``: B starts beside A and loads the snapshot A saved last (here periodically,
  ``--cache-save-interval 1``; ``POST /snapshot`` gives a fresh one on demand), becomes
  ready, takes the new traffic over, and only then A gets SIGTERM, drains and exits.
- ``sigterm-first``: A gets SIGTERM first, writes its snapshot at once and stays in lame
  duck (still answering) longer than B needs to start; B loads that snapshot, becomes
  ready and takes the traffic over; A drains and exits.

Every query must be answered (none lost, no SERVFAIL), and the hit ratio right after the
replacement must be within a few points of the ratio before it: B answers the names A had
cached from its loaded snapshot (counted at the fake upstream). The listener-level half is
in tests/test_handover.py.
"""

from __future__ import annotations

import random
import signal
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field

import dns.exception
import dns.message
import dns.query
import dns.rcode
import pytest

from tests.helpers import free_port

HOT = 400  # names resolved before the stream starts: the hits
MISS_SHARE = 0.2  # queries for names never asked before: the misses
TCP_SHARE = 0.1
SENDERS = 4  # concurrent clients: the old process always has queries coming in
PACE = 0.004  # seconds between one sender's queries
WINDOW = 1000  # queries in the "before" and in the "after" window
MAX_QUERIES = 40_000
MAX_SECONDS = 90.0
UPSTREAM_LATENCY = 0.05  # misses stay in flight long enough to matter at a drain
TOLERANCE = 0.05  # hit ratio after vs before


def hot_name(i: int) -> str:
    return f"h{i}.example.test"


@dataclass
class Stream:
    """``SENDERS`` threads sending paced queries to ``port`` until stopped (bounded in count
    and time). Every query is one attempt: a timeout is a lost query, never retried."""

    port: int
    up: object
    sent: int = 0
    lost: list[str] = field(default_factory=list)
    bad: list[str] = field(default_factory=list)
    tcp: int = 0
    marks: dict[str, tuple[int, int]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.deadline = time.monotonic() + MAX_SECONDS
        self.misses = 0
        self.threads = [threading.Thread(target=self.run, args=(k,), daemon=True)
                        for k in range(SENDERS)]

    def start(self) -> None:
        for t in self.threads:
            t.start()

    def close(self) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(10)

    def run(self, k: int) -> None:
        rng = random.Random(k)
        while not self.stop.is_set() and time.monotonic() < self.deadline:
            with self.lock:
                if self.sent >= MAX_QUERIES:
                    return
                self.sent += 1
                n = self.sent
                if rng.random() < MISS_SHARE:
                    self.misses += 1
                    name = f"crawl{1_000_000 + n}.example.test"
                else:
                    name = hot_name(rng.randrange(HOT))
                tcp = rng.random() < TCP_SHARE
                self.tcp += tcp
            q = dns.message.make_query(name, "A")
            try:
                if tcp:
                    r = dns.query.tcp(q, "127.0.0.1", port=self.port, timeout=3)
                else:
                    r = dns.query.udp(q, "127.0.0.1", port=self.port, timeout=3)
            except (dns.exception.Timeout, OSError, EOFError) as exc:
                with self.lock:
                    self.lost.append(f"{name} {'tcp' if tcp else 'udp'}: {exc!r}")
            else:
                if r.rcode() != dns.rcode.NOERROR or not r.answer:
                    with self.lock:
                        self.bad.append(f"{name}: {dns.rcode.to_text(r.rcode())}")
            time.sleep(PACE)

    def mark(self, label: str) -> None:
        """Queries sent so far and upstream queries so far, under ``label``."""
        with self.lock:
            self.marks[label] = (self.sent, self.up.queries)  # type: ignore[attr-defined]

    def wait_sent(self, n: int, timeout: float = 30.0) -> None:
        end = time.monotonic() + timeout
        while self.sent < n:
            assert time.monotonic() < end and not self.stop.is_set(), (self.sent, n)
            time.sleep(0.05)

    def hit_ratio(self, start: str, end: str) -> float:
        (q0, u0), (q1, u1) = self.marks[start], self.marks[end]
        return 1 - (u1 - u0) / (q1 - q0)


def ready(http_port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/readyz", timeout=2) as r:
            return r.status == 200
    except (urllib.error.URLError, OSError):
        return False


def wait_ready(http_port: int, proc, timeout: float = 30.0) -> None:
    end = time.monotonic() + timeout
    while not ready(http_port):
        assert proc.p.poll() is None, proc.lines
        assert time.monotonic() < end, f"not ready after {timeout}s: {proc.lines!r}"
        time.sleep(0.05)


@pytest.mark.parametrize("order", ["new-first", "sigterm-first"])
def test_replacement_loses_no_query_and_keeps_the_hit_ratio(process_upstream, sidecar_process,
                                                            tmp_path, order):
    up, port, path = process_upstream, free_port(), tmp_path / "cache.snap"
    up.log_queries = False

    def start(http_port: int, interval: str, lameduck: str):
        return sidecar_process(
            "--listen", f"127.0.0.1:{port}", "--http", f"127.0.0.1:{http_port}",
            "--upstream", up.address, "--reuse-port", "--cache-file", str(path),
            "--cache-save-interval", interval, "--lameduck", lameduck, "--timeout", "2")

    http_a, http_b = free_port(), free_port()
    if order == "new-first":
        a = start(http_a, "1", "1")
    else:
        # Only the SIGTERM save carries the cache over; the lame duck outlasts B's start.
        a = start(http_a, "0", "8")
    wait_ready(http_a, a)
    for i in range(HOT):
        assert dns.query.udp(dns.message.make_query(hot_name(i), "A"), "127.0.0.1",
                             port=port, timeout=3).answer
    up.latency = UPSTREAM_LATENCY
    warm = len(a.lines)

    stream = Stream(port, up)
    stream.start()
    try:
        stream.mark("before")
        stream.wait_sent(WINDOW)
        stream.mark("before-end")
        if order == "new-first":
            # A periodic save that began after the warm-up: the second one logged after it.
            first = a.wait_for("saved", start=warm)
            a.wait_for("saved", start=first + 1)
            b = start(http_b, "1", "1")
            wait_ready(http_b, b)
            stream.mark("replaced")
            assert a.terminate() == 0
        else:
            a.p.send_signal(signal.SIGTERM)
            a.wait_for("saved", start=warm, timeout=10)
            b = start(http_b, "0", "1")
            wait_ready(http_b, b)
            stream.mark("replaced")
            # B took over while A was still answering: no gap between the two.
            assert a.index("draining") is None, a.lines
            assert a.wait(30) == 0
        line = b.matching("cache snapshot")[0]  # the load comes first
        assert "entries loaded" in line, line
        sent = stream.marks["replaced"][0]
        stream.wait_sent(sent + WINDOW)
        stream.mark("after")
    finally:
        stream.close()
    assert b.terminate() == 0

    before = stream.hit_ratio("before", "before-end")
    after = stream.hit_ratio("replaced", "after")
    print(f"\n{order}: {stream.sent} queries ({stream.tcp} over TCP, {stream.misses} misses);"
          f" hit ratio before {before:.3f}, right after the replacement {after:.3f};"
          f" {line.split(': ', 1)[-1].strip()}")
    assert not stream.lost, (len(stream.lost), stream.lost[:10])
    assert not stream.bad, (len(stream.bad), stream.bad[:10])
    assert after >= before - TOLERANCE, (before, after)
