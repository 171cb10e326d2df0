"""Send one question on a c-ares channel; get the reply's answer and authority as wire records.

aiodns's ``query_dns`` (pycares ``Channel.query``) throws the whole reply away when c-ares
reports NXDOMAIN or NODATA, so the SOA that RFC 2308 negative caching needs never arrives
and every negative answer would cost a second upstream round trip (an SOA query). It also
builds a dataclass per record that the cache would re-encode with dnslib. Here the query goes
through the same c-ares call (``ares_query_dnsrec``, on the channel aiodns made) with our
own cffi callback, which keeps the sections for NXDOMAIN/NODATA and turns records straight
into wire rdata; TXT keeps its character-string boundaries.

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
from pycares.errno import ARES_EBADRESP, ARES_ENODATA, ARES_ENOTFOUND, ARES_SUCCESS

from sidecar.dns.types import RRClass, RRType
from sidecar.dns.wire import encode_name
from sidecar.upstream.records import Rec, rdata_from_pycares

# Names inside rdata (a zone's SOA names, CNAME and NS targets) repeat from reply to reply,
# and a cache hit costs a small fraction of encoding one again.
_rdata_name = functools.lru_cache(maxsize=4096)(encode_name)

log = logging.getLogger("sidecar.upstream")

_ffi: Any = getattr(pycares, "_ffi", None)
_lib: Any = getattr(pycares, "_lib", None)

#: c-ares status codes that still carry the reply.
_WITH_REPLY = (ARES_SUCCESS, ARES_ENODATA, ARES_ENOTFOUND)
#: The question's class (plain int for cffi).
_IN = int(RRClass.IN)
# Record types parsed here, as plain ints (the comparisons below run per record).
_A, _NS, _CNAME, _SOA, _PTR, _MX, _TXT, _AAAA, _SRV = (
    int(t) for t in (RRType.A, RRType.NS, RRType.CNAME, RRType.SOA, RRType.PTR, RRType.MX,
                     RRType.TXT, RRType.AAAA, RRType.SRV))

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
    if rtype == _A:
        return bytes(_ffi.buffer(lib.ares_dns_rr_get_addr(rr, lib.ARES_RR_A_ADDR), 4))
    if rtype == _AAAA:
        return bytes(_ffi.buffer(lib.ares_dns_rr_get_addr6(rr, lib.ARES_RR_AAAA_ADDR), 16))
    if rtype == _CNAME:
        return _rdata_name(_str(rr, lib.ARES_RR_CNAME_CNAME))
    if rtype == _TXT:
        key = lib.ARES_RR_TXT_DATA
        length = _ffi.new("size_t *")
        out = bytearray()
        for i in range(lib.ares_dns_rr_get_abin_cnt(rr, key)):
            data = lib.ares_dns_rr_get_abin(rr, key, i, length)
            chunk = b"" if data == _ffi.NULL else bytes(_ffi.buffer(data, length[0]))
            out.append(len(chunk))
            out += chunk
        return bytes(out) or b"\x00"
    if rtype == _SOA:
        g = lib.ares_dns_rr_get_u32
        return (_rdata_name(_str(rr, lib.ARES_RR_SOA_MNAME))
                + _rdata_name(_str(rr, lib.ARES_RR_SOA_RNAME))
                + _SOA_NUMS.pack(g(rr, lib.ARES_RR_SOA_SERIAL), g(rr, lib.ARES_RR_SOA_REFRESH),
                                 g(rr, lib.ARES_RR_SOA_RETRY), g(rr, lib.ARES_RR_SOA_EXPIRE),
                                 g(rr, lib.ARES_RR_SOA_MINIMUM)))
    if rtype == _NS:
        return _rdata_name(_str(rr, lib.ARES_RR_NS_NSDNAME))
    if rtype == _PTR:
        return _rdata_name(_str(rr, lib.ARES_RR_PTR_DNAME))
    if rtype == _MX:
        return (_U16.pack(lib.ares_dns_rr_get_u16(rr, lib.ARES_RR_MX_PREFERENCE))
                + _rdata_name(_str(rr, lib.ARES_RR_MX_EXCHANGE)))
    if rtype == _SRV:
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
                status = ARES_EBADRESP
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
    once, on the event loop's thread, where ``status`` is a c-ares code (``pycares.errno``:
    ``ARES_SUCCESS``, ``ARES_ENODATA``, ``ARES_ENOTFOUND``, ...) and ``sections`` is
    ``(answer, authority)`` lists of :class:`~sidecar.upstream.records.Rec` for those three,
    else None. A callback, not a future:
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
                status = _lib.ares_query_dnsrec(ch, name.encode("latin-1"), _IN, qtype,
                                                _callback, handle, _ffi.NULL)
        else:
            # What pycares's _capture_channel() does (the lock keeps close() from destroying
            # the channel mid-call), without the generator-based context manager it is made
            # of, which runs once per upstream query.
            with lock:
                holder = channel._channel
                if holder is None:
                    raise RuntimeError("Channel is destroyed, no new queries allowed")
                status = _lib.ares_query_dnsrec(holder[0], name.encode("latin-1"), _IN, qtype,
                                                _callback, handle, _ffi.NULL)
    except BaseException:
        _pending.pop(key, None)
        raise
    if status != ARES_SUCCESS and _pending.pop(key, None) is not None:
        # Refused at once and c-ares did not call back: this is the answer.
        _deliver(done, status, None)
