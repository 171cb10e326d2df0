"""Where the sidecar spends its time: py-spy on the hit path and on the miss path.

dns-sidecar (uvloop) is pinned to CPU 1 and loaded by dnsperf from CPU 0, once with cache hits
at full speed and once with cold names at a bounded rate; `py-spy record --format raw` samples
it meanwhile. The top frames by own time and by inclusive time are kept (JSON).

    python -m bench.profile [--seconds 8]
"""

from __future__ import annotations

import argparse
import collections
import shutil
import subprocess
import sys
from pathlib import Path

from . import common, peers, zone


def pyspy() -> str | None:
    return shutil.which("py-spy", path=str(Path(sys.executable).parent)) or shutil.which("py-spy")


def summarize_raw(path: str, top: int = 15) -> dict:
    own: collections.Counter[str] = collections.Counter()
    incl: collections.Counter[str] = collections.Counter()
    total = 0
    for line in Path(path).read_text().splitlines():
        if not line.strip():
            continue
        stack, n = line.rsplit(" ", 1)
        k = int(n)
        total += k
        frames = [f for f in stack.split(";") if f]
        if not frames:
            continue
        own[frames[-1]] += k
        for f in set(frames):
            incl[f] += k
    pct = lambda c: [(f, round(v / total * 100, 1)) for f, v in c.most_common(top)]  # noqa: E731
    return {"samples": total, "own": pct(own), "inclusive": pct(incl)}


def run(nsd: peers.Server, seconds: float = 8.0) -> dict:
    exe = pyspy()
    if exe is None:
        return {"missing": "py-spy not installed (pip install py-spy)"}
    d = common.tmpdir("prof-")
    out: dict = {}
    for mode in ("hit", "miss"):
        sc = peers.start_sidecar(nsd.port, uvloop=True, cache_size=200000)
        try:
            if mode == "hit":
                qfile = str(zone.write_queries(f"{d}/q.txt", zone.hit_names(1000)))
                common.dnsperf(sc.port, qfile, seconds=5, maxruns=1, qps=20000)
                kw: dict = {}
            else:
                qfile = str(zone.write_queries(f"{d}/q.txt", zone.cold_names("prof", 100000)))
                kw = {"qps": 1500, "maxruns": 1}
            raw = f"{d}/{mode}.txt"
            spy = subprocess.Popen([exe, "record", "-p", str(sc.pid), "-d", str(int(seconds)),
                                    "-r", "250", "-f", "raw", "-o", raw, "--nonblocking"],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            r = common.dnsperf(sc.port, qfile, seconds=seconds + 1, **kw)
            try:
                spy.wait(seconds + 30)
            except subprocess.TimeoutExpired:
                common.stop(spy)
            if Path(raw).exists():
                out[mode] = summarize_raw(raw) | {"qps": r.qps}
            else:
                out[mode] = {"missing": (spy.stderr.read() or b"").decode()[-300:]}
        finally:
            sc.stop()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=8.0)
    a = ap.parse_args()
    common.install_signal_handlers()
    nsd = peers.start_nsd()
    try:
        res = run(nsd, a.seconds)
    finally:
        nsd.stop()
    print(common.save_json("profile", res))


if __name__ == "__main__":
    main()
