"""The miss path: from a cache miss to a cache entry (fetch, coalesce, bound, scrub, encode)."""
