"""examples/crawl.py runs against the sidecar and prints its summary (loopback only)."""

from __future__ import annotations

import asyncio
import importlib.util
import sys
from pathlib import Path

import pytest

from tests.client_servers import closed_port, serving_http

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "crawl.py"


def load_example():
    spec = importlib.util.spec_from_file_location("crawl_example", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


@pytest.fixture
async def web():
    async with serving_http("127.0.0.91") as server:  # crawl90.example.test
        yield server


async def test_crawl_summary(side, web):
    crawl = load_example()
    urls = [web.url("crawl90.example.test", f"/?{i}") for i in range(5)]
    urls += [
        web.url("nope.example.test"),
        f"http://crawl90.example.test:{closed_port('127.0.0.91')}/",
        web.url("crawl90.example.test", "/status/404"),
    ]
    report = await crawl.crawl(
        urls,
        sidecar=side.dns_address,
        api_url=side.http_url,
        fallback=None,
        threaded=False,
        concurrency=4,
        timeout=2.0,
        prewarm=True,
    )
    snap = report.counters.snapshot()
    assert snap["ok"] == 6  # a 404 is a response, not a failure, unless raised
    assert snap["dns_nxdomain"] == 1 and snap["connect_refused"] == 1
    assert report.prewarm.requested == 2 and report.prewarm.nxdomain == ["nope.example.test"]
    text = crawl.format_report(report)
    assert "dns_nxdomain (dns)" in text and "connect_refused" in text
    assert "namelookup" in text and "starttransfer" in text
    assert "sidecar/prewarm" in text


async def test_crawl_command_line(side, web):
    proc = await asyncio.create_subprocess_exec(
        sys.executable, str(EXAMPLE), "--no-fallback", "--sidecar", side.dns_address,
        "--api", side.http_url, "--timeout", "2", "--prewarm",
        web.url("crawl90.example.test"), web.url("nope.example.test"),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await proc.communicate()
    text = out.decode()
    assert proc.returncode == 1, err.decode()  # one failure
    assert "2 requests" in text and "dns_nxdomain (dns)" in text
