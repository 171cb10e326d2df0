"""Turn bench/results/*.json into docs/benchmarks.md tables and docs/img/*.png plots.

Only the part of docs/benchmarks.md between the GENERATED markers is rewritten; text outside
them (the written reading of the results) is kept.

    python -m bench.report [--results bench/results] [--out docs]
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
from pathlib import Path

from . import common

BEGIN = "<!-- BEGIN GENERATED (python -m bench.run_all rewrites this part) -->"
END = "<!-- END GENERATED -->"

NAMES = {
    "sidecar-uvloop": "dns-sidecar (uvloop)",
    "sidecar-asyncio": "dns-sidecar (asyncio)",
    "dnsmasq": "dnsmasq",
    "unbound": "Unbound (1 thread)",
    "bare-uvloop": "bare Python responder (uvloop)",
    "bare-asyncio": "bare Python responder (asyncio)",
    "direct": "nsd directly (no cache)",
}
SHORT = {
    "sidecar-uvloop": "sidecar\nuvloop", "sidecar-asyncio": "sidecar\nasyncio",
    "dnsmasq": "dnsmasq", "unbound": "Unbound\n1 thread", "bare-uvloop": "bare Python\nuvloop",
    "bare-asyncio": "bare Python\nasyncio",
}
COLORS = {
    "sidecar-uvloop": "#1f77b4", "sidecar-asyncio": "#8fbbd9", "dnsmasq": "#2ca02c",
    "unbound": "#d62728", "bare-uvloop": "#7f7f7f", "bare-asyncio": "#c7c7c7",
    "A-threaded": "#d62728", "B-cold": "#1f77b4", "B-warm": "#17becf", "B-prewarm": "#9467bd",
    "C-floor": "#2ca02c",
}


ORDER = ["sidecar-uvloop", "sidecar-asyncio", "dnsmasq", "unbound", "bare-uvloop", "bare-asyncio",
         "direct", "A-threaded", "B-cold", "B-warm", "B-prewarm", "C-floor"]


def ordered(d: dict) -> list:
    return sorted(d.items(), key=lambda kv: ORDER.index(kv[0]) if kv[0] in ORDER else 99)


def load(results: Path) -> dict:
    out = {}
    for p in sorted(results.glob("*.json")):
        try:
            out[p.stem] = json.loads(p.read_text())
        except ValueError:
            pass
    return out


def f(x, digits: int = 0, unit: str = "") -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "n/a"
    if isinstance(x, float | int) and digits == 0:
        return f"{x:,.0f}{unit}"
    return f"{x:,.{digits}f}{unit}"


def rng(s: dict | None, digits: int = 0, unit: str = "") -> str:
    """'median (min-max)' of a summarize() dict."""
    if not s or s.get("median") is None:
        return "n/a"
    if s["n"] == 1:
        return f(s["median"], digits, unit)
    return f"{f(s['median'], digits, unit)} ({f(s['min'], digits)}–{f(s['max'], digits)})"


def table(head: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# plots


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_throughput(res: dict, path: Path) -> None:
    plt = _plt()
    s = res["summary"]
    names = [n for n, _ in ordered(s)]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4))
    for ax, key, title in ((a1, "qps", "answered queries/s (higher is better)"),
                           (a2, "cpu_us", "server CPU µs per query (lower is better)")):
        med = [s[n][key]["median"] or 0 for n in names]
        lo = [m - (s[n][key]["min"] or m) for n, m in zip(names, med, strict=True)]
        hi = [(s[n][key]["max"] or m) - m for n, m in zip(names, med, strict=True)]
        ax.bar(range(len(names)), med, yerr=[lo, hi], capsize=4,
               color=[COLORS.get(n, "#999") for n in names])
        ax.set_xticks(range(len(names)), [SHORT.get(n, n) for n in names], fontsize=8)
        ax.set_title(title, fontsize=10)
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle("UDP cache hits, dnsperf on CPU 0, server on CPU 1 (median, bars = min–max of rounds)",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_cdf(samples: dict, path: Path, title: str, xlabel: str, logx: bool = True) -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for n, vals in samples.items():
        if not vals:
            continue
        v = sorted(vals)
        y = [(i + 1) / len(v) for i in range(len(v))]
        ax.plot(v, y, label=NAMES.get(n, n), color=COLORS.get(n))
    if logx:
        ax.set_xscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("fraction of requests")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_scale(res: dict, path: Path) -> None:
    plt = _plt()
    lv = [x for x in res["levels"] if x.get("entries")]
    if not lv:
        return
    x = [m["entries"] for m in lv]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4))
    a1.plot(x, [m["bytes_per_entry"] for m in lv], "o-", color=COLORS["sidecar-uvloop"])
    a1.axhline(400, color="red", ls="--", lw=1, label="goal: 400 B/entry")
    a1.set_xscale("log")
    a1.set_xlabel("cached entries")
    a1.set_ylabel("RSS growth per entry (bytes)")
    a1.legend(fontsize=8)
    a1.grid(alpha=0.3, which="both")
    a2.plot(x, [m["hit_p50_us"] for m in lv], "o-", label="p50")
    a2.plot(x, [m["hit_p99_us"] for m in lv], "s-", label="p99")
    a2.set_xscale("log")
    a2.set_yscale("log")
    a2.set_xlabel("cached entries")
    a2.set_ylabel("hit latency at fixed rate (µs)")
    a2.legend(fontsize=8)
    a2.grid(alpha=0.3, which="both")
    fig.suptitle("dns-sidecar (uvloop): memory and hit latency vs cache size", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------
# markdown


#: A bare Python responder answers in 80-100 us at 5,000 q/s on this machine when its host is
#: quiet; above this its VM is sharing the physical cores and latencies say little.
QUIET_BARE_P50_US = 150.0


def host_busy(latency_summary: dict) -> str:
    """'' when the hit-latency run looks undisturbed, else why its verdicts are not judged:
    the bare responder's median p50 above QUIET_BARE_P50_US, or dnsmasq's p50 moving by more
    than 2x between rounds."""
    bare = latency_summary.get("bare-uvloop", {}).get("p50_us", {})
    ref = latency_summary.get("dnsmasq", {}).get("p50_us", {})
    if (bare.get("median") or 0) > QUIET_BARE_P50_US:
        return f"not judged: host busy (bare responder p50 {f(bare['median'])} µs)"
    if ref.get("min") and (ref.get("max") or 0) > 2 * ref["min"]:
        return (f"not judged: host busy (dnsmasq p50 {f(ref['min'])}–{f(ref['max'])} µs "
                "across rounds)")
    return ""


def goals(r: dict) -> list[list[str]]:
    rows = []

    def verdict(ok: bool | None) -> str:
        return "n/a" if ok is None else ("met" if ok else "**not met**")

    ht = r.get("hit_throughput", {}).get("summary", {}).get("sidecar-uvloop")
    if ht and ht.get("qps_vs_dnsmasq", {}).get("median") is not None:
        q, c = ht["qps_vs_dnsmasq"]["median"], ht["cpu_vs_dnsmasq"]["median"]
        rows.append(["1 hit throughput ≥ 0.9× dnsmasq", f"{q:.2f}×", verdict(q >= 0.9)])
        rows.append(["1 CPU per hit ≤ 1.5× dnsmasq", f"{c:.2f}×", verdict(c <= 1.5)])
    hl = r.get("hit_latency", {})
    s = hl.get("summary", {}).get("sidecar-uvloop")
    if s:
        ratio = s.get("p50_vs_dnsmasq", {}).get("median")
        rate = hl.get("config", {}).get("rate")
        busy = host_busy(hl.get("summary", {}))
        if ratio is not None:
            rows.append(["2 hit p50 within 10% of dnsmasq", f"{ratio:.2f}× "
                         f"({f(s['p50_us']['median'])} µs)",
                         busy or verdict(ratio <= 1.1)])
        p99 = s["p99_us"]["median"]
        rows.append([f"2 hit p99 < 0.5 ms at {rate} q/s", f"{f(p99)} µs",
                     busy or verdict(p99 is not None and p99 < 500)])
    co = r.get("coalescing", {}).get("summary", {}).get("sidecar-uvloop")
    if co:
        u = co["upstream_queries"]
        rows.append(["4 one upstream query for 1,000 identical cold queries",
                     f"{f(u['min'])}–{f(u['max'])}", verdict(u["max"] == 1 and u["min"] == 1)])
    cb = r.get("crawler_burst", {}).get("summary", {})
    if "B-cold" in cb:
        v = cb["B-cold"].get("p99_vs_A", {}).get("median")
        if v:
            rows.append(["5 cold burst p99 ≥ 10× better than getaddrinfo", f"{1 / v:.1f}× better",
                         verdict(v <= 0.1)])
        e = cb["B-cold"]["errors"]["max"]
        rows.append(["5 cold burst with zero errors", f"{f(e)} errors (worst round)",
                     verdict(e == 0)])
    alt = r.get("crawler_burst_aiohttp", {}).get("summary", {})
    if "B-cold" in alt and r.get("crawler_burst", {}).get("config", {}).get("http_server") == "nginx":
        v = alt["B-cold"].get("p99_vs_A", {}).get("median")
        if v:
            rows.append(["5 (the same, web servers in Python on the sidecar's core)",
                         f"{1 / v:.1f}× better", verdict(v <= 0.1)])
    if "B-prewarm" in cb:
        v = cb["B-prewarm"].get("p99_vs_floor", {}).get("median")
        if v:
            rows.append(["5 after pre-warm p99 ≤ 1.1× the literal-IP floor", f"{v:.2f}×",
                         verdict(v <= 1.1)])
    sc = r.get("scale", {}).get("levels", [])
    if sc:
        big = max(sc, key=lambda m: m["entries"] or 0)
        b = big.get("bytes_per_entry")
        rows.append([f"6 < 400 bytes per entry (at {f(big['entries'])} entries)", f"{f(b)} B",
                     verdict(b is not None and b < 400)])
    return rows


HTTP_SERVERS = {"nginx": "nginx, one worker", "aiohttp": "aiohttp.web on uvloop, one process"}


def burst_table(cb: dict) -> str:
    """The crawler burst's summary table: TTFB, wall time, errors, drops, ratios per scenario."""
    rows = []
    for n, s in ordered(cb["summary"]):
        rows.append([n, rng(s["ttfb_p50_ms"], 1), rng(s["ttfb_p99_ms"], 1),
                     rng(s["ttfb_max_ms"], 1), rng(s["wall_s"], 2), rng(s["errors"]),
                     rng(s["udp_rcvbuf_errors"]), rng(s.get("p99_vs_A"), 3),
                     rng(s.get("p99_vs_floor"), 2)])
    return table(["scenario", "TTFB p50 ms", "TTFB p99 ms", "TTFB max ms", "wall s",
                  "errors", "UDP drops", "p99 vs A", "p99 vs floor"], rows)


def render(r: dict, img: Path, img_rel: str) -> str:
    meta = r.get("meta", {})
    parts = []
    smoke = meta.get("smoke")
    parts.append(f"Run: {meta.get('date', '?')}, command `{meta.get('command', '?')}`"
                 + (" — **SMOKE RUN: seconds-long, numbers are not meaningful**" if smoke else ""))
    parts.append("")
    parts.append("### Machine and versions\n")
    rows = [["CPU", f"{meta.get('cpu', '?')}, {meta.get('cpus', '?')} cores"],
            ["memory", meta.get("memory", "?")], ["OS", meta.get("os", "?")],
            ["pinning", "load generator (dnsperf / Python client) and nsd on CPU 0, server under "
                        "test on CPU 1 (taskset)"],
            ["load average at start", meta.get("loadavg", "?")]]
    rows += [[k, v] for k, v in sorted(meta.get("versions", {}).items())]
    parts.append(table(["", ""], rows))
    parts.append("")
    g = goals(r)
    if g:
        parts.append("### Goals of issue 6 (medians of the rounds)\n")
        parts.append(table(["goal", "measured", "verdict"], g))
        parts.append("")

    ht = r.get("hit_throughput")
    if ht:
        c = ht["config"]
        parts.append("### 1. Cache-hit throughput\n")
        parts.append(f"dnsperf `-c 10 -q 200`, {c['seconds']:g} s per run, {c['rounds']} rounds "
                     f"alternating between the peers, {c['warm_names']} warm names (A). Median "
                     "(min–max) over the rounds; ratios are taken within each round, then the median.\n")
        rows = []
        for n, s in ordered(ht["summary"]):
            cap = s["cpu_us"]["median"]
            fc = [m["foreign_cpu_s"] / m["wall_s"] for m in ht["peers"][n]]
            rows.append([NAMES.get(n, n), rng(s["qps"]), rng(s["cpu_us"], 1),
                         f(1e6 / cap) if cap else "n/a",
                         rng(s.get("qps_vs_dnsmasq"), 2), rng(s.get("cpu_vs_dnsmasq"), 2),
                         f(s["lost"]), f(common.median(fc), 2)])
        parts.append(table(["server", "answered q/s", "server CPU µs/query",
                            "one-core capacity 1e6/CPU µs", "q/s vs dnsmasq", "CPU vs dnsmasq",
                            "lost (all rounds)", "other load (cores)"], rows))
        parts.append("\n*other load*: CPU used by processes outside the benchmark (other jobs on "
                     "the machine) during that peer's runs, median; throughput is only comparable "
                     "between runs with similar other load, CPU per query much less affected.")
        plot_throughput(ht, img / "hit_throughput.png")
        parts.append(f"\n![hit throughput]({img_rel}/hit_throughput.png)\n")

    hl = r.get("hit_latency")
    if hl:
        c = hl["config"]
        parts.append("### 2. Cache-hit latency at a fixed rate\n")
        parts.append(f"dnsperf `-Q {c['rate']} -c 1 -v`, {c['seconds']:g} s per run, {c['rounds']} "
                     "rounds; per-answer latency from dnsperf's verbose output (includes dnsperf's "
                     "own send/receive path).\n")
        rows = []
        for n, s in ordered(hl["summary"]):
            rows.append([NAMES.get(n, n), rng(s["p50_us"]), rng(s["p90_us"]), rng(s["p99_us"]),
                         rng(s["p99.9_us"]), rng(s.get("p50_vs_dnsmasq"), 2), f(s["lost"])])
        parts.append(table(["server", "p50 µs", "p90 µs", "p99 µs", "p99.9 µs", "p50 vs dnsmasq",
                            "lost"], rows))
        if hl.get("samples"):
            plot_cdf(hl["samples"], img / "hit_latency.png",
                     f"cache-hit latency at {c['rate']} q/s (round 1)", "latency (µs)")
            parts.append(f"\n![hit latency]({img_rel}/hit_latency.png)\n")

    mo = r.get("miss_overhead")
    if mo:
        c = mo["config"]
        parts.append("### 3. Miss overhead\n")
        parts.append(f"One query at a time from a blocking Python client, {c['queries']} fresh "
                     f"names per target and round, {c['rounds']} rounds, targets interleaved "
                     "query by query. Overhead = cache's median minus nsd's median in the same round.\n")
        rows = []
        for n, s in ordered(mo["summary"]):
            rows.append([NAMES.get(n, n), rng(s["p50_us"]), rng(s["p99_us"]),
                         "—" if n == "direct" else rng(s["overhead_p50_us"]), f(s["failed"])])
        parts.append(table(["target", "p50 µs", "p99 µs", "overhead p50 µs", "failed"], rows))
        parts.append("")

    mt = r.get("miss_throughput")
    if mt and mt.get("summary"):
        c = mt["config"]
        parts.append("### 3b. Miss throughput\n")
        parts.append(f"resperf ramps never-seen names (every query a miss forwarded to nsd) from "
                     f"0 to {f(c['max_qps'])} q/s over {c['ramp_s']:g} s; maximum rate of "
                     f"answers it saw, {c['rounds']} rounds alternating between the caches. CPU "
                     f"per miss: other never-seen names at a steady {f(c['steady_qps'])} q/s for "
                     f"{c['steady_s']:g} s in the same round, the cache's CPU / answered queries.\n")
        rows = []
        for n, s in ordered(mt["summary"]):
            rows.append([NAMES.get(n, n), rng(s["max_qps"]), rng(s.get("qps_vs_dnsmasq"), 2),
                         rng(s["cpu_us"], 1), rng(s.get("cpu_vs_dnsmasq"), 2),
                         f(s.get("steady_lost"))])
        parts.append(table(["cache", "max answered misses/s", "misses/s vs dnsmasq",
                            "CPU µs per miss", "CPU vs dnsmasq", "lost at the steady rate"],
                           rows))
        parts.append("")

    co = r.get("coalescing")
    if co:
        c = co["config"]
        parts.append("### 4. Coalescing\n")
        parts.append(f"{c['concurrency']} identical queries for a never-seen name sent at once "
                     f"(100 sockets × 10), upstream delayed {c['delay_ms']:g} ms by the counting "
                     f"proxy, {c['rounds']} rounds.\n")
        rows = []
        for n, s in ordered(co["summary"]):
            rows.append([NAMES.get(n, n), rng(s["upstream_queries"]), rng(s["answered"]),
                         rng(s["error_replies"])])
        parts.append(table(["cache", "queries reaching the upstream", "clients answered",
                            "error replies"], rows))
        parts.append("")

    cb = r.get("crawler_burst")
    if cb and cb.get("summary"):
        c = cb["config"]
        parts.append("### 5. The crawler burst\n")
        parts.append(f"{c['hosts']} distinct cold hostnames fetched at once with aiohttp "
                     f"(TCPConnector limit {c['limit']} in every scenario) from local web servers "
                     f"({HTTP_SERVERS[c.get('http_server', 'aiohttp')]}), upstream delayed "
                     f"{c['delay_ms']:g} ms per query, {c['rounds']} "
                     "rounds, inside a network namespace made by the suite. TTFB = request start "
                     "to response headers.\n")
        parts.append(burst_table(cb))
        roles = ("crawler", "sidecar", "delay_proxy", "http_servers", "nsd")
        cpu_rows = []
        for n, runs in ordered(cb.get("scenarios", {})):
            per = [r["cpu_s"] for r in runs if r.get("cpu_s")]
            if per:
                cpu_rows.append([n] + [f(statistics.median(p[k] for p in per), 2)
                                       for k in roles])
        if cpu_rows:
            parts.append("\nCPU seconds per process during each scenario (median of the rounds; "
                         "the crawler runs on CPU 0, everything else shares CPU 1; B-prewarm's "
                         "sidecar CPU is the /prewarm call):\n")
            parts.append(table(["scenario", "crawler", "dns-sidecar", "delay proxy",
                                "HTTP servers", "nsd"], cpu_rows))
        pw = cb["summary"].get("B-prewarm", {}).get("prewarm_s")
        if pw and pw.get("median") is not None:
            parts.append(f"\nThe pre-warm call itself (one POST /prewarm for the {c['hosts']} "
                         f"names, before the crawl, not in the TTFB): {rng(pw, 2, ' s')}.")
        alt = r.get("crawler_burst_aiohttp")
        if alt and alt.get("summary") and c.get("http_server") == "nginx":
            ac = alt["config"]
            parts.append(f"\nThe same burst in the same run with the web servers in Python "
                         f"({HTTP_SERVERS['aiohttp']}; {ac['rounds']} rounds), the layout of "
                         "the runs before 2026-12-01 (they share CPU 1 with the sidecar):\n")
            parts.append(burst_table(alt))
            def http_cpu(res: dict) -> float | None:
                runs = [x for x in res.get("scenarios", {}).get("B-cold", []) if x.get("cpu_s")]
                return (statistics.median(x["cpu_s"]["http_servers"] for x in runs)
                        if runs else None)

            py, ng = http_cpu(alt), http_cpu(cb)
            if py is not None and ng is not None:
                parts.append(f"\nWeb servers' CPU during B-cold (median): {f(py, 2)} s in "
                             f"Python, {f(ng, 2)} s for nginx.")
        if cb.get("samples"):
            plot_cdf(cb["samples"], img / "crawler_burst.png",
                     f"crawler burst: TTFB of {c['hosts']} concurrent fetches (round 1)",
                     "time to first byte (ms)")
            parts.append(f"\n![crawler burst]({img_rel}/crawler_burst.png)\n")
    elif cb:
        parts.append(f"### 5. The crawler burst\n\nnot run: {cb.get('missing')}\n")

    sc = r.get("scale")
    if sc and sc.get("levels"):
        parts.append("### 6. Scale\n")
        parts.append(f"dns-sidecar (uvloop) filled through DNS at {sc['config']['fill_rate']} q/s; "
                     f"RSS at start {f(sc['rss_start_bytes'] / 2**20, 1)} MiB. Hit latency: "
                     f"dnsperf -Q {sc['config']['rate']} over 1,000 random cached names.\n")
        rows = []
        for m in sc["levels"]:
            rows.append([f(m["level"]), f(m["entries"]), f(m["rss_bytes"] / 2**20, 1),
                         f(m["bytes_per_entry"]), f(m["hit_p50_us"]), f(m["hit_p99_us"]),
                         f"{f(m['fill_seconds'], 1)} s ({f(m['fill_qps'])}/s, lost {m['fill_lost']})"])
        parts.append(table(["level", "entries", "RSS MiB", "bytes/entry", "hit p50 µs",
                            "hit p99 µs", "fill"], rows))
        plot_scale(sc, img / "scale.png")
        parts.append(f"\n![scale]({img_rel}/scale.png)\n")

    pr = r.get("profile")
    if pr:
        parts.append("### Profile (py-spy, dns-sidecar uvloop)\n")
        for mode in ("hit", "miss"):
            p = pr.get(mode)
            if not p or "own" not in p:
                continue
            parts.append(f"{mode} path ({f(p.get('qps'))} q/s while sampled, {p['samples']} "
                         "samples), top frames by own time:\n")
            parts.append(table(["own %", "frame"], [[f"{v:.1f}", f"`{k}`"] for k, v in p["own"][:8]]))
            parts.append("")
    return "\n".join(parts) + "\n"


DEFAULT_HEAD = """# Benchmarks

How dns-sidecar compares with dnsmasq and Unbound on one machine, measured by the suite in
`bench/` (see "Reproduce" below). Everything runs on loopback or inside a network namespace the
suite creates; no query leaves the machine.

"""


def write(results: Path, out: Path) -> Path:
    r = load(results)
    img = out / "img"
    img.mkdir(parents=True, exist_ok=True)
    body = render(r, img, "img")
    md = out / "benchmarks.md"
    old = md.read_text() if md.exists() else DEFAULT_HEAD + BEGIN + "\n" + END + "\n"
    if BEGIN in old and END in old:
        head, rest = old.split(BEGIN, 1)
        tail = rest.split(END, 1)[1]
    else:
        head, tail = old + "\n", "\n"
    md.write_text(head + BEGIN + "\n\n" + body + "\n" + END + tail)
    return md


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--results", default=str(common.RESULTS_DIR))
    ap.add_argument("--out", default=str(common.REPO_DIR / "docs"))
    a = ap.parse_args()
    print(write(Path(a.results), Path(a.out)))


if __name__ == "__main__":
    main()
