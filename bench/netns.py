"""The network namespace the crawler benchmarks run in, and waiting for their web servers.

A namespace has its own loopback: the upstream listens there on 127.0.0.1:53 and
/etc/netns/NAME/resolv.conf says ``nameserver 127.0.0.1``, so getaddrinfo() inside reaches
it while the machine's own resolver configuration is never read or touched.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

RESOLV_CONF = "nameserver 127.0.0.1\n"


def kill_pids(ns: str) -> None:
    """SIGKILL what still runs in namespace ``ns`` (only the benchmark's processes live
    there): a killed inner run leaves its own children, which have their own sessions."""
    r = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True, check=False)
    for pid in r.stdout.split():
        with contextlib.suppress(ProcessLookupError, ValueError):
            os.kill(int(pid), signal.SIGKILL)


@contextlib.contextmanager
def namespace(prefix: str) -> Iterator[str]:
    """A new namespace named ``prefix`` + this PID, its loopback up and its resolv.conf
    naming 127.0.0.1; on exit whatever still runs in it is killed and it is deleted."""
    ns = f"{prefix}{os.getpid()}"
    etc = Path(f"/etc/netns/{ns}")
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        etc.mkdir(parents=True, exist_ok=True)
        (etc / "resolv.conf").write_text(RESOLV_CONF)
        subprocess.run(["ip", "netns", "exec", ns, "ip", "link", "set", "lo", "up"], check=True)
        yield ns
    finally:
        kill_pids(ns)
        subprocess.run(["ip", "netns", "del", ns], check=False)
        shutil.rmtree(etc, ignore_errors=True)
        with contextlib.suppress(OSError):
            Path("/etc/netns").rmdir()  # only when empty


def missing() -> str | None:
    """Why the benchmarks in a namespace of their own (with nsd as the upstream) cannot run
    here; None when they can."""
    if os.geteuid() != 0 or shutil.which("ip") is None:
        return "needs root and iproute2 (ip netns)"
    if shutil.which("nsd") is None:
        return "nsd not installed (bench/setup.sh)"
    return None


def wait_http(http: subprocess.Popen, host: str, port: int, deadline_s: float = 20.0) -> None:
    """Return once ``host:port`` accepts a connection; raise when ``http`` exited or after
    ``deadline_s`` seconds."""
    end = time.monotonic() + deadline_s
    while True:
        try:
            socket.create_connection((host, port), timeout=0.5).close()
            return
        except OSError:
            if http.poll() is not None or time.monotonic() > end:
                raise RuntimeError(f"the web servers did not start (exit code {http.poll()})") from None
            time.sleep(0.1)


def report(res: dict) -> None:
    """Hand an inner run's result to :func:`run_inner` (one JSON object, the last line)."""
    sys.stdout.write(json.dumps(res, default=str) + "\n")


def run_inner(prefix: str, module: str, args: list[str], timeout: float,
              env: dict[str, str] | None = None) -> dict:
    """Run ``python -m module --inner ARGS`` in a new namespace and return the JSON object
    on its last line of output, with the namespace's name added (``{"missing": why}`` when
    the run failed). The inner run is SIGTERMed first when it outlives ``timeout``, so its
    own handlers stop its children and remove its files; what is left is then killed."""
    from . import common

    proc = None
    with namespace(prefix) as ns:
        try:
            argv = ["ip", "netns", "exec", ns, common.python_exe(), "-m", module, "--inner",
                    *args]
            proc = subprocess.Popen(argv, cwd=str(common.REPO_DIR), env=env,
                                    stdout=subprocess.PIPE, text=True)
            stdout, _ = proc.communicate(timeout=timeout)
            if proc.returncode != 0:
                return {"missing": f"inner run failed with exit code {proc.returncode}"}
            res: dict = json.loads(stdout.strip().splitlines()[-1])
            res["namespace"] = {"name": ns, "resolv.conf": RESOLV_CONF.strip()}
            return res
        finally:
            if proc is not None and proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(15)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(5)
