"""Start and stop every DNS server of the benchmarks, each on its own loopback port.

    upstream  nsd (authoritative for the generated zone bench.test), optionally behind
              delay_proxy.py (adds latency, counts the queries that reach the upstream)
    peers     dnsmasq, Unbound (1 thread), dns-sidecar (uvloop and plain asyncio),
              bare_responder.py (uvloop and asyncio): all plain caching forwarders in front of
              the same upstream, none of them ever pointed at the machine's own nameserver.

Every server is a child process pinned with taskset, held by PID (`Server.proc`) and killed at
exit (common.stop_all via atexit, and `Server.stop()` in finally blocks).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from . import common, zone

BASE_PORT = int(os.environ.get("BENCH_BASE_PORT", "25300"))

PORTS = {
    "nsd": BASE_PORT,
    "proxy": BASE_PORT + 1,
    "dnsmasq": BASE_PORT + 10,
    "unbound": BASE_PORT + 11,
    "sidecar-uvloop": BASE_PORT + 20,
    "sidecar-asyncio": BASE_PORT + 21,
    "bare-uvloop": BASE_PORT + 30,
    "bare-asyncio": BASE_PORT + 31,
}
HTTP_PORTS = {"sidecar-uvloop": BASE_PORT + 120, "sidecar-asyncio": BASE_PORT + 121}

# The peers of the side-by-side cache benchmarks, in the order of each round.
CACHES = ["sidecar-uvloop", "sidecar-asyncio", "dnsmasq", "unbound"]
BASELINES = ["bare-uvloop", "bare-asyncio"]
DNSMASQ_MAX_CACHE = 10000  # dnsmasq refuses --cache-size above 10000


class StartError(RuntimeError):
    pass


@dataclass
class Server:
    name: str
    port: int
    proc: subprocess.Popen | None = None
    workdir: str = ""
    http_port: int | None = None
    log: str = ""
    extra: dict = field(default_factory=dict)

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def cpu(self) -> float:
        return common.cpu_seconds(self.pid)

    def rss(self) -> int:
        # the process that holds the cache: the python child, not taskset (taskset execs)
        return common.rss_bytes(self.pid)

    def stop(self) -> int | None:
        rc = common.stop(self.proc)
        self.proc = None
        return rc

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_tail(self, n: int = 2000) -> str:
        with contextlib.suppress(OSError):
            return Path(self.log).read_text(errors="replace")[-n:]
        return ""

    # HTTP API of dns-sidecar
    def http_json(self, path: str, method: str = "GET", body: dict | None = None) -> dict:
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(f"http://127.0.0.1:{self.http_port}{path}", data=data,
                                     method=method, headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=30) as r:  # noqa: S310 - loopback only
            return json.loads(r.read() or b"{}")


def _check(name: str, port: int) -> None:
    if not common.port_free(port):
        raise StartError(f"{name}: 127.0.0.1:{port} is in use (set BENCH_BASE_PORT)")


def _wait(srv: Server, probe: str, deadline: float = 20.0) -> Server:
    if not common.wait_dns(srv.port, probe, deadline, srv.proc):
        tail = srv.log_tail()
        srv.stop()
        raise StartError(f"{srv.name} did not answer on 127.0.0.1:{srv.port}\n{tail}")
    return srv


# ---------------------------------------------------------------------------------------------
# upstream


def start_nsd(names: int = 10000, crawl: int = 5000, port: int | None = None,
              cpu: int | None = common.LOAD_CPU, host: str = "127.0.0.1") -> Server:
    """nsd, authoritative for bench.test, 1 server process, no database, foreground (-d)."""
    port = port or PORTS["nsd"]
    _check("nsd", port)
    d = common.tmpdir("nsd-")
    zone.write_zone(f"{d}/bench.test.zone", names, crawl)
    conf = f"""server:
    ip-address: {host}@{port}
    port: {port}
    server-count: 1
    do-ip6: no
    username: ""
    chroot: ""
    zonesdir: "{d}"
    database: ""
    zonelistfile: "{d}/zone.list"
    pidfile: "{d}/nsd.pid"
    xfrdfile: "{d}/xfrd.state"
    xfrdir: "{d}"
    logfile: "{d}/nsd.log"
    verbosity: 0
    reuseport: no
    tcp-count: 200
    receive-buffer-size: 8388608
    rrl-ratelimit: 0
    rrl-whitelist-ratelimit: 0
    send-buffer-size: 8388608
remote-control:
    control-enable: no
zone:
    name: "{zone.ZONE}"
    zonefile: "{d}/bench.test.zone"
"""
    Path(f"{d}/nsd.conf").write_text(conf)
    srv = Server("nsd", port, workdir=d, log=f"{d}/stdout.log")
    srv.proc = common.spawn(["nsd", "-d", "-c", f"{d}/nsd.conf"], cpu=cpu, log=srv.log)
    return _wait(srv, f"h0.{zone.ZONE}", deadline=60)


def start_proxy(upstream_port: int, delay_ms: float = 0.0, port: int | None = None,
                cpu: int | None = common.LOAD_CPU, host: str = "127.0.0.1") -> Server:
    port = port or PORTS["proxy"]
    _check("proxy", port)
    d = common.tmpdir("proxy-")
    srv = Server("proxy", port, workdir=d, log=f"{d}/stdout.log")
    srv.extra["stats"] = f"{d}/stats.json"
    srv.proc = common.spawn(
        [common.python_exe(), str(common.BENCH_DIR / "delay_proxy.py"), "--listen", f"{host}:{port}",
         "--upstream", f"127.0.0.1:{upstream_port}", "--delay-ms", str(delay_ms),
         "--stats", srv.extra["stats"]], cpu=cpu, log=srv.log)
    return _wait(srv, f"h0.{zone.ZONE}")


def proxy_counts(srv: Server) -> dict:
    """Ask the proxy for its counters (SIGUSR1 -> JSON file)."""
    path = Path(srv.extra["stats"])
    before = path.stat().st_mtime_ns if path.exists() else 0
    os.kill(srv.pid, signal.SIGUSR1)
    end = time.monotonic() + 5
    while time.monotonic() < end:
        if path.exists() and path.stat().st_mtime_ns != before:
            with contextlib.suppress(ValueError):
                return json.loads(path.read_text())
        time.sleep(0.02)
    return json.loads(path.read_text())


# ---------------------------------------------------------------------------------------------
# caches


def start_dnsmasq(upstream_port: int, port: int | None = None, cpu: int | None = common.SERVER_CPU,
                  cache_size: int = DNSMASQ_MAX_CACHE) -> Server:
    port = port or PORTS["dnsmasq"]
    _check("dnsmasq", port)
    d = common.tmpdir("dnsmasq-")
    srv = Server("dnsmasq", port, workdir=d, log=f"{d}/stdout.log")
    srv.proc = common.spawn([
        "dnsmasq", "--no-daemon", "--keep-in-foreground", "--conf-file=/dev/null", "--no-resolv",
        "--no-hosts", "--no-poll", f"--server=127.0.0.1#{upstream_port}",
        f"--cache-size={min(cache_size, DNSMASQ_MAX_CACHE)}", f"--port={port}",
        "--listen-address=127.0.0.1", "--bind-interfaces", "--pid-file=", "--user=root",
        "--dns-forward-max=1000",
    ], cpu=cpu, log=srv.log)
    return _wait(srv, f"h0.{zone.ZONE}")


def start_unbound(upstream_port: int, port: int | None = None, cpu: int | None = common.SERVER_CPU,
                  cache_mb: int = 64) -> Server:
    port = port or PORTS["unbound"]
    _check("unbound", port)
    d = common.tmpdir("unbound-")
    conf = f"""server:
    interface: 127.0.0.1
    port: {port}
    num-threads: 1
    do-daemonize: no
    chroot: ""
    username: ""
    directory: "{d}"
    pidfile: ""
    use-syslog: no
    logfile: ""
    verbosity: 0
    do-ip6: no
    access-control: 127.0.0.0/8 allow
    do-not-query-localhost: no
    module-config: "iterator"
    qname-minimisation: no
    msg-cache-size: {cache_mb}m
    rrset-cache-size: {cache_mb * 2}m
    so-reuseport: no
    so-rcvbuf: 4m
    outgoing-range: 1024
    num-queries-per-thread: 2048
    local-zone: "test." nodefault
remote-control:
    control-enable: no
forward-zone:
    name: "."
    forward-addr: 127.0.0.1@{upstream_port}
"""
    Path(f"{d}/unbound.conf").write_text(conf)
    srv = Server("unbound", port, workdir=d, log=f"{d}/stdout.log")
    srv.proc = common.spawn(["unbound", "-d", "-c", f"{d}/unbound.conf"], cpu=cpu, log=srv.log)
    return _wait(srv, f"h0.{zone.ZONE}")


def sidecar_argv() -> list[str]:
    exe = shutil.which("dns-sidecar", path=os.path.dirname(common.python_exe()))
    return [exe] if exe else [common.python_exe(), "-m", "sidecar"]


def start_sidecar(upstream_port: int, *, uvloop: bool = True, port: int | None = None,
                  http: bool = False, cpu: int | None = common.SERVER_CPU, cache_size: int = 100000,
                  extra_args: list[str] | None = None, wrap: list[str] | None = None,
                  name: str | None = None, upstream_host: str = "127.0.0.1",
                  http_port: int | None = None) -> Server:
    name = name or ("sidecar-uvloop" if uvloop else "sidecar-asyncio")
    port = port or PORTS[name]
    _check(name, port)
    hport = (http_port or HTTP_PORTS.get(name, port + 100)) if http else None
    d = common.tmpdir("sidecar-")
    env = dict(os.environ)
    env.pop("DNS_SIDECAR_NO_UVLOOP", None)
    if not uvloop:
        env["DNS_SIDECAR_NO_UVLOOP"] = "1"
    argv = (wrap or sidecar_argv()) + [
        "--listen", f"127.0.0.1:{port}", "--http", f"127.0.0.1:{hport}" if http else "off",
        "--upstream", f"{upstream_host}:{upstream_port}", "--min-ttl", "30",
        "--cache-size", str(cache_size), "--log-level", "warning",
    ] + (extra_args or [])
    srv = Server(name, port, workdir=d, http_port=hport, log=f"{d}/stdout.log")
    srv.extra["argv"] = argv
    srv.proc = common.spawn(argv, cpu=cpu, env=env, log=srv.log)
    return _wait(srv, f"h0.{zone.ZONE}")


def start_bare(*, uvloop: bool = True, port: int | None = None,
               cpu: int | None = common.SERVER_CPU) -> Server:
    name = "bare-uvloop" if uvloop else "bare-asyncio"
    port = port or PORTS[name]
    _check(name, port)
    d = common.tmpdir("bare-")
    srv = Server(name, port, workdir=d, log=f"{d}/stdout.log")
    argv = [common.python_exe(), str(common.BENCH_DIR / "bare_responder.py"), "--port", str(port)]
    if not uvloop:
        argv.append("--asyncio")
    srv.proc = common.spawn(argv, cpu=cpu, log=srv.log)
    return _wait(srv, f"h0.{zone.ZONE}")


def start_peer(name: str, upstream_port: int, **kw) -> Server:
    if name == "dnsmasq":
        return start_dnsmasq(upstream_port, cache_size=kw.get("cache_size", DNSMASQ_MAX_CACHE))
    if name == "unbound":
        return start_unbound(upstream_port)
    if name.startswith("sidecar-"):
        return start_sidecar(upstream_port, uvloop=name == "sidecar-uvloop", **kw)
    if name.startswith("bare-"):
        return start_bare(uvloop=name == "bare-uvloop")
    raise ValueError(name)


def sidecar_available() -> bool:
    try:
        r = subprocess.run(sidecar_argv() + ["--help"], capture_output=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return r.returncode == 0


def versions() -> dict[str, str]:
    def first(argv: list[str]) -> str:
        try:
            r = subprocess.run(argv, capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            return "not installed"
        out = (r.stdout + r.stderr).strip().splitlines()
        return out[0].strip() if out else "?"

    v = {
        "dnsperf": first(["dnsperf", "-h"])[:0] or _dnsperf_version(),
        "dnsmasq": first(["dnsmasq", "--version"]).split("  ")[0],
        "unbound": first(["unbound", "-V"]),
        "nsd": first(["nsd", "-v"]),
        "python": first([common.python_exe(), "-VV"]),
        "kernel": os.uname().release,
    }
    for mod in ("uvloop", "aiohttp", "aiodns", "pycares", "dnslib"):
        try:
            from importlib.metadata import version

            v[mod] = version(mod if mod != "dnslib" else "dnslib")
        except Exception:
            v[mod] = "not installed"
    try:
        from importlib.metadata import version

        v["dns-sidecar"] = version("dns-sidecar")
    except Exception:
        v["dns-sidecar"] = "not installed"
    return v


def _dnsperf_version() -> str:
    try:
        r = subprocess.run(["dnsperf", "-h"], capture_output=True, text=True, timeout=10)
    except OSError:
        return "not installed"
    for line in (r.stdout + r.stderr).splitlines():
        if line.startswith("Version"):
            return "dnsperf " + line.split()[-1]
    return "dnsperf ?"


def run_against_nsd(name: str, run, *args) -> None:
    """Command-line body shared by the single benchmarks: start nsd, ``run(nsd, *args)``,
    stop nsd even on errors, save the result as bench/results/NAME.json and print its path."""
    common.install_signal_handlers()
    nsd = start_nsd()
    try:
        res = run(nsd, *args)
    finally:
        nsd.stop()
    print(common.save_json(name, res))
