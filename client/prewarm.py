"""Batch pre-warm: one ``POST /prewarm`` to the sidecar, answers kept in memory by TTL.

The sidecar resolves the whole batch into its cache and returns, per name and type, the
rcode, the addresses and their remaining TTL. :class:`PrewarmTable` keeps those answers
until they expire, so :meth:`client.SidecarResolver.resolve` can serve a warmed host
without any DNS round trip (and without an await on anything: the coroutine returns on
its first step). Both A and AAAA are warmed by default because c-ares, and so aiohttp's
``AsyncResolver``, asks for both whenever the connector's family is ``AF_UNSPEC``.

HTTP contract used (``POST {api_url}/prewarm``)::

    request:  {"names": ["a.example", ...], "types": ["A", "AAAA"]}
              Authorization: Bearer TOKEN   (when a token is configured)
    response: 200 {"elapsed_ms": float,
                   "results": [{"name": "a.example", "type": "A", "rcode": "NOERROR",
                                "ttl": 299, "records": ["10.0.0.1", ...]}, ...]}
"""

from __future__ import annotations

import ipaddress
import socket
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from aiohttp.abc import ResolveResult
from yarl import URL

from .errors import PrewarmError

try:
    from aiodns.error import DNSError as _AiodnsError
except ImportError:  # pragma: no cover
    _AiodnsError = None  # type: ignore[assignment,misc]

__all__ = (
    "DEFAULT_API_URL",
    "PrewarmResult",
    "PrewarmTable",
    "normalize_hosts",
    "post_prewarm",
)

DEFAULT_API_URL = "http://127.0.0.1:8053"

_NUMERIC_FLAGS = socket.AI_NUMERICHOST | socket.AI_NUMERICSERV
_ARES_ENODATA = 1
_ARES_ENOTFOUND = 4


def _key(host: str) -> str:
    return host.rstrip(".").lower()


def normalize_hosts(hosts: Iterable[str]) -> list[str]:
    """Host names from ``hosts`` (names or URLs), lower-cased, deduplicated, in order.

    A URL contributes its host (IDNA-encoded); IP literals and empty names are dropped.
    """
    out: dict[str, None] = {}
    for item in hosts:
        host = item.strip()
        if "://" in host:
            host = URL(host).raw_host or ""
        host = _key(host)
        if not host:
            continue
        try:
            ipaddress.ip_address(host.strip("[]"))
            continue
        except ValueError:
            pass
        out[host] = None
    return list(out)


@dataclass
class _Answer:
    expires: float  # time.monotonic() deadline
    rcode: str  # "NOERROR" or "NXDOMAIN"
    addresses: tuple[str, ...]


@dataclass
class PrewarmResult:
    """What one pre-warm call achieved.

    * ``requested``: names sent (after normalisation).
    * ``warmed``: names whose answers are now served from memory (every requested type
      answered NOERROR with a TTL > 0, or NXDOMAIN with a negative TTL > 0).
    * ``nxdomain``: names the sidecar says do not exist.
    * ``failed``: ``{name: reason}`` for names with an answer that cannot be kept: the
      rcode (``"SERVFAIL"``, ``"REFUSED"``, ...), ``"TTL0"`` (an answer with TTL 0) or
      ``"missing"`` (no result for a requested type).
    * ``server_ms``: the sidecar's own ``elapsed_ms`` (summed over the calls);
      ``elapsed``: the whole pre-warm, seconds.
    * ``error``: why the call failed, when :meth:`client.FailoverResolver.prewarm`
      swallowed a :class:`~client.PrewarmError` (``None`` otherwise).
    """

    requested: int = 0
    warmed: int = 0
    nxdomain: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    server_ms: float | None = None
    elapsed: float = 0.0
    error: str | None = None


class PrewarmTable:
    """Pre-warmed answers by name and type, kept until their TTL runs out.

    ``lookup()`` is synchronous; it returns aiohttp ``ResolveResult`` lists, raises the
    same ``OSError`` (chained from an ``aiodns.error.DNSError``) an ``AsyncResolver``
    would raise for NXDOMAIN / NODATA, or returns ``None`` when the answer is not held
    (or expired), meaning "ask DNS". ``max_entries`` bounds the names held; the oldest
    inserted go first.
    """

    def __init__(self, max_entries: int = 100_000) -> None:
        self.max_entries = max_entries
        self._names: dict[str, dict[str, _Answer]] = {}
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._names)

    def __bool__(self) -> bool:
        return bool(self._names)

    def __contains__(self, host: object) -> bool:
        return isinstance(host, str) and _key(host) in self._names

    def clear(self) -> None:
        """Forget everything."""
        self._names.clear()

    def purge(self, now: float | None = None) -> int:
        """Drop expired answers; returns the number of names dropped."""
        now = time.monotonic() if now is None else now
        dead = []
        for name, answers in self._names.items():
            for qtype in [t for t, a in answers.items() if a.expires <= now]:
                del answers[qtype]
            if not answers:
                dead.append(name)
        for name in dead:
            del self._names[name]
        return len(dead)

    def store(self, name: str, qtype: str, rcode: str, ttl: float, records: Sequence[str],
              now: float | None = None) -> bool:
        """Keep one answer; returns False when it cannot be kept (TTL <= 0, other rcode)."""
        qtype = qtype.upper()
        if qtype not in ("A", "AAAA") or ttl <= 0 or rcode not in ("NOERROR", "NXDOMAIN"):
            return False
        now = time.monotonic() if now is None else now
        key = _key(name)
        answers = self._names.get(key)
        if answers is None:
            if len(self._names) >= self.max_entries:
                self.purge(now)
                while len(self._names) >= self.max_entries:
                    del self._names[next(iter(self._names))]
            answers = self._names[key] = {}
        addresses = tuple(records) if rcode == "NOERROR" else ()
        answers[qtype] = _Answer(now + ttl, rcode, addresses)
        return True

    def lookup(self, host: str, port: int = 0, family: int = socket.AF_INET
               ) -> list[ResolveResult] | None:
        """The held answer for ``host`` in aiohttp's format, or ``None`` (not held).

        ``family`` ``AF_INET`` needs the A answer, ``AF_INET6`` the AAAA answer and
        ``AF_UNSPEC`` both (IPv4 addresses are listed first). Raises ``OSError`` for a
        held NXDOMAIN, or NODATA (no address of the family asked for).
        """
        answers = self._names.get(_key(host))
        if answers is None:
            self.misses += 1
            return None
        if family == socket.AF_INET:
            wanted: tuple[str, ...] = ("A",)
        elif family == socket.AF_INET6:
            wanted = ("AAAA",)
        else:
            wanted = ("A", "AAAA")
        now = time.monotonic()
        held = []
        for qtype in wanted:
            answer = answers.get(qtype)
            if answer is None or answer.expires <= now:
                self.misses += 1
                return None
            held.append((qtype, answer))
        self.hits += 1
        if any(a.rcode == "NXDOMAIN" for _, a in held):
            raise _dns_error(_ARES_ENOTFOUND, "Domain name not found")
        results: list[ResolveResult] = []
        for qtype, answer in held:
            fam = socket.AF_INET if qtype == "A" else socket.AF_INET6
            for address in answer.addresses:
                results.append(
                    ResolveResult(
                        hostname=host,
                        host=address,
                        port=port,
                        family=fam,
                        proto=0,
                        flags=_NUMERIC_FLAGS,
                    )
                )
        if not results:
            raise _dns_error(_ARES_ENODATA, "DNS server returned answer with no data")
        return results

    def load(self, payload: dict[str, Any], types: Sequence[str],
             result: PrewarmResult) -> None:
        """Store a ``/prewarm`` response body and fill in ``result``'s counts."""
        now = time.monotonic()
        per_name: dict[str, dict[str, tuple[str, bool]]] = {}
        for item in payload.get("results", ()):
            name = _key(str(item.get("name", "")))
            qtype = str(item.get("type", "")).upper()
            rcode = str(item.get("rcode", "")).upper()
            ttl = float(item.get("ttl") or 0)
            records = [str(r) for r in item.get("records") or ()]
            kept = self.store(name, qtype, rcode, ttl, records, now=now)
            per_name.setdefault(name, {})[qtype] = (rcode, kept)
        wanted = [t.upper() for t in types]
        for name, got in per_name.items():
            rcodes = {rcode for rcode, _ in got.values()}
            if "NXDOMAIN" in rcodes:
                result.nxdomain.append(name)
            if all(t in got and got[t][1] for t in wanted):
                result.warmed += 1
            else:
                bad = [got[t][0] if t in got else "missing" for t in wanted
                       if not (t in got and got[t][1])]
                result.failed[name] = bad[0] if bad[0] != "NOERROR" else "TTL0"


def _dns_error(code: int, message: str) -> OSError:
    """The OSError aiohttp's AsyncResolver raises, chained from an aiodns DNSError."""
    err = OSError(None, message)
    if _AiodnsError is not None:
        err.__cause__ = _AiodnsError(code, message)
    return err


async def post_prewarm(
    api_url: str,
    names: Sequence[str],
    *,
    types: Sequence[str] = ("A", "AAAA"),
    token: str | None = None,
    request_timeout: float = 30.0,
    session: aiohttp.ClientSession | None = None,
) -> dict[str, Any]:
    """``POST {api_url}/prewarm`` with ``names`` and ``types``; returns the JSON body.

    ``request_timeout`` (seconds) bounds the whole call. Raises :class:`~client.PrewarmError`
    when the sidecar cannot be reached, times out, answers non-200 or non-JSON.
    """
    url = api_url.rstrip("/") + "/prewarm"
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    body = {"names": list(names), "types": list(types)}
    own = session is None
    if session is None:
        # the API is an IP literal on loopback: no resolver needed, no pooling wanted
        session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True))
    try:
        async with session.post(url, json=body, headers=headers,
                                timeout=aiohttp.ClientTimeout(total=request_timeout)) as resp:
            if resp.status != 200:
                text = (await resp.text())[:200]
                raise PrewarmError(f"POST {url}: HTTP {resp.status}: {text}", status=resp.status)
            try:
                payload = await resp.json(content_type=None)
            except ValueError as exc:
                raise PrewarmError(f"POST {url}: response is not JSON", status=200) from exc
    except PrewarmError:
        raise
    except (aiohttp.ClientError, TimeoutError) as exc:
        raise PrewarmError(f"POST {url}: {type(exc).__name__}: {exc}") from exc
    finally:
        if own:
            await session.close()
    if not isinstance(payload, dict) or not isinstance(payload.get("results"), list):
        raise PrewarmError(f"POST {url}: unexpected response shape", status=200)
    return payload
