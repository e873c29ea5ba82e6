"""The package's shape, for reviews: its internal import graph, and its largest classes and functions.

python scripts/code_shape.py [--top N]
"""

from __future__ import annotations

import argparse
import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "asr"


def module_name(path: Path) -> str:
    return ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts).removesuffix(".__init__")


def imports(tree: ast.AST) -> set[str]:
    """The asr modules a module imports (``from asr.x import y`` counts as asr.x.y when that is a module)."""
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "asr":
            for alias in node.names:
                full = f"{node.module}.{alias.name}"
                as_path = PACKAGE.parent / full.replace(".", "/")
                found.add(full if as_path.with_suffix(".py").exists() or as_path.is_dir() else node.module)
        elif isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name.split(".")[0] == "asr"}
    return found


def sizes(node: ast.AST, prefix: str) -> list[tuple[int, str, str]]:
    """(lines, kind, qualified name) of every class and function in ``node``."""
    rows = []
    for child in ast.iter_child_nodes(node):
        if isinstance(child, ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
            kind = "class" if isinstance(child, ast.ClassDef) else "def"
            rows.append((child.end_lineno - child.lineno + 1, kind, f"{prefix}.{child.name}"))
            rows += sizes(child, f"{prefix}.{child.name}")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--top", type=int, default=12)
    args = parser.parse_args()
    rows = []
    print("import graph (module -> asr modules it imports):")
    for path in sorted(PACKAGE.rglob("*.py")):
        tree = ast.parse(path.read_text())
        module = module_name(path)
        print(f"  {module:32} -> {', '.join(sorted(imports(tree))) or '-'}")
        rows += sizes(tree, module)
    for kind in ("class", "def"):
        print(f"\nlargest {'classes' if kind == 'class' else 'functions and methods'} (lines):")
        for lines, _, name in sorted((r for r in rows if r[1] == kind), reverse=True)[: args.top]:
            print(f"  {lines:5}  {name}")


if __name__ == "__main__":
    main()
