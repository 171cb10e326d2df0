"""The package is typed (py.typed) and the README's client example type-checks."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# The README's "client in ten lines", plus the failover variant of docs/client.md.
README_EXAMPLE = '''
import aiohttp
from client import ClassCounters, failover_resolver, fetch, sidecar_connector, trace_config

async def crawl(urls: list[str]) -> None:
    connector = sidecar_connector("127.0.0.1:5353")
    counters = ClassCounters()
    async with aiohttp.ClientSession(connector=connector, trace_configs=[trace_config()]) as s:
        await connector.resolver.prewarm(urls)
        for url in urls:
            result = await fetch(s, url, counters=counters)
            print(result.failure or result.timings)
    print(counters.snapshot())

async def crawl_with_failover(urls: list[str]) -> None:
    resolver = failover_resolver("127.0.0.1:5353")
    connector = sidecar_connector(resolver=resolver)
    await connector.resolver.prewarm(urls)
    await resolver.close()
'''

# The control: a plain TCPConnector's resolver has no prewarm, and mypy must say so.
CONTROL = '''
from aiohttp.abc import AbstractResolver
from client import sidecar_connector

async def wrong(resolver: AbstractResolver, urls: list[str]) -> None:
    await sidecar_connector(resolver=resolver).resolver.prewarm(urls)
'''


def test_py_typed_ships():
    assert (ROOT / "client" / "py.typed").exists()
    assert 'client = ["py.typed"]' in (ROOT / "pyproject.toml").read_text()


@pytest.mark.skipif(importlib.util.find_spec("mypy") is None, reason="mypy not installed")
def test_readme_example_type_checks(tmp_path):
    (tmp_path / "readme_example.py").write_text(README_EXAMPLE)
    (tmp_path / "control.py").write_text(CONTROL)
    env = {**os.environ, "MYPYPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, "-m", "mypy", "--no-incremental", "--follow-imports=silent",
         "--cache-dir", str(tmp_path / "cache"), "readme_example.py", "control.py"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )
    errors = [line for line in proc.stdout.splitlines() if ": error:" in line]
    assert [e.split(":")[0] for e in errors] == ["control.py"], proc.stdout + proc.stderr
    assert '"AbstractResolver" has no attribute "prewarm"' in errors[0]
