"""The import graph of hpcdd: layered, no cycles, phases are leaves (docs/architecture.md, "Layers").

Every import of an hpcdd module counts, at the top of a file or inside a function (a lazy import
still ties the two modules); imports under ``if TYPE_CHECKING:`` do not.
"""

from __future__ import annotations

import ast
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# lowest first; a module may import its own layer and the ones below, never one above
LAYERS = (
    ("foundation", {"hpcdd", "hpcdd.errors", "hpcdd.extras", "hpcdd.metrics", "hpcdd.augmentation", "hpcdd.layout",
                    "hpcdd.atomic", "hpcdd.decomposition", "hpcdd.manifest", "hpcdd.registry", "hpcdd.cli_util",
                    "hpcdd.parallel", "hpcdd.parallel.launcher", "hpcdd.parallel.ownership", "hpcdd.parallel.device",
                    "hpcdd.parallel.collectives", "hpcdd.parallel.watchdog",
                    "hpcdd.training", "hpcdd.training.rng", "hpcdd.training.acceleration"}),
    ("concepts, data, training, plumbing", {
        "hpcdd.config", "hpcdd.data", "hpcdd.models", "hpcdd.fused", "hpcdd.aggregators", "hpcdd.coherent",
        "hpcdd.events", "hpcdd.progress", "hpcdd.export", "hpcdd.factory", "hpcdd.table",
        "hpcdd.training.fit", "hpcdd.training.engine",
        "hpcdd.parallel.world", "hpcdd.parallel.preemption", "hpcdd.parallel.failures"}),
    ("phases and report", {"hpcdd.phases", "hpcdd.phases.context", "hpcdd.phases.local", "hpcdd.phases.aggregate",
                           "hpcdd.phases.coherent", "hpcdd.phases.global_cnn", "hpcdd.phases.report", "hpcdd.report"}),
    ("entry points", {"hpcdd.runner", "hpcdd.run", "hpcdd.predict", "hpcdd.__main__"}),
)
SHARED_BY_PHASES = {"hpcdd.phases", "hpcdd.phases.context"}


def modules(package: str = "hpcdd") -> dict:
    out = {}
    for folder, _, files in os.walk(os.path.join(ROOT, package)):
        for f in files:
            if f.endswith(".py"):
                path = os.path.join(folder, f)
                name = os.path.relpath(path[:-3], ROOT).replace(os.sep, ".")
                out[name[:-len(".__init__")] if name.endswith(".__init__") else name] = path
    return out


def _type_checking(node) -> bool:
    return isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)


def targets(name: str, path: str, node, known) -> set:
    """The modules one import statement of module ``name`` (file ``path``) names: hpcdd modules by
    name (``from . import x`` names module x), anything else by its top-level package."""
    package = name if path.endswith("__init__.py") else name.rsplit(".", 1)[0]
    if isinstance(node, ast.Import):
        found = {a.name for a in node.names}
    else:
        base = node.module or ""
        if node.level:
            parts = package.split(".")
            base = ".".join(parts[:len(parts) - node.level + 1] + ([node.module] if node.module else []))
        found = {f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names}
    return {m if m in known else m.split(".")[0] for m in found} - {name}


def imports_of(name: str, path: str, known) -> set:
    """The hpcdd modules that module ``name`` (file ``path``) imports, anywhere but TYPE_CHECKING blocks."""
    found = set()

    def visit(node):
        if _type_checking(node):
            return
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            found.update(targets(name, path, node, known))
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(open(path).read()))
    return found & set(known)


def graph() -> dict:
    mods = modules()
    return {name: imports_of(name, path, mods) for name, path in mods.items()}


def problems(edges: dict, layers=LAYERS, shared=SHARED_BY_PHASES, phases="hpcdd.phases.") -> list:
    """Every rule the graph breaks, in words: an unlayered module, an upward import, a phase that
    imports another phase, a cycle."""
    level = {m: k for k, (_, members) in enumerate(layers) for m in members}
    out = [f"{m} is in no layer of tests/test_imports.py" for m in sorted(edges) if m not in level]
    for a in sorted(edges):
        for b in sorted(edges[a]):
            if a in level and b in level and level[b] > level[a]:
                out.append(f"upward import: {a} ({layers[level[a]][0]}) imports {b} ({layers[level[b]][0]})")
            if a.startswith(phases) and b.startswith(phases) and a not in shared and b not in shared:
                out.append(f"phase {a} imports phase {b}")
    state: dict = {}

    def walk(v, stack):
        state[v] = "open"
        for w in sorted(edges.get(v, ())):
            if state.get(w) == "open":
                out.append("cycle: " + " -> ".join(stack[stack.index(w):] + [w]))
            elif w not in state:
                walk(w, stack + [w])
        state[v] = "done"

    for v in sorted(edges):
        if v not in state:
            walk(v, [v])
    return out


def test_the_import_graph_is_layered_acyclic_and_phases_are_leaves():
    edges = graph()
    assert "hpcdd.phases.coherent" in edges and "hpcdd.config" in edges["hpcdd.models"]
    assert problems(edges) == []


def test_the_checker_finds_what_it_looks_for():
    layers = (("low", {"a", "b"}), ("high", {"p", "p.x", "p.y"}))
    edges = {"a": {"b"}, "b": {"a", "p.x"}, "p": set(), "p.x": {"p.y"}, "p.y": set(), "c": set()}
    found = problems(edges, layers, shared={"p"}, phases="p.")
    assert "c is in no layer of tests/test_imports.py" in found
    assert "upward import: b (low) imports p.x (high)" in found
    assert "phase p.x imports phase p.y" in found
    assert "cycle: a -> b -> a" in found


HEAVY = {"torch", "torchvision", "mpi4py", "h5py", "matplotlib"}


def heavy_on_import(mods: dict) -> set:
    """The hpcdd modules whose import loads torch, MPI, h5py or matplotlib (directly or through others)."""
    direct = {name: set().union(*[targets(name, path, node, mods) for node in ast.parse(open(path).read()).body
                                  if isinstance(node, (ast.Import, ast.ImportFrom))])
              for name, path in mods.items()}
    heavy = {name for name, imps in direct.items() if imps & HEAVY}
    while True:
        more = {name for name, imps in direct.items() if name not in heavy and imps & heavy}
        if not more:
            return heavy
        heavy |= more


def test_function_level_imports_only_keep_light_modules_light():
    """A function imports an hpcdd module only where a module-level import would load torch, MPI, h5py or
    matplotlib into a module that does without them (``hpcdd-run --help``, the config, the report's
    reading side); every other import is at module level, where it is seen at once."""
    mods = modules()
    heavy = heavy_on_import(mods)
    assert "hpcdd.training.engine" in heavy and "hpcdd.config" not in heavy and "hpcdd.run" not in heavy
    needless = []
    for name, path in mods.items():
        for fn in ast.walk(ast.parse(open(path).read())):
            if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                for node in ast.walk(fn):
                    if isinstance(node, (ast.Import, ast.ImportFrom)):
                        inner = targets(name, path, node, mods) & set(mods)
                        if inner and (name in heavy or not inner & heavy):
                            needless.append(f"{os.path.relpath(path, ROOT)}:{node.lineno} imports {sorted(inner)}")
    assert needless == []
