"""Real ``python -m sidecar`` processes started with ``--shared-cache``, sharing one real
redis-server, asked by dnspython over UDP on loopback; the fake upstream counts what
reaches it. The in-process behaviour is in tests/test_fleet_shared.py."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

import dns.message
import dns.query
import pytest

from sidecar.config import Config, HostPort
from sidecar.errors import ConfigError
from sidecar.testing.redisserver import RedisServer, available
from tests.helpers import free_port

pytestmark = pytest.mark.skipif(available() is not None, reason=str(available()))

PREFIX = "proc-test:v1:"


@pytest.fixture
def redis_server() -> Iterator[RedisServer]:
    with RedisServer() as srv:
        yield srv


class Node:
    def __init__(self, proc: Any, dns_port: int, http_port: int) -> None:
        self.proc, self.dns_port, self.http_port = proc, dns_port, http_port

    def ask(self, name: str, rdtype: str = "A") -> dns.message.Message:
        q = dns.message.make_query(name, rdtype)
        return dns.query.udp(q, "127.0.0.1", port=self.dns_port, timeout=3)

    def get(self, path: str) -> tuple[int, str]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.http_port}{path}",
                                        timeout=3) as r:
                return r.status, r.read().decode()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode()

    def shared(self) -> dict[str, Any]:
        status, body = self.get("/stats")
        assert status == 200, body
        return json.loads(body)["shared_cache"]


def start_nodes(sidecar_process: Any, up: Any, url: str, n: int) -> list[Node]:
    nodes = []
    for _ in range(n):
        dns_port, http_port = free_port(), free_port()
        proc = sidecar_process("--listen", f"127.0.0.1:{dns_port}",
                               "--http", f"127.0.0.1:{http_port}", "--upstream", up.address,
                               "--shared-cache", url, "--shared-cache-prefix", PREFIX)
        nodes.append(Node(proc, dns_port, http_port))
    for node in nodes:
        node.proc.wait_for("listening on")
        until = time.monotonic() + 10  # a loaded host may miss the first ping's deadline
        while node.shared()["state"] != "closed":
            assert time.monotonic() < until, node.shared()
            time.sleep(0.05)
    return nodes


def wait_written(node: Node, writes: int, seconds: float = 5.0) -> None:
    """Wait for ``node``'s background writes to reach the server (nothing to await across
    processes: bounded polling of its counters)."""
    until = time.monotonic() + seconds
    while (st := node.shared())["writes"] < writes or st["writes_inflight"]:
        assert time.monotonic() < until, st
        time.sleep(0.02)


def addresses(reply: dns.message.Message) -> set[str]:
    return {rr.to_text() for rrset in reply.answer for rr in rrset}


def test_a_name_resolved_by_one_process_is_answered_by_the_others(
        process_upstream, sidecar_process, redis_server):
    up = process_upstream
    a, b, c = start_nodes(sidecar_process, up, redis_server.url, 3)
    assert addresses(a.ask("www.example.test")) == {"10.0.0.1", "10.0.0.2"}
    wait_written(a, 1)
    keys = sorted(redis_server.cli("--scan", "--pattern", f"{PREFIX}*").split())
    data = f"{PREFIX}{{www.example.test/1/1}}"                    # the documented format
    assert keys == [data, data + "/lease"], keys
    up.reset_counts()
    for node in (b, c):
        assert addresses(node.ask("www.example.test")) == {"10.0.0.1", "10.0.0.2"}
    assert up.queries == 0, up.log
    for node in (b, c):
        st = node.shared()
        assert st["hits"] == 1 and st["state"] == "closed", st
        assert st["prefix"] == PREFIX and st["url"] == redis_server.url
    status, metrics = b.get("/metrics")
    assert status == 200
    assert "dns_sidecar_shared_cache_hits_total 1.0" in metrics.splitlines(), metrics
    for node in (a, b, c):
        assert node.proc.terminate() == 0


def test_killing_the_server_loses_no_answer_and_readyz_stays_up(
        process_upstream, sidecar_process, redis_server):
    up = process_upstream
    a, b = start_nodes(sidecar_process, up, redis_server.url, 2)
    for i in range(5):
        assert addresses(a.ask(f"h{i}.example.test")) == {"127.0.0.1"}
    redis_server.stop()
    for i in range(5, 45):                           # every answer still comes
        node = a if i % 2 else b
        assert addresses(node.ask(f"h{i}.example.test")) == {"127.0.0.1"}, i
        if i % 10 == 0:
            assert node.get("/readyz")[0] == 200
    for node in (a, b):
        st = node.shared()
        assert st["state"] != "closed" and st["breaker_opened"] >= 1, st
        assert st["skipped"] > 0, st                     # the dead server is not asked again
        assert node.get("/readyz")[0] == 200
        assert node.proc.terminate() == 0


def test_a_bad_url_exits_2_with_one_line_naming_the_flag(process_upstream, sidecar_process):
    proc = sidecar_process("--listen", f"127.0.0.1:{free_port()}", "--http", "off",
                           "--upstream", process_upstream.address,
                           "--shared-cache", "http://127.0.0.1:6379")
    assert proc.wait() == 2
    lines = [line for line in proc.lines if line.strip()]
    assert len(lines) == 1 and "--shared-cache" in lines[0], lines


def test_a_malformed_port_exits_2_too(process_upstream, sidecar_process):
    proc = sidecar_process("--listen", f"127.0.0.1:{free_port()}", "--http", "off",
                           "--upstream", process_upstream.address,
                           "--shared-cache", "redis://127.0.0.1:notaport")
    assert proc.wait() == 2
    lines = [line for line in proc.lines if line.strip()]
    assert len(lines) == 1 and "--shared-cache" in lines[0], lines


@pytest.mark.parametrize("url, problem", [
    ("http://127.0.0.1:6379", "expected a redis://"),
    ("redis://127.0.0.1:notaport", "bad port"),
    ("redis://127.0.0.1:6379/zero", "db number"),
    ("redis+cluster://127.0.0.1:7000/3", "only db 0"),
])
def test_bad_urls_are_config_errors_naming_the_flag(url, problem):
    with pytest.raises(ConfigError, match=f"--shared-cache: .*{problem}"):
        Config(upstreams=(HostPort("127.0.0.1", 53),), shared_cache=url).validate()


def test_a_prefix_with_braces_is_refused():
    """Braces in the prefix would make it the hash tag: one cluster slot for the fleet."""
    with pytest.raises(ConfigError, match="--shared-cache-prefix"):
        Config(upstreams=(HostPort("127.0.0.1", 53),), shared_cache="redis://127.0.0.1:1",
               shared_cache_prefix="{fleet}:").validate()
