"""The README's flag table is generated from the CLI's parser and kept current."""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
from pathlib import Path

import pytest

from sidecar import cli
from tools.flagtable import (
    NO_DEFAULT,
    README_BEGIN,
    README_END,
    documented_actions,
    env_name,
    extract_block,
    flag_rows,
    help_default_matches,
    render_flag_table,
    replace_block,
    split_help,
    update_readme,
)

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"


def long_flags(parser: argparse.ArgumentParser) -> list[str]:
    return [o for a in parser._actions for o in a.option_strings
            if o.startswith("--") and o != "--help"]


def table_rows(table: str) -> list[list[str]]:
    lines = table.strip("\n").splitlines()
    assert lines[0] == "| flag | env | default | meaning |"
    assert lines[1] == "| --- | --- | --- | --- |"
    rows = []
    for line in lines[2:]:
        assert line.startswith("| ") and line.endswith(" |"), line
        # split on unescaped pipes only
        cells = [c.strip().replace("\\|", "|") for c in re.split(r"(?<!\\)\|", line[1:-1])]
        assert len(cells) == 4, line
        rows.append(cells)
    return rows


def test_readme_flag_block_is_current() -> None:
    if not README.exists():
        pytest.skip("README.md does not exist yet (the README owner writes it)")
    text = README.read_text(encoding="utf-8")
    if README_BEGIN not in text or README_END not in text:
        pytest.skip(f"README.md has no {README_BEGIN} / {README_END} markers yet "
                    "(the README owner adds them); the table is checked once they are there")
    assert extract_block(text) == render_flag_table().strip("\n"), (
        "README.md's flag table is out of date: run `python -m tools.flagtable README.md`")


def test_table_lists_every_flag_of_the_parser() -> None:
    parser = cli.build_parser()
    rows = table_rows(render_flag_table(parser))
    listed = [row[0].strip("`").split()[0] for row in rows]
    assert listed == long_flags(parser)


def test_default_parser_is_the_cli_parser() -> None:
    assert render_flag_table() == render_flag_table(cli.build_parser())


def test_env_column_names_what_the_cli_reads() -> None:
    parser = cli.build_parser()
    for action, row in zip(documented_actions(parser), flag_rows(parser), strict=True):
        flag = next(o for o in action.option_strings if o.startswith("--"))
        name = env_name(flag)
        assert row[1].startswith(f"`{name}`")
        sample = "true" if action.nargs == 0 else "x"
        # The CLI's own env reader turns exactly this variable into this flag.
        args = cli._env_args(parser, {name: sample}, [])
        assert args and args[0].split("=", 1)[0] == flag, (name, args)


def test_default_column_is_the_parsers_default() -> None:
    parser = cli.build_parser()
    rows = {row[0].strip("`").split()[0]: row for row in table_rows(render_flag_table(parser))}
    for action in documented_actions(parser):
        flag = next(o for o in action.option_strings if o.startswith("--"))
        cell = rows[flag][2]
        if action.default is None:
            _, claimed = split_help(action.help or "")
            assert cell.strip("`") == (claimed or NO_DEFAULT), flag
        elif isinstance(action.default, bool):
            assert cell == f"`{str(action.default).lower()}`", flag
        else:
            assert cell.split()[0] == f"`{action.default}`", flag
    assert rows["--listen"][2] == "`127.0.0.1:5353`"
    assert rows["--http"][2] == "`127.0.0.1:8053`"
    assert rows["--zone"][2] == NO_DEFAULT
    assert rows["--allow"][2] == "loopback only"


def test_help_texts_do_not_claim_another_default() -> None:
    # The meaning column drops "(default X)": make sure X was not lying about the parser.
    parser = cli.build_parser()
    for action in documented_actions(parser):
        _, claimed = split_help(action.help or "")
        if claimed is None or action.default is None:
            continue
        value = claimed.split(",")[0].strip()
        assert help_default_matches(action.default, value), (
            f"{action.option_strings[0]}: help says default {claimed!r}, "
            f"the parser has {action.default!r}")


def test_meaning_column_has_no_default_suffix() -> None:
    for row in table_rows(render_flag_table()):
        assert "(default" not in row[3], row
        assert row[3], row


def test_render_handles_other_argument_kinds() -> None:
    p = argparse.ArgumentParser(prog="x")
    p.add_argument("--fast", action="store_true", help="go fast")
    p.add_argument("--mode", choices=("a", "b"), default="a", help="mode | kind (default a)")
    p.add_argument("--peer", action="append", metavar="HOST", help="repeatable (default: none)")
    p.add_argument("--size", type=int, default=7, help="size is %(default)s units")
    p.add_argument("--secret", help=argparse.SUPPRESS)
    table = render_flag_table(p)
    rows = {row[0].strip("`").split()[0]: row for row in table_rows(table)}
    assert set(rows) == {"--fast", "--mode", "--peer", "--size"}
    assert rows["--fast"] == ["`--fast`", "`DNS_SIDECAR_FAST` (true/false)", "`false`", "go fast"]
    assert rows["--mode"][0] == "`--mode a|b`" and "\\|" in table
    assert rows["--mode"][3] == "mode | kind"
    assert rows["--peer"][1].startswith("`DNS_SIDECAR_PEER` (several")
    assert rows["--peer"][2] == "none"
    assert rows["--size"][2:] == ["`7`", "size is 7 units"]


def test_split_help() -> None:
    assert split_help("TTL floor (default 30)") == ("TTL floor", "30")
    assert split_help("who (default: loopback only)") == ("who", "loopback only")
    assert split_help("no suffix") == ("no suffix", None)


README_SAMPLE = f"""# Title

Intro.

{README_BEGIN}
old table
{README_END}

After.
"""


def test_update_readme_rewrites_only_the_block(tmp_path: Path) -> None:
    path = tmp_path / "README.md"
    path.write_text(README_SAMPLE, encoding="utf-8")
    assert update_readme(path, check=True) is True
    assert path.read_text(encoding="utf-8") == README_SAMPLE, "check mode wrote the file"
    assert update_readme(path) is True
    text = path.read_text(encoding="utf-8")
    assert text.startswith("# Title\n\nIntro.\n\n" + README_BEGIN + "\n\n| flag |")
    assert text.endswith("|\n\n" + README_END + "\n\nAfter.\n")
    assert extract_block(text) == render_flag_table().strip("\n")
    assert update_readme(path) is False
    assert update_readme(path, check=True) is False


def test_replace_block_needs_exactly_one_pair_of_markers() -> None:
    for bad in ("no markers", f"{README_BEGIN}\n", f"{README_END}\n{README_BEGIN}\n",
                f"{README_BEGIN}\n{README_END}\n{README_BEGIN}\n{README_END}\n"):
        with pytest.raises(ValueError):
            replace_block(bad, "| t |\n")
    assert extract_block("no markers") is None


def run_module(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "tools.flagtable", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)


def test_command_line_updates_and_checks(tmp_path: Path) -> None:
    path = tmp_path / "README.md"
    path.write_text(README_SAMPLE, encoding="utf-8")
    stale = run_module("--check", str(path))
    assert stale.returncode == 1 and "out of date" in stale.stderr
    assert path.read_text(encoding="utf-8") == README_SAMPLE
    assert run_module(str(path)).returncode == 0
    assert run_module("--check", str(path)).returncode == 0
    (tmp_path / "plain.md").write_text("no markers\n", encoding="utf-8")
    missing = run_module("--check", str(tmp_path / "plain.md"))
    assert missing.returncode == 2 and "flags:begin" in missing.stderr


def test_flag_defaults_are_the_config_defaults():
    """Every flag's default is Config's: parsing no flags (but an upstream, so
    /etc/resolv.conf is not read) gives Config() field by field."""
    import dataclasses

    from sidecar.cli import parse_config
    from sidecar.config import Config, HostPort

    parsed = parse_config(["--upstream", "127.0.0.1:53"], env={})
    expected = Config(upstreams=(HostPort("127.0.0.1", 53),))
    differ = {f.name: (getattr(parsed, f.name), getattr(expected, f.name))
              for f in dataclasses.fields(Config)
              if getattr(parsed, f.name) != getattr(expected, f.name)}
    assert not differ, differ
