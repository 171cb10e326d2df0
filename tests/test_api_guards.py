"""The HTTP API's guards on mutating calls (issue 14, section 5), against the real API.

What a browser can be made to send: a cross-origin ``text/plain`` or form POST (no CORS
preflight), and, with DNS rebinding, a same-origin request whose ``Host`` is the attacker's
name. Each is refused before anything is resolved or flushed. Also the bounds on pre-warm
work: lookups per call, lookups admitted over all calls in progress (429), lookups resolving
at once, and the bytes the results may hold (results left out, counted in ``omitted``).

Requests go over real HTTP to the sidecar's listener: aiohttp where it can say what a
browser says, a raw socket where aiohttp would add or fix a header (no Host, no
Content-Type, Content-Length: 0).
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

import sidecar.ops.api as api_mod
from client.prewarm import PrewarmResult, PrewarmTable, post_prewarm
from sidecar import Sidecar
from sidecar.ops.api import host_names_listener, host_of, is_json_type, result_size
from sidecar.testing.fakeupstream import FakeUpstream
from tests.helpers import call, dns_query, running, url

TOKEN = "guard-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
#: What a browser sends for fetch(url, {method: "POST", body: "..."}) or sendBeacon.
BROWSER_TEXT = {"Content-Type": "text/plain;charset=UTF-8", "Origin": "http://evil.example"}
PREWARM = {"names": ["www.example.test"], "types": ["A"]}



async def raw_http(sc: Sidecar, head: str, body: bytes = b"") -> tuple[int, dict[str, str], Any]:
    """Send exactly ``head`` (request line and headers, CRLF added) and ``body``; return the
    status, headers (lower-case names) and JSON body."""
    addr = sc.http_address
    assert addr is not None
    reader, writer = await asyncio.open_connection(addr.host, addr.port)
    try:
        lines = head.strip("\n").split("\n") + ["Connection: close"]
        writer.write("\r\n".join(lines).encode("latin-1") + b"\r\n\r\n" + body)
        await writer.drain()
        data = await asyncio.wait_for(reader.read(), 10)
    finally:
        writer.close()
    top, _, payload = data.partition(b"\r\n\r\n")
    status_line, *header_lines = top.decode("latin-1").split("\r\n")
    headers = {}
    for line in header_lines:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return int(status_line.split()[1]), headers, json.loads(payload) if payload else None


async def stats(http: aiohttp.ClientSession, sc: Sidecar) -> dict[str, Any]:
    status, body, _ = await call(http, "GET", url(sc, "/stats"))
    assert status == 200
    return body


# ------------------------------------------------------------------ Content-Type


@pytest.mark.parametrize("headers", [
    BROWSER_TEXT,
    {"Content-Type": "text/plain"},
    {"Content-Type": "application/x-www-form-urlencoded"},
    {"Content-Type": "multipart/form-data; boundary=x"},
    {"Content-Type": "application/octet-stream"},
    {"Content-Type": "application/json-seq"},
    {"Content-Type": "application/json, text/plain"},
    {"Content-Type": "text/json"},
])
async def test_prewarm_refuses_bodies_that_are_not_json(up: FakeUpstream, sc: Sidecar,
                                                        http: aiohttp.ClientSession,
                                                        headers: dict[str, str]) -> None:
    status, body, resp = await call(http, "POST", url(sc, "/prewarm"), headers=headers,
                                    data=json.dumps(PREWARM))
    assert status == 415, body
    assert body["error"].startswith("Content-Type:")
    assert resp.headers["Accept"] == "application/json"
    assert up.queries == 0 and len(sc.cache.entries) == 0
    assert (await stats(http, sc))["api"]["refused"]["content_type"] == 1


async def test_browser_form_posts_are_refused(up: FakeUpstream, sc: Sidecar,
                                              http: aiohttp.ClientSession) -> None:
    """What an HTML form (urlencoded or multipart) posts cross-origin: aiohttp encodes it
    the way a browser does."""
    form = aiohttp.FormData({"names": "www.example.test"})
    status, _, _ = await call(http, "POST", url(sc, "/prewarm"), data=form)
    assert status == 415
    multipart = aiohttp.FormData()
    multipart.add_field("names", b'{"names": ["www.example.test"]}', filename="x.json",
                        content_type="application/json")
    status, _, _ = await call(http, "POST", url(sc, "/prewarm"), data=multipart)
    assert status == 415
    assert up.queries == 0


async def test_post_without_content_type_is_refused(up: FakeUpstream, sc: Sidecar) -> None:
    payload = json.dumps(PREWARM).encode()
    status, _, body = await raw_http(
        sc, f"POST /prewarm HTTP/1.1\nHost: 127.0.0.1\nContent-Length: {len(payload)}", payload)
    assert status == 415 and body["error"] == (
        "Content-Type: missing; POST /prewarm accepts only application/json bodies")
    status, _, _ = await raw_http(sc, "POST /prewarm HTTP/1.1\nHost: 127.0.0.1")
    assert status == 415  # a POST with no body at all
    assert up.queries == 0


@pytest.mark.parametrize("ctype", ["application/json", "application/json; charset=utf-8",
                                   "Application/JSON;charset=UTF-8"])
async def test_json_types_are_accepted(sc: Sidecar, http: aiohttp.ClientSession,
                                       ctype: str) -> None:
    status, body, _ = await call(http, "POST", url(sc, "/prewarm"), data=json.dumps(PREWARM),
                                 headers={"Content-Type": ctype})
    assert status == 200 and body["results"][0]["rcode"] == "NOERROR"


async def test_delete_without_body_needs_no_content_type(sc: Sidecar) -> None:
    """``curl -X DELETE`` sends neither a body nor a Content-Type."""
    await dns_query(sc, "www.example.test")
    status, _, body = await raw_http(sc, "DELETE /cache?name=www.example.test HTTP/1.1\n"
                                         "Host: 127.0.0.1")
    assert (status, body) == (200, {"deleted": 1, "name": "www.example.test"})
    await dns_query(sc, "www.example.test")
    # An empty body with any type is no body.
    status, _, body = await raw_http(sc, "DELETE /cache HTTP/1.1\nHost: localhost\n"
                                         "Content-Type: text/plain\nContent-Length: 0")
    assert (status, body) == (200, {"deleted": 1})


async def test_delete_with_a_body_is_refused(sc: Sidecar, http: aiohttp.ClientSession) -> None:
    await dns_query(sc, "www.example.test")
    status, body, _ = await call(http, "DELETE", url(sc, "/cache"), data="name=x",
                                 headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert status == 415 and body["error"].startswith("Content-Type:")
    # JSON, but a body: {"name": ...} there would otherwise flush everything.
    status, body, _ = await call(http, "DELETE", url(sc, "/cache"),
                                 json={"name": "www.example.test"})
    assert status == 400 and body["error"].startswith("body:")
    assert len(sc.cache.entries) == 1


# ------------------------------------------------------------------ Host (DNS rebinding)


@pytest.mark.parametrize("host", [
    "evil.example:8053",             # the rebinding page's own name
    "evil.example",
    "localhost.evil.example",
    "127.0.0.1.nip.io:8053",
    "localhost.",
    "0.0.0.0:8053",
    "[::]:8053",
    "10.9.9.9",                      # an address this listener is not on
    "",
    "localhost:80x",
    "[::1",
    "127.0.0.1:8053:1",
])
async def test_foreign_host_is_refused(up: FakeUpstream, sc: Sidecar,
                                       http: aiohttp.ClientSession, host: str) -> None:
    await dns_query(sc, "www.example.test")
    before = up.queries
    status, body, _ = await call(http, "POST", url(sc, "/prewarm"), headers={"Host": host},
                                 json={"names": ["h1.example.test"]})
    assert status == 421, body
    assert body["error"].startswith("Host:")
    status, body, _ = await call(http, "DELETE", url(sc, "/cache"), headers={"Host": host})
    assert status == 421, body
    assert up.queries == before and len(sc.cache.entries) == 1  # nothing resolved or flushed
    assert (await stats(http, sc))["api"]["refused"]["host"] == 2
    # Reads stay open to any Host (probes and Prometheus use the pod IP or a service name).
    for path in ("/healthz", "/stats", "/metrics", "/cache?name=www.example.test"):
        status, _, _ = await call(http, "GET", url(sc, path), headers={"Host": host})
        assert status == 200, path


async def test_missing_host_is_refused(up: FakeUpstream, sc: Sidecar) -> None:
    status, _, body = await raw_http(sc, "DELETE /cache HTTP/1.0")
    assert status == 421 and body["error"].startswith("Host: missing")


@pytest.mark.parametrize("host", ["localhost", "LOCALHOST:8053", "localhost:9999", "127.0.0.1",
                                  "127.0.0.1:1", "127.1.2.3:8053", "[::1]:8053", "[::1]", "::1",
                                  "[::ffff:127.0.0.1]:8053"])
async def test_loopback_hosts_are_accepted(sc: Sidecar, http: aiohttp.ClientSession,
                                           host: str) -> None:
    status, body, _ = await call(http, "POST", url(sc, "/prewarm"), headers={"Host": host},
                                 json=PREWARM)
    assert status == 200, body
    status, body, _ = await call(http, "DELETE", url(sc, "/cache"), headers={"Host": host})
    assert (status, body) == (200, {"deleted": 1})


async def test_host_is_compared_with_the_connection_address(
        sc: Sidecar, http: aiohttp.ClientSession, monkeypatch: pytest.MonkeyPatch) -> None:
    """The address the connection arrived on is what a wildcard listener is "named" by
    (e.g. the pod IP): the check is handed that address, not the configured one."""
    seen: list[tuple[str | None, str | None]] = []
    real = api_mod.host_names_listener

    def spy(host: str | None, local: str | None) -> bool:
        seen.append((host, local))
        return real(host, local)

    monkeypatch.setattr(api_mod, "host_names_listener", spy)
    status, _, _ = await call(http, "DELETE", url(sc, "/cache"))
    assert status == 200
    assert seen == [("127.0.0.1", "127.0.0.1")]


def test_host_rules() -> None:
    assert host_of("Example.COM:8053") == "example.com"
    assert host_of("[::1]:8053") == "::1"
    assert host_of("::1") == "::1"
    assert host_of("host:") == "host"
    for bad in ("", "[::1", "[::1]x", "a:b", "a:\u00b2"):
        assert host_of(bad) is None, bad
    assert not host_names_listener(host_of("a:1:2x"), "127.0.0.1")  # not an IPv6 address
    pod = "10.1.2.3"
    assert host_names_listener(pod, pod)                       # wildcard bind, pod IP
    assert host_names_listener(pod, "::ffff:10.1.2.3")         # dual-stack socket
    assert host_names_listener("fe80::1", "fe80::1%eth0")
    assert not host_names_listener(pod, "10.1.2.4")
    assert not host_names_listener(pod, None)
    assert not host_names_listener("0.0.0.0", "0.0.0.0")
    assert not host_names_listener("pod.namespace.svc", pod)
    assert not host_names_listener(None, "127.0.0.1")
    assert host_names_listener("127.0.0.5", None) and host_names_listener("localhost", None)
    assert is_json_type("application/json ; charset=utf-8")
    assert not is_json_type(None) and not is_json_type("application/jsonx")


# ------------------------------------------------------------------ with --api-token


async def test_token_replaces_the_host_check(up: FakeUpstream,
                                             http: aiohttp.ClientSession) -> None:
    """With --api-token any Host is accepted with the token (a rebinding page cannot send
    it); without the token the answer is 401, and the body type is still checked."""
    async with running(up, api_token=TOKEN) as sc:
        evil = {"Host": "evil.example:8053"}
        status, body, _ = await call(http, "POST", url(sc, "/prewarm"), headers=evil,
                                     json=PREWARM)
        assert status == 401, body
        status, _, _ = await call(http, "DELETE", url(sc, "/cache"), headers=evil)
        assert status == 401
        status, _, _ = await call(http, "POST", url(sc, "/prewarm"),
                                  headers={**AUTH, **BROWSER_TEXT}, data=json.dumps(PREWARM))
        assert status == 415
        assert up.queries == 0
        status, body, _ = await call(http, "POST", url(sc, "/prewarm"),
                                     headers={**AUTH, "Host": "dns-sidecar.crawl.svc:8053"},
                                     json=PREWARM)
        assert status == 200 and body["results"][0]["rcode"] == "NOERROR"
        status, body, _ = await call(http, "DELETE", url(sc, "/cache"), headers={**AUTH, **evil})
        assert (status, body) == (200, {"deleted": 1})
        refused = (await stats(http, sc))["api"]["refused"]
        assert refused == {"host": 0, "content_type": 1, "token": 2, "busy": 0}


async def test_cors_preflight_is_never_granted(sc: Sidecar, http: aiohttp.ClientSession) -> None:
    """A browser asks before a cross-origin JSON POST or any DELETE; no grant, no request."""
    for method in ("POST", "DELETE"):
        status, _, resp = await call(http, "OPTIONS", url(sc, "/prewarm"), headers={
            "Origin": "http://evil.example", "Access-Control-Request-Method": method,
            "Access-Control-Request-Headers": "content-type"})
        assert status == 405
        assert not any(h.lower().startswith("access-control-") for h in resp.headers)


async def test_the_client_passes_the_guards(sc: Sidecar) -> None:
    """client.prewarm posts JSON with the sidecar's address as Host."""
    payload = await post_prewarm(f"http://{sc.http_address}", ["www.example.test"])
    assert {r["type"] for r in payload["results"]} == {"A", "AAAA"}


# ------------------------------------------------------------------ pre-warm bounds


async def test_lookups_per_call_are_bounded(up: FakeUpstream, sc: Sidecar,
                                            http: aiohttp.ClientSession) -> None:
    """Names alone are bounded (10,000); with types they are bounded as lookups too."""
    names = [f"h{i}.example.test" for i in range(api_mod.MAX_PREWARM_NAMES)]
    status, body, _ = await call(http, "POST", url(sc, "/prewarm"),
                                 json={"names": names, "types": ["A", "AAAA", "MX"]})
    assert status == 400 and body["error"].startswith("names:")
    assert str(api_mod.MAX_PREWARM_LOOKUPS) in body["error"]
    assert up.queries == 0


async def test_backlog_over_calls_in_progress(up: FakeUpstream,
                                              http: aiohttp.ClientSession) -> None:
    """A slow upstream holds the first call's lookups; a second call that would pass the
    backlog is answered 429 with Retry-After and asks nobody; once the first is done, it
    is admitted."""
    up.name_latency.update({"h1.example.test": 0.5, "h2.example.test": 0.5})
    async with running(up, timeout=2.0) as sc:
        sc.prewarm.backlog = 4
        first = asyncio.ensure_future(call(http, "POST", url(sc, "/prewarm"), json={
            "names": ["h1.example.test", "h2.example.test"], "types": ["A", "AAAA"]}))
        await up.wait_for_queries(4)
        assert (await stats(http, sc))["prewarm"]["inflight"] == 4
        status, body, resp = await call(http, "POST", url(sc, "/prewarm"),
                                        json={"names": ["h3.example.test"], "types": ["A"]})
        assert status == 429, body
        assert body["error"].startswith("names:")
        assert resp.headers["Retry-After"] == str(api_mod.PREWARM_RETRY_AFTER)
        assert up.count("h3.example.test") == 0
        status, body, _ = await first
        assert status == 200 and len(body["results"]) == 4
        status, _, _ = await call(http, "POST", url(sc, "/prewarm"),
                                  json={"names": ["h3.example.test"], "types": ["A"]})
        assert status == 200
        # One call alone is admitted whatever its size (it is bounded per call).
        status, body, _ = await call(http, "POST", url(sc, "/prewarm"), json={
            "names": [f"h{i}.example.test" for i in range(10, 20)], "types": ["A"]})
        assert status == 200 and len(body["results"]) == 10
        got = await stats(http, sc)
        assert got["prewarm"]["inflight"] == 0
        assert got["api"]["refused"]["busy"] == 1


async def test_resolving_at_once_is_bounded_over_all_calls(
        up: FakeUpstream, http: aiohttp.ClientSession) -> None:
    """Lookups waiting on the resolver stay within PREWARM_CONCURRENCY over every call in
    progress (not per call), so pre-warm leaves the rest of --max-inflight to live misses."""
    async with running(up, timeout=2.0) as sc:
        api = sc.prewarm
        assert api.concurrency == api_mod.PREWARM_CONCURRENCY == 256
        api.concurrency = 3
        api.slots = asyncio.Semaphore(3)
        real = sc.resolver.resolve
        now = peak = 0
        gate = asyncio.Event()

        async def held(key: bytes) -> Any:
            nonlocal now, peak
            now += 1
            peak = max(peak, now)
            if now == 3:
                gate.set()
            try:
                await gate.wait()
                return await real(key)
            finally:
                now -= 1

        sc.resolver.resolve = held  # type: ignore[method-assign]
        calls = [asyncio.ensure_future(call(http, "POST", url(sc, "/prewarm"), json={
            "names": [f"h{k}{i}.example.test" for i in range(5)], "types": ["A"]}))
            for k in (1, 2, 3)]
        answers = await asyncio.gather(*calls)
    assert [a[0] for a in answers] == [200, 200, 200]
    assert peak == 3


async def test_results_are_bounded_in_bytes(up: FakeUpstream, sc: Sidecar,
                                            http: aiohttp.ClientSession) -> None:
    """A result that does not fit in the response budget is left out (counted); the
    response stays within the budget, and the client takes the missing name as not warmed."""
    await dns_query(sc, "www.example.test")
    await dns_query(sc, "many.example.test")  # 40 A records
    small = result_size({"name": "www.example.test", "type": "A", "rcode": "NOERROR",
                         "ttl": 300, "records": ["10.0.0.1", "10.0.0.2"]})
    sc.prewarm.response_budget = small + 100
    async with http.post(url(sc, "/prewarm"), json={
            "names": ["many.example.test", "www.example.test"], "types": ["A"]}) as resp:
        assert resp.status == 200
        raw = await resp.read()
    body = json.loads(raw)
    assert body["omitted"] == 1
    assert [r["name"] for r in body["results"]] == ["www.example.test"]
    assert len(raw) <= sc.prewarm.response_budget + 64  # 64: elapsed_ms, omitted and brackets

    table, result = PrewarmTable(), PrewarmResult()
    table.load(body, ["A"], result)
    assert result.warmed == 1 and "many.example.test" not in table
    assert table.lookup("many.example.test") is None  # ask DNS

    got = await stats(http, sc)
    assert got["prewarm"]["omitted"] == 1
    assert sc.prewarm.held == 0  # released with the response


async def test_response_budget_is_shared_by_calls_in_progress(
        up: FakeUpstream, http: aiohttp.ClientSession) -> None:
    up.name_latency["h1.example.test"] = 0.5
    async with running(up, timeout=2.0) as sc:
        await dns_query(sc, "www.example.test")
        www = {"name": "www.example.test", "type": "A", "rcode": "NOERROR", "ttl": 300,
               "records": ["10.0.0.1", "10.0.0.2"]}
        sc.prewarm.response_budget = result_size(www) + 10
        # The first call takes the budget with www (a cache hit) and stays in progress.
        first = asyncio.ensure_future(call(http, "POST", url(sc, "/prewarm"), json={
            "names": ["www.example.test", "h1.example.test"], "types": ["A"]}))
        await up.wait_for_queries(up.queries + 1)
        status, body, _ = await call(http, "POST", url(sc, "/prewarm"),
                                     json={"names": ["www.example.test"], "types": ["A"]})
        assert (status, body["omitted"], body["results"]) == (200, 1, [])
        status, body, _ = await first
        assert status == 200 and [r["name"] for r in body["results"]] == ["www.example.test"]
        assert body["omitted"] == 1  # h1 did not fit either
        status, body, _ = await call(http, "POST", url(sc, "/prewarm"),
                                     json={"names": ["www.example.test"], "types": ["A"]})
        assert (body["omitted"], len(body["results"])) == (0, 1)


@pytest.mark.parametrize("result", [
    {"name": "a", "type": "A", "rcode": "NOERROR", "ttl": 4294967295, "records": []},
    {"name": "x" * 63 + "." + "y" * 63, "type": "AAAA", "rcode": "BADVERS", "ttl": 0,
     "records": ["2001:db8:ffff:ffff:ffff:ffff:ffff:ffff"] * 50},
    {"name": 'a\\"b\\\\c.example', "type": "TXT", "rcode": "NOERROR", "ttl": 1,
     "records": ['"a\\001"\\b\ufffd"', '"\x01\x02"' * 40]},
    {"name": "e.example", "type": "NAPTR", "rcode": "65535", "ttl": 86400, "records": ["x"]},
])
def test_result_size_is_an_upper_bound(result: dict[str, Any]) -> None:
    assert len(json.dumps(result).encode()) + 2 <= result_size(result)


# ------------------------------------------------------------------ metrics


async def test_guard_counters_in_metrics(up: FakeUpstream, sc: Sidecar,
                                         http: aiohttp.ClientSession) -> None:
    await call(http, "POST", url(sc, "/prewarm"), headers=BROWSER_TEXT, data="{}")
    await call(http, "DELETE", url(sc, "/cache"), headers={"Host": "evil.example"})
    async with http.get(url(sc, "/metrics")) as resp:
        text = await resp.text()
    got = {(s.name, tuple(sorted(s.labels.items()))): s.value
           for f in text_string_to_metric_families(text) for s in f.samples}
    for reason, n in (("host", 1), ("content_type", 1), ("token", 0), ("busy", 0)):
        assert got[("dns_sidecar_api_refused_total", (("reason", reason),))] == n
    assert got[("dns_sidecar_prewarm_inflight", ())] == 0
    assert got[("dns_sidecar_prewarm_omitted_total", ())] == 0
