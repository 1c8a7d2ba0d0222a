"""Benchmarks and peer runners live in one bench package; product modules never import it."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "pertscale"
BENCH = PACKAGE / "bench"


def product_files() -> list[Path]:
    return sorted(p for p in PACKAGE.rglob("*.py") if BENCH not in p.parents)


def _is_bench(module: str) -> bool:
    return module == "pertscale.bench" or module.startswith("pertscale.bench.")


def _imports_bench(node: ast.AST, path: Path) -> bool:
    if isinstance(node, ast.Import):
        return any(_is_bench(a.name) for a in node.names)
    if not isinstance(node, ast.ImportFrom):
        return False
    module = node.module or ""
    if node.level:  # relative: resolve against the file's package
        package = list(path.relative_to(PACKAGE.parent).parts[:-1])
        base = package[:len(package) - node.level + 1]
        module = ".".join(base + ([module] if module else []))
    return _is_bench(module) or any(_is_bench(f"{module}.{a.name}") for a in node.names)


def test_product_modules_never_import_the_bench_package():
    assert BENCH.is_dir()
    found = []
    for path in product_files():
        tree = ast.parse(path.read_text(), filename=str(path))
        found += [f"{path.relative_to(PACKAGE.parent)}:{node.lineno}"
                  for node in ast.walk(tree) if _imports_bench(node, path)]
    assert not found, f"product modules import pertscale.bench: {found}"


def test_no_bench_or_peer_module_outside_the_bench_package():
    stray = [str(p.relative_to(PACKAGE.parent)) for p in product_files()
             if p.name.startswith("bench") or p.name.endswith("_peer.py")]
    assert not stray, f"benchmarks / peer runners outside pertscale/bench/: {stray}"
