"""The package's layers (README "Layout"): imports only go down, and there are no circles.

Every import of every module under metarl_llm/ and envs/ counts, the ones inside functions
included (an import placed in a function to dodge a circle is still a circle). A function-level
import is allowed only with a ``# deferred: <reason>`` comment on its line (start-up cost, or an
optional dependency); ``if TYPE_CHECKING:`` imports count for the direction of the layers but
not for circles (they never run).

    python -m tests.project.test_layering     # prints the layers, the module graph's size and the deferred imports
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

from tests.support import ROOT

# Bottom to top. A module may import its own package and any package of a lower layer; two
# packages of one layer are independent of each other.
LAYERS: list[tuple[str, ...]] = [
    ("config", "envs"),  # the schema; the environments (which never import metarl_llm)
    ("core",),  # Trial, StreamCodec, chat formatting, segmenters, RolloutBatch, padding, the registry helper
    ("models",),  # policy, critic, LoRA
    ("runtime",),  # processes, checkpoints, tracking, set-up, failure records, plots
    ("rollout",),  # sampling, KV cache, engines, the meta-prover
    ("verify",),  # trained verifiers
    ("rl", "arc"),  # advantages, losses, update, scoring, bonuses | ARC augmentation, voting, TTT
    ("evaluation",),  # held-out evaluation, curves, reports, diagnostics
    ("sft",),  # SFT fit, traces, warm start, verifier-free baselines
    ("jobs",),  # one module per job: the only code that reads a whole TrainConfig
    ("trainer", "evaluate"),  # entry points (train.py, python -m metarl_llm.evaluate)
]
LAYER_OF = {pkg: i for i, names in enumerate(LAYERS) for pkg in names}
DEFERRED = "# deferred:"


@dataclass(frozen=True)
class Import:
    source: str  # importing module, e.g. metarl_llm.rl.bonus
    target: str  # imported module, e.g. metarl_llm.rollout.meta_prover
    line: int
    in_function: bool
    type_checking: bool
    marked: bool  # the line carries "# deferred: ..."


def module_files() -> dict[str, Path]:
    files = {}
    for top in ("metarl_llm", "envs"):
        for f in sorted((ROOT / top).rglob("*.py")):
            name = ".".join(f.relative_to(ROOT).with_suffix("").parts)
            files[name.removesuffix(".__init__")] = f
    return files


def resolve(name: str, modules: set[str]) -> str | None:
    """The project module ``name`` refers to (a module, or the package whose __init__ it is)."""
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


def imports_of(module: str, path: Path, modules: set[str]) -> list[Import]:
    text = path.read_text()
    lines = text.splitlines()
    found: list[Import] = []

    def visit(node: ast.AST, in_function: bool, type_checking: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                visit(child, True, type_checking)
                continue
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                visit(child, in_function, True)
                continue
            names: list[str] = []
            if isinstance(child, ast.Import):
                names = [a.name for a in child.names]
            elif isinstance(child, ast.ImportFrom):
                if child.level:  # relative: from . import x / from .x import y
                    base = module.split(".")
                    if not path.name == "__init__.py":
                        base = base[:-1]
                    base = base[: len(base) - (child.level - 1)]
                    prefix = ".".join(base + ([child.module] if child.module else []))
                else:
                    prefix = child.module or ""
                names = [f"{prefix}.{a.name}" for a in child.names]  # "from pkg import submodule" imports the submodule
            if names:
                marked = any(DEFERRED in lines[i - 1] for i in range(child.lineno, child.end_lineno + 1))
                for n in names:
                    target = resolve(n, modules)
                    found.append(Import(module, target or n, child.lineno, in_function, type_checking, marked))
            visit(child, in_function, type_checking)

    visit(ast.parse(text), False, False)
    return found


def all_imports() -> list[Import]:
    files = module_files()
    modules = set(files)
    return [imp for m, f in files.items() for imp in imports_of(m, f, modules)]


def package_of(module: str) -> str:
    """The layer key of a project module: envs, or the component after metarl_llm."""
    parts = module.split(".")
    return "envs" if parts[0] == "envs" else parts[1] if len(parts) > 1 else "__init__"


def is_project(module: str) -> bool:
    return module == "metarl_llm" or module.startswith(("metarl_llm.", "envs"))


def upward_imports(imports: list[Import]) -> list[str]:
    bad = []
    for imp in imports:
        if not is_project(imp.target) or imp.source == imp.target:
            continue
        src, dst = package_of(imp.source), package_of(imp.target)
        if src == "envs" and dst != "envs":
            bad.append(f"{imp.source}:{imp.line} imports {imp.target}: envs/ never imports metarl_llm")
        elif src != dst and LAYER_OF[dst] >= LAYER_OF[src]:
            how = "the same layer" if LAYER_OF[dst] == LAYER_OF[src] else "a higher layer"
            bad.append(f"{imp.source}:{imp.line} imports {imp.target} ({dst}, {how} than {src})")
    return bad


def cycles(imports: list[Import]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), over the imports that run."""
    graph: dict[str, set[str]] = {}
    for imp in imports:
        if is_project(imp.target) and not imp.type_checking and imp.source != imp.target:
            graph.setdefault(imp.source, set()).add(imp.target)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def strongconnect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                strongconnect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            strongconnect(v)
    return out


def test_every_package_has_a_layer():
    packages = {package_of(m) for m in module_files()} - {"__init__"}
    assert packages <= set(LAYER_OF), f"packages without a layer in LAYERS: {sorted(packages - set(LAYER_OF))}"


def test_imports_only_go_down():
    bad = upward_imports(all_imports())
    assert not bad, "imports that go up or sideways:\n  " + "\n  ".join(bad)


def test_no_import_circles():
    found = cycles(all_imports())
    assert not found, "import circles:\n  " + "\n  ".join(" <-> ".join(c) for c in found)


def test_function_level_imports_are_marked_deferred():
    unmarked = [f"{i.source}:{i.line} imports {i.target}" for i in all_imports() if i.in_function and not i.marked]
    assert not unmarked, (
        "imports inside functions without a '# deferred: <reason>' comment (move them to the top "
        "of the module, or say why they wait):\n  " + "\n  ".join(unmarked)
    )


def test_the_checks_catch_what_they_are_for(tmp_path):
    """The checks on hand-built graphs: an upward import, a sideways one, a circle through a
    function-level import, and a TYPE_CHECKING import that does not make a circle."""
    a = Import("metarl_llm.core.trial", "metarl_llm.rl.bonus", 1, True, False, True)
    b = Import("metarl_llm.rl.bonus", "metarl_llm.core.trial", 1, False, False, False)
    c = Import("metarl_llm.rl.bonus", "metarl_llm.arc.vote", 1, False, False, False)
    d = Import("metarl_llm.evaluation.report", "metarl_llm.evaluation.heldout", 1, False, True, False)
    e = Import("metarl_llm.evaluation.heldout", "metarl_llm.evaluation.report", 1, False, False, False)
    assert [s.split(" (")[0] for s in upward_imports([a, b, c, d, e])] == [
        "metarl_llm.core.trial:1 imports metarl_llm.rl.bonus",
        "metarl_llm.rl.bonus:1 imports metarl_llm.arc.vote",
    ]
    assert cycles([a, b, d, e]) == [["metarl_llm.core.trial", "metarl_llm.rl.bonus"]]
    # the walker sees imports inside functions and under TYPE_CHECKING, and the marker
    src = tmp_path / "m.py"
    src.write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from metarl_llm.rl import bonus\n"
        "def f():\n    import metarl_llm.core.trial  # deferred: start-up cost\n"
    )
    found = imports_of("metarl_llm.core.x", src, {"metarl_llm.rl.bonus", "metarl_llm.core.trial", "metarl_llm.rl"})
    assert [(i.target, i.in_function, i.type_checking, i.marked) for i in found if is_project(i.target)] == [
        ("metarl_llm.rl.bonus", False, True, False),
        ("metarl_llm.core.trial", True, False, True),
    ]


if __name__ == "__main__":
    imps = all_imports()
    project = [i for i in imps if is_project(i.target)]
    print(f"{len(module_files())} modules, {len(project)} project imports, {len(imps)} imports in all")
    for i, names in enumerate(LAYERS):
        print(f"  L{i} {' | '.join(names)}")
    print("upward imports:", upward_imports(imps) or "none")
    print("circles:", cycles(imps) or "none")
    fn = [i for i in imps if i.in_function]
    print(f"function-level imports: {len(fn)} ({sum(is_project(i.target) for i in fn)} of project modules)")
    for i in fn:
        print(f"  {i.source}:{i.line} {i.target}{'' if i.marked else '  (UNMARKED)'}")


def test_tests_are_laid_out_like_the_package():
    """tests/<name>/ tests metarl_llm/<name>/ (or envs/); tests/project/ holds the tree's habits and
    tests/bench/ the benchmarks' code; a test file at the top of tests/ tests a top-level module."""
    tests = ROOT / "tests"
    packages = {p.name for p in (ROOT / "metarl_llm").iterdir() if (p / "__init__.py").exists()} | {"envs"}
    folders = {p.name for p in tests.iterdir() if p.is_dir() and p.name != "__pycache__"}
    assert folders <= packages | {"project", "bench"}, f"test folders that mirror no package: {sorted(folders - packages)}"
    assert all((tests / f / "__init__.py").exists() for f in folders), "every test folder is a package (unique module names)"
