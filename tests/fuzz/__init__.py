"""Fuzzing harnesses (run as modules, e.g. ``python -m tests.fuzz.fuzz_sidecar``)."""
