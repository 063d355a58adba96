"""The import graph of the tree, pinned.

Every module under featureplane/, cli/, flows/, operators/, serving/, batch/ and examples/
is parsed (never imported) and named as installed (flows/x.py is featureplane.flows.x).
Its imports, including those inside functions and `if TYPE_CHECKING:` blocks, must keep
the layering: the core (featureplane.* but the parts) on the ground floor importing no
part; operators under flows and batch; serving, flows and batch never importing each
other; only the cli importing the cli. Imports by dotted string would hide an edge from
this check, so there are none; and the imports that run when a module loads form no loop.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FOLDERS = {
    "featureplane": "featureplane",
    "cli": "featureplane.cli",
    "flows": "featureplane.flows",
    "operators": "featureplane.operators",
    "serving": "featureplane.serving",
    "batch": "featureplane.batch",
    "examples": "featureplane.examples",
}
PARTS = ("cli", "flows", "operators", "serving", "batch", "examples")
# What each layer must never import (every part but the cli also stays off the cli).
FORBIDDEN = {
    "core": {"cli", "flows", "operators", "serving", "batch", "examples"},
    "operators": {"cli", "flows", "serving", "batch"},
    "serving": {"cli", "flows", "operators", "batch"},
    "flows": {"cli", "serving", "batch"},
    "batch": {"cli", "flows", "serving"},
    "examples": {"cli", "flows", "operators", "serving", "batch"},
    "cli": set(),
}
# Imports by dotted string that are not an edge of our graph, with the reason.
DYNAMIC_ALLOWED = {
    # A spec's `on_demand: "module:function"` names the user's function; it is loaded
    # at start-up by that name. It is the user's code, never one of our modules.
    "featureplane.serving.ondemand": 1,
}
HEAVY = ("bytewax", "aiohttp", "redis", "confluent_kafka", "aioboto3", "botocore", "pyarrow")


@dataclass(frozen=True)
class Import:
    source: str  # the importing module
    target: str  # the imported module (or the package a name was taken from)
    line: int
    at_load: bool  # runs when the source is imported: module level, not TYPE_CHECKING


def modules(root: Path = ROOT) -> dict[str, Path]:
    """Installed module name -> file, for every module of ours."""
    found = {}
    for folder, package in FOLDERS.items():
        for path in sorted((root / folder).rglob("*.py")):
            parts = path.relative_to(root / folder).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join((package, *parts))] = path
    return found


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _walk(node: ast.AST, at_load: bool) -> Iterator[tuple[ast.AST, bool]]:
    """Every node below `node`, each with whether it runs when the module loads."""
    for child in ast.iter_child_nodes(node):
        if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda):
            yield child, at_load
            yield from _walk(child, False)
        elif isinstance(child, ast.If) and _is_type_checking(child.test):
            yield child, at_load
            for stmt in child.body:
                yield stmt, False
                yield from _walk(stmt, False)
            for stmt in child.orelse:
                yield stmt, at_load
                yield from _walk(stmt, at_load)
        else:
            yield child, at_load
            yield from _walk(child, at_load)


def imports(name: str, source: str, known: Mapping[str, object]) -> list[Import]:
    """Every import statement of module `name`, resolved to absolute module names."""
    tree = ast.parse(source)
    is_package = any(other.startswith(f"{name}.") for other in known)
    found = []
    for node, at_load in _walk(tree, True):
        if isinstance(node, ast.Import):
            found += [Import(name, a.name, node.lineno, at_load) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the package (of) this module, up level - 1
                anchor = name.split(".")
                anchor = anchor[: len(anchor) - node.level + (1 if is_package else 0)]
                base = ".".join([*anchor, *([base] if base else [])])
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                target = sub if sub in known else base
                found.append(Import(name, target, node.lineno, at_load))
    return found


def dynamic_imports(source: str) -> list[int]:
    """Lines that import by a dotted string: importlib.import_module, __import__."""
    lines = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Call):
            func = node.func
            called = func.id if isinstance(func, ast.Name) else getattr(func, "attr", None)
            if called in ("import_module", "__import__"):
                lines.append(node.lineno)
        elif isinstance(node, ast.ImportFrom) and node.module == "importlib":
            lines += [node.lineno for a in node.names if a.name == "import_module"]
    return sorted(lines)


def layer(module: str) -> str | None:
    """The layer of a module of ours, None for anything else."""
    head, _, rest = module.partition(".")
    if head != "featureplane":
        return None
    part = rest.split(".")[0]
    return part if part in PARTS else "core"


def layer_violations(graph: list[Import]) -> list[str]:
    bad = []
    for imp in graph:
        src, dst = layer(imp.source), layer(imp.target)
        if src is not None and dst in FORBIDDEN[src]:
            bad.append(f"{imp.source}:{imp.line} ({src}) imports {imp.target} ({dst})")
        if imp.target.split(".")[0] in PARTS:
            bad.append(f"{imp.source}:{imp.line} imports bare {imp.target!r}")
    return list(dict.fromkeys(bad))  # one line per statement, however many names it takes


def cycles(graph: list[Import]) -> list[list[str]]:
    """The import loops among modules of ours (strongly connected components, Tarjan)."""
    edges: dict[str, set[str]] = {}
    for imp in graph:
        if imp.at_load and layer(imp.target) is not None:
            edges.setdefault(imp.source, set()).add(imp.target)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    loops = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(edges.get(node, ())):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1 or node in edges.get(node, ()):
                loops.append(sorted(component))

    for node in sorted(edges):
        if node not in index:
            visit(node)
    return loops


def _graph(sources: Mapping[str, str]) -> list[Import]:
    return [imp for name, text in sources.items() for imp in imports(name, text, sources)]


def _tree() -> dict[str, str]:
    return {name: path.read_text() for name, path in modules().items()}


def test_every_part_is_parsed() -> None:
    found = modules()
    for package in FOLDERS.values():
        assert package in found, f"{package} not found under {ROOT}"
    assert sum(layer(m) == "core" for m in found) >= 10
    assert len(found) >= 50


def test_the_core_imports_no_part_and_parts_keep_their_floors() -> None:
    found = layer_violations(_graph(_tree()))
    assert not found, "\n".join(found)


def test_tests_and_benches_import_the_parts_by_their_installed_names() -> None:
    """From the repository root `import serving` would still work, as a second copy of
    every module beside featureplane.serving; only the installed names are used."""
    bad = []
    for path in sorted([*(ROOT / "tests").rglob("*.py"), *(ROOT / "bench").rglob("*.py")]):
        for imp in imports("tests.x", path.read_text(), {}):
            if imp.target.split(".")[0] in PARTS:
                bad.append(f"{path.relative_to(ROOT)}:{imp.line} imports bare {imp.target!r}")
    assert not bad, "\n".join(bad)


def test_no_import_by_dotted_string() -> None:
    found = {name: dynamic_imports(text) for name, text in _tree().items()}
    found = {name: lines for name, lines in found.items() if lines}
    allowed = {name: n for name, n in DYNAMIC_ALLOWED.items() if name in found}
    assert {name: len(lines) for name, lines in found.items()} == allowed, found


def test_no_import_loops() -> None:
    found = cycles(_graph(_tree()))
    assert not found, "\n".join(" -> ".join(loop) for loop in found)


def test_the_checks_catch_what_they_look_for() -> None:
    """Each check fails on a small tree that breaks its rule (a check that cannot fail
    would pass the real tree too)."""
    tree = {
        "featureplane": "",
        "featureplane.spec": "from featureplane.serving import app\n",
        "featureplane.keys": "def f():\n    import featureplane.batch.load\n",
        "featureplane.types": "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n    from featureplane.flows.ingest import x\n",
        "featureplane.serving": "",
        "featureplane.serving.app": "from . import reader\n",
        "featureplane.serving.reader": "from featureplane.serving.app import App\n",
        "featureplane.operators.write": "import serving.app\nfrom ..flows import dataflow\n",
        "featureplane.flows.dataflow": "",
        "featureplane.flows.ingest": "",
        "featureplane.batch.load": "",
    }
    found = layer_violations(_graph(tree))
    assert any(
        v.startswith("featureplane.spec:1 (core) imports featureplane.serving.app") for v in found
    )
    assert any(
        v.startswith("featureplane.keys:2 (core) imports featureplane.batch.load") for v in found
    )
    assert any(
        v.startswith("featureplane.types:3 (core) imports featureplane.flows.ingest") for v in found
    )
    assert any("imports bare 'serving.app'" in v for v in found)
    assert any("(operators) imports featureplane.flows.dataflow" in v for v in found)
    assert cycles(_graph(tree)) == [["featureplane.serving.app", "featureplane.serving.reader"]]
    # An import inside a function or under TYPE_CHECKING does not run at load: no loop.
    lazy = {
        "featureplane.a": "import featureplane.b\n",
        "featureplane.b": "def f():\n    import featureplane.a\n",
    }
    assert cycles(_graph(lazy)) == []
    dyn = "import importlib\nimportlib.import_module('x')\n__import__('y')\nfrom importlib import import_module\n"
    assert dynamic_imports(dyn) == [2, 3, 4]
    assert _loaded_after("import redis.asyncio") == ["redis"]


def _loaded_after(code: str) -> list[str]:
    probe = f"import sys\n{code}\nprint('loaded:', *(m for m in {HEAVY!r} if m in sys.modules))"
    out = subprocess.run(
        [sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, check=False
    )
    assert out.returncode == 0, out.stdout + out.stderr
    return out.stdout.splitlines()[-1].split()[1:]


def test_the_core_loads_no_runtime_library() -> None:
    """The spec and errors (all `featureplane validate` needs) load none of the libraries
    of ingestion, serving or the stores."""
    assert _loaded_after("import featureplane.spec, featureplane.errors") == []


def test_validate_loads_no_runtime_library() -> None:
    code = (
        "from featureplane.cli import main\n"
        f"assert main(['validate', {str(ROOT / 'examples')!r}]) == 0\n"
    )
    assert _loaded_after(code) == []
