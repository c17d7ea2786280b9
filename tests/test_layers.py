"""The house has no circles: each layer imports only the layers below it (docs/decisions.md).

Every ``import`` counts, including those inside functions: a lazy import is still a
dependency, it only moves the cost.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "src" / "ciss"
LAYERS = {
    "errors": 0, "tables": 0, "timing": 0, "progress": 0, "failpoints": 0, "hints": 0,
    "data": 1, "models": 1,
    "store": 2,
    "engines": 3,
    "analysis": 4, "updater": 4, "exporters": 4,
    "runtime": 5,
    "demo": 6, "benchmark": 6,
    "cli": 7, "__main__": 8,
}
# inside layer 4, packages may use one another only in this direction
SIDEWAYS = {("updater", "analysis"), ("exporters", "analysis")}


def unit(module: str) -> str:
    return module.split(".")[1] if "." in module else module


def imports() -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    for path in ROOT.rglob("*.py"):
        rel = path.relative_to(ROOT.parent).with_suffix("")
        name = ".".join(rel.parts).removesuffix(".__init__")
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith(
                    "ciss."):
                found.add(node.module)
            elif isinstance(node, ast.Import):
                found |= {a.name for a in node.names if a.name.startswith("ciss.")}
        out[name] = found
    return out


def test_every_unit_has_a_layer():
    units = {unit(m) for m in imports() if m != "ciss"}
    assert units <= set(LAYERS), units - set(LAYERS)


def test_imports_look_only_down():
    bad = []
    for mod, targets in imports().items():
        if mod == "ciss":
            continue
        src = unit(mod)
        for t in targets:
            dst = unit(t)
            if dst == src or t == mod:
                continue
            if LAYERS[dst] > LAYERS[src] or (LAYERS[dst] == LAYERS[src]
                                             and (src, dst) not in SIDEWAYS):
                bad.append(f"{mod} -> {t}")
    assert not bad, "imports that look up or sideways:\n" + "\n".join(sorted(bad))


def test_no_module_level_cycles():
    graph = imports()
    seen, stack, cycles = set(), [], []

    def visit(m):
        if m in stack:
            cycles.append(stack[stack.index(m):] + [m])
            return
        if m in seen or m not in graph:
            return
        seen.add(m)
        stack.append(m)
        for t in graph[m] - {m}:  # cli/__init__ names its own submodules
            visit(t)
        stack.pop()

    for m in graph:
        visit(m)
    assert not cycles, cycles
