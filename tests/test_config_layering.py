"""The package's import graph (read from the source with ``ast``, lazy imports inside functions included):
no cycle, and every import points down the layers of docs/architecture.md ("Layering"), so nothing below
the entry points imports an entry point."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "lightning_diff"

# Rank of each module (the longest matching dotted prefix wins); a module may import its own rank or lower.
LAYERS = {
    # the ground floor: schedules, networks, data, closed forms, and the leaf utilities
    "formulations": 0, "networks": 0, "data": 0, "analytic": 0, "optim": 0, "checkpoint_io": 0, "config": 0,
    "known_warnings": 0, "run_lock": 0,
    "sampling.schedules": 0,  # sigma grids: pure functions that the formulations' default grids are made of
    "denoiser": 1,
    "sampling": 2, "likelihood": 2, "metrics": 2, "objectives": 2, "analytic_dpm": 2,
    "extended_analytic_dpm": 2,
    "pretrained.remote": 0,  # download and cache: a leaf utility (published FID statistics use it too)
    "pretrained": 3, "module": 3,
    "evaluation": 4, "callbacks": 4, "builders": 4, "reports": 4, "resume_check": 4,
    "config_check": 4,  # the check every entry point runs first: reads the constants of the layers below
    "train": 5, "sample": 5, "evaluate": 5, "leaderboard": 5, "classifier": 5,  # the entry points
    "distillation": 5, "reflow": 5, "reproduction": 5,
    "cli": 6,
}
# (reproduction is the entry point of the experiments/repro_*/run.py scripts: it trains through lightning_diff.train)
ENTRY_POINTS = {"lightning_diff.train", "lightning_diff.sample", "lightning_diff.evaluate",
                "lightning_diff.leaderboard", "lightning_diff.classifier", "lightning_diff.distillation",
                "lightning_diff.reflow", "lightning_diff.reproduction", "lightning_diff.cli"}


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
        graph[module] = targets - {None, module, "lightning_diff"}
    return graph


def rank(module: str) -> int:
    parts = module.split(".")[1:]
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
    assert "lightning_diff.denoiser" in graph["lightning_diff.module"]  # from .denoiser import Denoiser
    assert "lightning_diff.sampling" in graph["lightning_diff.module"]  # `from . import sampling` in sample()
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycle():
    cycle = find_cycle(import_graph())
    assert cycle is None, " -> ".join(cycle)


@pytest.mark.parametrize("module", sorted(import_graph()))
def test_imports_point_down(module):
    upward = sorted(t for t in import_graph()[module] if rank(t) > rank(module))
    assert not upward, f"{module} (layer {rank(module)}) imports {upward} from higher layers"


def test_nothing_below_the_entry_points_imports_one():
    offenders = {m: sorted(t & ENTRY_POINTS) for m, t in import_graph().items()
                 if m not in ENTRY_POINTS and t & ENTRY_POINTS}
    assert not offenders


def test_config_is_a_leaf():
    assert import_graph()["lightning_diff.config"] == set()


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
    assert attribute_assignments((PACKAGE / "builders.py").read_text()) == []


@pytest.mark.parametrize("data", ["digits", "toy2d"])
def test_the_training_loader_is_resumable_by_itself(data, tmp_path):
    from lightning_diff.builders import build_datamodule
    from lightning_diff.checkpoint_io import ResumableDataLoader

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
