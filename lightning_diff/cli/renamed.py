"""The config keys renamed so that each meaning has one word across the commands (``RENAMED``), and the two places an
old key can come from, each mapped to the new key with one ``FutureWarning`` naming both, for one release:

- the command line (``rename_overrides``, run by ``accepts_renamed_keys`` on ``sys.argv`` before Hydra composes:
  Hydra refuses a key its config lacks), so ``lightning-diff distill teacher=x`` composes exactly as ``ckpt=x``;
- config files (``rename_config``, run by ``config_check.check_command`` on the composed config before the check: a
  user's experiment file or ``--config-dir`` that still sets ``ckpt_path:``).

The command-line pass also opens ``sampler.time_steps.<key>=...`` (null in every sampler file) for Hydra.

The words: ``ckpt`` the checkpoint a command reads; ``num_samples`` how many samples it generates (``num_images``
stays for counts of a data split's images); ``num_timesteps`` a formulation's number of discrete noise levels (its
classes take the old keywords too: ``aliases.renamed_keywords``).
"""

from __future__ import annotations

import functools
import re
import sys
from collections.abc import Callable, Sequence

from omegaconf import DictConfig, OmegaConf, open_dict

from ..aliases import warn_renamed

__all__ = ["RENAMED", "rename_overrides", "rename_config", "accepts_renamed_keys"]

_FORMULATION = {"formulation.M": "formulation.num_timesteps",  # EDM's M (VP, sub-VP, iDDPM)
                "formulation.num_levels": "formulation.num_timesteps"}  # NCSN's L
RENAMED = {  # config name -> {old key: new key}
    "train": {"ckpt_path": "ckpt",
              "callbacks.generative_metrics.num_images": "callbacks.generative_metrics.num_samples", **_FORMULATION},
    "classifier": dict(_FORMULATION),
    "evaluate": {"metrics.num_images": "metrics.num_samples"},
    "reflow": {"num_pairs": "num_samples"},
    "distill": {"teacher": "ckpt", "quality_seeds": "quality_samples"},
}
COMMANDS = {"classifier": "train-classifier"}  # config name -> command, where they differ (config_check's too)
_TIME_STEPS = re.compile(r"(module\.)?sampler\.time_steps\.\w+$")  # keys under a node that is null by default
_OVERRIDE = re.compile(r"(?P<prefix>~|\+\+|\+)?(?P<key>[\w.]+)(?P<rest>=.*)?", re.DOTALL)  # Hydra's key=value


def _renamed_key(key: str, config_name: str) -> str | None:
    """The new name of ``key`` (an old key or a key under one), or None when it was not renamed."""
    for old, new in RENAMED.get(config_name, {}).items():
        if key == old or key.startswith(old + "."):
            return new + key[len(old):]
    return None


def _warn(old: str, new: str, config_name: str) -> None:
    warn_renamed(old, new, f"lightning-diff {COMMANDS.get(config_name, config_name)}", stacklevel=4)


def rename_overrides(config_name: str, overrides: Sequence[str]) -> list[str]:
    """``overrides`` (Hydra's ``[+|++|~]key[=value]`` strings, flags untouched) with each old key of ``RENAMED``
    replaced by its new key, warning once per old key used.
    A key under ``sampler.time_steps`` (``module.sampler.time_steps`` in train) set without a prefix gets ``++``:
    the node is null in every sampler file, and Hydra's struct mode would refuse ``sampler.time_steps.file=grid.json``
    although it means ``sampler.time_steps={file: grid.json}`` (the check after composing still refuses a key that
    is not a time-steps setting, by name)."""
    renamed = []
    for override in overrides:
        match = _OVERRIDE.fullmatch(override)
        new = match and _renamed_key(match["key"], config_name)
        if new:
            _warn(match["key"], new, config_name)
            override = f"{match['prefix'] or ''}{new}{match['rest'] or ''}"
        elif match and match["prefix"] is None and match["rest"] and _TIME_STEPS.match(match["key"]):
            override = "++" + override
        renamed.append(override)
    return renamed


def rename_config(cfg: DictConfig, config_name: str) -> None:
    """Move each old key of ``RENAMED`` that ``cfg`` holds (a config file set it) to its new key, in place, warning
    once per key moved; the old key's value replaces the new key's default."""
    for old, new in RENAMED.get(config_name, {}).items():
        parent, _, leaf = old.rpartition(".")
        node = OmegaConf.select(cfg, parent) if parent else cfg
        if not isinstance(node, DictConfig) or leaf not in node:
            continue
        _warn(old, new, config_name)
        value = OmegaConf.to_container(node, resolve=False)[leaf]  # an interpolation stays one
        with open_dict(cfg):
            OmegaConf.update(cfg, new, value, merge=False)
            del node[leaf]


def accepts_renamed_keys(config_name: str) -> Callable:
    """Decorator of a command's ``@hydra.main`` function: on a command-line call (no arguments), ``sys.argv``'s
    overrides go through ``rename_overrides`` before Hydra reads them."""
    def decorate(hydra_main: Callable) -> Callable:
        @functools.wraps(hydra_main)
        def main(*args, **kwargs):
            if not args and not kwargs:
                sys.argv[1:] = rename_overrides(config_name, sys.argv[1:])
            return hydra_main(*args, **kwargs)

        return main

    return decorate
