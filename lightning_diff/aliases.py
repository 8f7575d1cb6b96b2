"""The module names of the flat layout before the rooms (``training/``, ``methods/``, ``objectives/``, ``evaluation/``,
``cli/``): each still imports, and ``python -m <old name>`` still runs its command, with a one-line
``FutureWarning`` naming the new place, until the next release removes them.

A meta-path finder (installed by ``lightning_diff/__init__``) answers the old names only: an old name that moved
whole is the new module itself (one object: ``isinstance`` and Hydra ``_target_`` paths of old checkpoints keep
working); one whose contents went to several rooms is a module holding their names. Written by hand because neither
the standard library nor a kept package maps module names with a warning.

``renamed_keywords(old=new, ...)`` does the same for a function's or a class's renamed keyword arguments
(``current_keywords`` renames them in a stored config node, e.g. an old checkpoint's, without a warning), and
``warn_renamed`` is the one-line warning both use (``cli/renamed.py`` uses it for renamed config keys).
"""

from __future__ import annotations

import functools
import importlib
import importlib.abc
import importlib.machinery
import pydoc
import sys
import types
import warnings

__all__ = ["MOVED", "install", "renamed_keywords", "current_keywords", "warn_renamed"]

MOVED = {  # old module -> the modules that hold its names now (the command's module first where it had one)
    "lightning_diff.train": ("lightning_diff.cli.train",),
    "lightning_diff.sample": ("lightning_diff.cli.sample",),
    "lightning_diff.evaluate": ("lightning_diff.cli.evaluate",),
    "lightning_diff.reproduction": ("lightning_diff.cli.reproduction",),
    "lightning_diff.config_check": ("lightning_diff.cli.config_check",),
    "lightning_diff.classifier": ("lightning_diff.cli.train_classifier", "lightning_diff.methods.classifier"),
    "lightning_diff.distillation": ("lightning_diff.cli.distill", "lightning_diff.methods.distillation"),
    "lightning_diff.reflow": ("lightning_diff.cli.reflow", "lightning_diff.methods.reflow",
                              "lightning_diff.objectives.reflow"),
    "lightning_diff.leaderboard": ("lightning_diff.cli.leaderboard", "lightning_diff.evaluation.leaderboard"),
    "lightning_diff.module": ("lightning_diff.training.module", "lightning_diff.sampling.settings"),
    "lightning_diff.builders": ("lightning_diff.training.builders",),
    "lightning_diff.optim": ("lightning_diff.training.optim",),
    "lightning_diff.resume_check": ("lightning_diff.training.resume_check",),
    "lightning_diff.run_lock": ("lightning_diff.training.run_lock",),
    "lightning_diff.likelihood": ("lightning_diff.evaluation.likelihood", "lightning_diff.formulations.posterior"),
    "lightning_diff.reports": ("lightning_diff.evaluation.reports",),
    "lightning_diff.analytic_dpm": ("lightning_diff.sampling.analytic_dpm",),
    "lightning_diff.extended_analytic_dpm": ("lightning_diff.sampling.analytic_dpm",
                                             "lightning_diff.objectives.second_moment"),
    "lightning_diff.sampling.schedules": ("lightning_diff.formulations.schedules",),
    "lightning_diff.metrics": ("lightning_diff.evaluation.metrics",),
    **{f"lightning_diff.metrics.{name}": (f"lightning_diff.evaluation.metrics.{name}",)
       for name in ("compute", "extractor", "protocol", "reference", "small_classifier", "stats")},
    "lightning_diff.metrics.distributed": ("lightning_diff.distributed",),
}


def _warn(old: str, targets: tuple[str, ...]) -> None:
    warnings.warn(f"{old} has moved to {' and '.join(targets)}; the old name is removed in the next release",
                  FutureWarning, stacklevel=4)


class _Loader(importlib.abc.Loader):
    def __init__(self, targets: tuple[str, ...]):
        self.targets = targets
        self._spec = None

    def create_module(self, spec):
        _warn(spec.name, self.targets)
        modules = [importlib.import_module(target) for target in self.targets]
        if len(modules) == 1:
            self._spec = modules[0].__spec__  # the import system sets the alias spec on it: put the real one back
            return modules[0]
        merged = types.ModuleType(spec.name, f"Deprecated alias of {', '.join(self.targets)}.")
        for module in reversed(modules):  # the first target's names win
            merged.__dict__.update({k: v for k, v in vars(module).items() if not k.startswith("__")})
        return merged

    def exec_module(self, module):
        if self._spec is not None:
            module.__spec__ = self._spec

    def get_code(self, fullname):
        """``python -m <old name>``: run the command module it moved to as ``__main__``."""
        command = self.targets[0]
        if not command.startswith("lightning_diff.cli."):
            raise ImportError(f"{fullname} is not a command; it moved to {' and '.join(self.targets)}")
        return compile(f"import warnings, runpy\nwarnings.warn({fullname!r} ' has moved: use python -m {command}', "
                       f"FutureWarning)\nrunpy.run_module({command!r}, run_name='__main__', alter_sys=True)\n",
                       fullname, "exec")


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name not in MOVED:
            return None
        return importlib.machinery.ModuleSpec(name, _Loader(MOVED[name]))


def install() -> None:
    """Put the finder first on ``sys.meta_path`` (once): the old names resolve before any file of that name would."""
    if not any(isinstance(finder, _Finder) for finder in sys.meta_path):
        sys.meta_path.insert(0, _Finder())


def warn_renamed(old: str, new: str, where: str, *, stacklevel: int = 3) -> None:
    """The one-line ``FutureWarning`` of a renamed setting or keyword: ``<where>: <old> is now <new>; ...``."""
    warnings.warn(f"{where}: {old} is now {new}; the old name still works until the next release removes it",
                  FutureWarning, stacklevel=stacklevel)


def renamed_keywords(**renames: str):
    """Decorator: ``fn(old=value)`` runs as ``fn(new=value)`` with ``warn_renamed`` (``renames``: old keyword -> new
    keyword), for one release; both at once is a TypeError. A class's ``__init__`` takes it; ``inspect.signature``
    (and so Hydra's and ``config_check``'s view of the arguments) shows the new names only."""
    def decorate(fn):
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            owner = type(args[0]).__name__ if fn.__name__ == "__init__" else fn.__qualname__  # a subclass: its name
            for old, new in renames.items():
                if old in kwargs:
                    if new in kwargs:
                        raise TypeError(f"{owner}() got {old}= and {new}=; {old} is the old name of {new}: pass "
                                        f"{new}= only")
                    warn_renamed(f"{old}=", f"{new}=", owner)
                    kwargs[new] = kwargs.pop(old)
            return fn(*args, **kwargs)

        wrapper.renamed_keywords = dict(renames)
        return wrapper

    return decorate


def current_keywords(node):
    """A config node ``{"_target_": <class or function>, **arguments}`` with the arguments its target renamed
    (``renamed_keywords``) under their new names; any other value as it is."""
    target = pydoc.locate(node["_target_"]) if isinstance(node, dict) and "_target_" in node else None
    renames = getattr(getattr(target, "__init__", target), "renamed_keywords", {})
    return {renames.get(key, key): value for key, value in node.items()} if renames else node
