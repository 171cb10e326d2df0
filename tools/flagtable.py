"""The README's flag table, generated from the CLI's own parser so that it cannot drift.

``python -m tools.flagtable README.md`` rewrites the block between :data:`README_BEGIN`
and :data:`README_END` in place; with ``--check`` it changes nothing and exits 1 when the
block is out of date (for CI), 0 when it is current.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Sequence
from pathlib import Path

README_BEGIN = "<!-- flags:begin -->"
README_END = "<!-- flags:end -->"

#: What stands in the default column when neither the parser nor the help text has one.
NO_DEFAULT = "—"

# "(default 30)", "(default: loopback only)", "(default 0, off)" at the end of a help text.
_DEFAULT_SUFFIX = re.compile(r"\s*\(default:?\s*(?P<text>[^()]*)\)\s*$")


def _env_prefix() -> str:
    from sidecar.cli import ENV_PREFIX

    return ENV_PREFIX


def _long_flag(action: argparse.Action) -> str | None:
    return next((o for o in action.option_strings if o.startswith("--")), None)


def env_name(flag: str, prefix: str | None = None) -> str:
    """The environment variable the CLI reads for ``flag`` (``--min-ttl`` -> ``DNS_SIDECAR_MIN_TTL``)."""
    return (_env_prefix() if prefix is None else prefix) + flag.lstrip("-").upper().replace("-", "_")


def documented_actions(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    """The parser's long options that the table lists: all but ``--help`` and hidden ones."""
    out = []
    for action in parser._actions:
        flag = _long_flag(action)
        if flag is None or isinstance(action, argparse._HelpAction):
            continue
        if action.help == argparse.SUPPRESS:
            continue
        out.append(action)
    return out


def _help_text(parser: argparse.ArgumentParser, action: argparse.Action) -> str:
    text = " ".join((action.help or "").split())
    if "%" in text:  # argparse-style "%(default)s" placeholders, expanded as argparse does
        params = dict(vars(action), prog=parser.prog)
        if params.get("choices") is not None:
            params["choices"] = ", ".join(map(str, params["choices"]))
        try:
            text = text % params
        except (KeyError, TypeError, ValueError):
            pass
    return text


def split_help(text: str) -> tuple[str, str | None]:
    """Split ``"meaning (default X)"`` into ``("meaning", "X")``; ``None`` without a suffix."""
    m = _DEFAULT_SUFFIX.search(text)
    if m is None:
        return text.strip(), None
    return text[: m.start()].rstrip(), m.group("text").strip()


def _flag_cell(action: argparse.Action, flag: str) -> str:
    if action.nargs == 0:  # store_true / store_false / store_const
        return flag
    if action.metavar is not None:
        metavar = action.metavar if isinstance(action.metavar, str) else " ".join(action.metavar)
    elif action.choices is not None:
        metavar = "|".join(map(str, action.choices))
    else:
        metavar = action.dest.upper()
    return f"{flag} {metavar}"


def _env_cell(action: argparse.Action, flag: str, prefix: str | None) -> str:
    name = f"`{env_name(flag, prefix)}`"
    if action.nargs == 0:
        return f"{name} (true/false)"
    if isinstance(action, argparse._AppendAction):
        return f"{name} (several: separated by spaces or `;`)"
    return name


def _format_default(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _default_cell(action: argparse.Action, help_default: str | None) -> str:
    value = action.default
    if value is None or value is argparse.SUPPRESS or isinstance(value, list | tuple | set | dict):
        return f"`{help_default}`" if _looks_literal(help_default) else (help_default or NO_DEFAULT)
    cell = f"`{_format_default(value)}`"
    # Keep a remark the help adds after the value: "(default 0, off)" -> `0` (off).
    if help_default and "," in help_default:
        claimed, remark = (part.strip() for part in help_default.split(",", 1))
        if remark and help_default_matches(value, claimed):
            cell += f" ({remark})"
    return cell


def help_default_matches(value: object, claimed: str) -> bool:
    """Whether the help text's claimed default ``claimed`` is the parser's ``value``."""
    if isinstance(value, bool):
        return claimed.lower() in (("true", "on", "yes") if value else ("false", "off", "no"))
    if isinstance(value, int | float):
        try:
            return float(claimed) == float(value)
        except ValueError:
            return False
    return claimed == str(value)


def _looks_literal(text: str | None) -> bool:
    """True for a value one would type (``127.0.0.1:5353``), not prose (``loopback only``)."""
    return bool(text) and " " not in text and any(c in text for c in "0123456789:./[=")


def _escape(cell: str) -> str:
    """Make ``cell`` safe inside a Markdown table row (pipes, line breaks)."""
    return " ".join(cell.split()).replace("|", "\\|")


def flag_rows(parser: argparse.ArgumentParser | None = None,
              prefix: str | None = None) -> list[tuple[str, str, str, str]]:
    """One ``(flag, env, default, meaning)`` tuple per documented flag, unescaped."""
    if parser is None:
        from sidecar.cli import build_parser

        parser = build_parser()
    rows = []
    for action in documented_actions(parser):
        flag = _long_flag(action)
        assert flag is not None
        meaning, help_default = split_help(_help_text(parser, action))
        rows.append((
            f"`{_flag_cell(action, flag)}`",
            _env_cell(action, flag, prefix),
            _default_cell(action, help_default),
            meaning,
        ))
    return rows


def render_flag_table(parser: argparse.ArgumentParser | None = None) -> str:
    """The Markdown table ``| flag | env | default | meaning |`` of ``parser``'s flags.

    ``parser`` defaults to :func:`sidecar.cli.build_parser`. The default column is the
    parser's own default; for flags whose parser default is ``None`` or a list (filled in
    later, e.g. from /etc/resolv.conf) it is the help text's "(default ...)" or "—". The
    meaning is the help text without that suffix. Ends with a newline.
    """
    lines = ["| flag | env | default | meaning |", "| --- | --- | --- | --- |"]
    for row in flag_rows(parser):
        lines.append("| " + " | ".join(_escape(cell) for cell in row) + " |")
    return "\n".join(lines) + "\n"


def replace_block(text: str, table: str) -> str:
    """``text`` with the part between the markers replaced by ``table``.

    Raises :class:`ValueError` when the markers are missing, repeated or out of order.
    """
    if text.count(README_BEGIN) != 1 or text.count(README_END) != 1:
        raise ValueError(f"expected one {README_BEGIN} and one {README_END} line")
    start = text.index(README_BEGIN) + len(README_BEGIN)
    end = text.index(README_END)
    if end < start:
        raise ValueError(f"{README_END} comes before {README_BEGIN}")
    return text[:start] + "\n\n" + table.rstrip("\n") + "\n\n" + text[end:]


def extract_block(text: str) -> str | None:
    """The table between the markers (stripped), or ``None`` when there are no markers."""
    if README_BEGIN not in text or README_END not in text:
        return None
    start = text.index(README_BEGIN) + len(README_BEGIN)
    return text[start : text.index(README_END)].strip("\n")


def update_readme(path: str | Path, parser: argparse.ArgumentParser | None = None,
                  *, check: bool = False) -> bool:
    """Regenerate the flag table between the markers of ``path``; True when it changed.

    With ``check=True`` nothing is written: the return value says whether it would change.
    """
    path = Path(path)
    text = path.read_text(encoding="utf-8")
    new = replace_block(text, render_flag_table(parser))
    if new == text:
        return False
    if not check:
        path.write_text(new, encoding="utf-8")
    return True


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m tools.flagtable",
        description="Regenerate the flag table of README.md from the CLI's parser.")
    ap.add_argument("readme", nargs="?", default="README.md", help="file to update (default README.md)")
    ap.add_argument("--check", action="store_true",
                    help="change nothing; exit 1 when the table is out of date")
    args = ap.parse_args(argv)
    try:
        changed = update_readme(args.readme, check=args.check)
    except (OSError, ValueError) as exc:
        print(f"{ap.prog}: {args.readme}: {exc}", file=sys.stderr)
        return 2
    if args.check:
        if changed:
            print(f"{args.readme}: the flag table is out of date; run: {ap.prog} {args.readme}",
                  file=sys.stderr)
            return 1
        return 0
    print(f"{args.readme}: {'flag table updated' if changed else 'flag table already current'}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
