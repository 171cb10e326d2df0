"""Warm restart of the real process (``--cache-file``): the snapshot written at SIGTERM and
periodically is loaded by the next process, which answers from it without asking upstream.

The format and the store are unit tested in tests/test_snapshot.py; replacement beside a
running process (``--reuse-port``) is in tests/test_process_handover.py.
"""

from __future__ import annotations

import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import dns.message
import dns.query
import dns.rcode
import dns.rdatatype
import pytest

from sidecar.persist.snapshot import MAGIC, encode_header
from tests.helpers import free_port

#: (name, type, rcode, answered: True for data, False for a negative answer with its SOA):
#: a positive answer, a CNAME chain, NXDOMAIN, NODATA.
NAMES = (
    ("www.example.test", "A", dns.rcode.NOERROR, True),
    ("alias.example.test", "A", dns.rcode.NOERROR, True),
    ("nope.example.test", "A", dns.rcode.NXDOMAIN, False),
    ("v4only.example.test", "AAAA", dns.rcode.NOERROR, False),
)


def ask(port: int, name: str, rdtype: str = "A", tcp: bool = False) -> dns.message.Message:
    q = dns.message.make_query(name, rdtype)
    if tcp:
        return dns.query.tcp(q, "127.0.0.1", port=port, timeout=3)
    return dns.query.udp(q, "127.0.0.1", port=port, timeout=3)


def flags(port: int, up, cache_file: Path | str, *extra: str) -> list[str]:
    return ["--listen", f"127.0.0.1:{port}", "--http", "off", "--upstream", up.address,
            "--cache-file", str(cache_file), *extra]


def ttls(msg: dns.message.Message) -> list[tuple[str, int]]:
    return [(str(rrset.name) + "/" + dns.rdatatype.to_text(rrset.rdtype), rrset.ttl)
            for section in (msg.answer, msg.authority) for rrset in section]


def content(msg: dns.message.Message) -> tuple:
    """An answer without its TTLs and ID."""
    return (msg.rcode(),
            [sorted(r.to_text() for r in rrset) + [str(rrset.name)] for rrset in msg.answer],
            [sorted(r.to_text() for r in rrset) + [str(rrset.name)] for rrset in msg.authority])


def snapshot_lines(proc, upto: str = "listening on") -> list[str]:
    """The ``cache snapshot`` lines logged before ``upto``."""
    end = proc.wait_for(upto)
    return [line for line in proc.lines[:end] if "cache snapshot" in line]


def test_warm_restart_answers_from_the_snapshot(process_upstream, sidecar_process, tmp_path):
    up, port, path = process_upstream, free_port(), tmp_path / "cache.snap"
    a = sidecar_process(*flags(port, up, path, "--cache-save-interval", "0"))
    (line,) = snapshot_lines(a)
    assert "not found, starting cold" in line
    before = {}
    for name, rdtype, rcode, answered in NAMES:
        r = ask(port, name, rdtype)
        assert r.rcode() == rcode, (name, r)
        if answered:
            assert r.answer, (name, r)
        else:
            assert not r.answer and r.authority[0].rdtype == dns.rdatatype.SOA, (name, r)
        before[name, rdtype] = r
    assert a.terminate() == 0
    assert path.read_bytes().startswith(MAGIC)
    assert a.matching(f"saved {len(NAMES)} entries")

    up.reset_counts()
    b = sidecar_process(*flags(port, up, path, "--cache-save-interval", "0"))
    (line,) = snapshot_lines(b)
    assert f"{len(NAMES)} entries loaded" in line
    for name, rdtype, _rcode, _answered in NAMES:
        for tcp in (False, True):
            r = ask(port, name, rdtype, tcp=tcp)
            assert content(r) == content(before[name, rdtype]), name
            old = dict(ttls(before[name, rdtype]))
            for owner, ttl in ttls(r):
                assert ttl <= old[owner], (name, owner, ttl, old[owner])  # never grows
    assert up.queries == 0, up.log
    assert b.terminate() == 0


def test_sigterm_saves_before_the_drain(process_upstream, sidecar_process, tmp_path):
    """The first save comes at once on SIGTERM, during the lame duck (a replacement started
    now finds it), and a second one after the drain."""
    up, port, path = process_upstream, free_port(), tmp_path / "cache.snap"
    a = sidecar_process(*flags(port, up, path, "--cache-save-interval", "0",
                               "--lameduck", "3"))
    a.wait_for("listening on")
    assert ask(port, "www.example.test").answer
    a.p.send_signal(signal.SIGTERM)
    saved = a.wait_for("saved 1 entries", timeout=5)
    assert path.is_file() and a.index("draining") is None, a.lines
    assert ask(port, "mail.example.test").answer  # still answering: the lame duck
    drained = a.wait_for("draining", timeout=10)
    assert saved < drained
    assert a.wait() == 0
    assert a.index("saved 2 entries", drained) is not None, a.lines


@pytest.mark.parametrize("damage", ["foreign", "truncated", "hostile", "empty"])
def test_damaged_file_is_one_line_and_starts_cold(process_upstream, sidecar_process, tmp_path,
                                                  damage):
    up, port, path = process_upstream, free_port(), tmp_path / "cache.snap"
    header = encode_header(time.time())
    path.write_bytes({
        "foreign": b"GIF89a" + bytes(range(256)) * 4,
        "truncated": header + struct.pack(">HHHBBd", 20, 40, 1, 0, 0, time.time() + 60),
        # A record claiming a 65535-byte key: refused before anything is read past it.
        "hostile": header + struct.pack(">HHHBBd", 0xFFFF, 0xFFFF, 0xFFFF, 0, 0, 1e300)
        + b"\0" * 64,
        "empty": b"",
    }[damage])
    a = sidecar_process(*flags(port, up, path, "--cache-save-interval", "0"))
    (line,) = snapshot_lines(a)
    assert "WARNING" in line and "starting cold" in line, line
    assert ask(port, "www.example.test").answer
    assert up.count("www.example.test", "A") == 1  # cold: it asked
    assert a.terminate() == 0
    assert path.read_bytes().startswith(MAGIC)  # replaced by a whole snapshot


def test_periodic_save_survives_a_crash(process_upstream, sidecar_process, tmp_path):
    """With an interval the file is written while serving; a process killed without a
    shutdown loses only what came after the last save."""
    up, port, path = process_upstream, free_port(), tmp_path / "cache.snap"
    a = sidecar_process(*flags(port, up, path, "--cache-save-interval", "1"))
    a.wait_for("listening on")
    names = [f"crawl{i}.example.test" for i in range(20)]
    for name in names:
        assert ask(port, name).answer
    a.wait_for(f"saved {len(names)} entries", timeout=10)
    assert path.read_bytes().startswith(MAGIC)
    a.kill()  # SIGKILL: no shutdown save
    up.reset_counts()
    b = sidecar_process(*flags(port, up, path, "--cache-save-interval", "0"))
    (line,) = snapshot_lines(b)
    assert f"{len(names)} entries loaded" in line
    for name in names:
        assert ask(port, name).answer
    assert up.queries == 0, up.log
    assert b.terminate() == 0


def test_cache_file_in_a_missing_folder_is_a_clear_error_not_a_crash(
        process_upstream, sidecar_process, tmp_path):
    """Also: the flag's environment twin is honoured."""
    up, port = process_upstream, free_port()
    path = tmp_path / "no-such-folder" / "cache.snap"
    a = sidecar_process("--listen", f"127.0.0.1:{port}", "--http", "off",
                        "--upstream", up.address, env={"DNS_SIDECAR_CACHE_FILE": str(path)})
    (line,) = snapshot_lines(a)
    assert "WARNING" in line and "does not exist" in line, line
    assert ask(port, "www.example.test").answer
    assert a.terminate() == 0
    failed = a.matching("save failed")
    assert failed and "No such file or directory" in failed[0] and str(path) in failed[0]
    assert not path.parent.exists()


@pytest.mark.parametrize("args,env", [
    (["--cache-save-interval", "-1"], {}),
    (["--cache-save-interval", "soon"], {}),
    (["--cache-save-interval", "nan"], {}),
    ([], {"DNS_SIDECAR_CACHE_SAVE_INTERVAL": "-5"}),
])
def test_bad_save_interval_exits_2_naming_the_flag(args, env):
    p = subprocess.run([sys.executable, "-m", "sidecar", "--upstream", "127.0.0.1", *args],
                       env={"PATH": "/usr/bin:/bin", **env}, capture_output=True, text=True,
                       timeout=20)
    lines = p.stderr.strip().splitlines()
    assert p.returncode == 2 and len(lines) == 1 and "--cache-save-interval" in lines[0], p.stderr


def test_empty_cache_file_exits_2():
    p = subprocess.run([sys.executable, "-m", "sidecar", "--upstream", "127.0.0.1",
                        "--cache-file", ""], capture_output=True, text=True, timeout=20)
    lines = p.stderr.strip().splitlines()
    assert p.returncode == 2 and len(lines) == 1 and "--cache-file" in lines[0], p.stderr
