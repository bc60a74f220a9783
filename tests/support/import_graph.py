"""The import graph of a Python package, read from the source (ast), without importing anything.

    graph = ImportGraph.of_package(ROOT / "dist_cnn")
    graph.modules                  # {'dist_cnn', 'dist_cnn.cli', 'dist_cnn.commands', 'dist_cnn.commands.train', ...}
    graph.imports                  # [Import(src, dst, path, line, function, statement), ...] package-internal only
    graph.cycles()                 # one shortest cycle per strongly connected component, as Import lists
    graph.private_uses()           # [PrivateUse(src, dst, name, path, line), ...] another module's `_name`

Every `import` statement counts, wherever it is (module level, inside a def, under `if TYPE_CHECKING`):
`import a.b.c` -> a.b.c; `from a.b import c` -> a.b.c when that is a module of the package, else a.b;
relative imports resolve against the importing module's package (`from . import y`, `from ..a import b`).
An import of a submodule does not add edges to its parent packages (that `__init__` runs too, but
counting it would make every `from . import x` inside a package a cycle through its `__init__`).
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Import:
    src: str  # importing module, e.g. 'dist_cnn.distributed.process_group'
    dst: str  # imported package module, e.g. 'dist_cnn.doctor'
    path: str  # the importing file, relative to the package's parent, e.g. 'dist_cnn/distributed.py'
    line: int
    function: str | None  # the enclosing def (qualified, e.g. 'Trainer._report'), None at module level
    statement: str  # the source of the import statement

    def where(self) -> str:
        inside = f" in {self.function}()" if self.function else ""
        return f"{self.path}:{self.line}{inside}: {self.statement}"


@dataclass(frozen=True)
class PrivateUse:
    src: str  # the module using the name
    dst: str  # the package module that defines it
    name: str  # e.g. '_draws'
    path: str
    line: int

    def where(self) -> str:
        return f"{self.path}:{self.line}: {self.src} uses {self.dst}.{self.name}"


def is_private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


class ImportGraph:
    def __init__(self, root: Path, files: dict[str, Path]):
        self.root = root  # the directory holding the package directory
        self.files = files  # module name -> file
        self.modules = set(files)
        self.imports: list[Import] = []
        for module in sorted(files):
            self.imports += self._imports_of(module)

    @classmethod
    def of_package(cls, package_dir: Path) -> ImportGraph:
        package_dir = Path(package_dir).resolve()
        files = {}
        for path in sorted(package_dir.rglob("*.py")):
            parts = path.relative_to(package_dir.parent).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            files[".".join(parts)] = path
        return cls(package_dir.parent, files)

    def is_package(self, module: str) -> bool:
        return self.files[module].name == "__init__.py"

    # ---- reading one file ---------------------------------------------------------------------
    def _imports_of(self, module: str) -> list[Import]:
        path = self.files[module]
        source = path.read_text()
        tree = ast.parse(source, filename=str(path))
        rel = path.relative_to(self.root).as_posix()
        found = []
        for node, function in _walk_with_scope(tree):
            statement = (ast.get_source_segment(source, node) or "").replace("\n", " ")
            for dst in sorted(self._targets(module, node)):
                found.append(Import(module, dst, rel, node.lineno, function, statement))
        return found

    def _base(self, module: str, node: ast.ImportFrom) -> str | None:
        """The absolute module a `from X import ...` names (None beyond the top-level package)."""
        base = node.module or ""
        if node.level:
            package = module if self.is_package(module) else module.rpartition(".")[0]
            parts = package.split(".")
            if node.level - 1 >= len(parts):
                return None
            anchor = ".".join(parts[: len(parts) - (node.level - 1)])
            base = f"{anchor}.{base}" if base else anchor
        return base

    def _targets(self, module: str, node) -> set[str]:
        if isinstance(node, ast.Import):
            return {t for alias in node.names if (t := self._innermost(alias.name))}
        base = self._base(module, node)
        if base is None:
            return set()  # beyond the top-level package: not ours
        targets = set()
        for alias in node.names:
            sub = f"{base}.{alias.name}"
            if sub in self.modules:
                targets.add(sub)  # `from pkg import submodule`
            elif t := self._innermost(base):
                targets.add(t)  # `from module import name` (or a name defined in pkg/__init__)
        return targets

    def _innermost(self, dotted: str) -> str | None:
        """The deepest module of the package that `dotted` names (None for other packages)."""
        parts = dotted.split(".")
        for n in range(len(parts), 0, -1):
            if ".".join(parts[:n]) in self.modules:
                return ".".join(parts[:n])
        return None

    def private_uses(self) -> list[PrivateUse]:
        """Every use of another package module's private name: `from m import _x`, or `m._x` where `m` is
        a name an import bound to a package module (`from pkg import m`, `import pkg.m as m`)."""
        found = []
        for module in sorted(self.files):
            path = self.files[module]
            rel = path.relative_to(self.root).as_posix()
            tree = ast.parse(path.read_text(), filename=str(path))
            bound: dict[str, str] = {}  # local name -> package module
            for node in ast.walk(tree):
                if isinstance(node, ast.Import):
                    bound |= {a.asname: a.name for a in node.names if a.asname and a.name in self.modules}
                elif isinstance(node, ast.ImportFrom) and (base := self._base(module, node)) is not None:
                    for alias in node.names:
                        if f"{base}.{alias.name}" in self.modules:
                            bound[alias.asname or alias.name] = f"{base}.{alias.name}"
                        elif is_private(alias.name) and (dst := self._innermost(base)) and dst != module:
                            found.append(PrivateUse(module, dst, alias.name, rel, node.lineno))
            for node in ast.walk(tree):
                if (
                    isinstance(node, ast.Attribute)
                    and isinstance(node.value, ast.Name)
                    and node.value.id in bound
                    and bound[node.value.id] != module
                    and is_private(node.attr)
                ):
                    found.append(PrivateUse(module, bound[node.value.id], node.attr, rel, node.lineno))
        return sorted(found, key=lambda u: (u.path, u.line, u.name))

    # ---- questions ----------------------------------------------------------------------------
    def edges(self) -> dict[str, dict[str, list[Import]]]:
        out: dict[str, dict[str, list[Import]]] = {m: {} for m in self.modules}
        for imp in self.imports:
            out[imp.src].setdefault(imp.dst, []).append(imp)
        return out

    def components(self) -> list[list[str]]:
        """Strongly connected components with a cycle (more than one module, or a module importing itself)."""
        edges = self.edges()
        index, low, on_stack, stack, comps = {}, {}, set(), [], []

        def visit(v):  # Tarjan; the package is small, recursion is fine
            index[v] = low[v] = len(index)
            stack.append(v)
            on_stack.add(v)
            for w in sorted(edges[v]):
                if w not in index:
                    visit(w)
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
                if len(comp) > 1 or v in edges[v]:
                    comps.append(sorted(comp))

        for v in sorted(edges):
            if v not in index:
                visit(v)
        return sorted(comps)

    def cycles(self) -> list[list[Import]]:
        """One shortest cycle per strongly connected component, as the imports that close it."""
        edges = self.edges()
        out = []
        for comp in self.components():
            members = set(comp)
            best = None
            for start in comp:
                path = _shortest_path_back(start, edges, members)
                if path and (best is None or len(path) < len(best)):
                    best = path
            out.append([edges[a][b][0] for a, b in best])
        return out


def _shortest_path_back(start: str, edges, members) -> list[tuple[str, str]] | None:
    """The shortest chain of (src, dst) edges from start back to start, inside `members` (BFS)."""
    prev: dict[str, str] = {}
    frontier = [start]
    while frontier:
        nxt = []
        for v in frontier:
            for w in sorted(edges[v]):
                if w not in members:
                    continue
                if w == start:
                    chain, cur = [(v, start)], v
                    while cur != start:
                        chain.append((prev[cur], cur))
                        cur = prev[cur]
                    return chain[::-1]
                if w not in prev:
                    prev[w] = v
                    nxt.append(w)
        frontier = nxt
    return None


def _walk_with_scope(tree):
    """(import node, enclosing function's qualified name or None) for every import in the tree."""

    def walk(node, scope: list[str], in_def: bool):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                yield child, ".".join(scope) if in_def else None
            elif isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                yield from walk(child, scope + [child.name], True)
            elif isinstance(child, ast.ClassDef):
                yield from walk(child, scope + [child.name], in_def)
            else:
                yield from walk(child, scope, in_def)

    yield from walk(tree, [], False)
