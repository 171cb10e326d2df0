"""Answers held in memory by their TTL, and the batch pre-warm that fills them.

:class:`PrewarmTable` is the client's one DNS cache: :class:`client.SidecarResolver` keeps
there both what ``POST /prewarm`` returned and what its own lookups returned, each until the
TTL the sidecar gave runs out (the sidecar already floors TTLs; the client never stretches
them). aiohttp's own DNS cache is switched off by :func:`client.sidecar_connector` because it
keeps every answer for a fixed time whatever its TTL. A held answer is served synchronously
(no I/O, no suspension) and its addresses rotate on every use, as aiohttp's cache rotates
them, so connections to a host spread over its addresses.

HTTP contract used (``POST {api_url}/prewarm``, ``Content-Type: application/json``, to the
sidecar's own address so the ``Host`` header names the listener)::

    request:  {"names": ["a.example", ...], "types": ["A", "AAAA"]}
              Authorization: Bearer TOKEN   (when a token is configured)
    response: 200 {"elapsed_ms": float,
                   "results": [{"name": "a.example", "type": "A", "rcode": "NOERROR",
                                "ttl": 299, "records": ["10.0.0.1", ...]}, ...]}
"""

from __future__ import annotations

import ipaddress
import json
import socket
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
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
    "PREWARM_TYPES",
    "PrewarmResult",
    "PrewarmTable",
    "normalize_hosts",
    "post_prewarm",
)

DEFAULT_API_URL = "http://127.0.0.1:8053"
#: Record types a pre-warm can ask for (the ones a connection needs).
PREWARM_TYPES = ("A", "AAAA")

_NUMERIC_FLAGS = socket.AI_NUMERICHOST | socket.AI_NUMERICSERV
_ARES_ENODATA = 1
_ARES_ENOTFOUND = 4
_ARES_ETIMEOUT = 12
_FAMILY_OF = {"A": socket.AF_INET, "AAAA": socket.AF_INET6}


def _key(host: str) -> str:
    return host.rstrip(".").lower()


def normalize_hosts(hosts: Iterable[str]) -> list[str]:
    """Host names from ``hosts`` (names or URLs), lower-cased, deduplicated, in order.

    A URL contributes its host (IDNA-encoded); IP literals, empty names and items that are
    not strings or not parseable URLs are dropped.
    """
    out: dict[str, None] = {}
    for item in hosts:
        if not isinstance(item, str):
            continue
        host = item.strip()
        if "://" in host:
            try:
                host = URL(host).raw_host or ""
            except ValueError:
                continue
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


def check_types(types: Sequence[str]) -> list[str]:
    """``types`` upper-cased; ``ValueError`` for anything but A and AAAA, or none."""
    wanted = [str(t).upper() for t in types]
    bad = [t for t in wanted if t not in PREWARM_TYPES]
    if bad or not wanted:
        raise ValueError(f"pre-warm types must be A and/or AAAA, got {list(types)!r}")
    return list(dict.fromkeys(wanted))


class _Answer:
    """One held answer: addresses as ``(family, address)`` in the order to try them, or a
    negative rcode; ``turn`` rotates the addresses on every use."""

    __slots__ = ("addresses", "expires", "groups", "rcode", "source", "turn")

    def __init__(self, expires: float, rcode: str, addresses: tuple[tuple[int, str], ...],
                 source: str) -> None:
        self.expires = expires
        self.rcode = rcode  # "NOERROR" or "NXDOMAIN"
        self.addresses = addresses
        self.source = source  # "prewarm" or "lookup"
        self.turn = 0
        by_family: dict[int, list[tuple[int, str]]] = {}
        for item in addresses:
            by_family.setdefault(item[0], []).append(item)
        self.groups = [g for g in by_family.values() if len(g) > 1] and list(by_family.values())

    def rotated(self) -> Sequence[tuple[int, str]]:
        """The addresses rotated by one more step within each family, families kept in
        their order (Happy Eyeballs starts with the family of the first address)."""
        if not self.groups:  # nothing to rotate: one address per family
            return self.addresses
        turn = self.turn
        self.turn += 1
        out: list[tuple[int, str]] = []
        for group in self.groups:
            k = turn % len(group)
            out.extend(group[k:])
            out.extend(group[:k])
        return out


class _Host:
    __slots__ = ("a", "aaaa", "single", "unspec")

    def __init__(self) -> None:
        self.a: _Answer | None = None
        self.aaaa: _Answer | None = None
        self.unspec: _Answer | None = None  # a lookup's AF_UNSPEC answer, in c-ares order
        self.single: str | None = None  # "A"/"AAAA": the pre-warm asked that type only

    def answers(self) -> Iterable[_Answer]:
        return (a for a in (self.a, self.aaaa, self.unspec) if a is not None)


@dataclass
class PrewarmResult:
    """What one pre-warm achieved.

    * ``requested``: names sent (after normalisation).
    * ``warmed``: names whose answers are now served from memory (every requested type
      answered NOERROR with a TTL > 0, or NXDOMAIN with a negative TTL > 0).
    * ``nxdomain``: names the sidecar says do not exist.
    * ``failed``: ``{name: reason}`` for names with an answer that cannot be kept: the
      rcode (``"SERVFAIL"``, ``"REFUSED"``, ...), ``"TTL0"`` (an answer with TTL 0) or
      ``"missing"`` (no result for a requested type).
    * ``pending``: names with no answer yet when the ``deadline`` passed (left to normal
      lookups; the sidecar goes on resolving them into its cache).
    * ``server_ms``: the sidecar's own ``elapsed_ms`` (summed over the calls);
      ``elapsed``: the whole pre-warm, seconds.
    * ``error``: why a call failed, when :meth:`client.FailoverResolver.prewarm` (which
      never raises) caught the error (``None`` otherwise).

    ``as_dict()`` / ``to_json()`` give plain JSON for logs.
    """

    requested: int = 0
    warmed: int = 0
    nxdomain: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    pending: list[str] = field(default_factory=list)
    server_ms: float | None = None
    elapsed: float = 0.0
    error: str | None = None

    def as_dict(self) -> dict[str, Any]:
        """The fields as plain JSON-serialisable values."""
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.as_dict())


class PrewarmTable:
    """Held answers by name and address family, each until its TTL runs out.

    ``lookup()`` is synchronous; it returns aiohttp ``ResolveResult`` lists (addresses
    rotated one step per call), raises the same ``OSError`` (chained from an
    ``aiodns.error.DNSError``) an ``AsyncResolver`` raises for NXDOMAIN / NODATA, or returns
    ``None`` when nothing valid is held ("ask DNS"). ``max_entries`` bounds the names held;
    expired answers go first, then the oldest inserted.

    An ``AF_UNSPEC`` lookup (aiohttp's default family) is served from a lookup's own
    ``AF_UNSPEC`` answer, from both the A and the AAAA answer, or, when the pre-warm asked
    only one type, from that type alone: ``types=["A"]`` means "connect over IPv4".
    """

    def __init__(self, max_entries: int = 100_000) -> None:
        self.max_entries = max_entries
        self._names: dict[str, _Host] = {}
        #: where the answer of the last successful ``lookup()`` came from
        self.last_source: str | None = None
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
        for name, h in self._names.items():
            for slot in ("a", "aaaa", "unspec"):
                answer = getattr(h, slot)
                if answer is not None and answer.expires <= now:
                    setattr(h, slot, None)
            if h.a is None and h.aaaa is None and h.unspec is None:
                dead.append(name)
        for name in dead:
            del self._names[name]
        return len(dead)

    def _host(self, name: str, now: float) -> _Host:
        key = _key(name)
        h = self._names.get(key)
        if h is None:
            if len(self._names) >= self.max_entries:
                self.purge(now)
                while len(self._names) >= self.max_entries:
                    del self._names[next(iter(self._names))]
            h = self._names[key] = _Host()
        return h

    def store(self, name: str, qtype: str, rcode: str, ttl: float, records: Sequence[str],
              now: float | None = None, *, source: str = "prewarm") -> bool:
        """Keep one answer for ``qtype`` (A or AAAA); False when it cannot be kept
        (TTL <= 0, an rcode other than NOERROR/NXDOMAIN)."""
        qtype = qtype.upper()
        if qtype not in _FAMILY_OF or ttl <= 0 or rcode not in ("NOERROR", "NXDOMAIN"):
            return False
        now = time.monotonic() if now is None else now
        family = _FAMILY_OF[qtype]
        addresses = tuple((family, r) for r in records) if rcode == "NOERROR" else ()
        answer = _Answer(now + ttl, rcode, addresses, source)
        h = self._host(name, now)
        if qtype == "A":
            h.a = answer
        else:
            h.aaaa = answer
        return True

    def store_lookup(self, name: str, family: int, addresses: Sequence[tuple[int, str]],
                     ttl: float, now: float | None = None) -> bool:
        """Keep what a lookup of ``family`` returned (``(family, address)`` pairs in the
        order c-ares sorted them) for ``ttl`` seconds; False when ``ttl <= 0``."""
        if ttl <= 0 or not addresses:
            return False
        now = time.monotonic() if now is None else now
        answer = _Answer(now + ttl, "NOERROR", tuple(addresses), "lookup")
        h = self._host(name, now)
        if family == socket.AF_INET:
            h.a = answer
        elif family == socket.AF_INET6:
            h.aaaa = answer
        else:
            h.unspec = answer
        return True

    def mark_single(self, name: str, qtype: str) -> None:
        """Serve ``AF_UNSPEC`` lookups of ``name`` from its ``qtype`` answer alone."""
        h = self._names.get(_key(name))
        if h is not None:
            h.single = qtype

    def _held(self, host: str, family: int) -> list[_Answer] | None:
        h = self._names.get(_key(host))
        if h is None:
            return None
        now = time.monotonic()
        if family == socket.AF_INET:
            a = h.a
            return [a] if a is not None and a.expires > now else None
        if family == socket.AF_INET6:
            a = h.aaaa
            return [a] if a is not None and a.expires > now else None
        u = h.unspec
        if u is not None and u.expires > now:
            return [u]
        a, aaaa = h.a, h.aaaa
        a_ok = a is not None and a.expires > now
        if a_ok and aaaa is not None and aaaa.expires > now:
            return [a, aaaa]  # type: ignore[list-item]
        one = a if h.single == "A" and a_ok else aaaa if h.single == "AAAA" else None
        if one is not None and one.expires > now and (one.addresses or one.rcode == "NXDOMAIN"):
            return [one]
        return None

    def source(self, host: str, family: int = socket.AF_UNSPEC) -> str | None:
        """``"prewarm"`` or ``"lookup"``: where the answer ``lookup()`` would use came from."""
        held = self._held(host, family)
        return held[0].source if held else None

    def lookup(self, host: str, port: int = 0, family: int = socket.AF_INET
               ) -> list[ResolveResult] | None:
        """The held answer for ``host`` in aiohttp's format, or ``None`` (not held).

        ``family`` ``AF_INET`` needs the A answer, ``AF_INET6`` the AAAA answer and
        ``AF_UNSPEC`` what the class doc says. Raises ``OSError`` for a held NXDOMAIN, or
        NODATA (no address of the family asked for).
        """
        held = self._held(host, family)
        if held is None:
            self.misses += 1
            return None
        self.hits += 1
        self.last_source = held[0].source
        if any(a.rcode == "NXDOMAIN" for a in held):
            raise dns_error(_ARES_ENOTFOUND, "Domain name not found")
        results: list[ResolveResult] = []
        for answer in held:
            for fam, address in answer.rotated():
                results.append(ResolveResult(hostname=host, host=address, port=port,
                                             family=fam, proto=0, flags=_NUMERIC_FLAGS))
        if not results:
            raise dns_error(_ARES_ENODATA, "DNS server returned answer with no data")
        return results

    def load(self, payload: dict[str, Any], types: Sequence[str],
             result: PrewarmResult) -> None:
        """Store a ``/prewarm`` response body and fill in ``result``'s counts."""
        now = time.monotonic()
        wanted = [t.upper() for t in types]
        single = wanted[0] if len(wanted) == 1 else None
        per_name: dict[str, dict[str, tuple[str, bool]]] = {}
        for item in payload.get("results", ()):
            if not isinstance(item, dict):
                continue
            name = _key(str(item.get("name", "")))
            qtype = str(item.get("type", "")).upper()
            rcode = str(item.get("rcode", "")).upper()
            try:
                ttl = float(item.get("ttl") or 0)
            except (TypeError, ValueError):
                ttl = 0.0
            records = [str(r) for r in item.get("records") or ()]
            kept = self.store(name, qtype, rcode, ttl, records, now=now)
            if kept:
                h = self._names[name]
                h.single = single
                h.unspec = None  # superseded by the per-type answers
            per_name.setdefault(name, {})[qtype] = (rcode, kept)
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


def dns_error(code: int, message: str) -> OSError:
    """The OSError aiohttp's AsyncResolver raises, chained from an aiodns DNSError."""
    err = OSError(None, message)
    if _AiodnsError is not None:
        err.__cause__ = _AiodnsError(code, message)
    return err


async def post_prewarm(
    api_url: str,
    names: Sequence[str],
    *,
    types: Sequence[str] = PREWARM_TYPES,
    token: str | None = None,
    request_timeout: float = 30.0,
    session: aiohttp.ClientSession | None = None,
) -> dict[str, Any]:
    """``POST {api_url}/prewarm`` with ``names`` and ``types`` as a JSON body; returns the
    JSON answer.

    ``request_timeout`` (seconds) bounds the whole call. Raises :class:`~client.PrewarmError`
    when the sidecar cannot be reached, times out, answers non-200 or non-JSON.
    """
    url = api_url.rstrip("/") + "/prewarm"
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    body = {"names": list(names), "types": list(types)}
    own = session is None
    try:
        if session is None:
            # the API is an IP literal on loopback: no resolver needed, no pooling wanted
            session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True))
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
    except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
        raise PrewarmError(f"POST {url}: {type(exc).__name__}: {exc}") from exc
    finally:
        if own and session is not None:
            await session.close()
    if not isinstance(payload, dict) or not isinstance(payload.get("results"), list):
        raise PrewarmError(f"POST {url}: unexpected response shape", status=200)
    return payload
