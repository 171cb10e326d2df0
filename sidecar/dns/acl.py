"""Who may query: client addresses checked against ``--allow`` networks.

Parsing an address and testing networks is far dearer than a dict lookup, so each client's
verdict is memoized in a plain dict (bounded; cleared when full) and the hot path pays one
lookup.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable

#: Verdicts memoized at most (distinct client address strings); the memo is cleared when full.
_MAX_REMEMBERED = 65536


class Acl:
    """``allowed(host)``: may ``host`` (a client IP as a string) query?

    Verdicts are memoized per host string in ``_verdicts`` (a verdict memo, not a DNS cache):
    ``remembered(host)`` is that memo's lookup alone (True, False, or None when not known
    yet; bound once, for the hot path), ``check(host)`` computes a verdict and memoizes it.
    """

    def __init__(self, networks: Iterable[ipaddress.IPv4Network | ipaddress.IPv6Network]) -> None:
        self.networks = tuple(networks)
        self._verdicts: dict[str, bool] = {}
        #: ``remembered(host)``: the memoized verdict, or None.
        self.remembered = self._verdicts.get

    def allowed(self, host: str) -> bool:
        """The verdict for ``host``: memoized, else computed (and memoized)."""
        verdict = self._verdicts.get(host)
        return self.check(host) if verdict is None else verdict

    def check(self, host: str) -> bool:
        """Compute the verdict for ``host`` and memoize it."""
        try:
            ip = ipaddress.ip_address(host.split("%", 1)[0])
        except ValueError:
            return False
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        ok = not self.networks or any(ip in net for net in self.networks)
        if len(self._verdicts) >= _MAX_REMEMBERED:
            self._verdicts.clear()  # in place: ``remembered`` stays bound to this dict
        self._verdicts[host] = ok
        return ok

    @property
    def loopback_only(self) -> bool:
        return all(net.is_loopback for net in self.networks)
