"""The documentation site against the code: the code map of docs/architecture.md lists every module with
its docstring's summary, and the import layers it shows are import-linter's contract in pyproject.toml.
(`mkdocs build --strict` in CI checks the links.)"""

import re

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

from tests.support import code_map
from tests.support.common import ROOT


def test_every_module_has_a_docstring_summary():
    missing = [p.relative_to(ROOT).as_posix() for p in code_map.modules() if not code_map.summary(p)]
    assert not missing, f"modules without a docstring (its first paragraph is their line in the code map): {missing}"


def test_code_map_matches_the_modules():
    shown = code_map.block_in(code_map.PAGE.read_text())
    fresh = code_map.render()
    assert shown == fresh, (
        "docs/architecture.md's code map is out of date with the modules' docstrings; "
        "run `python -m tests.support.code_map --write`"
    )


def test_code_map_renderer_lists_modules_with_their_summaries(tmp_path):
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text('"""The sub package."""\n')
    (pkg / "a.py").write_text('"""First line,\ncontinued.\n\nDetails."""\nx = 1\n')
    (pkg / "b.py").write_text("x = 1\n")
    (pkg / "c.py").write_text('"""Pipes: a|b, `c|d`."""\n')
    assert code_map.render(pkg).splitlines()[2:] == [
        "| `pkg/a.py` | First line, continued. |",
        "| `pkg/b.py` |  |",
        "| `pkg/c.py` | Pipes: a\\|b, `c|d`. |",
        "| `pkg/sub/__init__.py` | The sub package. |",
    ]


def test_import_layers_shown_are_the_contract():
    contract = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"]
    layers = next(c for c in contract if c["type"] == "layers")["layers"]
    page = code_map.PAGE.read_text()
    shown = re.search(r"<!-- import layers -->\n```text\n(.*?)\n```", page, re.S)
    assert shown, "docs/architecture.md lacks the <!-- import layers --> block"
    assert shown.group(1).splitlines() == layers, "docs/architecture.md's import layers differ from pyproject.toml"


def test_repository_paths_in_the_docs_exist():
    """A file or folder of the repository named in backticks (`dist_cnn/...`, `tests/...`, `configs/...`)
    exists: a move or rename shows here. Outputs a run writes (`benchmarks/results/`) are not in git."""
    pattern = re.compile(r"`((?:dist_cnn|tests|benchmarks|tools|configs|launch|slurm|examples)/[\w./-]*)`")
    missing = []
    for page in sorted((ROOT / "docs").glob("*.md")) + [ROOT / "README.md"]:
        for path in pattern.findall(page.read_text()):
            if "..." in path or path.startswith("benchmarks/results/"):
                continue  # a pattern, or an output
            if not (ROOT / path).exists():
                missing.append(f"{page.relative_to(ROOT)}: {path}")
    assert not missing, "paths named in the docs that do not exist:\n" + "\n".join(missing)
