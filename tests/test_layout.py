"""The house rules of docs/architecture.md, read from the source (no code is run).

- The modules of compressor/ and exporters/ form floors; a module imports only from its own part of its floor or
  from floors below it. Imports inside functions count too: a late import is still a dependency.
- No import circles.
- No function over 60 lines without a reason in its docstring ("Long because ...").
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# top floor first; each floor maps a part's name to the module prefixes it holds
FLOORS: list[dict[str, tuple[str, ...]]] = [
    {"cli": ("compressor.cli", "compressor.commands", "compressor.__main__")},
    {"api": ("compressor", "compressor.api")},
    # artifact writers read an ArtifactSource (plan + tensors), never the pipeline's state
    {"exporters": ("exporters",), "passes": ("compressor.pipeline", "compressor.passes", "compressor.state")},
    {"allocate": ("compressor.allocate",)},
    {"techniques": ("compressor.techniques",)},
    {"structure": ("compressor.structure",)},
    {"eval": ("compressor.eval",), "calibration": ("compressor.calibration",), "runtime": ("compressor.runtime",)},
    {"plan": ("compressor.plan",)},
    {"models": ("compressor.models",), "recipe": ("compressor.recipe", "compressor.schema")},
    {"quant": ("compressor.quant",)},
    {"base": ("compressor.errors", "compressor.version")},
]
MAX_FUNCTION_LINES = 60


def _modules() -> dict[str, Path]:
    mods = {}
    for top in ("compressor", "exporters"):
        for path in sorted((ROOT / top).rglob("*.py")):
            name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
            mods[name.removesuffix(".__init__")] = path
    return mods


def _imports(name: str, path: Path, mods: dict[str, Path]) -> set[str]:
    """The project modules `name` imports (a `from package import name` counts as the submodule if it is one)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(parts + ([base] if base else []))
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                found.add(sub if sub in mods else base)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return {m for m in found if m in mods and m != name}


def _place(module: str) -> tuple[int, str]:
    """(floor index, part) of the longest prefix that holds `module`."""
    best = None
    for i, floor in enumerate(FLOORS):
        for part, prefixes in floor.items():
            for p in prefixes:
                if (module == p or module.startswith(p + ".")) and (best is None or len(p) > best[0]):
                    best = (len(p), i, part)
    assert best is not None, f"{module} is on no floor: add it to FLOORS in tests/test_layout.py and the docs"
    return best[1], best[2]


def test_every_import_goes_down():
    mods = _modules()
    wrong = []
    for name, path in mods.items():
        floor, part = _place(name)
        for dep in sorted(_imports(name, path, mods)):
            dep_floor, dep_part = _place(dep)
            if dep_floor < floor or (dep_floor == floor and dep_part != part):
                wrong.append(f"{name} ({part}) imports {dep} ({dep_part})")
    assert not wrong, "imports that go up or sideways:\n" + "\n".join(wrong)


def test_no_import_circles():
    mods = _modules()
    graph = {name: _imports(name, path, mods) for name, path in mods.items()}
    state: dict[str, int] = {}  # 1 on the current path, 2 done

    def visit(node: str, trail: list[str]) -> list[str] | None:
        state[node] = 1
        for dep in sorted(graph[node]):
            if state.get(dep) == 1:
                return trail[trail.index(dep) :] + [dep] if dep in trail else [node, dep]
            if dep not in state and (cycle := visit(dep, trail + [dep])):
                return cycle
        state[node] = 2
        return None

    for name in sorted(graph):
        if name not in state:
            cycle = visit(name, [name])
            assert cycle is None, "import circle: " + " -> ".join(cycle)


def test_functions_are_short():
    long = []
    for path in _modules().values():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                doc = ast.get_docstring(node) or ""
                if lines > MAX_FUNCTION_LINES and "Long because" not in doc:
                    long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({lines} lines)")
    assert not long, "functions over 60 lines (split them, or say 'Long because ...' in the docstring):\n" + "\n".join(
        long
    )
