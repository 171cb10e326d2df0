"""Test servers others import: a fake upstream nameserver with injectable faults."""
