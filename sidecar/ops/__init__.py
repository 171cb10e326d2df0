"""Operations: the HTTP API, stats, Prometheus metrics, OpenAPI and kernel UDP drop counters."""
