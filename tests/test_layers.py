"""The architecture holds: imports go downward, and dask's internals stay where they are read.

Every ``import`` in the package (at module level or inside a function) is an
edge; the rules below are the layering ``docs/design.md`` describes.  A rule's
exceptions are listed by name with the reason, so a new one fails here.
"""

from __future__ import annotations

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1] / "dask_sweep"
DASK_GRAPH = ("dask._task_spec", "dask.highlevelgraph", "dask.blockwise", "dask.layers",
              "dask.array._array_expr", "dask._expr")


def _module(path: pathlib.Path) -> str:
    rel = path.relative_to(ROOT.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _is_module(name: str) -> bool:
    rel = pathlib.Path(*name.split("."))
    return (ROOT.parent / rel).with_suffix(".py").exists() or (ROOT.parent / rel).is_dir()


def _imports() -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    for path in ROOT.rglob("*.py"):
        mod = _module(path)
        names: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and not node.level:
                # ``from pkg import mod`` depends on mod; ``from pkg import name`` on pkg
                for a in node.names:
                    full = f"{node.module}.{a.name}"
                    names.add(full if _is_module(full) else node.module)
                    names.add(full)
            elif isinstance(node, ast.ImportFrom) and node.level:
                base = mod.split(".")[: -node.level + (path.name == "__init__.py")]
                names.add(".".join([*base, node.module] if node.module else base))
            elif isinstance(node, ast.Import):
                names.update(a.name for a in node.names)
        out[mod] = names
    return out


IMPORTS = _imports()
MODULES = set(IMPORTS)


def _internal(mod: str) -> set[str]:
    return {n for n in IMPORTS[mod] if n in MODULES and n != mod}


def test_no_import_circles():
    graph = {m: _internal(m) for m in MODULES}
    cycles = set()
    for start in graph:
        stack, seen = [(start, (start,))], set()
        while stack:
            node, path = stack.pop()
            for nxt in graph[node]:
                if nxt == start and len(path) > 1:
                    cycles.add(tuple(sorted(path)))
                elif nxt not in seen and not nxt.startswith(path[0] + "."):
                    seen.add(nxt)
                    stack.append((nxt, (*path, nxt)))
    # a package's __init__ re-exporting its modules, which import siblings, is not a circle
    cycles = {c for c in cycles if not any(c[0] == p.rsplit(".", 1)[0] for p in c[1:])}
    assert not cycles, "\n".join(" -> ".join(c) for c in sorted(cycles, key=len))


@pytest.mark.parametrize("layer", ["dask_sweep.plan", "dask_sweep.runtime"])
def test_plan_and_runtime_know_no_dask_graphs_and_no_layer_above(layer):
    above = ("dask_sweep.patterns", "dask_sweep.integration", "dask_sweep.emit",
             "dask_sweep.passes", "dask_sweep.dsl", "dask_sweep.ndimage", "dask_sweep.io")
    for mod in (m for m in MODULES if m.startswith(layer)):
        bad = [n for n in IMPORTS[mod] if n.startswith(DASK_GRAPH) or n.startswith(above)]
        assert not bad, (mod, bad)


def test_the_multipass_algorithms_know_no_dask_and_no_front_end():
    """label's and the EDT's slab steps are numpy/numba/scipy/cc3d only: both front ends
    (the drop-ins' dask tasks, the DSL's passes) drive the same steps."""
    above = ("dask_sweep.patterns", "dask_sweep.integration", "dask_sweep.emit",
             "dask_sweep.passes", "dask_sweep.dsl", "dask_sweep.ndimage")
    mods = [m for m in MODULES if m.startswith("dask_sweep.multipass")]
    assert len(mods) >= 5
    for mod in mods:
        bad = [n for n in IMPORTS[mod] if n == "dask" or n.startswith(("dask.", *above))]
        # the storage layer's byte accounting (a leaf) counts what spilled tables write
        bad = [n for n in bad if not n.startswith("dask_sweep.io.")]
        io = [n for n in _internal(mod) if n.startswith("dask_sweep.io")]
        assert not bad and set(io) <= {"dask_sweep.io.accounting"}, (mod, bad, io)


def test_the_dsl_does_not_stand_on_the_drop_ins():
    for mod in (m for m in MODULES if m.startswith("dask_sweep.dsl")):
        bad = [n for n in _internal(mod) if n.startswith("dask_sweep.ndimage")]
        assert not bad, (mod, bad)


def test_the_dsl_objects_import_nothing_of_the_compiler():
    bad = [n for n in _internal("dask_sweep.dsl.core")
           if n.startswith("dask_sweep.dsl.") and n != "dask_sweep.dsl.core"]
    assert not bad, bad


def test_io_is_a_leaf():
    """The storage layer imports nothing of the plugin: what it needs of the active
    sweep is handed in (``io/host.py``)."""
    above = ("dask_sweep.patterns", "dask_sweep.integration", "dask_sweep.emit",
             "dask_sweep.passes", "dask_sweep.dsl", "dask_sweep.ndimage")
    for mod in (m for m in MODULES if m.startswith("dask_sweep.io")):
        bad = [n for n in _internal(mod) if n.startswith(above)]
        assert not bad, (mod, bad)


# modules outside patterns/ and emit/ that touch dask's internals, each with what and why
HOOKS: dict[str, tuple[str, str]] = {
    "dask_sweep.integration.expr": (
        "dask._expr",
        "wraps dask._expr.optimize_until, the one path every expression-mode compute takes "
        "(dask 2026.8 has no hook for array expressions)"),
}


def test_every_listed_hook_still_needs_its_exception():
    stale = [m for m, (name, _) in HOOKS.items() if name not in IMPORTS.get(m, ())]
    assert not stale, f"exceptions no longer needed, still listed in HOOKS: {stale}"


def test_dask_graph_internals_only_where_graphs_are_read_or_written():
    """Graphs are read in patterns/ and written in emit/; the hooks in integration/ call
    them (and wrap one dask function, listed in HOOKS)."""
    allowed = ("dask_sweep.patterns", "dask_sweep.emit")
    for mod in MODULES:
        if mod.startswith(allowed):
            continue
        bad = [n for n in IMPORTS[mod] if n.startswith(DASK_GRAPH)
               and n != HOOKS.get(mod, ("",))[0]]
        assert not bad, (mod, bad)
