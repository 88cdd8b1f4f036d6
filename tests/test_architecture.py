"""The layering, read from the source with ast: units import downward only and without cycles, test
and benchmark code stays out of the product, benchmarks use public names only. Every import counts
(inside functions, under try or TYPE_CHECKING, relative, `from pkg import submodule`,
importlib.import_module with a literal), since any of them makes the importing layer depend on the
imported one. Each check is a function of the repository root, so it can be run on another tree."""
from __future__ import annotations

import ast
import functools
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCANNED = ("bbu_jax", "convert_weights", "scripts", "benchmarks", "tests")

# unit -> layer. A unit imports units of its own layer or below, never above. A module directly under
# bbu_jax/ is a unit of its own and needs a row here like any subpackage.
LAYERS = {
    "bbu_jax": 0,              # the package root: importing any unit runs it
    "bbu_jax.foundation": 0,   # sharding, file writes, host memory
    "bbu_jax.models": 1,       # the model and its own input processing
    "bbu_jax.losses": 2,
    "bbu_jax.data": 3,
    "bbu_jax.training": 4,
    "bbu_jax.inference": 4,
    "bbu_jax.evaluation": 4,
    "bbu_jax.workflows": 5,    # composition: train run, export, demo assets
    "convert_weights": 5,      # thin CLIs over bbu_jax.workflows.export
    "bbu_jax.perf": 6,         # measurement tools for benchmarks and tests
    "bbu_jax.testing": 6,      # torch reference; who may import it is checked on its own below
}
# Outside the units: scripts/ and benchmarks/ (thin CLIs on top) and tests/.

TESTING_USERS = ("tests/", "benchmarks/", "scripts/demo.py", "bbu_jax/testing/")


@dataclass(frozen=True)
class Import:
    file: str      # path relative to the root, with / separators
    line: int
    module: str    # absolute name of the imported module
    name: str      # for `from module import name`: that name; else ""
    bound: str     # the local name the statement binds ("" for import_module and the like)

    @property
    def where(self) -> str:
        return f"{self.file}:{self.line}"

    @property
    def top(self) -> str:
        return self.module.split(".")[0]


def _module_name(rel: str) -> str:
    parts = rel[:-len(".py")].split("/")
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_module(root: Path, module: str) -> bool:
    p = root.joinpath(*module.split("."))
    return p.with_suffix(".py").is_file() or p.is_dir()


def _const_str(node: ast.AST) -> str | None:
    return node.value if isinstance(node, ast.Constant) and isinstance(node.value, str) else None


def _dotted(node: ast.AST) -> str:
    """`a.b.c` for a Name/Attribute chain, else ""."""
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        base = _dotted(node.value)
        return f"{base}.{node.attr}" if base else ""
    return ""


def _imports(root: Path, rel: str, nodes: tuple[ast.AST, ...]) -> Iterator[Import]:
    module = _module_name(rel)
    package = module if rel.endswith("__init__.py") else module.rpartition(".")[0]
    for node in nodes:
        if isinstance(node, ast.Import):
            for a in node.names:
                yield Import(rel, node.lineno, a.name, "", a.asname or a.name.split(".")[0])
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module
            for a in node.names:
                sub = f"{target}.{a.name}"
                is_sub = a.name != "*" and _is_module(root, sub)
                yield Import(rel, node.lineno, sub if is_sub else target, a.name, a.asname or a.name)
        elif isinstance(node, ast.Call) and node.args and _dotted(node.func) in (
                "importlib.import_module", "import_module", "__import__"):
            if (name := _const_str(node.args[0])) is not None:
                yield Import(rel, node.lineno, name, "", "")


@dataclass(frozen=True)
class Source:
    root: Path
    nodes: dict[str, tuple[ast.AST, ...]]   # relative path -> every node of the parsed file
    imports: tuple[Import, ...]

    def helper_modules(self) -> frozenset[str]:
        """Top-level modules in tests/ that tests import by bare name (pytest puts tests/ on sys.path)."""
        return frozenset(Path(f).stem for f in self.nodes if f.startswith("tests/") and f.count("/") == 1)

    def assignments(self, rel: str) -> dict[str, list[ast.AST]]:
        """name -> every value assigned to it anywhere in the file (module or function level)."""
        env: dict[str, list[ast.AST]] = {}
        for node in self.nodes[rel]:
            if isinstance(node, ast.Assign):
                for t in node.targets:
                    if isinstance(t, ast.Name):
                        env.setdefault(t.id, []).append(node.value)
        return env


@functools.cache
def load(root: Path = ROOT) -> Source:
    nodes = {}
    for top in SCANNED:
        for path in sorted((root / top).rglob("*.py")):
            rel = path.relative_to(root).as_posix()
            if "__pycache__" not in rel:
                nodes[rel] = tuple(ast.walk(ast.parse(path.read_text(), filename=str(path))))
    imports = tuple(i for rel, file_nodes in nodes.items() for i in _imports(root, rel, file_nodes))
    return Source(root, nodes, imports)


def unit_of(module: str) -> str | None:
    parts = module.split(".")
    if parts[0] == "convert_weights":
        return "convert_weights"
    if parts[0] != "bbu_jax":
        return None
    return ".".join(parts[:2])


def unit_edges(root: Path = ROOT) -> dict[tuple[str, str], list[str]]:
    """(importing unit, imported unit) -> the file:line of every import that makes that edge."""
    edges: dict[tuple[str, str], list[str]] = {}
    for imp in load(root).imports:
        src, dst = unit_of(_module_name(imp.file)), unit_of(imp.module)
        if src and dst and src != dst:
            edges.setdefault((src, dst), []).append(imp.where)
    return edges


# ---------------------------------------------------------------------------------------------------
# The checks: each returns its offences, empty when the tree is clean.


def _by_place(offences: list[str]) -> list[str]:
    """Each "file:line: what" once, in file and line order."""
    def place(o: str) -> tuple[str, int]:
        file, line, _ = o.split(":", 2)
        return file, int(line)
    return sorted(dict.fromkeys(offences), key=place)


def import_cycles(root: Path = ROOT) -> list[str]:
    """One cycle per strongly connected group of units, each edge with one file:line that makes it."""
    edges = unit_edges(root)
    graph: dict[str, list[str]] = {}
    for a, b in sorted(edges):
        graph.setdefault(a, []).append(b)
        graph.setdefault(b, [])
    # Tarjan's strongly connected components.
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    groups: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                groups.append(sorted(group))

    for v in sorted(graph):
        if v not in index:
            visit(v)

    out = []
    for group in groups:
        # The shortest way from the group's first unit back to itself, by breadth-first search.
        start, members = group[0], set(group)
        came_from: dict[str, str] = {}
        frontier = [start]
        while start not in came_from:
            reached = []
            for v in frontier:
                for w in graph[v]:
                    if w in members and w not in came_from:
                        came_from[w] = v
                        reached.append(w)
            frontier = reached
        path, v = [start], came_from[start]
        while v != start:
            path.append(v)
            v = came_from[v]
        path = [start] + path[::-1]
        steps = "".join(f"\n      {a} -> {b}: {edges[a, b][0]}" for a, b in zip(path, path[1:]))
        out.append(" -> ".join(path) + steps)
    return out


def unlayered_units(root: Path = ROOT) -> list[str]:
    """Units in the tree without a row in LAYERS, and rows with no unit behind them."""
    src = load(root)
    present = {unit_of(_module_name(f)) for f in src.nodes} - {None}
    return ([f"{u}: in the tree but not in LAYERS" for u in sorted(present - set(LAYERS))]
            + [f"{u}: in LAYERS but not in the tree" for u in sorted(set(LAYERS) - present)])


def upward_imports(root: Path = ROOT) -> list[str]:
    out = []
    for imp in load(root).imports:
        src, dst = unit_of(_module_name(imp.file)), unit_of(imp.module)
        if src in LAYERS and dst in LAYERS and LAYERS[src] < LAYERS[dst]:
            out.append(f"{imp.where}: {src} (layer {LAYERS[src]}) imports {imp.module} (layer {LAYERS[dst]})")
    return _by_place(out)


def imports_of_testing(root: Path = ROOT) -> list[str]:
    """bbu_jax.testing imports torch: only tests, benchmarks and the demo may pull it in."""
    return _by_place([f"{i.where}: imports {i.module}" for i in load(root).imports
                      if unit_of(i.module) == "bbu_jax.testing" and not i.file.startswith(TESTING_USERS)])


def product_imports_of_tests_and_clis(root: Path = ROOT) -> list[str]:
    """bbu_jax and convert_weights import no tests/ code (by package or by bare helper name) and no
    benchmarks; bbu_jax imports no convert_weights; scripts and benchmarks import no tests/ code."""
    src = load(root)
    tests_code = {"tests"} | src.helper_modules()
    banned = {
        "bbu_jax": tests_code | {"benchmarks", "convert_weights"},
        "convert_weights": tests_code | {"benchmarks"},
        "scripts": tests_code,
        "benchmarks": tests_code,
    }
    return _by_place([f"{i.where}: imports {i.module}" for i in src.imports
                      if i.top in banned.get(i.file.split("/")[0], ())])


def _is_private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def benchmark_private_use(root: Path = ROOT) -> list[str]:
    """Benchmarks measure the public API: no private bbu_jax name (imported, read as an attribute or
    through getattr) and no assignment, deletion or patch on anything imported from bbu_jax."""
    src = load(root)
    out = []
    for rel, nodes in src.nodes.items():
        if not rel.startswith("benchmarks/"):
            continue
        imports = [i for i in src.imports if i.file == rel and i.top == "bbu_jax"]
        # A name the file binds again (a variable, a parameter) may no longer be the bbu_jax object.
        rebound = {n.id for n in nodes if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store)}
        rebound |= {a.arg for n in nodes if isinstance(n, ast.arguments)
                    for a in n.posonlyargs + n.args + n.kwonlyargs}
        bound = {i.bound for i in imports if i.bound} - rebound
        for i in imports:
            private = [p for p in i.module.split(".") + [i.name] if p and _is_private(p)]
            if private:
                out.append(f"{i.where}: imports private {i.module}{'.' + i.name if i.name else ''}")

        def root_name(node: ast.AST) -> str:
            while isinstance(node, (ast.Attribute, ast.Subscript)):
                node = node.value
            return node.id if isinstance(node, ast.Name) else ""

        def names_bbu_jax(node: ast.AST) -> bool:
            s = _const_str(node)
            return root_name(node) in bound or (s is not None and s.split(".")[0] == "bbu_jax")

        for node in nodes:
            if isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Load) and _is_private(node.attr) \
                    and root_name(node) in bound:
                out.append(f"{rel}:{node.lineno}: reads private {_dotted(node) or node.attr}")
            targets = []
            if isinstance(node, (ast.Assign, ast.Delete)):
                targets = node.targets
            elif isinstance(node, (ast.AugAssign, ast.AnnAssign)):
                targets = [node.target]
            for t in targets:
                for leaf in ast.walk(t):
                    if isinstance(leaf, (ast.Attribute, ast.Subscript)) and isinstance(leaf.ctx, (ast.Store, ast.Del)) \
                            and root_name(leaf) in bound:
                        out.append(f"{rel}:{node.lineno}: patches {_dotted(leaf) or root_name(leaf)}")
            if isinstance(node, ast.Call) and node.args:
                func = _dotted(node.func)
                if func in ("getattr", "hasattr") and len(node.args) > 1 and root_name(node.args[0]) in bound \
                        and _is_private(_const_str(node.args[1]) or ""):
                    out.append(f"{rel}:{node.lineno}: reads private {_const_str(node.args[1])} via {func}")
                if (func in ("setattr", "delattr") or func.endswith(("patch", ".object", ".dict", ".multiple"))) \
                        and names_bbu_jax(node.args[0]):
                    out.append(f"{rel}:{node.lineno}: patches through {func}")
    return _by_place(out)


def _path_values(node: ast.AST, file: Path, env: dict[str, list[ast.AST]], depth: int = 0) -> list[str]:
    """The paths an expression can evaluate to, as far as the usual __file__ arithmetic goes
    (os.path, pathlib, module and function level names); a bare string stands for itself."""
    if depth > 20:
        return []
    again = functools.partial(_path_values, file=file, env=env, depth=depth + 1)
    if (s := _const_str(node)) is not None:
        return [s]
    if isinstance(node, ast.Name):
        if node.id == "__file__":
            return [str(file)]
        return [p for value in env.get(node.id, []) for p in again(value)]
    if isinstance(node, ast.Attribute) and node.attr == "parent":
        return [os.path.dirname(p) for p in again(node.value)]
    if isinstance(node, ast.Subscript) and isinstance(node.value, ast.Attribute) and node.value.attr == "parents" \
            and isinstance(node.slice, ast.Constant) and isinstance(node.slice.value, int):
        up = node.slice.value + 1
        return [functools.reduce(lambda q, _: os.path.dirname(q), range(up), p) for p in again(node.value.value)]
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Div):
        return [os.path.join(a, b) for a in again(node.left) for b in again(node.right)]
    if isinstance(node, (ast.List, ast.Tuple)):
        return [p for e in node.elts for p in again(e)]
    if isinstance(node, ast.Call):
        func = _dotted(node.func)
        method = node.func.attr if isinstance(node.func, ast.Attribute) else func
        if method in ("resolve", "absolute", "expanduser") and isinstance(node.func, ast.Attribute):
            return again(node.func.value)
        if not node.args:
            return []
        if func == "os.pathsep.join":
            return again(node.args[0])
        if func == "os.path.join":
            paths = again(node.args[0])
            for arg in node.args[1:]:
                paths = [os.path.join(a, b) for a in paths for b in again(arg)]
            return paths
        if method == "dirname":
            return [os.path.dirname(p) for p in again(node.args[0])]
        if method in ("abspath", "realpath", "normpath", "Path", "PurePath", "str", "fspath"):
            return again(node.args[0])
    return []


def sys_path_additions_of_tests(root: Path = ROOT) -> list[str]:
    """No file puts tests/ on the import path (sys.path, site.addsitedir or a PYTHONPATH it sets): the
    tests' helpers are theirs, not an import source for anything else."""
    tests_dir = os.path.normpath(root / "tests")
    src = load(root)
    out = []
    for rel, nodes in src.nodes.items():
        added: list[tuple[int, ast.AST, str]] = []
        for node in nodes:
            if isinstance(node, ast.Call):
                func = _dotted(node.func)
                if func == "sys.path.insert" and len(node.args) > 1:
                    added.append((node.lineno, node.args[1], func))
                elif func in ("sys.path.append", "sys.path.extend", "site.addsitedir") and node.args:
                    added.append((node.lineno, node.args[0], func))
                added += [(node.lineno, k.value, "PYTHONPATH") for k in node.keywords if k.arg == "PYTHONPATH"]
            elif isinstance(node, ast.Dict):
                added += [(v.lineno, v, "PYTHONPATH") for k, v in zip(node.keys, node.values)
                          if k is not None and _const_str(k) == "PYTHONPATH"]
            elif isinstance(node, (ast.Assign, ast.AugAssign)):
                for t in node.targets if isinstance(node, ast.Assign) else [node.target]:
                    if _dotted(t) == "sys.path" or (isinstance(t, ast.Subscript) and _dotted(t.value) == "sys.path"):
                        added.append((node.lineno, node.value, "sys.path"))
                    elif isinstance(t, ast.Subscript) and _const_str(t.slice) == "PYTHONPATH":
                        added.append((node.lineno, node.value, "PYTHONPATH"))
        file, env = root / rel, src.assignments(rel)
        for line, expr, how in added:
            paths = _path_values(expr, file, env)
            # A relative path counts from the root, where scripts, tests and benchmarks are run.
            if any(os.path.normpath(os.path.join(root, p)) == tests_dir for p in paths):
                out.append(f"{rel}:{line}: {how} gets tests/")
    return _by_place(out)


def benchmark_imports_in_tests(root: Path = ROOT) -> list[str]:
    """Tests run benchmarks as programs (subprocess) but import nothing from them: what a test needs
    from a benchmark belongs in the library (bbu_jax.perf) or in the test."""
    src = load(root)
    out = [f"{i.where}: imports {i.module}" for i in src.imports
           if i.file.startswith("tests/") and i.top == "benchmarks"]
    for rel, nodes in src.nodes.items():
        if not rel.startswith("tests/"):
            continue
        env = src.assignments(rel)
        for node in nodes:
            if not isinstance(node, ast.Call):
                continue
            func = _dotted(node.func)
            if func.endswith("run_path") and node.args:
                arg = node.args[0]
            elif func.endswith(("spec_from_file_location", "SourceFileLoader")) and len(node.args) > 1:
                arg = node.args[1]
            else:
                continue
            for p in _path_values(arg, root / rel, env):
                full = os.path.normpath(os.path.join(root, p))
                if full.startswith(os.path.normpath(root / "benchmarks") + os.sep):
                    out.append(f"{rel}:{node.lineno}: loads {os.path.relpath(full, root)}")
    return _by_place(out)


def foundation_imports(root: Path = ROOT) -> list[str]:
    """bbu_jax.foundation is the bottom: it exists and imports nothing else of bbu_jax."""
    if not (root / "bbu_jax" / "foundation" / "__init__.py").is_file():
        return ["bbu_jax/foundation/__init__.py: missing"]
    return _by_place([f"{i.where}: imports {i.module}" for i in load(root).imports
                      if i.file.startswith("bbu_jax/foundation/") and i.top == "bbu_jax"
                      and unit_of(i.module) != "bbu_jax.foundation"])


# ---------------------------------------------------------------------------------------------------


def _report(offences: list[str], what: str) -> str:
    return f"{what}:\n  " + "\n  ".join(offences)


def test_units_import_without_cycles():
    cycles = import_cycles()
    assert not cycles, _report(cycles, "import cycles between units (each edge: one import that makes it)")


def test_every_unit_has_a_layer():
    bad = unlayered_units()
    assert not bad, _report(bad, "LAYERS and the units in the tree differ")


def test_imports_point_down_the_layers():
    bad = upward_imports()
    assert not bad, _report(bad, "imports from a lower layer to a higher one")


def test_testing_is_imported_only_by_tests_benchmarks_and_demo():
    bad = imports_of_testing()
    assert not bad, _report(bad, f"bbu_jax.testing imported outside {', '.join(TESTING_USERS)}")


def test_product_imports_no_tests_benchmarks_or_convert_weights():
    bad = product_imports_of_tests_and_clis()
    assert not bad, _report(bad, "product code importing tests/benchmarks/convert_weights, or a CLI importing tests/")


def test_benchmarks_use_public_names_and_patch_nothing():
    bad = benchmark_private_use()
    assert not bad, _report(bad, "benchmarks touching private bbu_jax names or patching bbu_jax")


def test_tests_import_no_benchmarks():
    bad = benchmark_imports_in_tests()
    assert not bad, _report(bad, "tests importing benchmark modules")


def test_nothing_puts_tests_on_the_import_path():
    bad = sys_path_additions_of_tests()
    assert not bad, _report(bad, "tests/ added to the import path")


def test_foundation_imports_nothing_of_bbu_jax():
    bad = foundation_imports()
    assert not bad, _report(bad, "bbu_jax.foundation importing the rest of bbu_jax")


BAD_TREE = {
    "bbu_jax/__init__.py": "",
    "bbu_jax/extra.py": "",
    "bbu_jax/foundation/__init__.py": "from .. import models\n",
    "bbu_jax/models/__init__.py": "",
    "bbu_jax/models/m.py": ("def f():\n"
                            "    from bbu_jax.foundation import x\n"
                            "    import importlib\n"
                            "    importlib.import_module('bbu_jax.training.t')\n"),
    "bbu_jax/training/__init__.py": "from bbu_jax import testing\n",
    "bbu_jax/training/t.py": ("import convert_weights.cli\n"
                              "import training_toy\n"
                              "from tests import training_toy\n"
                              "from benchmarks import b\n"),
    "bbu_jax/testing/__init__.py": "",
    "convert_weights/__init__.py": "",
    "convert_weights/cli.py": "",
    "scripts/demo.py": "from bbu_jax.testing import x\n",
    "scripts/other.py": "import bbu_jax.testing\nimport training_toy\n",
    "tests/training_toy.py": "import os, sys\nsys.path.append(os.path.dirname(__file__))\n",
    "tests/test_x.py": ("import runpy\n"
                        "from pathlib import Path\n"
                        "ROOT = Path(__file__).resolve().parents[1]\n"
                        "runpy.run_path(str(ROOT / 'benchmarks' / 'b.py'))\n"
                        "import benchmarks.b\n"),
    "benchmarks/__init__.py": "",
    "benchmarks/b.py": ("import sys\n"
                        "from pathlib import Path\n"
                        "from unittest import mock\n"
                        "sys.path.insert(0, str(Path(__file__).resolve().parents[1] / 'tests'))\n"
                        "from bbu_jax.models import m\n"
                        "from bbu_jax.models.m import _hidden\n"
                        "m._f()\n"
                        "m.f = None\n"
                        "setattr(m, 'f', None)\n"
                        "mock.patch('bbu_jax.models.m.f')\n"
                        "getattr(m, '_g')\n"),
}


def test_checks_catch_a_bad_tree(tmp_path):
    """Each check, run on a small tree that breaks its rule in the ways above, names every offence
    and nothing else: the checks above pass because the tree is clean, not because they are blind."""
    for rel, text in BAD_TREE.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)

    def heads(offences: list[str]) -> list[str]:
        return [o.split(": ")[0].splitlines()[0] for o in offences]

    t, b = "bbu_jax/training/t.py", "benchmarks/b.py"
    assert heads(import_cycles(tmp_path)) == ["bbu_jax.foundation -> bbu_jax.models -> bbu_jax.foundation"]
    assert heads(unlayered_units(tmp_path)) == [
        "bbu_jax.extra", "bbu_jax.data", "bbu_jax.evaluation", "bbu_jax.inference", "bbu_jax.losses",
        "bbu_jax.perf", "bbu_jax.workflows"]
    assert heads(upward_imports(tmp_path)) == [
        "bbu_jax/foundation/__init__.py:1", "bbu_jax/models/m.py:4", "bbu_jax/training/__init__.py:1", f"{t}:1"]
    assert heads(imports_of_testing(tmp_path)) == ["bbu_jax/training/__init__.py:1", "scripts/other.py:1"]
    assert heads(product_imports_of_tests_and_clis(tmp_path)) == [
        f"{t}:1", f"{t}:2", f"{t}:3", f"{t}:4", "scripts/other.py:2"]
    assert heads(benchmark_private_use(tmp_path)) == [f"{b}:{n}" for n in range(6, 12)]
    assert heads(benchmark_imports_in_tests(tmp_path)) == ["tests/test_x.py:4", "tests/test_x.py:5"]
    assert heads(sys_path_additions_of_tests(tmp_path)) == [f"{b}:4", "tests/training_toy.py:2"]
    assert heads(foundation_imports(tmp_path)) == ["bbu_jax/foundation/__init__.py:1"]
