"""The shared cache's server-side steps: the lookup and the write as Lua scripts, and the
notice a write publishes to the sidecars waiting for it.

A lease waiter used to poll the server for the holder's value. Now the two steps that
meet each other run on the server, each atomically:

* **lookup** (value key, lease key, wait key): the value if there is one; else the lease
  if it is free (or already ours: the script may run twice, see
  :meth:`~sidecar.fleet.client.SharedCache`); else mark the key as waited for.
* **write** (value key, wait key): store the value; if the key is marked as waited for,
  clear the mark and publish the key and its value on the fleet's channel.

Each script takes any number of keys (triples, pairs) and does its step for each: a single
server gets one call per batch, so redis-py packs and parses one command instead of one
per key; a cluster, whose scripts may only touch one slot, gets one call per key.

The server runs scripts one at a time, so a waiter either finds the value or marks the key
before the write looks for the mark: no notice is lost between the two, and nothing is
published for a key nobody waits for (a fleet's channel carries its contended names, not
its every miss). The three keys share the value key's hash tag: one slot in a cluster.

A notice is ``<length of key>:<key><value>``, built by the server from what the writer sent.
Like a value read with GET it is untrusted: :func:`parse_notice` bounds it and the value is
then decoded and scrubbed as any other.
"""

from __future__ import annotations

import hashlib
from typing import Final

#: KEYS: (value, lease, wait mark) per key. ARGV: our lease token, lease milliseconds.
#: Returns (value or nil, 1 if the lease is ours) per key, flat.
LOOKUP: Final = b"""\
local out = {}
for i = 1, #KEYS, 3 do
  local v = redis.call('GET', KEYS[i])
  if v then
    out[#out + 1] = v
    out[#out + 1] = 0
  elseif redis.call('SET', KEYS[i + 1], ARGV[1], 'NX', 'PX', ARGV[2])
      or redis.call('GET', KEYS[i + 1]) == ARGV[1] then
    out[#out + 1] = false
    out[#out + 1] = 1
  else
    redis.call('SET', KEYS[i + 2], '1', 'PX', ARGV[2])
    out[#out + 1] = false
    out[#out + 1] = 0
  end
end
return out
"""

#: KEYS: (value, wait mark) per key. ARGV: the notice channel, then (value, PX
#: milliseconds) per key. Returns how many notices were published.
WRITE: Final = b"""\
local sent = 0
for i = 1, #KEYS, 2 do
  redis.call('SET', KEYS[i], ARGV[i + 1], 'PX', ARGV[i + 2])
  if redis.call('DEL', KEYS[i + 1]) == 1 then
    redis.call('PUBLISH', ARGV[1], string.len(KEYS[i]) .. ':' .. KEYS[i] .. ARGV[i + 1])
    sent = sent + 1
  end
end
return sent
"""

LOOKUP_SHA: Final = hashlib.sha1(LOOKUP).hexdigest()
WRITE_SHA: Final = hashlib.sha1(WRITE).hexdigest()
SCRIPTS: Final = ((LOOKUP_SHA, LOOKUP), (WRITE_SHA, WRITE))

#: Key suffixes of a value's lease and of its waited-for mark.
LEASE_SUFFIX: Final = b"/lease"
WAIT_SUFFIX: Final = b"/wait"
#: The channel's name after the key prefix (an ACL's ``&<prefix>*`` covers it).
CHANNEL_SUFFIX: Final = b"notices"
#: Digits of the key length at most: keys are far below 10,000 bytes.
_MAX_LEN_DIGITS: Final = 4


class BadNotice(ValueError):
    """A message on the channel that is not a notice of ours (the reason is its text)."""


def parse_notice(message: bytes, prefix: bytes, max_key: int,
                 max_value: int) -> tuple[bytes, bytes]:
    """(value key, value) of ``message``, or :class:`BadNotice`: the length must be
    decimal and in bounds, the key must carry ``prefix``, the value must fit ``max_value``."""
    colon = message.find(b":", 0, _MAX_LEN_DIGITS + 1)
    if colon <= 0 or not message[:colon].isdigit():
        raise BadNotice("no key length")
    n = int(message[:colon])
    if n > max_key:
        raise BadNotice("key too long")
    key = message[colon + 1:colon + 1 + n]
    value = message[colon + 1 + n:]
    if len(key) != n or not key.startswith(prefix):
        raise BadNotice("not one of our keys")
    if not value or len(value) > max_value:
        raise BadNotice("value empty or too long")
    return key, value
