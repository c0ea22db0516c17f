"""docs/ARCHITECTURE.md's module map is the import graph: each row names modules, what they import at module
level and what they import lazily (inside functions), and this test holds the table to the code (ast, no
imports run). Typing-only imports (``if TYPE_CHECKING:``) are not arrows: they never run.

Also: no import circles, no ``_private`` name imported from another module, no re-exports (``__all__`` names
only what a module defines, package ``__init__`` files import nothing), every command module in cli's registry.
On a mismatch the failure prints the rows the code implies, to paste into the table."""
from __future__ import annotations

import ast
import re
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "gguf_experts"
DOC = ROOT / "docs" / "ARCHITECTURE.md"
PKG_NAME = "gguf_experts"


@dataclass
class Module:
    key: str  # the map's name: path under gguf_experts/ without .py; a package: its folder (trace/); root: __init__
    dotted: str
    is_pkg: bool
    path: Path
    imports: set[str] = field(default_factory=set)  # keys or third-party names, module level
    lazy: set[str] = field(default_factory=set)  # imported only inside functions
    private: list[str] = field(default_factory=list)  # "_name from module" imported across modules


def _modules() -> dict[str, Module]:
    mods = {}
    for p in sorted(PKG.rglob("*.py")):
        rel = p.relative_to(PKG).with_suffix("")
        parts = list(rel.parts)
        is_pkg = parts[-1] == "__init__"
        if is_pkg:
            parts = parts[:-1]
        key = "/".join(parts) + ("/" if is_pkg and parts else "") or "__init__"  # a package: trace/
        mods[".".join([PKG_NAME, *parts])] = Module(key, ".".join([PKG_NAME, *parts]), is_pkg, p)
    return mods


def _is_type_checking(node: ast.If) -> bool:
    t = node.test
    return (isinstance(t, ast.Name) and t.id == "TYPE_CHECKING") or (
        isinstance(t, ast.Attribute) and t.attr == "TYPE_CHECKING")


def _walk(node: ast.AST, in_function: bool) -> Iterator[tuple[ast.Import | ast.ImportFrom, bool]]:
    """(import node, inside a function?) for every import outside ``if TYPE_CHECKING:`` blocks."""
    for child in ast.iter_child_nodes(node):
        if isinstance(child, (ast.Import, ast.ImportFrom)):
            yield child, in_function
        elif isinstance(child, ast.If) and _is_type_checking(child):
            for stmt in child.orelse:
                yield from _walk(ast.Module(body=[stmt], type_ignores=[]), in_function)
        else:
            yield from _walk(child, in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef,
                                                                       ast.Lambda)))


def _base(mod: Module, node: ast.ImportFrom) -> str:
    if node.level == 0:
        return node.module or ""
    parts = mod.dotted.split(".")
    if not mod.is_pkg:
        parts = parts[:-1]
    parts = parts[:len(parts) - (node.level - 1)]
    return ".".join(parts + ([node.module] if node.module else []))


def _third_party(name: str) -> str | None:
    top = name.split(".")[0]
    if top == PKG_NAME or top in sys.stdlib_module_names or top == "__future__":
        return None
    return top


def _targets(mods: dict[str, Module], mod: Module, node: ast.Import | ast.ImportFrom) -> list[str]:
    """The map's names of what one import statement imports; records private names taken across modules."""
    if isinstance(node, ast.Import):
        return [mods[a.name].key if a.name.split(".")[0] == PKG_NAME else tp
                for a in node.names if a.name.split(".")[0] == PKG_NAME or (tp := _third_party(a.name))]
    base = _base(mod, node)
    if base.split(".")[0] != PKG_NAME:
        tp = _third_party(base)
        return [tp] if tp else []
    out = []
    for a in node.names:
        sub = f"{base}.{a.name}"
        if sub in mods:  # a module imported by name: private modules stay inside their package
            if a.name.startswith("_") and not sub.startswith(_package(mod) + "."):
                mod.private.append(f"module {sub}")
            out.append(mods[sub].key)
        else:
            if a.name.startswith("_") and not a.name.startswith("__") and base != mod.dotted:
                mod.private.append(f"{a.name} from {base}")
            out.append(mods[base].key)
    return out


def _graph() -> dict[str, Module]:
    mods = _modules()
    for mod in mods.values():
        tree = ast.parse(mod.path.read_text(encoding="utf-8"))
        for node, lazy in _walk(tree, False):
            for t in _targets(mods, mod, node):
                if t != mod.key:
                    (mod.lazy if lazy else mod.imports).add(t)
        mod.lazy -= mod.imports
    return {m.key: m for m in mods.values()}


def _package(mod: Module) -> str:
    return mod.dotted if mod.is_pkg else mod.dotted.rsplit(".", 1)[0]


_TICKS = re.compile(r"`([^`]+)`")


@dataclass
class Row:
    modules: list[str]
    imports: set[str]
    lazy: set[str]
    line: int


def _table() -> list[Row]:
    lines = DOC.read_text(encoding="utf-8").splitlines()
    start = next(i for i, t in enumerate(lines) if t.startswith("## Module map"))
    rows, in_table = [], False
    for i in range(start + 1, len(lines)):
        t = lines[i].strip()
        if t.startswith("## "):
            break
        if not t.startswith("|"):
            if in_table:
                break
            continue
        in_table = True
        cells = [c.strip() for c in t.strip("|").split("|")]
        if cells[0] == "module" or set(cells[0]) <= {"-", ":"}:
            continue
        assert len(cells) == 4, f"ARCHITECTURE.md:{i + 1}: expected | module | owns | imports | lazily |"
        rows.append(Row(_TICKS.findall(cells[0]), set(_TICKS.findall(cells[2])), set(_TICKS.findall(cells[3])),
                        i + 1))
    return rows


def _fmt(names: set[str]) -> str:
    internal = sorted(n for n in names if n in GRAPH)
    external = sorted(n for n in names if n not in GRAPH)
    return ", ".join(f"`{n}`" for n in internal + external) or "-"


GRAPH = _graph()


def _suggest(keys: list[str]) -> str:
    return "\n".join(f"| `{k}` | ... | {_fmt(GRAPH[k].imports)} | {_fmt(GRAPH[k].lazy)} |" for k in keys)


def test_every_module_has_one_row() -> None:
    listed = [m for row in _table() for m in row.modules]
    twice = sorted({m for m in listed if listed.count(m) > 1})
    unknown = sorted(set(listed) - set(GRAPH))
    missing = sorted(set(GRAPH) - set(listed))
    assert not twice, f"listed twice in docs/ARCHITECTURE.md's module map: {twice}"
    assert not unknown, f"no such module (moved or removed?): {unknown}"
    assert not missing, "modules missing from docs/ARCHITECTURE.md's module map; add rows:\n" + _suggest(missing)


def test_table_matches_the_imports() -> None:
    wrong = []
    for row in _table():
        mods = [GRAPH[m] for m in row.modules if m in GRAPH]
        imports = set().union(*(m.imports for m in mods)) if mods else set()
        lazy = set().union(*(m.lazy for m in mods)) if mods else set()
        lazy -= imports
        if imports != row.imports or lazy != row.lazy:
            wrong.append(f"line {row.line} {row.modules}: the code imports {_fmt(imports)}, lazily {_fmt(lazy)}"
                         f" (the table says {_fmt(row.imports)}, lazily {_fmt(row.lazy)})")
    assert not wrong, "docs/ARCHITECTURE.md's module map differs from the code:\n" + "\n".join(wrong)


def _cycles() -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), over runtime imports, lazy included."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted((GRAPH[v].imports | GRAPH[v].lazy) & GRAPH.keys()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(GRAPH):
        if v not in index:
            visit(v)
    return out


def test_no_import_circles() -> None:
    assert _cycles() == []


def test_circle_detection_finds_a_circle() -> None:
    """The detector itself: a circle added to the graph is found."""
    a, b = GRAPH["gguf/names"], GRAPH["errors"]
    a.lazy.add("errors")
    b.lazy.add("gguf/names")
    try:
        assert ["errors", "gguf/names"] in _cycles()
    finally:
        a.lazy.discard("errors")
        b.lazy.discard("gguf/names")


def test_no_private_names_across_modules() -> None:
    bad = {k: m.private for k, m in GRAPH.items() if m.private}
    assert not bad, f"imports of another module's private names (make them public or move them): {bad}"


_LAZY_FRONT_DOOR = {"Recorder", "capture"}


def test_no_re_exports() -> None:
    """Each name has one import path: __all__ lists only what the module defines, and package __init__ files
    import nothing (the root package's lazy ``Recorder``/``capture`` is the one documented front door)."""
    bad = []
    for key, mod in GRAPH.items():
        tree = ast.parse(mod.path.read_text(encoding="utf-8"))
        defined = {n.name for n in tree.body if isinstance(n, (ast.FunctionDef, ast.ClassDef))}
        for n in tree.body:
            for t in (n.targets if isinstance(n, ast.Assign) else [n.target] if isinstance(n, ast.AnnAssign) else []):
                defined |= {x.id for x in ast.walk(t) if isinstance(x, ast.Name)}
        for n in tree.body:
            if isinstance(n, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "__all__" for t in n.targets):
                names = ast.literal_eval(n.value)
                served = _LAZY_FRONT_DOOR if key == "__init__" else set()  # by the root's module __getattr__
                bad += [f"{key}: __all__ names {x!r}, defined elsewhere" for x in names if x not in defined | served]
        if mod.is_pkg and key != "__init__" and (mod.imports or mod.lazy):
            bad.append(f"{key}__init__.py imports {sorted(mod.imports | mod.lazy)}: import from the modules")
    assert not bad, "\n".join(bad)


def test_cli_registry_lists_every_command() -> None:
    """mypy checks the commands against cli.Command through cli's TYPE_CHECKING registry: it must be complete."""
    tree = ast.parse((PKG / "cli.py").read_text(encoding="utf-8"))
    registry = next(n for n in ast.walk(tree) if isinstance(n, ast.AnnAssign) and isinstance(n.target, ast.Name)
                    and n.target.id == "_REGISTRY")
    assert isinstance(registry.value, ast.Tuple)
    names = {e.id for e in registry.value.elts if isinstance(e, ast.Name)}
    files = {p.stem for p in (PKG / "commands").glob("*.py") if not p.stem.startswith("_")}
    assert names == files


@pytest.mark.parametrize("key", ["gguf/reader", "trace/reader", "gguf/layout", "heat"])
def test_graph_sees_lazy_imports(key: str) -> None:
    """Sanity of the parser on modules known to import lazily (numpy, the metadata check, the pending header)."""
    assert GRAPH[key].lazy, f"{key}: no lazy import found; the parser lost them"


@pytest.mark.platform_skip("Python < 3.11 has no tomllib")
def test_package_data_globs_match_the_tree() -> None:
    """pyproject's package-data: each glob matches a file, and every non-Python file of the package (the C
    tracer, the report's JS/CSS) is shipped by one (files move with their modules)."""
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11; CI runs 3.12
    conf = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    globs = conf["tool"]["setuptools"]["package-data"][PKG_NAME]
    empty = [g for g in globs if not list(PKG.glob(g))]
    assert not empty, f"package-data globs that match nothing: {empty}"
    shipped = {p for g in globs for p in PKG.glob(g)}
    data = {p for p in PKG.rglob("*") if p.is_file() and p.suffix not in (".py", ".pyc")
            and "__pycache__" not in p.parts}
    assert not sorted(data - shipped), f"files of the package that the wheel would leave out: {sorted(data - shipped)}"
