"""The fleet's shared second-level cache (Valkey/Redis): value codec, circuit breaker, client.

Only this package imports ``redis`` (the optional extra ``shared``); the miss path reaches it
through the :class:`~sidecar.miss.second.SecondLevel` protocol.
"""
