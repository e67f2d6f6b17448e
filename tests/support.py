"""What several test modules share: the repository root, loading a script of the tree (a benchmark,
a docs generator) as a module, and the metrics glossary's key patterns (docs/metrics.md)."""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parent.parent  # the repository root


def load_script(relative: str, name: str | None = None) -> ModuleType:
    """The file ``ROOT / relative`` (e.g. ``bench/ttt.py``) imported as a module named ``name``
    (default: its path with ``/`` as ``_``), registered in ``sys.modules`` (dataclasses look
    their module up there)."""
    name = name or relative.removesuffix(".py").replace("/", "_")
    spec = importlib.util.spec_from_file_location(name, ROOT / relative)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


def glossary_patterns() -> list[re.Pattern]:
    """The keys of docs/metrics.md's tables (first column), placeholders as regular expressions."""
    pats = []
    for line in (ROOT / "docs" / "metrics.md").read_text().splitlines():
        if not line.startswith("| `"):
            continue
        for key in re.findall(r"`([^`]+)`", line.split(" | ")[0]):
            rx = re.escape(key)
            for ph, sub in (("<j>", r"\d+"), ("<b>", r"\d+"), ("<n>", r"\d+"), ("<k>", r"\d+"), ("<s>", r"[\d.]+"),
                            ("<metric>", r"\w+")):
                rx = rx.replace(re.escape(ph), sub)
            pats.append(re.compile(rx + r"\Z"))
    return pats


def undocumented_keys(rows: list) -> list:
    """Keys of metrics.jsonl rows that docs/metrics.md does not list (``iteration`` is the step)."""
    pats = glossary_patterns()
    keys = {k for r in rows for k in r} - {"iteration"}
    return sorted(k for k in keys if not any(p.match(k) for p in pats))
