"""Soak test: a fixed query rate for a long time; does memory plateau, do fds leak, does p99 drift?

    python -m bench.soak [--seconds 600] [--qps 800] [--cache-size 20000] [--interval 5]
    python -m bench.soak ...            (the same)

Starts a fake upstream process (``python -m sidecar.testing.fakeupstream --port 0``) and a real sidecar
process (``python -m sidecar ... --cache-size N``), both on loopback, and sends UDP queries at a
fixed rate (open loop) from this process: a mix of

- hits:   a hot set of names (``crawl<i>.example.test``, cached after their first query),
- misses: unique names ``h<N>.example.test`` (the fake upstream synthesises them: NOERROR),
- NXDOMAIN: unique names ``nx<N>.example.test``.

Every ``--interval`` seconds it samples the sidecar's RSS (/proc/PID/status VmRSS), open fds
(/proc/PID/fd), CPU, ``/stats`` (cache entries, evictions, upstream errors) and, for the queries
answered in the interval, p50 / p99 / max latency and the errors (timeouts, SERVFAIL, a wrong
rcode, unparseable replies). Rows go to ``bench/results/soak.csv`` as they are taken; at the end
a plot goes to ``docs/img/soak.png`` (matplotlib) and a summary is printed: memory growth over
the second half of the run (after the cache has filled, the bound must make it flat), fds,
errors, p99 over time.

Bounded in time (``--seconds`` plus a few seconds of draining); every process it starts is killed
on exit (try/finally, also on SIGINT/SIGTERM).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import csv
import json
import os
import selectors
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results"
HOST = "127.0.0.1"
CLK_TCK = os.sysconf("SC_CLK_TCK")
REPLY_TIMEOUT = 5.0  # a query unanswered this long is a timeout (sidecar budget: 2 x 2 s)

NOERROR, SERVFAIL, NXDOMAIN = 0, 2, 3


# ------------------------------------------------------------------------------- processes


def free_port() -> int:
    for _ in range(50):
        t = socket.socket()
        t.bind((HOST, 0))
        port = t.getsockname()[1]
        u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            u.bind((HOST, port))
        except OSError:
            continue
        finally:
            u.close()
            t.close()
        return port
    raise RuntimeError("no free port")


class Procs:
    """Processes started here, each in its own session; ``stop_all`` kills them all."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen] = []

    def spawn(self, argv: list[str], **kw) -> subprocess.Popen:
        p = subprocess.Popen(argv, stdin=subprocess.DEVNULL, start_new_session=True, cwd=REPO,
                             **kw)
        self.procs.append(p)
        return p

    def stop_all(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(p.pid, signal.SIGTERM)
        for p in self.procs:
            try:
                p.wait(8)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(p.pid, signal.SIGKILL)
                p.wait(5)


def start_upstream(procs: Procs) -> int:
    p = procs.spawn([sys.executable, "-m", "sidecar.testing.fakeupstream", "--port", "0"],
                    stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    sel = selectors.DefaultSelector()
    sel.register(p.stdout, selectors.EVENT_READ)
    line = p.stdout.readline() if sel.select(timeout=20) else ""
    sel.close()
    if "listening on" not in line:
        raise RuntimeError(f"fake upstream did not start: {line!r}")
    return int(line.rsplit(":", 1)[1])


def http_json(url: str, timeout: float = 3.0) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return resp.status, json.load(resp)
    except urllib.error.HTTPError as exc:
        return exc.code, json.load(exc)


def start_sidecar(procs: Procs, uport: int, cache_size: int, log_path: str,
                  extra: list[str]) -> tuple[subprocess.Popen, int, str]:
    for _ in range(5):
        port, hport = free_port(), free_port()
        with open(log_path, "ab") as log:
            p = procs.spawn([sys.executable, "-m", "sidecar", "--listen", f"{HOST}:{port}",
                             "--http", f"{HOST}:{hport}", "--upstream", f"{HOST}:{uport}",
                             "--cache-size", str(cache_size), "--log-level", "warning", *extra],
                            stdout=log, stderr=log)
        base = f"http://{HOST}:{hport}"
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and p.poll() is None:
            with contextlib.suppress(OSError, ValueError):
                if http_json(base + "/readyz", 0.5)[0] == 200:
                    return p, port, base
            time.sleep(0.1)  # polling a process coming up, bounded by the deadline
        if p.poll() is None:
            raise RuntimeError("sidecar not ready within 20 s")
        if p.returncode != 1:
            raise RuntimeError(f"sidecar exited with {p.returncode} at start-up")
    raise RuntimeError("sidecar could not start on 5 ports")


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        s = f.read()
    fields = s[s.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


# ------------------------------------------------------------------------------- load


def encode_query(qid: int, name: str, qtype: int = 1) -> bytes:
    q = b"".join(bytes((len(p),)) + p.encode() for p in name.split(".")) + b"\x00"
    return struct.pack(">HHHHHH", qid, 0x0100, 1, 0, 0, 0) + q + struct.pack(">HH", qtype, 1)


def pct(values: list[float], p: float) -> float | None:
    if not values:
        return None
    s = sorted(values)
    return s[min(len(s) - 1, int(round(p / 100 * (len(s) - 1))))]


@dataclass
class Interval:
    sent: int = 0
    answered: int = 0
    timeouts: int = 0
    servfail: int = 0
    wrong_rcode: int = 0
    bad_reply: int = 0
    lat: list[float] = field(default_factory=list)
    lat_hit: list[float] = field(default_factory=list)
    lat_miss: list[float] = field(default_factory=list)

    @property
    def errors(self) -> int:
        return self.timeouts + self.servfail + self.wrong_rcode + self.bad_reply


class Load(asyncio.DatagramProtocol):
    """Open-loop UDP load: ``tick`` sends what is due at ``qps``; replies are matched by ID."""

    def __init__(self, qps: float, hot: int, shares: tuple[float, float, float]) -> None:
        self.qps = qps
        self.hot = hot
        self.hit_share, self.miss_share, _nx = shares
        self.transport: asyncio.DatagramTransport | None = None
        self.outstanding: dict[int, tuple[float, str, int]] = {}
        self.next_id = 1
        self.n_sent = 0
        self.n_unique = 0
        self.cur = Interval()
        self.totals = Interval()
        self.started = 0.0

    def connection_made(self, transport) -> None:
        self.transport = transport

    def error_received(self, exc: Exception) -> None:
        pass  # counted as timeouts when the reply never comes

    def _kind(self) -> str:
        # A deterministic, evenly spread interleave with the configured shares (golden ratio
        # sequence): no bursts of one kind.
        x = (self.n_sent * 0.6180339887) % 1.0
        if x < self.hit_share:
            return "hit"
        if x < self.hit_share + self.miss_share:
            return "miss"
        return "nx"

    def send_one(self, now: float) -> None:
        kind = self._kind()
        if kind == "hit":
            name, want = f"crawl{self.n_sent % self.hot}.example.test", NOERROR
        elif kind == "miss":
            self.n_unique += 1
            name, want = f"h{self.n_unique}.example.test", NOERROR
        else:
            self.n_unique += 1
            name, want = f"nx{self.n_unique}.example.test", NXDOMAIN
        for _ in range(65536):
            qid = self.next_id
            self.next_id = (self.next_id + 1) & 0xFFFF
            if qid not in self.outstanding:
                break
        else:
            return  # 65536 queries outstanding: skip (counted by the sent/answered gap)
        self.outstanding[qid] = (now, kind, want)
        self.transport.sendto(encode_query(qid, name))
        self.n_sent += 1
        self.cur.sent += 1
        self.totals.sent += 1

    def tick(self) -> None:
        now = time.monotonic()
        due = int((now - self.started) * self.qps) - self.n_sent
        for _ in range(max(0, min(due, 2000))):
            self.send_one(now)

    def expire(self, now: float) -> None:
        stale = [qid for qid, (t, _k, _w) in self.outstanding.items() if now - t > REPLY_TIMEOUT]
        for qid in stale:
            del self.outstanding[qid]
            self.cur.timeouts += 1
            self.totals.timeouts += 1

    def datagram_received(self, data: bytes, addr) -> None:
        now = time.monotonic()
        if len(data) < 12:
            self._count("bad_reply")
            return
        qid = (data[0] << 8) | data[1]
        got = self.outstanding.pop(qid, None)
        if got is None:
            return  # a late reply to a query already counted as a timeout
        sent, kind, want = got
        lat = now - sent
        self.cur.answered += 1
        self.totals.answered += 1
        rcode = data[3] & 0x0F
        if not data[2] & 0x80:
            self._count("bad_reply")
        elif rcode == SERVFAIL:
            self._count("servfail")
        elif rcode != want or (want == NOERROR and data[6:8] == b"\x00\x00"):
            self._count("wrong_rcode")
        self.cur.lat.append(lat)
        (self.cur.lat_hit if kind == "hit" else self.cur.lat_miss).append(lat)

    def _count(self, what: str) -> None:
        setattr(self.cur, what, getattr(self.cur, what) + 1)
        setattr(self.totals, what, getattr(self.totals, what) + 1)

    def take_interval(self) -> Interval:
        cur, self.cur = self.cur, Interval()
        return cur


# ------------------------------------------------------------------------------- run

COLUMNS = ["t_s", "rss_mb", "fds", "cpu_pct", "sent", "answered", "errors", "timeouts",
           "servfail", "wrong_rcode", "bad_reply", "p50_ms", "p99_ms", "max_ms", "hit_p99_ms",
           "miss_p99_ms", "cache_entries", "evictions", "sidecar_hits", "sidecar_misses",
           "upstream_errors", "ready"]


def ms(x: float | None) -> float | None:
    return None if x is None else round(x * 1000, 3)


async def soak(args: argparse.Namespace, pid: int, port: int, api: str, out: csv.writer,
               fh, rows: list[dict]) -> Load:
    loop = asyncio.get_running_loop()
    load = Load(args.qps, args.hot_names, (args.hit_share, args.miss_share, args.nx_share))
    transport, _ = await loop.create_datagram_endpoint(lambda: load, remote_addr=(HOST, port))
    with contextlib.suppress(OSError):
        transport.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF,
                                                      4 << 20)
    t0 = time.monotonic()
    load.started = t0
    end = t0 + args.seconds
    next_sample = t0 + args.interval
    cpu_prev, t_prev = cpu_seconds(pid), t0
    try:
        while True:
            now = time.monotonic()
            if now >= end:
                break
            load.tick()
            load.expire(now)
            if now >= next_sample:
                next_sample += args.interval
                iv = load.take_interval()
                cpu = cpu_seconds(pid)
                try:
                    _status, st = await loop.run_in_executor(None, http_json, api + "/stats")
                    _rstatus, _ = await loop.run_in_executor(None, http_json, api + "/readyz")
                except (OSError, ValueError):
                    st, _rstatus = {}, 0
                ups = st.get("upstreams", [])
                row = {
                    "t_s": round(now - t0, 1), "rss_mb": round(rss_mb(pid), 2),
                    "fds": open_fds(pid),
                    "cpu_pct": round(100 * (cpu - cpu_prev) / (now - t_prev), 1),
                    "sent": iv.sent, "answered": iv.answered, "errors": iv.errors,
                    "timeouts": iv.timeouts, "servfail": iv.servfail,
                    "wrong_rcode": iv.wrong_rcode, "bad_reply": iv.bad_reply,
                    "p50_ms": ms(pct(iv.lat, 50)), "p99_ms": ms(pct(iv.lat, 99)),
                    "max_ms": ms(max(iv.lat) if iv.lat else None),
                    "hit_p99_ms": ms(pct(iv.lat_hit, 99)), "miss_p99_ms": ms(pct(iv.lat_miss, 99)),
                    "cache_entries": st.get("cache", {}).get("entries"),
                    "evictions": st.get("cache", {}).get("evictions"),
                    "sidecar_hits": st.get("cache", {}).get("hits"),
                    "sidecar_misses": st.get("cache", {}).get("misses"),
                    "upstream_errors": sum(sum(u.get("errors", {}).values()) for u in ups),
                    "ready": int(_rstatus == 200),
                }
                cpu_prev, t_prev = cpu, now
                rows.append(row)
                out.writerow([row[c] for c in COLUMNS])
                fh.flush()
                print(f"  t={row['t_s']:6.1f}s rss {row['rss_mb']:7.2f} MB fds {row['fds']:3d} "
                      f"cpu {row['cpu_pct']:5.1f}% answered {iv.answered:5d}/{iv.sent:5d} "
                      f"err {iv.errors:3d} p50 {row['p50_ms']} ms p99 {row['p99_ms']} ms "
                      f"entries {row['cache_entries']}", flush=True)
            await asyncio.sleep(0.01)  # the send clock: 100 ticks per second
        # drain: answers still on their way, at most REPLY_TIMEOUT
        drain_end = time.monotonic() + REPLY_TIMEOUT + 0.5
        while load.outstanding and time.monotonic() < drain_end:
            load.expire(time.monotonic())
            await asyncio.sleep(0.05)
        load.expire(float("inf"))
    finally:
        transport.close()
    return load


def median(values: list[float]) -> float:
    return sorted(values)[len(values) // 2]


def slope_mb_per_min(rows: list[dict], key: str = "rss_mb") -> float | None:
    pts = [(r["t_s"], r[key]) for r in rows if r.get(key) is not None]
    if len(pts) < 3:
        return None
    n = len(pts)
    mx = sum(t for t, _ in pts) / n
    my = sum(v for _, v in pts) / n
    den = sum((t - mx) ** 2 for t, _ in pts)
    return None if den == 0 else 60 * sum((t - mx) * (v - my) for t, v in pts) / den


def plot(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    t = [r["t_s"] for r in rows]
    fig, ax = plt.subplots(4, 1, figsize=(9, 10), sharex=True)
    ax[0].plot(t, [r["rss_mb"] for r in rows], color="tab:blue")
    ax[0].set_ylabel("RSS (MB)", color="tab:blue")
    ax[0].set_ylim(bottom=0)
    twin = ax[0].twinx()
    twin.plot(t, [r["cache_entries"] or 0 for r in rows], color="tab:gray", linestyle="--")
    twin.set_ylabel("cache entries", color="tab:gray")
    twin.set_ylim(bottom=0)
    ax[1].plot(t, [r["fds"] for r in rows], color="tab:green")
    ax[1].set_ylabel("open fds")
    ax[1].set_ylim(bottom=0)
    for key, style in (("p50_ms", "-"), ("p99_ms", "-"), ("hit_p99_ms", ":"),
                       ("miss_p99_ms", "--")):
        ax[2].plot(t, [r[key] if r[key] is not None else float("nan") for r in rows],
                   linestyle=style, label=key.replace("_ms", ""))
    ax[2].set_ylabel("latency (ms)")
    ax[2].set_yscale("log")
    ax[2].yaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
    ax[2].yaxis.set_minor_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
    ax[2].legend(loc="upper right", fontsize="small", ncol=4)
    ax[3].bar(t, [r["errors"] for r in rows], width=0.8 * (t[1] - t[0] if len(t) > 1 else 1),
              color="tab:red", label="errors")
    ax[3].set_ylabel("errors / interval")
    ax[3].set_ylim(0, max(1, max(r["errors"] for r in rows)) * 1.15)
    ax[3].set_xlabel("seconds")
    twin3 = ax[3].twinx()
    twin3.plot(t, [r["cpu_pct"] for r in rows], color="tab:purple", alpha=0.6)
    twin3.set_ylabel("sidecar CPU %", color="tab:purple")
    twin3.set_ylim(bottom=0)
    fig.suptitle(title, fontsize="medium")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)


def summarize(rows: list[dict], load: Load, args: argparse.Namespace) -> None:
    if not rows:
        print("no samples")
        return
    half = [r for r in rows if r["t_s"] >= rows[-1]["t_s"] / 2]
    rss = [r["rss_mb"] for r in rows]
    fds = [r["fds"] for r in rows]
    p99 = [r["p99_ms"] for r in rows if r["p99_ms"] is not None]
    tot = load.totals
    slope_all = slope_mb_per_min(rows)
    slope_half = slope_mb_per_min(half)
    full = next((r["t_s"] for r in rows if (r["cache_entries"] or 0) >= args.cache_size), None)
    after_full = [r for r in rows if full is not None and r["t_s"] > full]
    slope_full = slope_mb_per_min(after_full)
    print("summary:")
    print(f"  queries: sent {tot.sent}, answered {tot.answered}, errors {tot.errors} "
          f"(timeouts {tot.timeouts}, servfail {tot.servfail}, wrong rcode {tot.wrong_rcode}, "
          f"bad reply {tot.bad_reply}); unique names {load.n_unique}")
    print(f"  cache full ({args.cache_size} entries) at t={full} s; "
          f"evictions at the end {rows[-1]['evictions']}")
    def fmt(x: float | None) -> str:
        return "n/a" if x is None else f"{x:+.3f} MB/min"

    print(f"  RSS: first {rss[0]:.1f} MB, max {max(rss):.1f} MB, last {rss[-1]:.1f} MB; slope: "
          f"whole run {fmt(slope_all)}, second half {fmt(slope_half)}, since the cache filled "
          f"{fmt(slope_full)}"
          + (f" ({after_full[0]['rss_mb']:.2f} -> {after_full[-1]['rss_mb']:.2f} MB over "
             f"{after_full[-1]['t_s'] - after_full[0]['t_s']:.0f} s)" if len(after_full) > 1
             else ""))
    print(f"  fds: min {min(fds)}, max {max(fds)}, last {fds[-1]}")
    if p99:
        third = max(1, len(p99) // 3)
        print(f"  p99 per interval (ms): min {min(p99):.2f}, median {median(p99):.2f}, "
              f"max {max(p99):.2f}; median of the first third {median(p99[:third]):.2f}, "
              f"of the last third {median(p99[-third:]):.2f}")
    print(f"  readiness: {sum(r['ready'] for r in rows)}/{len(rows)} samples ready")


def title(args: argparse.Namespace) -> str:
    return (f"dns-sidecar soak: {args.qps:g} qps ({args.hit_share:g} hits / "
            f"{args.miss_share:g} unique misses / {args.nx_share:g} NXDOMAIN), "
            f"--cache-size {args.cache_size}, {args.seconds:g} s")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="soak", description=__doc__.split("\n")[0])
    ap.add_argument("--seconds", type=float, default=600.0)
    ap.add_argument("--qps", type=float, default=800.0, help="fixed query rate")
    ap.add_argument("--interval", type=float, default=5.0, help="seconds between samples")
    ap.add_argument("--cache-size", type=int, default=20000)
    ap.add_argument("--hot-names", type=int, default=500, help="names of the hit set")
    ap.add_argument("--hit-share", type=float, default=0.6)
    ap.add_argument("--miss-share", type=float, default=0.3)
    ap.add_argument("--nx-share", type=float, default=0.1)
    ap.add_argument("--csv", default=str(RESULTS / "soak.csv"))
    ap.add_argument("--png", default=str(REPO / "docs" / "img" / "soak.png"))
    ap.add_argument("--no-plot", action="store_true")
    ap.add_argument("--replot", action="store_true",
                    help="only redraw --png from an existing --csv (no run)")
    ap.add_argument("--sidecar-arg", action="append", default=[],
                    help="extra sidecar flag (repeatable), e.g. --sidecar-arg=--prefetch")
    args = ap.parse_args(argv)
    if abs(args.hit_share + args.miss_share + args.nx_share - 1) > 1e-6:
        ap.error("--hit-share + --miss-share + --nx-share must be 1")

    if args.replot:
        with open(args.csv, newline="") as fh:
            rows = [{k: (float(v) if v not in ("", "None") else None) for k, v in r.items()}
                    for r in csv.DictReader(fh)]
        plot(rows, Path(args.png), title(args))
        print(f"plot {args.png}")
        return 0

    procs = Procs()

    def on_signal(signum, frame):  # pragma: no cover - interactive interrupt
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_signal)
    rows: list[dict] = []
    log_path = tempfile.mkstemp(prefix="soak-sidecar-", suffix=".log")[1]
    try:
        uport = start_upstream(procs)
        sc, port, api = start_sidecar(procs, uport, args.cache_size, log_path, args.sidecar_arg)
        print(f"soak: {args.seconds:g} s at {args.qps:g} qps (hits {args.hit_share:g}, misses "
              f"{args.miss_share:g}, NXDOMAIN {args.nx_share:g}), cache {args.cache_size}; "
              f"sidecar pid {sc.pid} on {HOST}:{port}, api {api}, fake upstream on {uport}",
              flush=True)
        Path(args.csv).parent.mkdir(parents=True, exist_ok=True)
        with open(args.csv, "w", newline="") as fh:
            out = csv.writer(fh)
            out.writerow(COLUMNS)
            load = asyncio.run(soak(args, sc.pid, port, api, out, fh, rows))
        alive = sc.poll() is None
        summarize(rows, load, args)
        print(f"  sidecar alive at the end: {alive}; csv {args.csv}")
        if not args.no_plot and rows:
            plot(rows, Path(args.png), title(args))
            print(f"  plot {args.png}")
        with open(log_path, errors="replace") as f:
            tracebacks = f.read().count("Traceback")
        print(f"  sidecar log: {tracebacks} tracebacks"
              + (f" ({log_path})" if tracebacks else ""))
        if not tracebacks:
            os.unlink(log_path)
        return 0 if alive else 1
    except KeyboardInterrupt:
        print("interrupted")
        return 130
    finally:
        procs.stop_all()


if __name__ == "__main__":
    sys.exit(main())
