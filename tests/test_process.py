"""The real ``dns-sidecar`` process: start-up line, exit codes, SIGTERM, and ``dig``."""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import sys
import threading
import time

import dns.message
import dns.query
import dns.rcode
import pytest

from sidecar.testing.fakeupstream import FakeUpstream
from tests.helpers import free_port


def sidecar_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "sidecar", *args]


@pytest.fixture
def threaded_upstream():
    up = FakeUpstream()
    up.start_in_thread()
    yield up
    up.stop_in_thread()


class Proc:
    """A sidecar process; a thread reads its stderr into ``lines`` (so the process never
    blocks on a full pipe, and no line is missed when several arrive in one read)."""

    def __init__(self, args: list[str]) -> None:
        self.p = subprocess.Popen(sidecar_cmd(*args), stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True)
        self.lines: list[str] = []
        self._seen = 0
        self._new = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.p.stderr is not None
        for line in iter(self.p.stderr.readline, ""):
            with self._new:
                self.lines.append(line)
                self._new.notify_all()
        with self._new:
            self._new.notify_all()

    def wait_for_line(self, needle: str, timeout: float = 15) -> str:
        """The first line logged after the last one this returned that contains
        ``needle``."""
        end = time.monotonic() + timeout
        with self._new:
            while True:
                for i in range(self._seen, len(self.lines)):
                    if needle in self.lines[i]:
                        self._seen = i + 1
                        return self.lines[i]
                left = end - time.monotonic()
                if left <= 0 or not self._reader.is_alive():
                    raise AssertionError(f"{needle!r} not logged; got {self.lines!r}")
                self._new.wait(left)

    def finish(self, timeout: float) -> str:
        """Wait for the exit; all it wrote to stderr."""
        self.p.wait(timeout=timeout)
        self._reader.join(timeout)
        return "".join(self.lines)

    def kill(self) -> None:
        if self.p.poll() is None:
            self.p.kill()
            self.p.wait()


@pytest.fixture
def procs():
    started: list[Proc] = []

    def start(*args: str) -> Proc:
        pr = Proc(list(args))
        started.append(pr)
        return pr

    yield start
    for pr in started:
        pr.kill()


def test_sigterm_exits_zero_after_serving(threaded_upstream, procs):
    port = free_port()
    pr = procs("--listen", f"127.0.0.1:{port}", "--http", "off",
               "--upstream", threaded_upstream.address)
    line = pr.wait_for_line("listening on")
    assert f"127.0.0.1:{port}" in line and threaded_upstream.address in line
    r = dns.query.udp(dns.message.make_query("www.example.test", "A"), "127.0.0.1", port=port,
                      timeout=3)
    assert r.rcode() == dns.rcode.NOERROR and r.answer
    r = dns.query.tcp(dns.message.make_query("www.example.test", "A"), "127.0.0.1", port=port,
                      timeout=3)
    assert r.answer
    pr.p.send_signal(signal.SIGTERM)
    assert pr.p.wait(timeout=10) == 0


def test_bad_flag_exits_2_with_one_line(procs):
    for args, needle in ((["--min-ttl", "-1"], "--min-ttl"),
                         (["--upstream", "not-an-ip"], "--upstream"),
                         (["--listen", "127.0.0.1"], "--listen"),
                         (["--bogus"], "--bogus"),
                         (["--upstream", "127.0.0.1", "--min-ttl", "90", "--max-ttl", "60"],
                          "--min-ttl")):
        pr = procs(*args)
        err = pr.finish(timeout=20)
        assert pr.p.returncode == 2, (args, err)
        lines = err.strip().splitlines()
        assert len(lines) == 1 and needle in lines[0], (args, err)


def test_bad_env_value_exits_2(tmp_path):
    env = {"DNS_SIDECAR_MIN_TTL": "soon", "PATH": "/usr/bin:/bin"}
    p = subprocess.run(sidecar_cmd("--upstream", "127.0.0.1"), env=env, capture_output=True,
                       text=True, timeout=20)
    assert p.returncode == 2 and "--min-ttl" in p.stderr


def test_port_in_use_exits_1(threaded_upstream):
    holder = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    holder.bind(("127.0.0.1", 0))
    port = holder.getsockname()[1]
    try:
        p = subprocess.run(sidecar_cmd("--listen", f"127.0.0.1:{port}", "--http", "off",
                                       "--upstream", threaded_upstream.address),
                           capture_output=True, text=True, timeout=20)
    finally:
        holder.close()
    assert p.returncode == 1
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and str(port) in lines[0] and "cannot" in lines[0]


@pytest.mark.skipif(shutil.which("dig") is None, reason="dig is not installed")
def test_dig_udp_and_tcp(threaded_upstream, procs):
    port = free_port()
    pr = procs("--listen", f"127.0.0.1:{port}", "--http", "off",
               "--upstream", threaded_upstream.address)
    pr.wait_for_line("listening on")
    for extra in ([], ["+tcp"]):
        out = subprocess.run(["dig", "@127.0.0.1", "-p", str(port), "+short", "+time=2",
                              "+tries=1", *extra, "alias.example.test", "A"],
                             capture_output=True, text=True, timeout=10).stdout.split()
        assert out == ["www.example.test.", "10.0.0.1", "10.0.0.2"]
    pr.p.send_signal(signal.SIGINT)
    assert pr.p.wait(timeout=10) == 0


def _http_status(url: str) -> int:
    import urllib.error
    import urllib.request

    try:
        return urllib.request.urlopen(url, timeout=3).status
    except urllib.error.HTTPError as exc:
        return exc.code


def test_lameduck_then_drain(threaded_upstream, procs):
    port, http = free_port(), free_port()
    pr = procs("--listen", f"127.0.0.1:{port}", "--http", f"127.0.0.1:{http}",
               "--upstream", threaded_upstream.address, "--lameduck", "3")
    pr.wait_for_line("listening on")
    assert _http_status(f"http://127.0.0.1:{http}/readyz") == 200
    pr.p.send_signal(signal.SIGTERM)
    pr.wait_for_line("lame duck")
    # Not ready at once, but DNS keeps answering during the lame-duck period.
    assert _http_status(f"http://127.0.0.1:{http}/readyz") == 503
    assert _http_status(f"http://127.0.0.1:{http}/healthz") == 200
    r = dns.query.udp(dns.message.make_query("www.example.test", "A"), "127.0.0.1", port=port,
                      timeout=3)
    assert r.answer
    assert pr.p.wait(timeout=15) == 0


def test_sigterm_under_load_answers_in_flight_queries(threaded_upstream, procs):
    port = free_port()
    pr = procs("--listen", f"127.0.0.1:{port}", "--http", "off",
               "--upstream", threaded_upstream.address, "--timeout", "3")
    pr.wait_for_line("listening on")
    threaded_upstream.latency = 0.5
    socks = []
    try:
        for i in range(50):
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            s.settimeout(5)
            q = dns.message.make_query(f"h{i}.example.test", "A")
            s.sendto(q.to_wire(), ("127.0.0.1", port))
            socks.append((s, q.id))
        # All 50 reached the upstream: they are in flight inside the sidecar now.
        threaded_upstream.wait_for_queries_blocking(50, timeout=10)
        pr.p.send_signal(signal.SIGTERM)
        for s, qid in socks:
            r = dns.message.from_wire(s.recv(4096))
            assert r.id == qid and r.rcode() == dns.rcode.NOERROR and r.answer
    finally:
        for s, _ in socks:
            s.close()
    assert pr.p.wait(timeout=15) == 0


def test_sighup_reload_keeps_serving_and_cache(threaded_upstream, procs):
    port = free_port()
    pr = procs("--listen", f"127.0.0.1:{port}", "--http", "off",
               "--upstream", threaded_upstream.address)
    pr.wait_for_line("listening on")
    q = dns.message.make_query("www.example.test", "A")
    assert dns.query.udp(q, "127.0.0.1", port=port, timeout=3).answer
    pr.p.send_signal(signal.SIGHUP)
    line = pr.wait_for_line("reloaded")
    assert "cache kept (1 entries)" in line
    assert dns.query.udp(q, "127.0.0.1", port=port, timeout=3).answer
    assert threaded_upstream.count("www.example.test", "A") == 1
    pr.p.send_signal(signal.SIGTERM)
    assert pr.p.wait(timeout=10) == 0


def test_upstream_pointing_at_itself_exits_1():
    port = free_port()
    p = subprocess.run(sidecar_cmd("--listen", f"127.0.0.1:{port}", "--http", "off",
                                   "--upstream", f"127.0.0.1:{port}"),
                       capture_output=True, text=True, timeout=20)
    assert p.returncode == 1 and "loop" in p.stderr and len(p.stderr.strip().splitlines()) == 1


def test_repeated_log_lines_are_rate_limited_in_the_process(threaded_upstream, procs):
    """Per-query warnings (here: upstream slots full against a silent upstream) from 1,000
    queries come out as at most a few lines per template and second, not one per query."""
    import re

    threaded_upstream.drop = True
    port = free_port()
    pr = procs("--listen", f"127.0.0.1:{port}", "--http", "off", "--max-inflight", "1",
               "--timeout", "0.2", "--tries", "1", "--upstream", threaded_upstream.address)
    pr.wait_for_line("listening on")
    first = len(pr.lines)
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
    sock.settimeout(5)
    t0 = time.monotonic()
    got = 0
    try:
        for i in range(1000):
            sock.sendto(dns.message.make_query(f"n{i}.example.test", "A").to_wire(),
                        ("127.0.0.1", port))
            if i % 50 == 49:  # stay inside the socket buffers
                while got < i - 100:
                    sock.recv(4096)
                    got += 1
        while got < 1000:
            sock.recv(4096)
            got += 1
    except TimeoutError:
        pass
    finally:
        sock.close()
    elapsed = time.monotonic() - t0
    pr.p.send_signal(signal.SIGTERM)
    assert pr.p.wait(timeout=10) == 0
    pr._reader.join(5)
    assert got >= 990
    warnings = [re.sub(r"n\d+\.example\.test", "N", line.split(" ", 3)[-1])
                for line in pr.lines[first:] if " WARNING " in line]
    per_template: dict[str, int] = {}
    for w in warnings:
        per_template[w] = per_template.get(w, 0) + 1
    assert warnings and max(per_template.values()) <= 10 * (int(elapsed) + 2), per_template
    assert len(warnings) < 300
