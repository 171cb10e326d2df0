"""FailoverResolver: set aside what cannot answer, never fail over an answer."""

from __future__ import annotations

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
from tests.client_servers import serving_http
from tests.fakeupstream import FakeUpstream


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
        sidecar_resolver(flaky.address, timeout=0.3, tries=1),
        AsyncResolver(nameservers=[backup.address], timeout=0.3, tries=1),
        names=["sidecar", "backup"],
        backoff=10.0,
        max_backoff=25.0,
    )
    try:
        await flaky.stop()
        await r.resolve("crawl40.example.test", 80, socket.AF_INET)
        s = r.states[0]
        assert s.backoff == 10.0
        for expected in (20.0, 25.0):
            s.aside_until = time.monotonic()  # the back-off period is over
            await r.resolve("crawl40.example.test", 80, socket.AF_INET)  # probe fails again
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


async def test_timeout_fails_over(side, backup):
    side.upstream.drop_names = {"crawl44.example.test"}
    r = chain(side, backup)
    try:
        got = await r.resolve("crawl44.example.test", 80, socket.AF_INET)
        assert [a["host"] for a in got] == ["127.0.0.45"]
        assert r.answered_by("crawl44.example.test") == "backup"
        assert r.states[0].failures == 1 and r.states[0].set_aside == 1
    finally:
        await r.close()


async def test_attempt_timeout_is_a_hard_deadline(side, backup):
    side.upstream.drop_names = {"crawl44.example.test"}
    slow = FailoverResolver(
        sidecar_resolver(side.dns_address, timeout=5.0, tries=3),
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


async def test_servfail_moves_on_without_setting_aside(side, backup):
    side.upstream.name_rcode = {"crawl46.example.test": "SERVFAIL"}
    r = chain(side, backup)
    try:
        await r.resolve("crawl46.example.test", 80, socket.AF_INET)
        assert r.answered_by("crawl46.example.test") == "backup"
        assert r.states[0].rcode_failovers == 1
        assert r.states[0].set_aside == 0 and r.states[0].available(time.monotonic())
    finally:
        await r.close()


async def test_servfail_is_raised_when_configured(side, backup):
    side.upstream.name_rcode = {"crawl46.example.test": "SERVFAIL"}
    r = chain(side, backup, failover_on_servfail=False)
    try:
        with pytest.raises(OSError) as info:
            await r.resolve("crawl46.example.test", 80, socket.AF_INET)
        assert info.value.__cause__.args[0] == 3
        assert backup.queries == 0
    finally:
        await r.close()


async def test_nothing_left_is_dns_error(side, backup, web):
    """The sidecar stopped: fail over to the backup; the backup stopped too: dns_error."""
    r = chain(side, backup, backoff=30.0)
    conn = sidecar_connector(resolver=r)
    counters = ClassCounters()
    try:
        async with aiohttp.ClientSession(connector=conn, trace_configs=[trace_config()]) as s:
            await side.stop()
            first = await fetch(s, web.url("crawl40.example.test"), counters=counters)
            assert first.ok and first.trace.resolver == "backup"
            assert first.trace.dns_attempts == [("sidecar", "unreachable"), ("backup", "answer")]

            await backup.stop()
            second = await fetch(s, web.url("crawl47.example.test"), counters=counters)
            assert second.failure.kind is FailureClass.DNS_ERROR
            assert second.failure.phase == "dns"
            assert second.trace.dns_attempts == [("sidecar", "set-aside"), ("backup", "unreachable")]

            third = await fetch(s, web.url("crawl48.example.test"), counters=counters)
            assert third.failure.kind is FailureClass.DNS_ERROR  # everything set aside
            assert third.trace.dns_attempts == [("sidecar", "set-aside"), ("backup", "set-aside")]
            assert counters.dns_failures == 2 and counters["ok"] == 1
    finally:
        await r.close()


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


async def test_failover_resolver_builds_the_usual_chain():
    r = failover_resolver("127.0.0.1:5353", fallback_nameservers=["127.0.0.2"], backoff=1.0)
    try:
        assert [s.name for s in r.states] == ["sidecar@127.0.0.1:5353", "public@127.0.0.2",
                                              "threaded"]
        assert isinstance(r.states[1].resolver, AsyncResolver)
        assert isinstance(r.states[2].resolver, ThreadedResolver)
        assert r.backoff == 1.0
    finally:
        await r.close()


async def test_needs_a_resolver():
    with pytest.raises(ValueError):
        FailoverResolver()
