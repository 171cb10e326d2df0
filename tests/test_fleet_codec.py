"""Shared-cache values without a server: the codec, the outside-entry check, the breaker."""

from __future__ import annotations

import asyncio
import ipaddress
import struct

import pytest

from sidecar.dns.cache import BODY, EXPIRES, NEVER, new_entry
from sidecar.dns.wire import encode_name, make_key
from sidecar.fleet import codec
from sidecar.fleet.breaker import CLOSED, OPEN, Breaker
from sidecar.fleet.client import parse_url, redact
from sidecar.miss.entry import TtlPolicy
from sidecar.miss.outside import check_outside
from sidecar.miss.scrub import ScrubPolicy
from sidecar.persist import snapshot

KEY = make_key("www.example.test", 1)
RR = struct.Struct(">HHIH")


def a_entry(addr: bytes = b"\x0a\x00\x00\x01", ttl: int = 300, now: float = 1000.0,
            owner: bytes = b"\xc0\x0c", rcode: int = 0):
    body = owner + RR.pack(1, 1, ttl, len(addr)) + addr
    return new_entry(rcode, 1, 0, 0, body, (len(owner) + 4,), now, float(ttl))


def test_round_trip_keeps_only_the_time_left():
    e = a_entry(now=1000.0)
    value = codec.encode(KEY, e, 1100.0, 50_000.0)          # written 100 s after storing
    assert value is not None
    got = codec.decode(KEY, value, 7.0, 50_030.0)          # read 30 s later elsewhere
    assert got[BODY] == e[BODY][:6] + struct.pack(">I", 200) + e[BODY][10:]
    assert got[EXPIRES] - 7.0 == pytest.approx(170.0)


def test_a_reader_whose_clock_is_behind_never_gets_more_than_was_left():
    value = codec.encode(KEY, a_entry(now=1000.0), 1000.0, 50_000.0)
    assert value is not None
    got = codec.decode(KEY, value, 5.0, 49_000.0)           # reader 1000 s behind
    assert got[EXPIRES] - 5.0 == pytest.approx(300.0)


def test_failures_and_nearly_expired_entries_are_not_shared():
    servfail = new_entry(2, 0, 0, 0, b"", (), 1000.0, 5.0)
    assert codec.encode(KEY, servfail, 1000.0, 5e4) is None
    assert codec.encode(KEY, a_entry(ttl=300), 1299.5, 5e4) is None


def test_prefetch_mark_is_not_shared():
    e = a_entry()[:-1] + (1200.0,)
    value = codec.encode(KEY, e, 1000.0, 5e4)
    assert value is not None
    assert codec.decode(KEY, value, 0.0, 5e4)[-1] == NEVER


@pytest.mark.parametrize("reason,mangle", [
    ("corrupt", lambda v: v[:-20] + bytes(20)),                         # checksum
    ("corrupt", lambda v: v[:30]),                                      # cut short
    ("corrupt", lambda v: b"garbage"),
    ("corrupt", lambda v: v[:24] + b"\xff\xff" * 3 + v[30:]),          # huge lengths
    ("version", lambda v: _with_version(v, 2)),
])
def test_bad_values_are_rejected_with_a_reason(reason, mangle):
    value = codec.encode(KEY, a_entry(), 1000.0, 5e4)
    with pytest.raises(codec.Rejected) as exc:
        codec.decode(KEY, mangle(value), 0.0, 5e4)
    assert exc.value.reason == reason


def test_an_oversized_value_is_refused_before_it_is_decoded():
    value = codec.encode(KEY, a_entry(), 1000.0, 5e4)
    with pytest.raises(codec.Rejected, match="^value of"):
        codec.decode(KEY, value + bytes(codec.MAX_VALUE), 0.0, 5e4)


def _with_version(value: bytes, version: int) -> bytes:
    head = struct.pack(">8sHHd", snapshot.MAGIC, version, 0, 5e4)
    return head + struct.pack(">I", __import__("zlib").crc32(head)) + value[24:]


def test_a_value_under_another_key_is_rejected():
    value = codec.encode(make_key("evil.example.test", 1), a_entry(), 1000.0, 5e4)
    with pytest.raises(codec.Rejected) as exc:
        codec.decode(KEY, value, 0.0, 5e4)
    assert exc.value.reason == "key"


def test_a_planted_servfail_is_rejected():
    e = a_entry()
    # encode() refuses it, so forge the record the way a hostile writer would
    rec = snapshot.encode_record(KEY, 2, 1, 0, 0, e[BODY], (6,), 5e4 + 300)
    value = snapshot.encode_header(5e4) + rec + snapshot.encode_end(1)
    with pytest.raises(codec.Rejected) as exc:
        codec.decode(KEY, value, 0.0, 5e4)
    assert exc.value.reason == "rcode"


# ---------------------------------------------------------------- outside entries (scrub)

POLICY = TtlPolicy()
SCRUB = ScrubPolicy()


def test_a_plain_answer_passes():
    assert check_outside(KEY, a_entry(), SCRUB, POLICY, 1000.0) is None


def test_a_record_for_another_name_is_refused():
    e = a_entry(owner=encode_name("evil.example.test"))
    assert check_outside(KEY, e, SCRUB, POLICY, 1000.0) == "records a scrub removes"


def test_a_private_address_is_refused_when_the_policy_removes_it():
    policy = ScrubPolicy((ipaddress.ip_network("10.0.0.0/8"),))
    assert check_outside(KEY, a_entry(), policy, POLICY, 1000.0) == "records a scrub removes"


def test_ttl_beyond_the_cap_is_refused():
    e = a_entry(ttl=10 * 86400)
    assert "TTL" in check_outside(KEY, e, SCRUB, POLICY, 1000.0)


def test_a_compression_pointer_inside_rdata_is_refused():
    key = make_key("alias.example.test", 5)
    rdata = b"\xc0\x20"
    body = b"\xc0\x0c" + RR.pack(5, 1, 60, len(rdata)) + rdata
    e = new_entry(0, 1, 0, 0, body, (6,), 1000.0, 60.0)
    assert check_outside(key, e, SCRUB, POLICY, 1000.0) == "records do not parse"


def test_a_planted_servfail_entry_is_refused():
    assert check_outside(KEY, a_entry(rcode=2), SCRUB, POLICY, 1000.0) == "rcode 2"


# ---------------------------------------------------------------- URL forms


def test_url_forms():
    assert parse_url("redis://h:1/2") == ("redis://h:1/2", False)
    assert parse_url("rediss://u:p@h:1") == ("rediss://u:p@h:1", False)
    assert parse_url("redis+cluster://h:1") == ("redis://h:1", True)
    assert parse_url("rediss+cluster://u:p@h:1") == ("rediss://u:p@h:1", True)
    with pytest.raises(ValueError):
        parse_url("http://h:1")
    assert redact("redis://u:secret@h:1/0") == "redis://u:***@h:1/0"
    assert "secret" not in redact("redis://:secret@h:1")


# ---------------------------------------------------------------- breaker


async def test_breaker_opens_on_one_failure_and_closes_after_a_good_probe():
    answers = [False, True]
    breaker = Breaker(lambda: _pop(answers), backoff_min=0.01, backoff_max=0.02)
    assert breaker.allow()
    breaker.failure("timeout")
    assert breaker.state == OPEN and not breaker.allow()
    for _ in range(200):
        if breaker.state == CLOSED:
            break
        await asyncio.sleep(0.01)
    assert breaker.allow() and breaker.probes == 2 and breaker.opened == 1
    await breaker.close()


async def _pop(answers: list[bool]) -> bool:
    return answers.pop(0)
