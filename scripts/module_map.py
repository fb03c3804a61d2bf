"""The module map of ARCHITECTURE.md, generated from each module's docstring (first line).

`python scripts/module_map.py` rewrites the table between the markers; `--check` exits 1 when
the committed table differs from what the code says (tests/test_docs.py runs it), so adding,
moving or re-describing a module without the map is a failing test, not a drifting doc.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "ARCHITECTURE.md"
PACKAGES = ("finetune", "data_tools")
START, END = "<!-- module-map:start -->", "<!-- module-map:end -->"


def modules() -> list[Path]:
    return sorted(p.relative_to(ROOT) for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")
                  if "__pycache__" not in p.parts)


def job(path: Path) -> str | None:
    """The first line of the module's docstring, or None when it has none."""
    doc = ast.get_docstring(ast.parse((ROOT / path).read_text()))
    return doc.strip().splitlines()[0].strip() if doc and doc.strip() else None


def table() -> str:
    rows = ["| module | job |", "|---|---|"]
    for p in modules():
        rows.append(f"| `{p.as_posix()}` | {(job(p) or '(no docstring)').replace('|', '&#124;')} |")
    return "\n".join(rows)


def render(text: str) -> str:
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    return f"{head}{START}\n{table()}\n{END}{tail}"


def main(argv: list[str]) -> int:
    text = DOC.read_text()
    new = render(text)
    if "--check" in argv:
        if new != text:
            print("ARCHITECTURE.md's module map is out of date: run `python scripts/module_map.py`")
            return 1
        return 0
    DOC.write_text(new)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
