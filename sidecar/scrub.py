"""What of an upstream's answer may be cached and served: the scrub between pool and cache.

(Stub: filled in by the hardening work; returns the answer unchanged.)
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from .encode import Answer


@dataclass(frozen=True)
class ScrubPolicy:
    """``private``: networks removed from A/AAAA answers for names outside every ``zones``
    suffix (``--private-address``); ``zones``: the ``--zone`` suffixes (lower-case, no dots
    at either end)."""

    private: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()
    zones: tuple[str, ...] = ()


def scrub(name: str, qtype: int, answer: Answer, policy: ScrubPolicy) -> Answer:
    """The part of ``answer`` (to ``name``/``qtype``; ``name`` lower-case without trailing
    dot) that may be cached."""
    return answer
