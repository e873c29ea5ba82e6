"""The package's layering, checked on its source: entry points are thin and do not import each other, the data
package does not know the model, and no library module imports a benchmark."""

import ast
from pathlib import Path

import pytest

import asr

PACKAGE = Path(asr.__file__).parent
ENTRY_POINTS = {
    "asr.train",
    "asr.evaluate",
    "asr.bench",
    "asr.transcribe",
    "asr.export",
    "asr.lm",
    "asr.data.__main__",
    "asr.data.bench",
}
BENCHMARKS = {"asr.bench", "asr.data.bench"}


def asr_imports() -> dict[str, set[str]]:
    """Each module of the package -> the asr modules (or packages) it imports, by their dotted names."""
    graph = {}
    for path in PACKAGE.rglob("*.py"):
        module = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts).removesuffix(".__init__")
        names = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("asr"):
                names |= {node.module, *(f"{node.module}.{a.name}" for a in node.names)}
            elif isinstance(node, ast.Import):
                names |= {a.name for a in node.names if a.name.startswith("asr")}
        graph[module] = names
    return graph


GRAPH = asr_imports()


def test_the_entry_points_exist():
    assert ENTRY_POINTS <= GRAPH.keys()


@pytest.mark.parametrize("module", sorted(ENTRY_POINTS))
def test_no_entry_point_imports_another(module):
    assert not GRAPH[module] & (ENTRY_POINTS - {module})


@pytest.mark.parametrize("module", sorted(m for m in GRAPH if m.startswith("asr.data")))
def test_the_data_package_does_not_import_the_model(module):
    assert not {name for name in GRAPH[module] if name.startswith(("asr.model", "asr.speedups"))}


@pytest.mark.parametrize("module", sorted(set(GRAPH) - BENCHMARKS))
def test_only_a_benchmark_command_imports_a_benchmark(module):
    assert not GRAPH[module] & BENCHMARKS
