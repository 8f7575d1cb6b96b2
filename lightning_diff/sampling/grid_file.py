"""Explicit sigma grids for ``sampler.time_steps``: a list (``{"sigmas": [...]}``) or the JSON file that
``lightning-diff tune-steps`` writes (``{"file": path}``; docs/tune_steps.md), checked before any sampling.

The file holds the grid (``sigmas``, decreasing, ending in 0), what it was tuned for (``model``: the checkpoint and
the sha256 of its weights; ``sampler``; ``nfe``), how (``method``, ``initial``) and how well (``loss``), and a
``key``: the sha256 of all its other entries. A record of a run on the file carries the sigmas and that key, and a
file edited by hand or cut short no longer matches its key and is refused.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import warnings
from collections.abc import Mapping
from pathlib import Path

import torch

from ..checkpoint_io import atomic_write

__all__ = ["GRID_FORMAT", "EXPLICIT_FORMS", "checked_sigmas", "explicit_grid", "grid_key", "read_grid_file",
           "warn_if_tuned_for_another_model", "write_grid_file"]

GRID_FORMAT = "lightning-diff tune-steps grid, version 1"  # the file's "format" entry
EXPLICIT_FORMS = ("sigmas", "file")  # sampler.time_steps keys that give the grid itself
ALLOWED_FORMS = ("sigma_min, sigma_max, rho (any subset: EDM's time steps, eq. 5); or alone sigmas: [s_0, ..., 0] (a "
                 "decreasing grid ending in 0) or file: <a lightning-diff tune-steps JSON file>")


def checked_sigmas(values, setting: str) -> torch.Tensor:
    """``values`` (a list of numbers) as a float64 ``[N + 1]`` grid: at least 2 entries, finite, strictly decreasing,
    positive but the last, which is 0 (every sampler's last step lands on the denoiser's estimate). ValueError
    naming ``setting``, the value and what is allowed."""
    allowed = "a list of at least 2 finite numbers, strictly decreasing, positive but the last, which is 0"
    numbers = isinstance(values, (list, tuple)) and all(
        isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in values)
    if not numbers or len(values) < 2:
        raise ValueError(f"{setting}={values!r} is invalid; allowed: {allowed}")
    if values[-1] != 0 or any(a <= b for a, b in zip(values, values[1:], strict=False)):
        raise ValueError(f"{setting}={list(values)} is not a grid; allowed: {allowed}")
    return torch.tensor([float(v) for v in values], dtype=torch.float64)


def grid_key(content: Mapping) -> str:
    """The sha256 of ``content`` but its ``key`` entry, as canonical JSON (sorted keys): what names a grid file."""
    body = {k: v for k, v in content.items() if k != "key"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def write_grid_file(path: str | os.PathLike, content: Mapping) -> dict:
    """Write ``content`` (``sigmas`` and what the grid was tuned for) with its ``format`` and ``key`` to ``path`` as
    JSON, atomically (``checkpoint_io.atomic_write``). Returns what was written."""
    checked_sigmas(content["sigmas"], "sigmas")
    content = {**content, "format": GRID_FORMAT}
    content["key"] = grid_key(content)
    text = json.dumps(content, indent=1, sort_keys=True) + "\n"
    atomic_write(path, lambda file: file.write(text.encode()))
    return content


def read_grid_file(path: str | os.PathLike, setting: str = "sampler.time_steps.file") -> dict:
    """The content of a ``lightning-diff tune-steps`` file, after checking that it is one (``format``), that it
    matches its ``key`` and that its ``sigmas`` are a grid. ValueError naming ``setting`` and the path otherwise."""
    allowed = "allowed: a file written by lightning-diff tune-steps (docs/tune_steps.md)"
    try:
        content = json.loads(Path(path).read_text())
    except OSError as err:
        raise ValueError(f"{setting}={path}: cannot read it ({err.strerror or err}); {allowed}") from None
    except ValueError as err:
        raise ValueError(f"{setting}={path} is not JSON ({err}); {allowed}") from None
    if not isinstance(content, dict) or content.get("format") != GRID_FORMAT:
        found = content.get("format") if isinstance(content, dict) else type(content).__name__
        raise ValueError(f"{setting}={path} has format {found!r}, not {GRID_FORMAT!r}; {allowed}")
    if content.get("key") != grid_key(content):
        raise ValueError(f"{setting}={path}: its content does not match its key {content.get('key')!r} (edited or "
                         f"cut short); {allowed}, unchanged")
    checked_sigmas(content.get("sigmas"), f"{setting}={path}: sigmas")
    return content


def explicit_grid(time_steps: Mapping, sampler: str) -> tuple[torch.Tensor, dict] | None:
    """``(grid float64 [N + 1], its record)`` for ``sampler.time_steps`` that give the grid itself (``sigmas`` or
    ``file``), None for EDM's time-step constants. The record is ``{"sigmas"}``, with ``"file"`` and ``"key"`` for a
    tune-steps file. ``sampler``: the sampler that will run on the grid; a file tuned for another one is used, with a
    warning naming both. ValueError naming the setting for a mix of forms or a bad grid."""
    explicit = [k for k in EXPLICIT_FORMS if k in time_steps]
    if not explicit:
        return None
    if len(time_steps) != 1:
        raise ValueError(f"sampler.time_steps={dict(time_steps)} mixes forms {sorted(time_steps)}; allowed: "
                         f"{ALLOWED_FORMS}")
    if explicit == ["sigmas"]:
        grid = checked_sigmas(time_steps["sigmas"], "sampler.time_steps.sigmas")
        return grid, {"sigmas": grid.tolist()}
    path = time_steps["file"]
    if not isinstance(path, (str, os.PathLike)):
        raise ValueError(f"sampler.time_steps.file={path!r} is invalid; allowed: the path of a lightning-diff "
                         "tune-steps file")
    content = read_grid_file(path)
    tuned_for = (content.get("sampler") or {}).get("name")
    if tuned_for != sampler:
        warnings.warn(f"sampler.time_steps.file={path} was tuned for sampler={tuned_for}; sampling with "
                      f"sampler={sampler} on it", UserWarning, stacklevel=4)  # the caller of SamplerSettings(...)
    grid = checked_sigmas(content["sigmas"], f"sampler.time_steps.file={path}: sigmas")
    return grid, {"sigmas": grid.tolist(), "file": str(path), "key": content["key"]}


def warn_if_tuned_for_another_model(time_steps: Mapping | None, denoiser: torch.nn.Module, formulation: str) -> None:
    """A UserWarning when ``time_steps`` is a tune-steps file (``{"file": path}``) tuned for another model than
    ``denoiser`` under ``formulation`` (a formulation's name): its ``model`` entry names another formulation or
    another fingerprint of the weights (``analytic_dpm.fingerprint``: the weights actually loaded, EMA or raw). The
    grid is still used: a grid tuned on one model often serves a close one, but the record would not say so."""
    if not time_steps or "file" not in time_steps:
        return
    from .analytic_dpm import fingerprint  # the tune-steps file's fingerprint of the weights

    path = time_steps["file"]
    model = read_grid_file(path).get("model") or {}
    found = fingerprint(denoiser, torch.zeros(0), {})
    if model.get("formulation") != formulation or model.get("fingerprint") != found:
        warnings.warn(f"sampler.time_steps.file={path} was tuned for another model (ckpt={model.get('ckpt')}, "
                      f"weights={model.get('weights')}, formulation={model.get('formulation')}, fingerprint "
                      f"{str(model.get('fingerprint'))[:12]}); sampling this one (formulation={formulation}, "
                      f"fingerprint {found[:12]}) on it", UserWarning, stacklevel=3)
