"""Send one question on a c-ares channel; get the reply's answer and authority as wire records.

aiodns's ``query_dns`` (pycares ``Channel.query``) throws the whole reply away when c-ares
reports NXDOMAIN or NODATA, so the SOA that RFC 2308 negative caching needs never arrives
and every negative answer cost a second upstream round trip (an SOA query). It also builds
a dataclass per record that the cache then re-encodes with dnslib. Here the query goes
through the same c-ares call (``ares_query_dnsrec``, on the channel aiodns made) with our
own cffi callback, which keeps the sections for NXDOMAIN/NODATA and turns records straight
into wire rdata; TXT keeps its character-string boundaries.

Measured with ``bench/miss_micro.py`` (1,000 cold A/AAAA misses at once, sidecar pinned to
one core, upstream answering at once): 445-543 us of sidecar CPU per miss with ``query_dns``,
SOA lookups and dnslib; 162-200 us with this module and the other miss-path changes of the
same session (wire-level entries, tries as futures).

The cffi callback runs where c-ares processes the reply: on the event loop for the sidecar's
loop-driven channels (:class:`sidecar.upstream.cares.LoopResolver`), where it calls the caller's
``done`` at once, or on c-ares' event thread for a default aiodns channel, from where it hands
the records over with ``call_soon_threadsafe``. The record pointer is only valid inside the
callback, so parsing happens there. If pycares's internals are not what this expects,
:data:`AVAILABLE` is False and callers use ``query_dns`` (answers stay correct; negative
answers then need the SOA lookup).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import struct
from collections.abc import Callable
from threading import get_ident
from typing import Any

import pycares

from sidecar.dns.wire import encode_name
from sidecar.upstream.records import Rec, rdata_from_pycares

# Names inside rdata (a zone's SOA names, CNAME and NS targets) repeat from reply to reply;
# encoding one costs ~2 us, a cache hit ~0.1 us.
_rdata_name = functools.lru_cache(maxsize=4096)(encode_name)

log = logging.getLogger("sidecar.upstream")

_ffi: Any = getattr(pycares, "_ffi", None)
_lib: Any = getattr(pycares, "_lib", None)

#: c-ares status codes that still carry the reply.
OK, ENODATA, ENOTFOUND, EBADRESP = 0, 1, 4, 10
_WITH_REPLY = (OK, ENODATA, ENOTFOUND)

_U16 = struct.Struct(">H")
_HHH = struct.Struct(">HHH")
_SOA_NUMS = struct.Struct(">IIIII")

# handle -> (box) kept alive until c-ares calls back; cffi handles die with their object.
_pending: dict[int, Any] = {}
_MISSING = object()


def _available() -> bool:
    names = ("ares_query_dnsrec", "ares_dns_record_rr_cnt", "ares_dns_record_rr_get_const",
             "ares_dns_rr_get_type", "ares_dns_rr_get_name", "ares_dns_rr_get_ttl",
             "ares_dns_rr_get_addr", "ares_dns_rr_get_addr6", "ares_dns_rr_get_str",
             "ares_dns_rr_get_u16", "ares_dns_rr_get_u32", "ares_dns_rr_get_abin_cnt",
             "ares_dns_rr_get_abin", "ARES_SECTION_ANSWER", "ARES_SECTION_AUTHORITY")
    return (_ffi is not None and _lib is not None and all(hasattr(_lib, n) for n in names)
            and hasattr(pycares.Channel, "_capture_channel")
            and hasattr(pycares, "extract_record_data"))


def _str(rr: Any, key: int) -> str:
    return _ffi.string(_lib.ares_dns_rr_get_str(rr, key)).decode("latin-1")


def _rdata(rr: Any, rtype: int) -> bytes | None:
    lib = _lib
    if rtype == 1:
        return bytes(_ffi.buffer(lib.ares_dns_rr_get_addr(rr, lib.ARES_RR_A_ADDR), 4))
    if rtype == 28:
        return bytes(_ffi.buffer(lib.ares_dns_rr_get_addr6(rr, lib.ARES_RR_AAAA_ADDR), 16))
    if rtype == 5:
        return _rdata_name(_str(rr, lib.ARES_RR_CNAME_CNAME))
    if rtype == 16:
        key = lib.ARES_RR_TXT_DATA
        length = _ffi.new("size_t *")
        out = bytearray()
        for i in range(lib.ares_dns_rr_get_abin_cnt(rr, key)):
            data = lib.ares_dns_rr_get_abin(rr, key, i, length)
            chunk = b"" if data == _ffi.NULL else bytes(_ffi.buffer(data, length[0]))
            out.append(len(chunk))
            out += chunk
        return bytes(out) or b"\x00"
    if rtype == 6:
        g = lib.ares_dns_rr_get_u32
        return (_rdata_name(_str(rr, lib.ARES_RR_SOA_MNAME))
                + _rdata_name(_str(rr, lib.ARES_RR_SOA_RNAME))
                + _SOA_NUMS.pack(g(rr, lib.ARES_RR_SOA_SERIAL), g(rr, lib.ARES_RR_SOA_REFRESH),
                                 g(rr, lib.ARES_RR_SOA_RETRY), g(rr, lib.ARES_RR_SOA_EXPIRE),
                                 g(rr, lib.ARES_RR_SOA_MINIMUM)))
    if rtype == 2:
        return _rdata_name(_str(rr, lib.ARES_RR_NS_NSDNAME))
    if rtype == 12:
        return _rdata_name(_str(rr, lib.ARES_RR_PTR_DNAME))
    if rtype == 15:
        return (_U16.pack(lib.ares_dns_rr_get_u16(rr, lib.ARES_RR_MX_PREFERENCE))
                + _rdata_name(_str(rr, lib.ARES_RR_MX_EXCHANGE)))
    if rtype == 33:
        u16 = lib.ares_dns_rr_get_u16
        return (_HHH.pack(u16(rr, lib.ARES_RR_SRV_PRIORITY), u16(rr, lib.ARES_RR_SRV_WEIGHT),
                          u16(rr, lib.ARES_RR_SRV_PORT))
                + _rdata_name(_str(rr, lib.ARES_RR_SRV_TARGET)))
    # Rare types (CAA, NAPTR, ...): through pycares's decoder and dnslib's encoder.
    try:
        data = pycares.extract_record_data(rr, rtype)
    except Exception:
        return None
    return rdata_from_pycares(rtype, data)


def _section(dnsrec: Any, section: int) -> list[Rec]:
    lib = _lib
    out = []
    for i in range(lib.ares_dns_record_rr_cnt(dnsrec, section)):
        rr = lib.ares_dns_record_rr_get_const(dnsrec, section, i)
        if rr == _ffi.NULL:
            continue
        rtype = lib.ares_dns_rr_get_type(rr)
        rdata = _rdata(rr, rtype)
        if rdata is None:
            continue
        name = _ffi.string(lib.ares_dns_rr_get_name(rr)).decode("latin-1")
        out.append(Rec(name, rtype, lib.ares_dns_rr_get_ttl(rr), rdata))
    return out


def _deliver(done: Callable[[int, Any], None], status: int, sections: Any) -> None:
    try:
        done(status, sections)
    except Exception:  # pragma: no cover - the callback must not raise; never lose the loop
        log.exception("c-ares reply callback failed")


def _on_reply(arg: Any, status: int, timeouts: int, dnsrec: Any) -> None:
    # An exception here would only be printed by cffi, so none escapes.
    try:
        box = _pending.pop(int(_ffi.cast("uintptr_t", arg)), None)
        if box is None:
            return
        loop, done, thread = box[0], box[1], box[3]
        sections = None
        if status in _WITH_REPLY and dnsrec != _ffi.NULL:
            try:
                sections = (_section(dnsrec, _lib.ARES_SECTION_ANSWER),
                            _section(dnsrec, _lib.ARES_SECTION_AUTHORITY))
            except Exception:
                status = EBADRESP
        if get_ident() == thread:
            _deliver(done, status, sections)  # loop-driven channel: already on the loop
        else:
            loop.call_soon_threadsafe(_deliver, done, status, sections)
    except Exception:  # pragma: no cover - loop closed under a late reply at shutdown
        pass


AVAILABLE = _available()
_callback = (_ffi.callback("void(void *, ares_status_t, size_t, const ares_dns_record_t *)",
                           _on_reply) if AVAILABLE else None)


def submit(channel: pycares.Channel, name: str, qtype: int,
           done: Callable[[int, Any], None]) -> None:
    """Send ``name``/``qtype`` (class IN) on ``channel``; ``done(status, sections)`` is called
    once, on the event loop's thread, where ``status`` is a c-ares code (0 ok, 1 NODATA,
    4 NXDOMAIN, ...) and ``sections`` is ``(answer, authority)`` lists of
    :class:`~sidecar.encode.Rec` for the first three, else None. A callback, not a future:
    the reply is handled in the same loop pass that read it. ``done`` must not raise. Raises
    ``RuntimeError`` if the channel is closed (``done`` is then never called)."""
    box = [asyncio.get_running_loop(), done, None, get_ident()]
    handle = _ffi.new_handle(box)
    box[2] = handle
    key = int(_ffi.cast("uintptr_t", handle))
    _pending[key] = box
    try:
        lock, holder = getattr(channel, "_lock", None), getattr(channel, "_channel", _MISSING)
        if lock is None or holder is _MISSING:  # pragma: no cover - pycares changed
            with channel._capture_channel() as ch:
                status = _lib.ares_query_dnsrec(ch, name.encode("latin-1"), 1, qtype,
                                                _callback, handle, _ffi.NULL)
        else:
            # What pycares's _capture_channel() does (the lock keeps close() from destroying
            # the channel mid-call), without the generator-based context manager it is made
            # of: 9k of 446k instructions per miss (2%; callgrind, bench/miss_micro.py).
            with lock:
                holder = channel._channel
                if holder is None:
                    raise RuntimeError("Channel is destroyed, no new queries allowed")
                status = _lib.ares_query_dnsrec(holder[0], name.encode("latin-1"), 1, qtype,
                                                _callback, handle, _ffi.NULL)
    except BaseException:
        _pending.pop(key, None)
        raise
    if status != OK and _pending.pop(key, None) is not None:
        # Refused at once and c-ares did not call back: this is the answer.
        _deliver(done, status, None)
