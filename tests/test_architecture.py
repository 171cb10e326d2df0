"""docs/architecture.md matches the tree, and the import rules hold at run time."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "architecture.md"


def documented_modules() -> set[str]:
    table = DOC.read_text().split("## Module index", 1)[1]
    return set(re.findall(r"^\| `(sidecar/[\w/]+\.py)` \|", table, re.M))


def tree_modules() -> set[str]:
    return {str(p.relative_to(ROOT)) for p in (ROOT / "sidecar").rglob("*.py")
            if not (p.name == "__init__.py" and p.parent != ROOT / "sidecar")}


def test_module_index_lists_every_module_and_only_existing_ones():
    doc, tree = documented_modules(), tree_modules()
    assert not tree - doc, f"modules missing from docs/architecture.md: {sorted(tree - doc)}"
    assert not doc - tree, f"docs/architecture.md names modules that do not exist: {sorted(doc - tree)}"


def test_every_path_the_page_names_exists():
    named = set(re.findall(r"\b(sidecar/[\w/]+\.py)\b", DOC.read_text()))
    missing = sorted(p for p in named if not (ROOT / p).exists())
    assert not missing, missing


def loaded_after(statement: str, prefixes: tuple[str, ...]) -> list[str]:
    code = (f"import sys; {statement}; print('\\n'.join(sorted(m for m in sys.modules "
            f"if m.split('.')[0] in {prefixes!r} or m.startswith({prefixes!r}))))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60, cwd=ROOT, check=True)
    return proc.stdout.split()


def test_wire_and_cache_load_no_resolver_library():
    mods = loaded_after("import sidecar.dns.wire, sidecar.dns.cache, sidecar.dns.types",
                        ("aiodns", "pycares", "dnslib", "aiohttp", "prometheus_client"))
    assert mods == []


def test_dns_side_loads_no_http_stack():
    mods = loaded_after("import sidecar.server", ("aiohttp", "prometheus_client", "sidecar.ops"))
    assert mods == []
