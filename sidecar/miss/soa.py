"""Find the SOA of the zone enclosing a name, for NXDOMAIN/NODATA answers (RFC 2308).

The fallback for negative answers that arrive without an SOA in their authority section
(an upstream that strips it, or the ``query_dns`` path when ``caresquery`` is unavailable):
the SOA a negative answer must carry is then learned with one SOA query, made on the
fetch's own in-flight slot. Asking every ancestor would cost a query per label (60 and more
for a long name, outside any bound); instead the closest apex already known is used, else
one name is asked: the registrable-domain guess (:func:`~sidecar.miss.inflight.zone_key`), which
is the apex for most names, and whose reply also carries the enclosing zone's SOA in its
authority section when it is not (NXDOMAIN/NODATA). What is learned (an apex and its SOA,
or "asked, nothing learned") is remembered, so later negative answers under the same zone
cost no extra upstream query.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

from sidecar.dns.types import Rcode, RRType
from sidecar.errors import ResolveFailed, UpstreamError
from sidecar.miss.inflight import zone_key

_NOERROR = int(Rcode.NOERROR)
_SOA = int(RRType.SOA)

_NOT_APEX_TTL = 300.0
_FAILED_TTL = 30.0
_MAX_KNOWN = 20_000


class SoaFinder:
    """``find(name, include_self)`` returns the enclosing zone's SOA (a :class:`Rec`).

    ``clock`` gives the monotonic seconds what is learned expires by (the cache's clock)."""

    def __init__(self, pools: Any, clock: Callable[[], float] = time.monotonic) -> None:
        self.pools = pools
        self.clock = clock
        # name -> (expires, SOA record or None when the name is known not to be an apex)
        self.known: dict[str, tuple[float, Any]] = {}
        self._inflight: dict[str, asyncio.Future[None]] = {}
        self.lookups = 0

    @staticmethod
    def ancestors(name: str, include_self: bool) -> list[str]:
        """Candidates from longest to shortest; the root is ``""``."""
        labels = name.split(".") if name else []
        out = [".".join(labels[i:]) for i in range(0 if include_self else 1, len(labels))]
        out.append("")
        return out

    @staticmethod
    def guess(name: str, include_self: bool) -> str:
        """The one name whose SOA is asked for ``name``: its registrable-domain guess, or
        its parent when that guess is the name itself and the name does not exist."""
        cand = zone_key(name)
        if cand == name and not include_self:
            dot = name.find(".")
            cand = name[dot + 1 :] if dot >= 0 else ""
        return cand

    async def find(self, name: str, include_self: bool) -> Any | None:
        """The SOA of the closest known apex above ``name`` (or at it, with
        ``include_self``), after at most one upstream query; None when none is known."""
        soa = self._closest(name, include_self)
        if soa is not None:
            return soa
        cand = self.guess(name, include_self)
        hit = self.known.get(cand)
        if hit is not None and hit[0] > self.clock():
            return None  # asked lately and nothing usable came back
        await self._learn(cand)
        return self._closest(name, include_self)

    def _closest(self, name: str, include_self: bool) -> Any | None:
        now = self.clock()
        known = self.known
        for cand in self.ancestors(name, include_self):
            hit = known.get(cand)
            if hit is not None and hit[1] is not None and hit[0] > now:
                return hit[1]
        return None

    async def _learn(self, cand: str) -> None:
        fut = self._inflight.get(cand)
        if fut is not None:
            # Shielded: a waiter cancelled (jostled, shutdown) must not cancel the shared
            # future under the fetch that asks and the other waiters.
            await asyncio.shield(fut)
            return
        fut = asyncio.get_running_loop().create_future()
        self._inflight[cand] = fut
        try:
            await self._ask(cand)
        finally:
            del self._inflight[cand]
            if not fut.done():
                fut.set_result(None)

    async def _ask(self, cand: str) -> None:
        self.lookups += 1
        pool = self.pools.pool_for(cand)
        try:
            ans = await pool.query(cand or ".", _SOA)
        except (ResolveFailed, UpstreamError):
            # Unknown; remember briefly so an outage or a refusing upstream does not cost an
            # extra query per negative answer.
            self._remember(cand, self.clock() + _FAILED_TTL, None)
            return
        now = self.clock()
        soa, apex = None, cand
        if ans.rcode == _NOERROR:
            for rec in ans.answer:
                if rec.type == _SOA and rec.name.rstrip(".").lower() == cand:
                    soa = rec
                    break
        if soa is None:
            # Not an apex: a NODATA/NXDOMAIN reply names the enclosing zone in its authority.
            for rec in ans.authority:
                owner = rec.name.rstrip(".").lower()
                if rec.type == _SOA and (not owner or owner == cand
                                      or cand.endswith("." + owner)):
                    soa, apex = rec, owner
                    break
        if soa is not None:
            self._remember(apex, now + max(1, min(soa.ttl, 3600)), soa)
        if apex != cand or soa is None:
            self._remember(cand, now + _NOT_APEX_TTL, None)

    def _remember(self, name: str, expires: float, soa: Any | None) -> None:
        if len(self.known) >= _MAX_KNOWN and name not in self.known:
            # Drop the oldest tenth; dicts keep insertion order.
            for k in list(self.known)[: _MAX_KNOWN // 10]:
                del self.known[k]
        self.known[name] = (expires, soa)
