"""The package's import graph (read from the source with ``ast``, lazy imports inside functions included): no cycle,
and every import points down the floors of docs/architecture.md ("Layering"), counting the package ``__init__``
files that an import runs; a fresh interpreter that imports a module loads nothing above its floor."""

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "lightning_diff"

# The intended floors (a module may import its own floor or lower; the longest matching dotted prefix wins).
LAYERS = {
    # 0: pieces that know nothing of each other's use, and the leaf utilities
    "formulations": 0, "networks": 0, "data": 0, "analytic": 0, "checkpoint_io": 0, "config": 0,
    "known_warnings": 0, "aliases": 0, "distributed": 0,
    "denoiser": 1,  # a network preconditioned by a formulation, and the one loss
    "sampling": 2, "objectives": 2,  # the mathematics that needs a denoiser
    "training": 3, "pretrained": 3,  # a denoiser trained with Lightning, or loaded from a paper's file
    "methods": 4,  # built on a trained model: classifiers, distillation, reflow
    "evaluation": 5, "callbacks": 5,  # metrics, likelihood, records, leaderboard; the run's callbacks
    "cli": 6, "__main__": 6,  # the commands
}



def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """``module -> modules of this package it imports`` (a ``from a import b`` names ``a.b`` when that is a
    module, else ``a``)."""
    files = {_module_name(p): p for p in PACKAGE.rglob("*.py")}

    def owner(name: str) -> str | None:
        while name and name not in files:
            name = name.rpartition(".")[0]
        return name or None

    graph = {}
    for module, path in files.items():
        package = module if path.name == "__init__.py" else module.rpartition(".")[0]
        targets = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(anchor + ([node.module] if node.module else []))
                names = [f"{base}.{alias.name}" for alias in node.names]
            else:
                continue
            targets |= {owner(n) for n in names if n.startswith("lightning_diff")}
        targets -= {None}
        own = set(ancestors(module))
        for target in list(targets):  # importing a.b.c runs a/b/__init__.py first (unless `module` is inside a.b)
            targets |= set(ancestors(target)) - own
        graph[module] = targets - {module, "lightning_diff"}
    return graph


def ancestors(module: str) -> list[str]:
    """The packages above ``module`` below the root, ``a.b.c`` -> ``[a.b]`` (``lightning_diff.x.y`` ->
    ``[lightning_diff.x]``)."""
    parts = module.split(".")
    return [".".join(parts[:k]) for k in range(2, len(parts))]


def rank(module: str) -> int:
    parts = module.split(".")[1:]
    if not parts:
        return 0  # the package's own __init__: installs the deprecated aliases (floor 0)
    for end in range(len(parts), 0, -1):
        if ".".join(parts[:end]) in LAYERS:
            return LAYERS[".".join(parts[:end])]
    raise KeyError(f"{module} has no layer: add it to LAYERS (docs/architecture.md, Layering)")


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` as a list of modules (first == last), or None."""
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        state[node] = "done"
        stack.pop()
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_graph_reader_sees_lazy_and_relative_imports():
    graph = import_graph()
    assert "lightning_diff.denoiser" in graph["lightning_diff.training.module"]  # from .denoiser import Denoiser
    assert "lightning_diff.sampling" in graph["lightning_diff.training.module"]  # `from . import sampling` in sample()
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycle():
    cycle = find_cycle(import_graph())
    assert cycle is None, " -> ".join(cycle)


@pytest.mark.parametrize("module", sorted(import_graph()))
def test_imports_point_down(module):
    upward = sorted(t for t in import_graph()[module] if rank(t) > rank(module))
    assert not upward, f"{module} (layer {rank(module)}) imports {upward} from higher layers"


def test_config_is_a_leaf():
    assert import_graph()["lightning_diff.config"] == set()


# What the interpreter really loads, which the reading above could miss (an import built at run time, a package's
# __init__): a forked child per module imports it into a clean lightning_diff namespace and lists what is loaded.
# The third-party libraries are imported once in the parent, so each child only runs this package's code.
_LOADED = """
import json, os, sys
import hydra, numpy, omegaconf, pandas, pytorch_lightning, scipy, sklearn, timm, torch  # noqa: F401
import torch_fidelity, torchmetrics, wandb  # noqa: F401
found = {}
for name in json.loads(sys.argv[1]):
    read, write = os.pipe()
    if os.fork() == 0:
        os.close(read)
        __import__(name)
        loaded = [m for m in sys.modules if m == "lightning_diff" or m.startswith("lightning_diff.")]
        os.write(write, json.dumps(loaded).encode())
        os._exit(0)
    os.close(write)
    with os.fdopen(read) as pipe:
        found[name] = json.loads(pipe.read() or "null")
    os.wait()
print(json.dumps(found))
"""


def test_importing_a_module_loads_nothing_above_its_floor():
    modules = sorted(m for m in import_graph() if not m.endswith("__main__"))
    run = subprocess.run([sys.executable, "-c", _LOADED, json.dumps(modules)], capture_output=True, text=True,
                         cwd=PACKAGE.parent, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    loaded = json.loads(run.stdout.strip().splitlines()[-1])
    assert set(loaded) == set(modules) and all(v is not None for v in loaded.values())
    above = {m: sorted(x for x in found if x not in ("lightning_diff.aliases",) and rank(x) > rank(m))
             for m, found in loaded.items()}
    assert {m: x for m, x in above.items() if x} == {}


# --- builders construct objects and pass them what they need; they patch nothing ----------------------------


def attribute_assignments(source: str) -> list[str]:
    """``obj.attr`` targets of every assignment in ``source`` (``a.b = ...``, ``a.b, c.d = ...``, ``a.b += ...``)."""
    found = []
    for node in ast.walk(ast.parse(source)):
        targets = node.targets if isinstance(node, ast.Assign) else \
            [node.target] if isinstance(node, (ast.AugAssign, ast.AnnAssign)) else []
        for target in targets:
            for leaf in (target.elts if isinstance(target, ast.Tuple) else [target]):
                if isinstance(leaf, ast.Attribute):
                    found.append(ast.unparse(leaf))
    return found


def test_builders_set_no_attribute_on_what_they_build():
    assert attribute_assignments("module.data_shape, x = 1, 2\nd.f += 1\ny = 3") == ["module.data_shape", "d.f"]
    assert attribute_assignments((PACKAGE / "training" / "builders.py").read_text()) == []


@pytest.mark.parametrize("data", ["digits", "toy2d"])
def test_the_training_loader_is_resumable_by_itself(data, tmp_path):
    from lightning_diff.checkpoint_io import ResumableDataLoader
    from lightning_diff.training.builders import build_datamodule

    from .helpers import compose_config

    datamodule = build_datamodule(compose_config("train", [f"data={data}"], tmp_path))
    assert "train_dataloader" not in vars(datamodule)  # the class's own method, not one patched on
    assert isinstance(datamodule.train_dataloader(), ResumableDataLoader)
    assert not isinstance(datamodule.val_dataloader(), ResumableDataLoader)


def test_the_architecture_page_draws_every_layer_at_its_floor():
    """docs/architecture.md's picture is this file's ``LAYERS``: one line ``<floor>  <room>`` per entry, no other."""
    import re

    page = (PACKAGE.parent / "docs" / "architecture.md").read_text()
    drawn = dict((name, int(floor)) for floor, name in re.findall(r"^(\d)  ([\w.]+) +\S", page, re.MULTILINE))
    assert drawn == LAYERS


def test_the_readme_layout_lists_every_room_of_the_package_once():
    """README.md's layout block: one line per room of ``lightning_diff/`` (a folder with code or configs, or a module
    file other than ``__init__.py``), each one that exists."""
    import re

    readme = (PACKAGE.parent / "README.md").read_text()
    block = readme.split("## Layout\n\n```\nlightning_diff/\n", 1)[1].split("```", 1)[0]
    listed = re.findall(r"^  (\S+)", block, re.MULTILINE)
    rooms = sorted(f"{p.name}/" if p.is_dir() else p.name for p in PACKAGE.iterdir()
                   if p.name != "__pycache__" and p.name != "__init__.py" and (p.suffix == ".py" or p.is_dir()))
    assert len(listed) == len(set(listed))
    assert sorted(listed) == rooms
