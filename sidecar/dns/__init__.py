"""The DNS path: wire parsing, the cache, the query handler and the UDP/TCP listeners.

Nothing here knows HTTP, and a miss leaves through the :class:`~sidecar.dns.misspath.MissPath`
protocol without this package importing the miss path or the upstreams.
"""
