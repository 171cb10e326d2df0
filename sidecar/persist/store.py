"""The cache snapshot file: load at start, periodic and final saves, written atomically.

A save never stalls the DNS path: the entries are encoded on the event loop in slices of at
most :data:`SLICE_SECONDS` each (only the cache's keys are copied at once, one C-level list
copy), and the file is written, fsynced and renamed in a worker thread, where the GIL is
released. A save that fails (disk full, no permission) logs one line and leaves the previous
snapshot in place; the sidecar keeps serving.

A load is synchronous (it runs before the sidecar says it is ready), reads the file in
chunks (never whole, and not through mmap: a file truncated by someone else while mapped
would kill the process with SIGBUS), stops once the cache's bounds are reached, and stops at
the first damage, keeping the entries validated before it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import BinaryIO

from sidecar.dns.cache import EXPIRES, RCODE, Cache, RawEntry, entry_size
from sidecar.dns.types import Rcode
from sidecar.persist.snapshot import (
    Decoder,
    SnapshotError,
    encode_end,
    encode_entry,
    encode_header,
    to_entry,
)

log = logging.getLogger("sidecar.snapshot")

#: Longest stretch of encoding on the event loop before it yields (seconds).
SLICE_SECONDS = 0.002
#: Entries encoded between two looks at the clock.
SLICE_CHECK = 64
#: Bytes read from the file at once by a load.
READ_CHUNK = 1 << 17
#: Encoded bytes handed to the writer thread at once.
WRITE_CHUNK = 1 << 20
_SERVFAIL = int(Rcode.SERVFAIL)
#: Buffers per writev call (Linux's IOV_MAX is 1024).
_IOV_MAX = 512


@dataclass(frozen=True)
class LoadResult:
    """What a load did. ``stopped_reason``: ``complete`` (the whole file), ``full`` (the
    cache's bounds reached: the rest, older entries, left), ``missing`` (no file), or the
    :class:`~sidecar.persist.snapshot.SnapshotError` reason (``empty``, ``foreign``,
    ``version``, ``truncated``, ``corrupt``, ``invalid``), or ``error`` (the file could not
    be read). ``detail`` is the one-line explanation that was logged."""

    loaded: int = 0
    skipped_expired: int = 0
    skipped_bad: int = 0
    #: Entries larger than this cache stores (its per-entry bound).
    skipped_large: int = 0
    stopped_reason: str = "complete"
    detail: str = ""
    #: Wall-clock time of the save the file holds (None: no valid header).
    saved_at: float | None = None
    seconds: float = 0.0
    #: Bytes of the file read and checked (where the load stopped).
    file_bytes: int = 0

    @property
    def error(self) -> str | None:
        """The file's problem, None when it was whole, missing or bigger than the cache."""
        if self.stopped_reason in ("complete", "full", "missing"):
            return None
        return self.detail


@dataclass(frozen=True)
class SaveResult:
    """What a save did: entries written, skipped (expired beyond the serve-stale window,
    SERVFAIL, or outside the format's bounds), file bytes, seconds, error (None: saved)."""

    ok: bool
    entries: int = 0
    skipped: int = 0
    bytes: int = 0
    seconds: float = 0.0
    error: str | None = None


#: A temporary file this old is left over from a killed save (no save takes that long).
STALE_TMP_SECONDS = 3600.0


def tmp_prefix(path: Path) -> str:
    """How the temporary files of saves to ``path`` are named (beside it)."""
    return f".{path.name}."


def remove_stale_tmp(path: Path, now: float) -> None:
    """Remove temporary files of saves to ``path`` killed midway (older than an hour)."""
    prefix = tmp_prefix(path)
    with contextlib.suppress(OSError):
        for entry in os.scandir(path.parent):
            if entry.name.startswith(prefix) and entry.name.endswith(".tmp"):
                with contextlib.suppress(OSError):
                    if now - entry.stat(follow_symlinks=False).st_mtime > STALE_TMP_SECONDS:
                        os.unlink(entry.path)


class _Writer:
    """The temporary file next to the snapshot; every method runs in a worker thread."""

    def __init__(self, path: Path) -> None:
        self.path = path
        # Per save: a process replacing this one writes its own temporary file, even when
        # both are PID 1 of containers on one host name (two hostNetwork DaemonSets sharing
        # a hostPath folder). One left by a kill mid-save is removed by a later load.
        self.tmp = path.with_name(f"{tmp_prefix(path)}{os.getpid()}.{secrets.token_hex(4)}.tmp")
        self.fd: int | None = os.open(self.tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC
                                      | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        self.bytes = 0

    def write(self, chunks: list[bytes]) -> None:
        # writev: the GIL is released for the copy into the kernel. A join here (or a
        # buffered file's loop over small writes) would hold it, and the event loop would
        # wait for it (the switch interval is 5 ms) while the thread copies.
        assert self.fd is not None
        for i in range(0, len(chunks), _IOV_MAX):
            batch = chunks[i : i + _IOV_MAX]
            total = sum(map(len, batch))
            done = os.writev(self.fd, batch)
            if done < total:  # a short write (signal, nearly full disk): finish it
                rest = memoryview(b"".join(batch))[done:]
                while rest:
                    rest = rest[os.write(self.fd, rest):]
            self.bytes += total

    def commit(self) -> None:
        """fsync the file, rename it over the snapshot, fsync the folder (the rename).

        The folder's fsync is best effort: some filesystems refuse it (EINVAL), and once the
        rename is done the new snapshot is in place either way."""
        assert self.fd is not None
        os.fsync(self.fd)
        fd, self.fd = self.fd, None
        os.close(fd)
        os.replace(self.tmp, self.path)
        with contextlib.suppress(OSError):
            folder = os.open(self.path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            try:
                os.fsync(folder)
            finally:
                os.close(folder)

    def abort(self) -> None:
        if self.fd is not None:
            fd, self.fd = self.fd, None
            with contextlib.suppress(OSError):
                os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(self.tmp)


class SnapshotStore:
    """The snapshot at ``path`` of ``cache``: ``load()`` once before the sidecar is ready,
    ``run()`` as a task for a save every ``interval`` seconds (0: none), ``await save()``
    after the drain at shutdown (and for ``POST /snapshot``).

    ``serve_stale`` (``--serve-stale`` seconds) keeps entries expired less than that long,
    at save and at load, for serve-stale to use. Times: ``wall`` (wall clock, stored in the
    file) and the cache's own monotonic clock (``cache.clock``, ``time.monotonic`` without).
    """

    def __init__(self, path: str | os.PathLike[str], interval: float, cache: Cache,
                 serve_stale: float = 0, *, wall: Callable[[], float] = time.time,
                 slice_seconds: float = SLICE_SECONDS) -> None:
        self.path = Path(path)
        self.interval = interval
        self.cache = cache
        self.serve_stale = serve_stale
        self.wall = wall
        self.slice_seconds = slice_seconds
        self.entries_loaded = 0
        self.last_load: LoadResult | None = None
        self.saves = 0
        self.save_errors = 0
        self.last_save: SaveResult | None = None
        #: The last save that succeeded (its duration and size are what /stats shows).
        self.last_ok: SaveResult | None = None
        self._last_save_done: float | None = None
        self._current: asyncio.Task[SaveResult] | None = None

    @property
    def clock(self) -> Callable[[], float]:
        return getattr(self.cache, "clock", time.monotonic)

    # -------------------------------------------------------------------------- load

    def load(self) -> LoadResult:
        """Fill the cache from the file; never raises. Entries are taken newest first until
        the cache's count or byte bound, then stored oldest first (the cache's eviction
        order survives). One log line says what happened."""
        t0 = time.perf_counter()
        try:
            result = self._load()
        except Exception as exc:  # a bug here must not stop the sidecar from starting
            log.exception("cache snapshot %s: load failed", self.path)
            result = LoadResult(stopped_reason="error", detail=f"load failed: {exc}")
        result = replace(result, seconds=time.perf_counter() - t0)
        self.last_load = result
        self.entries_loaded = result.loaded
        self._log_load(result)
        return result

    def _load(self) -> LoadResult:
        remove_stale_tmp(self.path, time.time())
        try:
            f = open(self.path, "rb", buffering=0)
        except FileNotFoundError:
            if not self.path.parent.is_dir():
                # Said now, at start, rather than only by the first save's failure later.
                return LoadResult(stopped_reason="error",
                                  detail=f"folder {self.path.parent} does not exist; every"
                                  " save will fail until it does")
            return LoadResult(stopped_reason="missing", detail="no snapshot file")
        except OSError as exc:
            return LoadResult(stopped_reason="error", detail=f"cannot open: {exc}")
        with f:
            return self._fill(f)

    def _fill(self, f: BinaryIO) -> LoadResult:
        """Read ``f`` in chunks (never whole: a file may be far larger than the cache, and
        only what fits is wanted) and take its records newest first while they fit."""
        cache = self.cache
        wall, mono = self.wall(), self.clock()
        room = cache.capacity - len(cache)
        room_bytes = cache.memory_limit - cache.bytes
        max_entry = cache.max_entry_bytes
        stale = self.serve_stale
        dec = Decoder()
        taken: dict[bytes, RawEntry] = {}
        used = expired = large = 0
        reason, detail = "complete", ""
        try:
            while reason == "complete":
                try:
                    chunk = f.read(READ_CHUNK)
                except OSError as exc:
                    reason, detail = "error", f"read failed at byte {dec.offset}: {exc}"
                    break
                if not chunk:
                    dec.finish()
                    break
                dec.feed(chunk)
                for rec in dec.records():
                    e = to_entry(rec, dec.saved_at or 0.0, wall, mono)
                    left = e[EXPIRES] - mono
                    if left <= 0 and (-left >= stale or e[RCODE] == _SERVFAIL):
                        expired += 1
                        continue
                    key = rec.key
                    if key in taken:
                        continue  # a later copy in the file is older
                    cost = entry_size(key, e)
                    if cost > max_entry:
                        large += 1
                        continue
                    if len(taken) >= room or used + cost > room_bytes:
                        reason = "full"
                        detail = (f"the cache's bounds ({cache.capacity} entries,"
                                  f" {cache.memory_limit} bytes) reached: older entries left")
                        break
                    taken[key] = e
                    used += cost
        except SnapshotError as exc:
            reason, detail = exc.reason, str(exc)
        put = cache.put
        for key, e in reversed(taken.items()):
            put(key, e)
        return LoadResult(loaded=len(taken), skipped_expired=expired,
                          skipped_bad=dec.skipped_bad, skipped_large=large,
                          stopped_reason=reason, detail=detail, saved_at=dec.saved_at,
                          file_bytes=dec.offset)

    def _log_load(self, r: LoadResult) -> None:
        where = f"cache snapshot {self.path}"
        if r.stopped_reason == "missing":
            log.info("%s: not found, starting cold", where)
            return
        if r.stopped_reason == "error":
            log.warning("%s: %s; starting cold", where, r.detail)
            return
        age = f", saved {self.wall() - r.saved_at:.0f}s ago" if r.saved_at is not None else ""
        counts = (f"{r.loaded} entries loaded ({r.skipped_expired} expired,"
                  f" {r.skipped_bad} invalid, {r.skipped_large} too large){age},"
                  f" {r.seconds:.2f}s")
        if r.stopped_reason == "complete":
            log.info("%s: %s", where, counts)
        elif r.stopped_reason == "full":
            log.info("%s: %s; %s", where, counts, r.detail)
        elif r.loaded:
            log.warning("%s: %s (%s); kept the entries before it: %s", where, r.detail,
                        r.stopped_reason, counts)
        else:
            log.warning("%s: %s (%s); starting cold", where, r.detail, r.stopped_reason)

    # -------------------------------------------------------------------------- save

    async def run(self) -> None:
        """Save every ``interval`` seconds until cancelled; returns at once for 0. A save
        under way when the task is cancelled still completes (see :meth:`save`)."""
        if self.interval <= 0:
            return
        while True:
            await asyncio.sleep(self.interval)
            await self.save()

    async def save(self) -> SaveResult:
        """Write the snapshot now; never raises (a failure is logged and counted).

        Saves run one at a time (a call during a save waits, then saves afresh). The work
        runs in its own task: cancelling the caller does not cut a save short, so the file
        is never left half-renamed and the temporary file is always cleaned up."""
        while self._current is not None:
            await asyncio.wait([self._current])
        task = asyncio.get_running_loop().create_task(self._save())
        self._current = task
        task.add_done_callback(self._save_done)
        return await asyncio.shield(task)

    def _save_done(self, task: asyncio.Task[SaveResult]) -> None:
        if self._current is task:
            self._current = None

    async def _save(self) -> SaveResult:
        t0 = time.perf_counter()
        writer: _Writer | None = None
        committed = False
        try:
            writer = await asyncio.to_thread(_Writer, self.path)
            entries, skipped = await self._encode(writer)
            await asyncio.to_thread(writer.commit)
            committed = True
        except Exception as exc:  # disk full, permission, a bug: keep serving
            self.save_errors += 1
            result = SaveResult(ok=False, seconds=time.perf_counter() - t0, error=str(exc))
            self.last_save = result
            log.warning("cache snapshot %s: save failed (%s: %s); previous snapshot kept,"
                        " still serving", self.path, type(exc).__name__, exc)
            return result
        finally:
            if writer is not None and not committed:
                writer.abort()  # close and unlink: quick, and only on the failure path
        result = SaveResult(ok=True, entries=entries, skipped=skipped, bytes=writer.bytes,
                            seconds=time.perf_counter() - t0)
        self.saves += 1
        self.last_save = self.last_ok = result
        self._last_save_done = self.clock()
        log.info("cache snapshot %s: saved %d entries, %d bytes in %.2fs", self.path,
                 entries, writer.bytes, result.seconds)
        return result

    async def _encode(self, writer: _Writer) -> tuple[int, int]:
        """Encode every entry (on the loop, in slices) and hand the bytes to ``writer``."""
        cache = self.cache
        mono, wall = self.clock(), self.wall()
        get = cache.entries.get
        # Newest first: a smaller cache loading this file keeps the most recent entries.
        keys = list(cache.entries)
        keys.reverse()
        await asyncio.sleep(0)  # the copy is the one pause that grows with the cache
        keep_until = mono - self.serve_stale
        pending: list[bytes] = [encode_header(wall)]
        pending_bytes = 0
        records: list[bytes] = []
        count = skipped = 0
        perf = time.perf_counter
        slice_seconds, check = self.slice_seconds, SLICE_CHECK
        total = len(keys)
        start = 0
        while start < total:
            t = perf()
            while start < total:
                for key in keys[start : start + check]:
                    e = get(key)
                    if e is None:
                        continue  # deleted since the keys were taken
                    if e[EXPIRES] <= keep_until or e[RCODE] == _SERVFAIL:
                        skipped += 1
                        continue
                    rec = encode_entry(key, e, mono, wall)
                    if rec is None:
                        skipped += 1
                        continue
                    records.append(rec)
                    count += 1
                start += check
                if perf() - t >= slice_seconds:
                    break
            # One bytes object per slice: the writer thread gets a few large buffers.
            chunk = b"".join(records)
            records.clear()
            pending.append(chunk)
            pending_bytes += len(chunk)
            if pending_bytes >= WRITE_CHUNK:
                chunks, pending, pending_bytes = pending, [], 0
                await asyncio.to_thread(writer.write, chunks)
            else:
                await asyncio.sleep(0)
        pending.append(encode_end(count))
        await asyncio.to_thread(writer.write, pending)
        return count, skipped

    # -------------------------------------------------------------------------- stats

    def _snapshot_age(self) -> float | None:
        """Seconds since the newest snapshot this process knows: its own last save, else
        the one it loaded (by the wall clock), else None."""
        if self._last_save_done is not None:
            return max(0.0, self.clock() - self._last_save_done)
        loaded = self.last_load
        if loaded is not None and loaded.saved_at is not None and loaded.loaded:
            return max(0.0, self.wall() - loaded.saved_at)
        return None

    def stats(self) -> dict:
        """For ``/stats`` (``snapshot``) and the metrics: seconds, bytes, counts.
        ``last_save_*`` describe the last save that succeeded; ``last_save_error`` is the
        last save's error (None when it succeeded)."""
        last, loaded = self.last_ok, self.last_load
        return {
            "path": str(self.path),
            "entries_loaded": self.entries_loaded,
            "load_seconds": loaded.seconds if loaded else None,
            "load_error": loaded.error if loaded else None,
            "last_save_age": (None if self._last_save_done is None
                              else max(0.0, self.clock() - self._last_save_done)),
            "snapshot_age": self._snapshot_age(),
            "last_save_seconds": last.seconds if last else None,
            "last_save_bytes": last.bytes if last else None,
            "last_save_entries": last.entries if last else None,
            "last_save_error": (self.last_save.error if self.last_save else None),
            "saves": self.saves,
            "save_errors": self.save_errors,
        }

