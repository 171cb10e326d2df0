"""Find the SOA of the zone enclosing a name, for NXDOMAIN/NODATA answers (RFC 2308).

The fallback for negative answers that arrive without an SOA in their authority section
(an upstream that strips it, or the ``query_dns`` path when ``caresquery`` is unavailable):
the SOA a negative answer must carry is then learned with SOA queries of the name's
ancestors. All unknown ancestors are asked at once (one round trip), and what is learned
(this name is a zone apex with this SOA / is not an apex) is remembered, so later negative
answers under the same zone cost no extra upstream query.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from .errors import ResolveFailed, UpstreamError
from .wire import NOERROR

_NOT_APEX_TTL = 300.0
_FAILED_TTL = 30.0
_MAX_KNOWN = 20_000


class SoaFinder:
    """``find(name, include_self)`` returns the enclosing zone's SOA (a :class:`Rec`)."""

    def __init__(self, pools: Any) -> None:
        self.pools = pools
        # name -> (expires, SOA record or None when the name is known not to be an apex)
        self.known: dict[str, tuple[float, Any]] = {}
        self._inflight: dict[str, asyncio.Future] = {}
        self.lookups = 0

    @staticmethod
    def ancestors(name: str, include_self: bool) -> list[str]:
        """Candidates from longest to shortest; the root is ``""``."""
        labels = name.split(".") if name else []
        out = [".".join(labels[i:]) for i in range(0 if include_self else 1, len(labels))]
        out.append("")
        return out

    async def find(self, name: str, include_self: bool) -> Any | None:
        now = time.monotonic()
        candidates = self.ancestors(name, include_self)
        unknown: list[str] = []
        for cand in candidates:
            hit = self.known.get(cand)
            if hit is not None and hit[0] > now:
                if hit[1] is not None:
                    break  # the closest known apex; nothing above it matters
                continue
            unknown.append(cand)
        if unknown:
            await asyncio.gather(*(self._learn(c) for c in unknown))
        now = time.monotonic()
        for cand in candidates:
            hit = self.known.get(cand)
            if hit is not None and hit[0] > now and hit[1] is not None:
                return hit[1]
        return None

    async def _learn(self, cand: str) -> None:
        fut = self._inflight.get(cand)
        if fut is not None:
            await fut
            return
        fut = asyncio.get_running_loop().create_future()
        self._inflight[cand] = fut
        try:
            await self._ask(cand)
        finally:
            del self._inflight[cand]
            fut.set_result(None)

    async def _ask(self, cand: str) -> None:
        self.lookups += 1
        pool = self.pools.pool_for(cand)
        try:
            ans = await pool.query(cand or ".", 6)
        except (ResolveFailed, UpstreamError):
            # Unknown; remember briefly so an outage or a refusing upstream does not cost an
            # extra query per negative answer.
            self.known[cand] = (time.monotonic() + _FAILED_TTL, None)
            return
        now = time.monotonic()
        soa = None
        if ans.rcode == NOERROR:
            for rec in ans.answer:
                if rec.type == 6 and rec.name.rstrip(".").lower() == cand:
                    soa = rec
                    break
        if len(self.known) >= _MAX_KNOWN:
            # Drop the oldest tenth; dicts keep insertion order.
            for k in list(self.known)[: _MAX_KNOWN // 10]:
                del self.known[k]
        if soa is not None:
            self.known[cand] = (now + max(1, min(soa.ttl, 3600)), soa)
        else:
            self.known[cand] = (now + _NOT_APEX_TTL, None)
