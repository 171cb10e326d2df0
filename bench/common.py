"""Shared helpers for the benchmark scripts: processes, CPU pinning, /proc readings, dnsperf.

Everything here talks to 127.0.0.0/8 only. Every process started through `spawn()` is
registered and killed at interpreter exit (atexit), on SIGTERM/SIGINT and in `finally` blocks.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import re
import shutil
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
REPO_DIR = BENCH_DIR.parent
RESULTS_DIR = BENCH_DIR / "results"

# CPU layout on a 2-core machine: the load generator (and the authoritative upstream, which is
# idle during cache-hit runs) on CPU 0, the server under test on CPU 1.
LOAD_CPU = 0
SERVER_CPU = 1

CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")

_children: list[subprocess.Popen] = []
_tmpdirs: list[str] = []


def python_exe() -> str:
    return sys.executable


#: The CPUs this benchmark may use, read once at import: a benchmark that then pins itself
#: to one CPU (os.sched_setaffinity) must still pin its children to the others.
_CPUS = len(os.sched_getaffinity(0))


def have_cpus() -> int:
    return _CPUS


def taskset_prefix(cpu: int | None) -> list[str]:
    if cpu is None or have_cpus() < 2 or shutil.which("taskset") is None:
        return []
    return ["taskset", "-c", str(cpu)]


def tmpdir(prefix: str = "dnsbench-") -> str:
    d = tempfile.mkdtemp(prefix=prefix)
    _tmpdirs.append(d)
    return d


def spawn(argv: list[str], *, cpu: int | None = None, env: dict | None = None,
          log: str | None = None, cwd: str | None = None) -> subprocess.Popen:
    """Start a process (pinned to `cpu`) in its own process group and remember it."""
    full = taskset_prefix(cpu) + argv
    out = open(log, "ab") if log else subprocess.DEVNULL  # noqa: SIM115
    p = subprocess.Popen(full, stdout=out, stderr=subprocess.STDOUT if log else subprocess.DEVNULL,
                         stdin=subprocess.DEVNULL, env=env, cwd=cwd, start_new_session=True)
    if log:
        out.close()
    _children.append(p)
    return p


def stop(p: subprocess.Popen | None, timeout: float = 5.0) -> int | None:
    """SIGTERM the process group of `p`, then SIGKILL after `timeout`."""
    if p is None:
        return None
    if p.poll() is None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(p.pid, signal.SIGTERM)
        try:
            p.wait(timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(p.pid, signal.SIGKILL)
            p.wait(5)
    # children left behind in the group (nsd forks workers)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(p.pid, signal.SIGKILL)
    if p in _children:
        _children.remove(p)
    return p.returncode


def stop_all() -> None:
    for p in list(_children):
        with contextlib.suppress(Exception):
            stop(p, timeout=3)
    for d in list(_tmpdirs):
        shutil.rmtree(d, ignore_errors=True)
        _tmpdirs.remove(d)


atexit.register(stop_all)


def _on_signal(signum, frame):  # pragma: no cover - interactive interrupt
    stop_all()
    raise SystemExit(128 + signum)


def install_signal_handlers() -> None:
    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)


# ---------------------------------------------------------------------------------------------
# /proc readings


def descendants(pid: int) -> list[int]:
    """pid and all its descendants (walks /proc/*/stat ppid links)."""
    kids: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                s = f.read()
        except OSError:
            continue
        ppid = int(s[s.rindex(")") + 2:].split()[1])
        kids.setdefault(ppid, []).append(int(d))
    out, todo = [], [pid]
    while todo:
        x = todo.pop()
        out.append(x)
        todo.extend(kids.get(x, []))
    return out


def cpu_seconds(pid: int, tree: bool = True) -> float:
    """user+sys CPU seconds of pid (all threads), plus its live descendants when tree=True."""
    total = 0
    for p in descendants(pid) if tree else [pid]:
        try:
            with open(f"/proc/{p}/stat") as f:
                s = f.read()
        except OSError:
            continue
        fields = s[s.rindex(")") + 2:].split()
        total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15)
    return total / CLK_TCK


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def udp_counters() -> dict[str, int]:
    """Udp: counters of /proc/net/snmp for the current network namespace."""
    with open("/proc/net/snmp") as f:
        lines = [ln.split() for ln in f if ln.startswith("Udp:")]
    return {k: int(v) for k, v in zip(lines[0][1:], lines[1][1:], strict=False)}


def cpu_model() -> str:
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return "unknown"


# ---------------------------------------------------------------------------------------------
# ports and DNS probes


def port_free(port: int, host: str = "127.0.0.1") -> bool:
    for kind in (socket.SOCK_DGRAM, socket.SOCK_STREAM):
        s = socket.socket(socket.AF_INET, kind)
        if kind == socket.SOCK_STREAM:  # servers set SO_REUSEADDR too; ignore TIME_WAIT leftovers
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
        finally:
            s.close()
    return True


def build_query(name: str, qtype: int = 1, qid: int = 0x1234, rd: bool = True) -> bytes:
    hdr = struct.pack("!HHHHHH", qid, 0x0100 if rd else 0, 1, 0, 0, 0)
    q = b"".join(bytes([len(p)]) + p.encode() for p in name.rstrip(".").split(".")) + b"\0"
    return hdr + q + struct.pack("!HH", qtype, 1)


def rcode_of(reply: bytes) -> int:
    return reply[3] & 0x0F


def ancount_of(reply: bytes) -> int:
    return struct.unpack("!H", reply[6:8])[0]


def dns_ask(port: int, name: str, qtype: int = 1, host: str = "127.0.0.1",
            timeout: float = 1.0) -> bytes | None:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.settimeout(timeout)
    try:
        s.sendto(build_query(name, qtype, qid=os.getpid() & 0xFFFF), (host, port))
        data, _ = s.recvfrom(65535)
        return data
    except OSError:
        return None
    finally:
        s.close()


def drained(port: int, name: str, deadline_s: float = 10.0) -> bool:
    """Wait until a server has worked off what a finished load run left in its socket buffer:
    one query, sent now, is answered only after everything queued before it (UDP queues are
    FIFO). Without this, a lead-in at full load leaves up to 8 MiB of queries whose (unseen)
    answers a slower server pays for inside the next measured run (measured: plain-asyncio
    dns-sidecar 12 -> 32-36 us of CPU per counted query)."""
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        if dns_ask(port, name, timeout=1.0) is not None:
            return True
    return False


def wait_dns(port: int, name: str, deadline_s: float = 15.0, proc: subprocess.Popen | None = None,
             host: str = "127.0.0.1") -> bool:
    """Wait until `port` answers a query for `name` with NOERROR (or any reply if name empty)."""
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        if proc is not None and proc.poll() is not None:
            return False
        r = dns_ask(port, name, host=host, timeout=0.3)
        if r is not None and rcode_of(r) == 0:
            return True
        time.sleep(0.1)
    return False


# ---------------------------------------------------------------------------------------------
# dnsperf


@dataclass
class PerfResult:
    sent: int = 0
    completed: int = 0
    lost: int = 0
    qps: float = 0.0
    avg_lat: float = 0.0
    duration: float = 0.0
    rcodes: dict = field(default_factory=dict)
    latencies: list[float] = field(default_factory=list)  # seconds, only with verbose=True
    raw: str = ""


_RE = {
    "sent": re.compile(r"Queries sent:\s+(\d+)"),
    "completed": re.compile(r"Queries completed:\s+(\d+)"),
    "lost": re.compile(r"Queries lost:\s+(\d+)"),
    "qps": re.compile(r"Queries per second:\s+([\d.]+)"),
    "avg_lat": re.compile(r"Average Latency \(s\):\s+([\d.]+)"),
    "duration": re.compile(r"Run time \(s\):\s+([\d.]+)"),
}


def run_bounded(argv: list[str], timeout_s: float, on_start=None) -> str:
    """Run a load tool to completion (killed after ``timeout_s`` seconds, and at exit if
    interrupted); its stdout and stderr together."""
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    _children.append(proc)
    if on_start:
        on_start()
    try:
        out, _ = proc.communicate(timeout=timeout_s)
    finally:
        stop(proc)
    return out


def dnsperf(port: int, datafile: str, *, seconds: float, qps: int | None = None, clients: int = 10,
            outstanding: int = 200, verbose: bool = False, maxruns: int | None = None,
            timeout_s: float = 2.0, host: str = "127.0.0.1", cpu: int | None = LOAD_CPU,
            on_start=None) -> PerfResult:
    """Run dnsperf (bounded by -l) against host:port, pinned to `cpu`; parse its summary."""
    argv = taskset_prefix(cpu) + [
        "dnsperf", "-s", host, "-p", str(port), "-d", datafile, "-l", f"{seconds:g}",
        "-c", str(clients), "-q", str(outstanding), "-t", f"{timeout_s:g}", "-b", "4096",
    ]
    if qps:
        argv += ["-Q", str(qps)]
    if maxruns:
        argv += ["-n", str(maxruns)]
    if verbose:
        argv += ["-v"]
    out = run_bounded(argv, seconds + timeout_s + 30, on_start)
    r = PerfResult(raw=out[-4000:])
    for k, rx in _RE.items():
        m = rx.search(out)
        if m:
            setattr(r, k, type(getattr(r, k))(float(m.group(1))) if k in ("qps", "avg_lat", "duration")
                    else int(m.group(1)))
    m = re.search(r"Response codes:\s+(.*)", out)
    if m:
        for part in m.group(1).split(","):
            kv = part.strip().split()
            if len(kv) >= 2:
                r.rcodes[kv[0]] = int(kv[1])
    if verbose:
        # lines like: "> NOERROR h1.bench.test A 0.000085"
        for line in out.splitlines():
            if line.startswith("> "):
                with contextlib.suppress(ValueError, IndexError):
                    r.latencies.append(float(line.rsplit(None, 1)[1]))
    return r


# ---------------------------------------------------------------------------------------------
# statistics


def pct(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    v = sorted(values)
    k = (len(v) - 1) * p / 100.0
    lo, hi = int(k), min(int(k) + 1, len(v) - 1)
    return v[lo] + (v[hi] - v[lo]) * (k - lo)


def median(values: list[float]) -> float:
    vals = [x for x in values if x == x]
    return statistics.median(vals) if vals else float("nan")


def summarize(values: list[float]) -> dict:
    vals = [x for x in values if x == x]
    if not vals:
        return {"median": None, "min": None, "max": None, "n": 0}
    return {"median": statistics.median(vals), "min": min(vals), "max": max(vals), "n": len(vals)}


#: Seconds of the same load, unmeasured, right before each measured run (see rotated()).
LEAD_IN_S = 1.0


def rotated(names: list[str], rnd: int) -> list[str]:
    """The peers' order in round ``rnd``: rotated by one each round, so no peer is always
    the first run after a pause. Measured: with a fixed order, whichever peer ran first in
    its round had a p99 up to 4x worse at 5,000 q/s (sidecar-uvloop first: 408-1,418 us;
    the same build last: 245-289 us), a position effect of this VM, not of the server."""
    k = rnd % len(names) if names else 0
    return names[k:] + names[:k]


def ratios_to(per_peer: dict, key: str, ref: str = "dnsmasq") -> dict[str, dict]:
    """Per peer, the summary of ``run[key] / ref_run[key]`` taken within each round (same
    round = same background load); empty when ``ref`` did not run."""
    if ref not in per_peer:
        return {}
    out = {}
    for n, runs in per_peer.items():
        ratios = []
        for r in runs:
            base = next((x for x in per_peer[ref] if x["round"] == r["round"]), None)
            if base and base.get(key) and r.get(key):
                ratios.append(r[key] / base[key])
        out[n] = summarize(ratios)
    return out


def save_json(name: str, data: dict) -> Path:
    """Write ``RESULTS_DIR/NAME.json`` (what the report reads: the latest run of each
    benchmark) and a dated copy under ``RESULTS_DIR/archive/``, so a later run of one
    benchmark never loses the numbers of an earlier one."""
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    text = json.dumps(data, indent=2, sort_keys=True, default=str)
    path = RESULTS_DIR / f"{name}.json"
    path.write_text(text)
    archive = RESULTS_DIR / "archive"
    archive.mkdir(exist_ok=True)
    (archive / f"{time.strftime('%Y%m%d-%H%M%S')}-{name}.json").write_text(text)
    return path


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)
