"""The layers point one way: stores <- extractors, recipes <- flows, and no import cycle between project modules.

Every module of the four packages is parsed with `ast`; every import counts, at module level, inside functions and
under `if TYPE_CHECKING:`, because a lazy import is still a dependency of the layer that writes it.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("stores", "extractors", "recipes", "flows")
FORBIDDEN = {
    "stores": {"recipes", "extractors", "flows"},
    "extractors": {"flows"},
    "recipes": {"flows"},
}
"""Which top-level packages each layer may never import."""


def project_modules() -> dict[str, Path]:
    """Dotted module name -> file, for every .py file under the project packages (a package is its __init__)."""
    modules = {}
    for package in PACKAGES:
        for path in sorted((REPO / package).rglob("*.py")):
            parts = list(path.relative_to(REPO).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            modules[".".join(parts)] = path
    return modules


def imports_of(name: str, path: Path, modules: dict[str, Path]) -> list[tuple[str, int]]:
    """The project modules `name` imports anywhere in its file, with the line of each import.

    `from a.b import c` names `a.b.c` when that is a module, else `a.b`; relative imports are resolved."""
    is_package = path.name == "__init__.py"
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = name.split(".") if is_package else name.split(".")[:-1]
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            targets = [
                f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names
            ]
        else:
            continue
        for target in targets:
            # `import a.b.c` depends on the deepest project module it names
            while target and target not in modules:
                target = target.rpartition(".")[0]
            if target and target.split(".")[0] in PACKAGES:
                found.append((target, node.lineno))
    return sorted(set(found))


@pytest.fixture(scope="module")
def graph() -> dict[str, list[tuple[str, int]]]:
    modules = project_modules()
    return {name: imports_of(name, path, modules) for name, path in modules.items()}


def test_the_walk_sees_every_kind_of_import(graph):
    """The walker itself: it finds imports inside functions and under TYPE_CHECKING (flows/cli_context.py has both
    kinds of `stores.workspace` import), so the layer and cycle checks below cannot pass by seeing nothing."""
    assert len(graph) > 40
    lines = [line for target, line in graph["flows.cli_context"] if target == "stores.workspace"]
    assert len(lines) >= 2, graph["flows.cli_context"]


def test_lower_layers_never_import_higher_ones(graph):
    """stores/ imports nothing from recipes/, extractors/ or flows/; recipes/ and extractors/ import nothing from
    flows/ (the lowest layer that owns the data holds a helper both sides need)."""
    bad = [
        f"{REPO.name}/{name.replace('.', '/')}.py:{line} imports {target}"
        for name, targets in graph.items()
        for target, line in targets
        if target.split(".")[0] in FORBIDDEN.get(name.split(".")[0], set())
    ]
    assert not bad, "imports against the layers:\n" + "\n".join(sorted(bad))


def cycles(graph: dict[str, list[tuple[str, int]]]) -> list[list[str]]:
    """Strongly connected components of more than one module (or a module importing itself), by Tarjan."""
    edges = {name: sorted({t for t, _ in targets if t in graph}) for name, targets in graph.items()}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1 or v in edges[v]:
                found.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def test_cycle_finder_finds_a_cycle():
    """The cycle finder reports a two-module cycle and leaves an acyclic chain alone."""
    fake = {"a": [("b", 1)], "b": [("a", 1)], "c": [("a", 1)]}
    assert cycles(fake) == [["a", "b"]]


def test_no_import_cycle_between_project_modules(graph):
    """No group of project modules imports each other in a circle, lazily or not."""
    found = cycles(graph)
    detail = [
        " <-> ".join(c)
        + "\n    "
        + "\n    ".join(f"{m} imports {t} (line {line})" for m in c for t, line in graph[m] if t in c)
        for c in found
    ]
    assert not found, "import cycles:\n" + "\n".join(detail)


HEAVY = ("lancedb", "pandas", "torch", "ray", "prefect", "transformers", "stores.workspace")
PROBE = """
import json, sys
from click.testing import CliRunner
from flows.cli import cli
result = CliRunner().invoke(cli, sys.argv[1:], obj={})
print(json.dumps({"exit": result.exit_code, "output": result.output,
                  "loaded": [m for m in sys.argv[0].split(",") if m in sys.modules]}))
"""


def _probe(*args: str, heavy: tuple[str, ...]) -> dict:
    """Run the CLI in a fresh interpreter and report which of `heavy` it imported."""
    import json
    import subprocess
    import sys

    code = PROBE.replace("sys.argv[0]", repr(",".join(heavy)))
    done = subprocess.run(
        [sys.executable, "-c", code, *args], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_help_and_usage_errors_import_nothing_heavy():
    """`mmfeat --help`, a sub-command's --help and a usage error load no LanceDB, pandas, torch, Ray, Prefect or
    transformers: the CLI imports them inside the commands that need them (issue 13: a CLI that starts fast)."""
    for args in (["--help"], ["encode", "--help"], ["forget", "user"], ["no-such-command"]):
        out = _probe(*args, heavy=HEAVY)
        assert out["loaded"] == [], (args, out)
    assert "Commands:" in _probe("--help", heavy=HEAVY)["output"]


def test_sql_reads_the_workspace_without_lancedb(tmp_path):
    """`mmfeat sql` lists and reads the workspace's tables through pylance alone: LanceDB is never imported."""
    import lance
    import pyarrow as pa

    root = tmp_path / "ws"
    root.mkdir()
    lance.write_dataset(pa.table({"item_id": ["a", "b", "c"]}), str(root / "items.lance"))
    out = _probe("--workspace", str(root), "sql", "select count(*) AS n from items", heavy=("lancedb",))
    assert out["exit"] == 0 and out["output"].split() == ["n", "3"], out
    assert out["loaded"] == [], out
