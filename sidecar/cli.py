"""Command line: flags, their ``DNS_SIDECAR_*`` environment twins, exit codes.

Exit codes: 0 after a clean SIGTERM/SIGINT, 2 for a bad flag or value (one line naming it),
1 when the sidecar cannot start (port in use, no upstream known).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Mapping, Sequence

from sidecar.config import (
    Config,
    HostPort,
    parse_cidrs,
    parse_hostport,
    parse_upstreams,
    parse_zone,
    read_resolv_conf,
)
from sidecar.errors import ConfigError, StartupError

ENV_PREFIX = "DNS_SIDECAR_"
RESOLV_CONF = "/etc/resolv.conf"
PROG = "dns-sidecar"


class _Parser(argparse.ArgumentParser):
    """argparse, but a bad flag is reported in one line (no usage block) and exits 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message}\n")


def _typed(what: str, fn):
    """Wrap a converter so argparse reports ``what`` and the reason instead of the function name."""

    def convert(text: str):
        try:
            return fn(text)
        except (ValueError, ConfigError) as exc:
            reason = str(exc) if isinstance(exc, ConfigError) else f"expected {what}"
            raise argparse.ArgumentTypeError(f"{reason} (got {text!r})") from None

    convert.__name__ = what
    return convert


def _positive_float(text: str) -> float:
    value = float(text)
    if value < 0:
        raise ValueError(text)
    return value


def _nonneg_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise ValueError(text)
    return value


def _path(text: str) -> str:
    if not text.strip():
        raise ValueError(text)
    return text


def _listen(text: str) -> HostPort:
    return parse_hostport(text, None)


def _http(text: str) -> HostPort | None:
    if text.strip().lower() == "off":
        return None
    return parse_hostport(text, None)


def _log_level(text: str) -> str:
    level = text.lower()
    if level not in ("debug", "info", "warning", "error"):
        raise ValueError(text)
    return level


def build_parser() -> argparse.ArgumentParser:
    """The argument parser; its defaults are the documented defaults (README flag table)."""
    p = _Parser(
        prog=PROG,
        description="Caching DNS sidecar for crawlers. Every flag also reads "
        "DNS_SIDECAR_<FLAG> from the environment (the flag wins).",
    )
    add = p.add_argument
    add("--listen", metavar="HOST:PORT", action="append", type=_typed("HOST:PORT", _listen), default=None,
        help="UDP and TCP DNS listener, repeatable; [::1]:5353 for IPv6 (default 127.0.0.1:5353)")
    add("--http", metavar="HOST:PORT", type=_typed("HOST:PORT or off", _http), default="127.0.0.1:8053",
        help="health and stats API address, or 'off' (default 127.0.0.1:8053)")
    add("--upstream", metavar="ADDR[,ADDR...]", type=_typed("ADDR[,ADDR...]", parse_upstreams), default=None,
        help="default upstream pool; ADDR is IP, IP:PORT or [IPv6]:PORT "
        "(default: nameservers of /etc/resolv.conf)")
    add("--zone", metavar="SUFFIX=ADDR[,ADDR...]", action="append", type=_typed("SUFFIX=ADDR[,ADDR...]", parse_zone), default=None,
        help="a pool for names under SUFFIX, repeatable; longest suffix wins")
    add("--min-ttl", metavar="SECONDS", type=_typed("a whole number >= 0", _nonneg_int), default=Config.min_ttl,
        help="TTL floor for cached answers (default %(default)s)")
    add("--max-ttl", metavar="SECONDS", type=_typed("a whole number >= 0", _nonneg_int), default=Config.max_ttl,
        help="TTL cap for cached answers (default %(default)s)")
    add("--max-negative-ttl", metavar="SECONDS", type=_typed("a whole number >= 0", _nonneg_int), default=Config.max_negative_ttl,
        help="cap for NXDOMAIN/NODATA caching, RFC 2308 (default %(default)s)")
    add("--servfail-ttl", metavar="SECONDS", type=_typed("a whole number >= 0", _nonneg_int), default=Config.servfail_ttl,
        help="how long a failed lookup (SERVFAIL) is remembered (default %(default)s)")
    add("--cache-size", metavar="ENTRIES", type=_typed("a whole number >= 0", _nonneg_int), default=Config.cache_size,
        help="cache bound, least recently used evicted first (CLOCK approximation; default "
        "100000)")
    add("--cache-memory", metavar="MIB", type=_typed("a whole number >= 1", _nonneg_int), default=Config.cache_memory,
        help="bound on the bytes the cached answers hold, in MiB; with --cache-size, whichever "
        "is reached first evicts (default %(default)s)")
    add("--timeout", metavar="SECONDS", type=_typed("a number >= 0", _positive_float), default=Config.timeout,
        help="per upstream try (default %(default)s)")
    add("--tries", metavar="N", type=_typed("a whole number >= 0", _nonneg_int), default=Config.tries,
        help="upstream tries per miss (default %(default)s)")
    add("--max-inflight", metavar="N", type=_typed("a whole number >= 0", _nonneg_int), default=Config.max_inflight,
        help="upstream queries in flight at once; more wait their turn (default %(default)s)")
    add("--upstream-0x20", action="store_true", default=Config.upstream_0x20,
        help="randomise the letter case of upstream queries (DNS 0x20) and drop replies that do "
        "not echo it")
    add("--serve-stale", metavar="SECONDS", type=_typed("a whole number >= 0", _nonneg_int), default=Config.serve_stale,
        help="answer from entries expired less than this long ago when upstreams fail, "
        "RFC 8767 (default %(default)s, off)")
    add("--prefetch", action="store_true", default=Config.prefetch,
        help="refresh popular entries before they expire")
    add("--no-aaaa", action="store_true", default=Config.no_aaaa,
        help="answer AAAA queries with NODATA")
    add("--allow", metavar="CIDR[,CIDR...]", type=_typed("CIDR[,CIDR...]", parse_cidrs), default=None,
        help="clients that may query (default: loopback only)")
    add("--rate-limit", metavar="QPS", type=_typed("a number >= 0", _positive_float), default=Config.rate_limit,
        help="per-client query rate limit; over it queries are dropped (default %(default)s, off)")
    add("--rate-burst", metavar="N", type=_typed("a number >= 0", _positive_float), default=Config.rate_burst,
        help="queries a client may send in a burst above --rate-limit; 0 means twice the rate (default %(default)s)")
    add("--rate-limit-v6-prefix", metavar="BITS", type=_typed("a whole number 0-128", _nonneg_int), default=Config.rate_limit_v6_prefix,
        help="IPv6 clients are rate limited per prefix of this length; IPv4 per address (default %(default)s)")
    add("--max-udp-size", metavar="BYTES", type=_typed("a whole number 512-65535", _nonneg_int), default=Config.max_udp_size,
        help="largest UDP reply sent, whatever size the client advertises; larger answers go out "
        "with TC=1 (default %(default)s)")
    add("--private-address", metavar="CIDR[,CIDR...]", type=_typed("CIDR[,CIDR...]", parse_cidrs), default=None,
        help="addresses removed from answers for names outside every --zone suffix "
        "(DNS-rebinding / SSRF guard; default: none)")
    add("--tcp-max-connections", metavar="N", type=_typed("a whole number >= 0", _nonneg_int), default=Config.tcp_max_connections,
        help="open TCP connections at once (default %(default)s)")
    add("--tcp-idle-timeout", metavar="SECONDS", type=_typed("a number >= 0", _positive_float), default=Config.tcp_idle_timeout,
        help="close a TCP connection idle this long (default %(default)s)")
    add("--api-token", metavar="TOKEN", default=None,
        help="required as 'Authorization: Bearer TOKEN' on mutating API calls")
    add("--lameduck", metavar="SECONDS", type=_typed("a number >= 0", _positive_float), default=Config.lameduck,
        help="on SIGTERM report not-ready and keep answering this long before draining (default %(default)s)")
    add("--cache-file", metavar="PATH", type=_typed("a file path", _path), default=None,
        help="cache snapshot: loaded at start before ready, written on SIGTERM, after the "
        "drain and every --cache-save-interval seconds (default: none, start cold)")
    add("--cache-save-interval", metavar="SECONDS", type=_typed("a number >= 0", _positive_float),
        default=Config.cache_save_interval,
        help="seconds between snapshot saves with --cache-file; 0 saves only at shutdown "
        "(default %(default)s)")
    add("--reuse-port", action="store_true", default=Config.reuse_port,
        help="bind the DNS listeners with SO_REUSEPORT beside a running sidecar and take its "
        "new traffic over (replacement without a lost query)")
    add("--shared-cache", metavar="URL", default=None,
        help="redis://, rediss://, redis+cluster:// or rediss+cluster:// URL of a Valkey/Redis "
        "server shared by a fleet of sidecars as a second-level cache (default: none)")
    add("--shared-cache-prefix", metavar="PREFIX", default=Config.shared_cache_prefix,
        help="key prefix in the shared cache, one per fleet (default dns-sidecar:v1:)")
    add("--shared-cache-timeout", metavar="MS", type=_typed("a number > 0", _positive_float),
        default=Config.shared_cache_timeout * 1000,
        help="deadline of one shared-cache lookup in milliseconds (default %(default)g)")
    add("--log-level", metavar="LEVEL", type=_typed("debug, info, warning or error", _log_level), default=Config.log_level,
        help="debug, info, warning or error (default info)")
    add("--log-format", choices=("text", "json"), default="text",
        help="text or json (default text)")
    return p


def _env_args(parser: argparse.ArgumentParser, env: Mapping[str, str],
              argv: Sequence[str]) -> list[str]:
    """Turn DNS_SIDECAR_* variables into arguments for flags not given on the command line."""
    given = {a.split("=", 1)[0] for a in argv if a.startswith("--")}
    extra: list[str] = []
    for action in parser._actions:
        flag = next((o for o in action.option_strings if o.startswith("--")), None)
        if flag is None or flag == "--help" or flag in given:
            continue
        var = ENV_PREFIX + flag[2:].upper().replace("-", "_")
        if var not in env:
            continue
        value = env[var]
        if isinstance(action, argparse._StoreTrueAction):
            v = value.strip().lower()
            if v in ("1", "true", "yes", "on"):
                extra.append(flag)
            elif v not in ("0", "false", "no", "off", ""):
                raise ConfigError(f"{var}: expected true or false, got {value!r}")
        elif isinstance(action, argparse._AppendAction):
            # Several listeners or zones: separated by whitespace or ';'.
            for item in value.replace(";", " ").split():
                extra.extend([flag, item])
        else:
            extra.append(f"{flag}={value}")
    return extra


def parse_config(argv: Sequence[str] | None = None,
                 env: Mapping[str, str] | None = None) -> Config:
    """Build a validated :class:`Config` from arguments and environment.

    Raises ``SystemExit(2)`` (argparse) or :class:`ConfigError` for bad values.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    env = os.environ if env is None else env
    parser = build_parser()
    ns = parser.parse_args(argv + _env_args(parser, env, argv))
    upstreams = ns.upstream
    resolv_conf = None
    if upstreams is None:
        resolv_conf = RESOLV_CONF
        upstreams = read_resolv_conf(resolv_conf)
    cfg = Config(
        listen=tuple(ns.listen) if ns.listen else Config.listen,
        http=ns.http,  # argparse runs string defaults through the type, too
        upstreams=tuple(upstreams),
        resolv_conf=resolv_conf,
        zones=tuple(ns.zone or ()),
        min_ttl=ns.min_ttl,
        max_ttl=ns.max_ttl,
        max_negative_ttl=ns.max_negative_ttl,
        servfail_ttl=ns.servfail_ttl,
        cache_size=ns.cache_size,
        timeout=ns.timeout,
        tries=ns.tries,
        max_inflight=ns.max_inflight,
        serve_stale=ns.serve_stale,
        prefetch=ns.prefetch,
        no_aaaa=ns.no_aaaa,
        allow=ns.allow if ns.allow is not None else Config.allow,
        rate_limit=ns.rate_limit,
        rate_burst=ns.rate_burst,
        cache_memory=ns.cache_memory,
        max_udp_size=ns.max_udp_size,
        upstream_0x20=ns.upstream_0x20,
        rate_limit_v6_prefix=ns.rate_limit_v6_prefix,
        private_address=tuple(ns.private_address or ()),
        tcp_max_connections=ns.tcp_max_connections,
        tcp_idle_timeout=ns.tcp_idle_timeout,
        api_token=ns.api_token,
        lameduck=ns.lameduck,
        cache_file=ns.cache_file,
        cache_save_interval=ns.cache_save_interval,
        reuse_port=ns.reuse_port,
        shared_cache=ns.shared_cache,
        shared_cache_prefix=ns.shared_cache_prefix,
        shared_cache_timeout=ns.shared_cache_timeout / 1000.0,
        log_level=ns.log_level,
        log_format=ns.log_format,
    )
    cfg.validate()
    if not cfg.upstreams:
        raise StartupError("no upstream known: /etc/resolv.conf has no nameserver; use --upstream")
    return cfg


def main(argv: Sequence[str] | None = None) -> int:
    """Console entry point: parse, run until SIGTERM/SIGINT, return the exit code."""
    try:
        cfg = parse_config(argv)
    except ConfigError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    except StartupError as exc:
        print(f"{PROG}: cannot start: {exc}", file=sys.stderr)
        return 1
    from sidecar.app import run

    try:
        return run(cfg)
    except StartupError as exc:
        print(f"{PROG}: cannot start: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
