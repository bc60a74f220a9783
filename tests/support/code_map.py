"""The code map of docs/architecture.md, generated from the package's module docstrings.

    python -m tests.support.code_map          # print the map
    python -m tests.support.code_map --write  # replace the map in docs/architecture.md

Every module of the package is a row (an empty `__init__.py` is not a module worth a row), in path
order, with its docstring's summary: the first paragraph, its lines joined.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "dist_cnn"
PAGE = ROOT / "docs" / "architecture.md"
START = "<!-- code map: generated from the module docstrings by tests/support/code_map.py -->"
END = "<!-- end of code map -->"


def summary(path: Path) -> str | None:
    doc = ast.get_docstring(ast.parse(path.read_text(), filename=str(path)))
    if not doc:
        return None
    return " ".join(line.strip() for line in doc.strip().split("\n\n")[0].splitlines())


def modules(package: Path = PACKAGE) -> list[Path]:
    paths = sorted(package.rglob("*.py"), key=lambda p: p.relative_to(package.parent).as_posix())
    return [p for p in paths if not (p.name == "__init__.py" and not p.read_text().strip())]


def render(package: Path = PACKAGE) -> str:
    rows = ["| module | what it owns |", "|---|---|"]
    for path in modules(package):
        text = _cell(summary(path) or "")
        rows.append(f"| `{path.relative_to(package.parent).as_posix()}` | {text} |")
    return "\n".join(rows)


def _cell(text: str) -> str:
    """Text for a table cell: a pipe outside a code span escaped (mkdocs keeps those inside as they are)."""
    parts = text.split("`")
    return "`".join(p.replace("|", "\\|") if i % 2 == 0 else p for i, p in enumerate(parts))


def block_in(page_text: str) -> str:
    """The map as the page holds it, between the START and END markers."""
    head, start, rest = page_text.partition(START)
    body, end, _ = rest.partition(END)
    if not start or not end:
        raise ValueError(f"{PAGE.name} lacks the markers {START!r} ... {END!r}")
    return body.strip("\n")


def write(page: Path = PAGE) -> None:
    text = page.read_text()
    block_in(text)  # the markers are there
    head, _, rest = text.partition(START)
    _, _, tail = rest.partition(END)
    page.write_text(f"{head}{START}\n{render()}\n{END}{tail}")


if __name__ == "__main__":
    if sys.argv[1:] == ["--write"]:
        write()
    else:
        print(render())
