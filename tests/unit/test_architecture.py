"""The package's structure, read from the source (tests/support/import_graph.py, ast).

Which package may import which is import-linter's layers contract (pyproject.toml, `lint-imports` in CI).
What it cannot say is checked here:
  (a) no import cycle among the package's modules (the contract only orders the packages);
  (b) no import of a package module inside a function (the usual way to hide a cycle);
  (c) no module uses another module's private (`_name`) names: a boundary crossed that way is not shown.
  (d) no isinstance/issubclass on a data source outside dist_cnn/data: consumers use its interface.
Each failure names the file, line and statement to change.
"""

import ast
import functools
import textwrap
from pathlib import Path

import pytest

from tests.support.common import ROOT
from tests.support.import_graph import ImportGraph

PACKAGE = "dist_cnn"
# Function-local imports kept on purpose, as {(module, imported module): why}. Empty: none is needed.
LOCAL_IMPORTS_ALLOWED: dict[tuple[str, str], str] = {}
# Private names used across modules on purpose, as {(module, defining module, name): why}. Empty: none is.
PRIVATE_USES_ALLOWED: dict[tuple[str, str, str], str] = {}


@functools.lru_cache(maxsize=1)
def graph() -> ImportGraph:
    return ImportGraph.of_package(ROOT / PACKAGE)


def test_no_import_cycle():
    g = graph()
    edges, problems = g.edges(), []
    for comp, cycle in zip(g.components(), g.cycles()):
        chain = " -> ".join([cycle[0].src] + [imp.dst for imp in cycle])
        inside = sorted(
            (imp for a in comp for b in comp for imp in edges[a].get(b, [])),
            key=lambda imp: (imp.path, imp.line, imp.dst),
        )
        problems.append(
            f"import cycle among {len(comp)} modules ({', '.join(comp)}), e.g. {chain}:\n"
            + "".join(f"    {imp.src} -> {imp.dst} at {imp.where()}\n" for imp in cycle)
            + "  all imports inside this group:\n"
            + "".join(f"    {imp.src} -> {imp.dst} at {imp.where()}\n" for imp in inside)
        )
    if problems:
        pytest.fail("\n".join(problems), pytrace=False)


def test_no_module_uses_another_modules_private_names():
    uses = graph().private_uses()
    bad = [u for u in uses if (u.src, u.dst, u.name) not in PRIVATE_USES_ALLOWED]
    if bad:
        pytest.fail(
            "private names used outside their module (make the name public, or move the code that needs it):\n"
            + "\n".join(f"  {u.where()}" for u in bad),
            pytrace=False,
        )
    stale = set(PRIVATE_USES_ALLOWED) - {(u.src, u.dst, u.name) for u in uses}
    assert not stale, f"PRIVATE_USES_ALLOWED lists uses that are gone; remove them: {sorted(stale)}"


def test_no_function_local_imports_of_the_package():
    bad = [
        imp for imp in graph().imports if imp.function is not None and (imp.src, imp.dst) not in LOCAL_IMPORTS_ALLOWED
    ]
    if bad:
        pytest.fail(
            "imports of package modules inside functions (move them to the top of the module; a cycle "
            "they hide shows in test_no_import_cycle):\n" + "\n".join(f"  {imp.where()}" for imp in bad),
            pytrace=False,
        )


def test_the_graph_sees_the_package():
    g = graph()
    assert {f"{PACKAGE}.train.trainer", f"{PACKAGE}.data.loader", f"{PACKAGE}.cli"} <= g.modules
    trainer_imports = {imp.dst for imp in g.imports if imp.src == f"{PACKAGE}.train.trainer"}
    assert {f"{PACKAGE}.data.loader", f"{PACKAGE}.train.optim", f"{PACKAGE}.train.checkpoint"} <= trainer_imports


# ------------------------------------------------------------------------------ the graph builder itself


def write_package(tmp_path, files: dict[str, str]):
    for rel, text in files.items():
        path = tmp_path / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))
    return ImportGraph.of_package(tmp_path / "pkg")


def test_builder_resolves_every_import_form(tmp_path):
    g = write_package(
        tmp_path,
        {
            "pkg/__init__.py": "",
            "pkg/errors.py": "import os\n",
            "pkg/a.py": """\
            import pkg.errors
            import pkg.sub.deep as deep
            from . import b
            from .sub.deep import thing
            from pkg.sub import leaf, NAME
            from .errors import *
            import numpy, os.path
            """,
            "pkg/b.py": "from pkg import errors\n",
            "pkg/sub/__init__.py": "NAME = 1\nfrom .. import errors\n",
            "pkg/sub/deep.py": "from ..b import x\nfrom . import leaf\n",
            "pkg/sub/leaf.py": "",
        },
    )
    assert g.modules == {"pkg", "pkg.errors", "pkg.a", "pkg.b", "pkg.sub", "pkg.sub.deep", "pkg.sub.leaf"}
    by_src = {}
    for imp in g.imports:
        by_src.setdefault(imp.src, set()).add((imp.line, imp.dst))
    assert by_src["pkg.a"] == {
        (1, "pkg.errors"),
        (2, "pkg.sub.deep"),
        (3, "pkg.b"),
        (4, "pkg.sub.deep"),
        (5, "pkg.sub.leaf"),
        (5, "pkg.sub"),
        (6, "pkg.errors"),
    }
    assert by_src["pkg.b"] == {(1, "pkg.errors")}
    assert by_src["pkg.sub"] == {(2, "pkg.errors")}
    assert by_src["pkg.sub.deep"] == {(1, "pkg.b"), (2, "pkg.sub.leaf")}
    assert "pkg.errors" not in by_src and g.components() == []


def test_builder_finds_cycles_and_local_imports(tmp_path):
    g = write_package(
        tmp_path,
        {
            "pkg/__init__.py": "",
            "pkg/a.py": "from . import b\n",
            "pkg/b.py": "def f():\n    from .c import g\n",
            "pkg/c.py": "import pkg.a\nclass K:\n    async def m(self):\n        from . import d\n",
            "pkg/d.py": "from . import d\n",  # imports itself
            "pkg/e.py": "from . import a\n",  # depends on the cycle, not part of it
        },
    )
    assert g.components() == [["pkg.a", "pkg.b", "pkg.c"], ["pkg.d"]]
    cycle = g.cycles()[0]
    assert [(i.src, i.dst) for i in cycle] == [("pkg.a", "pkg.b"), ("pkg.b", "pkg.c"), ("pkg.c", "pkg.a")]
    assert cycle[1].where() == "pkg/b.py:2 in f(): from .c import g"
    local = sorted((i.src, i.function, i.dst) for i in g.imports if i.function)
    assert local == [("pkg.b", "f", "pkg.c"), ("pkg.c", "K.m", "pkg.d")]


def test_builder_finds_private_names_used_across_modules(tmp_path):
    g = write_package(
        tmp_path,
        {
            "pkg/__init__.py": "",
            "pkg/a.py": "_x = 1\n__all__ = []\ndef _f(): return _x\n",
            "pkg/b.py": """\
            from pkg.a import _x, __all__
            from . import a
            import pkg.a as alias
            a._f()
            alias._x
            a.public
            """,
            "pkg/c.py": "from .a import _f as f\n",
        },
    )
    found = [(u.src, u.dst, u.name, u.line) for u in g.private_uses()]
    assert found == [
        ("pkg.b", "pkg.a", "_x", 1),
        ("pkg.b", "pkg.a", "_f", 4),
        ("pkg.b", "pkg.a", "_x", 5),
        ("pkg.c", "pkg.a", "_f", 1),
    ]


# ------------------------------------------------------------------------------ one data interface


def data_source_forks(package_dir, data_package: str = "data") -> list[str]:
    """`isinstance`/`issubclass` tests against a class or alias of the data package (e.g. FolderIndex,
    InMemory, StreamSource) in any module outside it: consumers use the DataSource interface only."""
    package_dir = Path(package_dir)
    inside = package_dir / data_package
    names = set()
    for path in inside.rglob("*.py"):
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.ClassDef):
                names.add(node.name)
            elif isinstance(node, ast.Assign) and isinstance(node.value, ast.Name) and node.value.id in names:
                names.update(t.id for t in node.targets if isinstance(t, ast.Name))  # Dataset = InMemory

    def named(node) -> set[str]:
        if isinstance(node, ast.Tuple):
            return set().union(*(named(e) for e in node.elts))
        if isinstance(node, ast.Attribute):
            return {node.attr}
        return {node.id} if isinstance(node, ast.Name) else set()

    found = []
    for path in sorted(package_dir.rglob("*.py")):
        if inside in path.parents:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Name)
                and node.func.id in ("isinstance", "issubclass")
                and len(node.args) == 2
                and named(node.args[1]) & names
            ):
                found.append(f"{path.relative_to(package_dir.parent)}:{node.lineno}: {ast.unparse(node)}")
    return found


def test_no_data_source_isinstance_outside_the_data_package():
    bad = data_source_forks(ROOT / PACKAGE)
    if bad:
        pytest.fail(
            "tests on the kind of a data source outside dist_cnn/data (use the DataSource interface, "
            "dist_cnn/data/source.py):\n" + "\n".join(f"  {b}" for b in bad),
            pytrace=False,
        )


def test_the_data_source_rule_finds_a_fork(tmp_path):
    write_package(
        tmp_path,
        {
            "pkg/__init__.py": "",
            "pkg/data/__init__.py": "",
            "pkg/data/stream.py": "class FolderIndex:\n    pass\nAlias = FolderIndex\n",
            "pkg/data/memory.py": "def f(x):\n    return isinstance(x, FolderIndex)\n",  # inside: allowed
            "pkg/train.py": "from pkg.data import stream\ndef g(d):\n    return isinstance(d, (int, stream.Alias))\n",
            "pkg/api.py": "def h(d):\n    return isinstance(d, str)\n",
        },
    )
    assert data_source_forks(tmp_path / "pkg") == ["pkg/train.py:3: isinstance(d, (int, stream.Alias))"]
