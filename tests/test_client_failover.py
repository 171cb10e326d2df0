"""FailoverResolver: set aside what cannot answer, never fail over an answer."""

from __future__ import annotations

import asyncio
import socket
import time

import aiohttp
import pytest
from aiohttp.resolver import AsyncResolver, ThreadedResolver

from client import (
    ClassCounters,
    FailoverResolver,
    FailureClass,
    ResolverUnavailable,
    failover_resolver,
    fetch,
    sidecar_connector,
    sidecar_resolver,
    trace_config,
)
from sidecar.testing.fakeupstream import FakeUpstream
from tests.client_servers import serving_http, start_raw


@pytest.fixture
def backup(second_upstream):
    """A second nameserver (the "pinned public resolver" of the chain), on loopback."""
    return second_upstream


@pytest.fixture
async def web():
    async with serving_http("127.0.0.41") as server:
        yield server


def chain(side, backup, **kw) -> FailoverResolver:
    return FailoverResolver(
        sidecar_resolver(side.dns_address, api_url=side.http_url, timeout=0.3, tries=1),
        AsyncResolver(nameservers=[backup.address], timeout=0.3, tries=1),
        names=["sidecar", "backup"],
        **kw,
    )


async def test_first_resolver_answers_and_is_reported(side, backup):
    seen = []
    r = chain(side, backup, on_lookup=seen.append)
    try:
        got = await r.resolve("crawl40.example.test", 80, socket.AF_UNSPEC)
        assert [a["host"] for a in got] == ["127.0.0.41"]
        assert r.answered_by("crawl40.example.test") == "sidecar"
        assert backup.queries == 0
        assert seen[0].resolver == "sidecar" and seen[0].attempts == (("sidecar", "answer"),)
        assert r.states[0].answers == 1
    finally:
        await r.close()


async def test_nxdomain_is_an_answer_not_a_failover(side, backup):
    r = chain(side, backup)
    try:
        with pytest.raises(OSError) as info:
            await r.resolve("nope.example.test", 80, socket.AF_UNSPEC)
        assert info.value.__cause__.args[0] == 4
        assert not isinstance(info.value, ResolverUnavailable)
        assert backup.queries == 0
        assert r.answered_by("nope.example.test") == "sidecar"
        assert r.states[0].negative == 1 and r.states[0].set_aside == 0
    finally:
        await r.close()


async def test_sidecar_stopped_fails_over_then_sets_it_aside(side, backup):
    r = chain(side, backup, backoff=30.0)
    try:
        await side.stop()  # the sidecar's port is closed now: "Could not contact"
        got = await r.resolve("crawl40.example.test", 80, socket.AF_INET)
        assert [a["host"] for a in got] == ["127.0.0.41"]
        assert r.answered_by("crawl40.example.test") == "backup"
        status = r.status()
        assert status[0]["available"] is False and status[0]["aside_for"] > 0
        assert r.states[0].set_aside == 1

        seen = []
        r.on_lookup = seen.append
        await r.resolve("crawl42.example.test", 80, socket.AF_INET)
        assert seen[-1].attempts == (("sidecar", "set-aside"), ("backup", "answer"))
    finally:
        await r.close()


async def test_back_off_expires_and_doubles(backup):
    flaky = FakeUpstream()  # a nameserver that goes away and comes back on its port
    await flaky.start()
    r = FailoverResolver(
        sidecar_resolver(flaky.address, timeout=0.3, tries=1, lookup_timeout=0.3),
        AsyncResolver(nameservers=[backup.address], timeout=0.3, tries=1),
        names=["sidecar", "backup"],
        backoff=10.0,
        max_backoff=25.0,
        max_timeouts=1,  # one timeout with nothing answered is enough here
        stall_timeout=None,
    )
    try:
        await flaky.stop()
        await r.resolve("crawl40.example.test", 80, socket.AF_INET)
        s = r.states[0]
        assert s.backoff == 10.0
        for i, expected in enumerate((20.0, 25.0)):
            s.aside_until = time.monotonic()  # the back-off period is over
            await r.resolve(f"crawl4{i + 1}.example.test", 80, socket.AF_INET)  # probe fails
            assert s.backoff == expected and not s.available(time.monotonic())
        # the sidecar comes back: the next probe answers and resets it
        await flaky.start()
        s.aside_until = time.monotonic()
        await r.resolve("crawl43.example.test", 80, socket.AF_INET)
        assert r.answered_by("crawl43.example.test") == "sidecar"
        assert s.backoff == 0.0 and s.available(time.monotonic())
    finally:
        await r.close()
        await flaky.stop()


def short_chain(side, backup, **kw) -> FailoverResolver:
    """The sidecar with a short lookup deadline (so its timeouts come quickly)."""
    kw.setdefault("stall_timeout", None)
    return FailoverResolver(
        sidecar_resolver(side.dns_address, api_url=side.http_url, lookup_timeout=0.3),
        AsyncResolver(nameservers=[backup.address], timeout=0.3, tries=1),
        names=["sidecar", "backup"],
        **kw,
    )


async def test_one_dead_name_never_sets_the_resolver_aside(side, backup):
    side.upstream.drop_names = {"crawl44.example.test"}
    backup.drop_names = {"crawl44.example.test"}
    r = short_chain(side, backup)
    try:
        for _ in range(3):  # the same dead name, again and again, nothing else asked
            with pytest.raises(OSError):  # (the sidecar's SERVFAIL may arrive by the last)
                await r.resolve("crawl44.example.test", 80, socket.AF_INET)
        assert r.states[0].timeouts >= 2 and r.states[0].set_aside == 0
        assert r.states[0].available(time.monotonic())
    finally:
        await r.close()


async def test_timeouts_with_answers_in_between_never_set_aside(side, backup):
    dead = [f"crawl{i}.example.test" for i in (51, 52, 53, 54)]
    side.upstream.drop_names = set(dead)
    backup.drop_names = set(dead)
    r = short_chain(side, backup)
    try:
        async def live():
            for i in range(40):  # answered while the dead names wait
                await r.resolve(f"crawl{100 + i}.example.test", 80, socket.AF_INET)
                await asyncio.sleep(0.01)

        results = await asyncio.gather(live(), *(r.resolve(n, 80, socket.AF_INET) for n in dead),
                                       return_exceptions=True)
        assert all(isinstance(x, ResolverUnavailable) for x in results[1:])
        assert r.states[0].timeouts == 4 and r.states[0].set_aside == 0
    finally:
        await r.close()


async def test_several_names_timing_out_with_nothing_answered_set_aside(side, backup):
    dead = [f"crawl{i}.example.test" for i in (55, 56, 57)]
    side.upstream.drop_names = set(dead)
    r = short_chain(side, backup, max_timeouts=3)
    try:
        got = await asyncio.gather(*(r.resolve(n, 80, socket.AF_INET) for n in dead))
        assert [g[0]["host"] for g in got] == ["127.0.0.56", "127.0.0.57", "127.0.0.58"]
        s = r.states[0]
        assert s.set_aside == 1 and not s.available(time.monotonic())
        assert "3 names timed out" in s.reason
    finally:
        await r.close()


async def test_dead_domain_gets_the_sidecars_servfail_within_the_default_budget(side, backup):
    """The default lookup budget outlasts the sidecar's (2 s here): SERVFAIL, an answer,
    even on a warm channel, whose c-ares tries start at 250 ms."""
    side.upstream.drop_names = {"crawl58.example.test"}
    r = FailoverResolver(sidecar_resolver(side.dns_address, api_url=side.http_url),
                         AsyncResolver(nameservers=[backup.address], timeout=0.3, tries=1),
                         names=["sidecar", "backup"])
    try:
        for i in range(8):  # RTT samples: c-ares now uses its 250 ms floor per try
            await r.resolve(f"crawl{120 + i}.example.test", 80, socket.AF_INET)
        with pytest.raises(OSError) as info:
            await r.resolve("crawl58.example.test", 80, socket.AF_INET)
        assert info.value.__cause__.args[0] == 3  # SERVFAIL from the sidecar
        assert backup.queries == 0
        assert r.states[0].set_aside == 0 and r.states[0].timeouts == 0
    finally:
        await r.close()


async def test_hung_resolver_is_set_aside_by_a_failed_health_check(backup):
    """A sidecar that answers nothing (DNS nor HTTP): lookups waiting on it move to the
    next resolver after one stall period and one failed /healthz, not a deadline each."""
    silent_dns = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    silent_dns.bind(("127.0.0.1", 0))
    silent_http = await start_raw("127.0.0.1", "silent")
    dns_port = silent_dns.getsockname()[1]
    seen = []
    r = FailoverResolver(
        sidecar_resolver(f"127.0.0.1:{dns_port}", api_url=f"http://127.0.0.1:{silent_http.port}"),
        AsyncResolver(nameservers=[backup.address], timeout=0.3, tries=1),
        names=["sidecar", "backup"], stall_timeout=0.2, on_lookup=seen.append,
    )
    try:
        started = time.monotonic()
        got = await asyncio.gather(*(r.resolve(f"crawl{i}.example.test", 80, socket.AF_INET)
                                     for i in range(60, 70)))
        elapsed = time.monotonic() - started
        assert [g[0]["host"] for g in got] == [f"127.0.0.{i + 1}" for i in range(60, 70)]
        s = r.states[0]
        assert s.reason == "health check failed" and s.set_aside == 1
        assert {rec.attempts for rec in seen} == {(("sidecar", "set-aside"), ("backup", "answer"))}
        assert elapsed < 6.0  # not the attempt deadline (timing noted in the report)
        seen.clear()
        await r.resolve("crawl70.example.test", 80, socket.AF_INET)
        assert seen[0].attempts == (("sidecar", "set-aside"), ("backup", "answer"))
    finally:
        await r.close()
        silent_dns.close()
        await silent_http.stop()


async def test_stall_with_a_healthy_sidecar_keeps_it(side, backup):
    side.upstream.drop_names = {"crawl71.example.test"}
    r = FailoverResolver(sidecar_resolver(side.dns_address, api_url=side.http_url),
                         AsyncResolver(nameservers=[backup.address], timeout=0.3, tries=1),
                         names=["sidecar", "backup"], stall_timeout=0.1)
    try:
        with pytest.raises(OSError) as info:
            await r.resolve("crawl71.example.test", 80, socket.AF_INET)
        assert info.value.__cause__.args[0] == 3
        s = r.states[0]
        assert s.health_checks >= 1 and s.set_aside == 0
    finally:
        await r.close()


async def test_attempt_timeout_is_a_hard_deadline(side, backup):
    side.upstream.drop_names = {"crawl44.example.test"}
    slow = FailoverResolver(
        sidecar_resolver(side.dns_address, timeout=5.0, tries=3, lookup_timeout=None),
        AsyncResolver(nameservers=[backup.address], timeout=0.3, tries=1),
        names=["sidecar", "backup"],
        attempt_timeout=0.3,
    )
    try:
        seen = []
        slow.on_lookup = seen.append
        await slow.resolve("crawl44.example.test", 80, socket.AF_INET)
        assert seen[0].attempts == (("sidecar", "timeout"), ("backup", "answer"))
    finally:
        await slow.close()


async def test_servfail_is_an_answer(side, backup):
    side.upstream.name_rcode = {"crawl46.example.test": "SERVFAIL"}
    r = chain(side, backup)
    try:
        with pytest.raises(OSError) as info:
            await r.resolve("crawl46.example.test", 80, socket.AF_INET)
        assert info.value.__cause__.args[0] == 3
        assert backup.queries == 0
        assert r.states[0].set_aside == 0 and r.states[0].negative == 1
    finally:
        await r.close()


async def test_servfail_moves_on_when_configured(side, backup):
    side.upstream.name_rcode = {"crawl46.example.test": "SERVFAIL"}
    r = chain(side, backup, failover_on_servfail=True)
    try:
        await r.resolve("crawl46.example.test", 80, socket.AF_INET)
        assert r.answered_by("crawl46.example.test") == "backup"
        assert r.states[0].rcode_failovers == 1
        assert r.states[0].set_aside == 0 and r.states[0].available(time.monotonic())
    finally:
        await r.close()


async def test_nothing_left_is_dns_error(side, backup, web):
    """The sidecar stopped: fail over to the backup; the backup unreachable too: dns_error."""
    nothing = closed_udp_port()
    r = FailoverResolver(
        sidecar_resolver(side.dns_address, api_url=side.http_url),
        AsyncResolver(nameservers=[f"127.0.0.1:{nothing}"], timeout=0.3, tries=1),
        names=["sidecar", "backup"], backoff=30.0)
    conn = sidecar_connector(resolver=r)
    counters = ClassCounters()
    try:
        async with aiohttp.ClientSession(connector=conn, trace_configs=[trace_config()]) as s:
            await side.stop()
            first = await fetch(s, web.url("crawl40.example.test"), counters=counters)
            assert first.failure.kind is FailureClass.DNS_ERROR
            assert first.trace.dns_attempts == [("sidecar", "unreachable"),
                                                ("backup", "unreachable")]
            second = await fetch(s, web.url("crawl48.example.test"), counters=counters)
            assert second.failure.kind is FailureClass.DNS_ERROR  # everything set aside
            assert second.trace.dns_attempts == [("sidecar", "set-aside"), ("backup", "set-aside")]
            assert counters.dns_failures == 2
    finally:
        await r.close()


def closed_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def test_prewarmed_answers_survive_the_sidecar_being_set_aside(side, backup):
    r = chain(side, backup, backoff=30.0)
    try:
        result = await r.prewarm(["crawl49.example.test"])
        assert result.warmed == 1
        await side.stop()
        await r.resolve("crawl40.example.test", 80, socket.AF_INET)  # sets the sidecar aside
        assert not r.states[0].available(time.monotonic())
        before = backup.queries
        got = await r.resolve("crawl49.example.test", 80, socket.AF_UNSPEC)
        assert [a["host"] for a in got] == ["127.0.0.50"]
        assert r.answered_by("crawl49.example.test") == "sidecar/prewarm"
        assert backup.queries == before
    finally:
        await r.close()


async def test_prewarm_never_raises(side):
    r = FailoverResolver(sidecar_resolver(side.dns_address, api_url=None))
    try:
        result = await r.prewarm(["crawl35.example.test"])  # no API: ValueError inside
        assert result.error and "api_url" in result.error and result.warmed == 0
        r.states[0].resolver.api_url = side.http_url
        result = await r.prewarm(["crawl35.example.test"], types=["MX"])
        assert result.error and "types" in result.error
        assert (await r.prewarm(["crawl35.example.test"])).warmed == 1
    finally:
        await r.close()


async def test_failover_resolver_builds_the_usual_chain():
    r = failover_resolver("127.0.0.1:5353", backoff=1.0)
    try:
        assert [s.name for s in r.states] == ["sidecar@127.0.0.1:5353", "system"]
        assert isinstance(r.states[1].resolver, ThreadedResolver)
        assert r.backoff == 1.0
    finally:
        await r.close()
    named = failover_resolver("127.0.0.1:5353", fallback_nameservers=["127.0.0.2"])
    try:
        assert [s.name for s in named.states] == ["sidecar@127.0.0.1:5353",
                                                  "nameservers@127.0.0.2", "system"]
        assert isinstance(named.states[1].resolver, AsyncResolver)
    finally:
        await named.close()


async def test_no_resolvers_is_the_default_chain():
    r = FailoverResolver()
    try:
        assert [s.name for s in r.states] == ["sidecar@127.0.0.1:5353", "system"]
        assert isinstance(r.states[1].resolver, ThreadedResolver)
        assert r.failover_on_servfail is False
    finally:
        await r.close()
