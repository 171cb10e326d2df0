"""Upstream nameservers: the loop-driven c-ares channel, queries, health, pools and failover.

Kept empty so that ``import sidecar.upstream.cares`` (the client does) loads nothing else.
"""
