"""Real ``redis-server`` processes on loopback for tests and benchmarks: one server, or a
small Redis Cluster (``redis-cli --cluster create``), each in its own temporary directory.

    with RedisServer() as srv:            # srv.url == "redis://127.0.0.1:<port>/0"
        srv.pause(); srv.resume()         # SIGSTOP / SIGCONT: a server that hangs
        srv.stop(); srv.start()           # killed and back on the same port

    with RedisCluster(3) as cl:           # cl.url == "redis+cluster://127.0.0.1:<port>"
        ...

    with RedisServer(tls=True) as srv:    # TLS only, a self-signed certificate for 127.0.0.1:
        ...                               # srv.url == "rediss://...?ssl_ca_certs=<its cert>"

``available()`` says whether the binaries are installed (tests skip without them), and
``tls_available()`` whether ``openssl`` is, which makes the certificate. Servers bind
127.0.0.1 only, persist nothing, and are killed on exit.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import ssl
import subprocess
import tempfile
import time
from types import TracebackType

#: Longest a server takes to accept connections, or a cluster to agree on its slots.
START_TIMEOUT = 10.0


def available() -> str | None:
    """None when redis-server and redis-cli are installed, else why not (a skip reason)."""
    missing = [b for b in ("redis-server", "redis-cli") if shutil.which(b) is None]
    if missing:
        return (f"{' and '.join(missing)} not installed (Debian: apt-get install"
                " redis-server)")
    return None


def tls_available() -> str | None:
    """None when ``openssl`` can make a test certificate, else why not (a skip reason)."""
    if shutil.which("openssl") is None:
        return "openssl not installed (Debian: apt-get install openssl)"
    return None


def make_certificate(directory: str) -> tuple[str, str]:
    """A self-signed certificate for 127.0.0.1 and its key, as PEM files in ``directory``."""
    cert, key = os.path.join(directory, "cert.pem"), os.path.join(directory, "key.pem")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes",
                    "-keyout", key, "-out", cert, "-days", "1", "-subj", "/CN=127.0.0.1",
                    "-addext", "subjectAltName=IP:127.0.0.1"],
                   capture_output=True, timeout=60, check=True)
    return cert, key


def free_port() -> int:
    """A loopback TCP port free right now, whose +10000 (cluster bus) is free too."""
    for _ in range(100):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port + 10000 > 65535:
            continue
        with socket.socket() as bus:
            try:
                bus.bind(("127.0.0.1", port + 10000))
            except OSError:
                continue
        return port
    raise RuntimeError("no free port pair for redis-server")


def _ping(port: int, tls: bool = False) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as raw:
            s = raw
            if tls:  # a liveness check: the certificate is the client's to verify
                ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
                ctx.check_hostname = False
                ctx.verify_mode = ssl.CERT_NONE
                s = ctx.wrap_socket(raw)
            s.sendall(b"PING\r\n")
            return s.recv(16).startswith(b"+PONG")
    except OSError:
        return False


class RedisServer:
    """One ``redis-server`` on 127.0.0.1:``port`` (a free one by default)."""

    def __init__(self, port: int | None = None, *, cluster: bool = False,
                 directory: str | None = None, tls: bool = False) -> None:
        self.port = port or free_port()
        self.cluster = cluster
        self._own_dir = directory is None
        self.dir = directory or tempfile.mkdtemp(prefix="redis-test-")
        self.proc: subprocess.Popen[bytes] | None = None
        #: (certificate, key) files when the server speaks TLS only; made by ``start()``.
        self.tls: tuple[str, str] | None = None
        self._want_tls = tls

    @property
    def url(self) -> str:
        if self.tls is not None:
            return f"rediss://127.0.0.1:{self.port}/0?ssl_ca_certs={self.tls[0]}"
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> RedisServer:
        port = ["--port", str(self.port)]
        if self._want_tls:
            if self.tls is None:
                self.tls = make_certificate(self.dir)
            cert, key = self.tls
            port = ["--port", "0", "--tls-port", str(self.port), "--tls-cert-file", cert,
                    "--tls-key-file", key, "--tls-ca-cert-file", cert,
                    "--tls-auth-clients", "no"]
        args = ["redis-server", "--bind", "127.0.0.1", *port,
                "--dir", self.dir, "--save", "", "--appendonly", "no",
                "--protected-mode", "no", "--loglevel", "warning",
                "--logfile", os.path.join(self.dir, f"redis-{self.port}.log")]
        if self.cluster:
            args += ["--cluster-enabled", "yes",
                     "--cluster-config-file", f"nodes-{self.port}.conf",
                     "--cluster-node-timeout", "2000"]
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + START_TIMEOUT
        while not _ping(self.port, self.tls is not None):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"redis-server on port {self.port} did not start")
            time.sleep(0.02)
        return self

    def pause(self) -> None:
        """Freeze the server (SIGSTOP): connections stay open, nothing is answered."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGCONT)

    def stop(self) -> None:
        """Kill the server (SIGKILL, after SIGCONT in case it is paused)."""
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGCONT)
            proc.kill()
            proc.wait(timeout=10)

    def cli(self, *args: str) -> str:
        """``redis-cli -p port args...`` and its output (raises on failure)."""
        tls = ["--tls", "--cacert", self.tls[0]] if self.tls is not None else []
        out = subprocess.run(["redis-cli", "-h", "127.0.0.1", "-p", str(self.port), *tls, *args],
                             capture_output=True, timeout=30, check=True)
        return out.stdout.decode(errors="replace")

    def cleanup(self) -> None:
        self.stop()
        if self._own_dir:
            shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(self, t: type[BaseException] | None, e: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.cleanup()


class RedisCluster:
    """``n`` cluster-enabled servers (masters only) joined by ``redis-cli --cluster create``."""

    def __init__(self, n: int = 3) -> None:
        self.dir = tempfile.mkdtemp(prefix="redis-cluster-test-")
        self.nodes = [RedisServer(cluster=True, directory=self.dir) for _ in range(n)]

    @property
    def url(self) -> str:
        return f"redis+cluster://127.0.0.1:{self.nodes[0].port}"

    def start(self) -> RedisCluster:
        try:
            for node in self.nodes:
                node.start()
            addrs = [f"127.0.0.1:{n.port}" for n in self.nodes]
            subprocess.run(["redis-cli", "--cluster", "create", *addrs, "--cluster-yes"],
                           capture_output=True, timeout=60, check=True)
            deadline = time.monotonic() + START_TIMEOUT
            while not all("cluster_state:ok" in n.cli("cluster", "info") for n in self.nodes):
                if time.monotonic() > deadline:
                    raise RuntimeError("redis cluster did not reach cluster_state:ok")
                time.sleep(0.05)
        except BaseException:
            self.cleanup()
            raise
        return self

    def cleanup(self) -> None:
        for node in self.nodes:
            node.stop()
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> RedisCluster:
        return self.start()

    def __exit__(self, t: type[BaseException] | None, e: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.cleanup()
