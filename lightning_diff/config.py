"""Where the Hydra configs live and how they are composed: a leaf module that every entry point imports.

- ``CONFIG_DIR``: the ``configs/`` folder of this checkout (``train.yaml``, ``sample.yaml``, ``evaluate.yaml``
  and their groups).
- ``compose(overrides, config_name)``: the config ``lightning-diff <command> [overrides]`` would run, for
  tests and notebooks.
- the resolvers ``${wandb_offline:}``, ``${run_id:}`` (6 random hex digits, one per process),
  ``${group_options:<group>}`` (the options of a config group, for the ``--help`` texts), ``${auto_accelerator:}``
  and ``${auto_precision:}`` (``trainer=auto``), registered on import.

It imports nothing else of the package, so any module can use it without an import cycle.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Sequence
from pathlib import Path

from omegaconf import DictConfig, OmegaConf, open_dict

__all__ = ["CONFIG_DIR", "compose", "register_resolvers", "wandb_offline", "group_options"]

CONFIG_DIR = str(Path(__file__).resolve().parent.parent / "configs")


def wandb_offline() -> bool:
    """W&B runs offline unless an API key is configured or ``WANDB_MODE=online`` is asked for."""
    if os.environ.get("WANDB_MODE") == "online":
        return False
    if os.environ.get("WANDB_MODE") in ("offline", "dryrun", "disabled"):
        return True
    return not os.environ.get("WANDB_API_KEY")


def group_options(group: str) -> str:
    """The options of config group ``group`` (``configs/<group>/*.yaml``), comma-separated."""
    return ", ".join(sorted(path.stem for path in Path(CONFIG_DIR, group).glob("*.yaml")))


def auto_accelerator() -> str:
    """``trainer=auto``'s accelerator: ``gpu`` when CUDA is available, else ``cpu`` (Apple's MPS lacks the
    float64 that sampler state uses, so it is not picked)."""
    import torch

    return "gpu" if torch.cuda.is_available() else "cpu"


def auto_precision() -> str:
    """``trainer=auto``'s precision: on a GPU, bf16 autocast of the backbone where the GPU computes in bf16
    (Ampere and newer), else fp16 with loss scaling; on the CPU full fp32 (bf16 autocast: 2-3x slower there)."""
    import torch

    if not torch.cuda.is_available():
        return "32-true"
    return "bf16-mixed" if torch.cuda.is_bf16_supported(including_emulation=False) else "16-mixed"


def register_resolvers() -> None:
    """Register the resolvers the configs use (idempotent)."""
    if not OmegaConf.has_resolver("wandb_offline"):
        OmegaConf.register_new_resolver("wandb_offline", wandb_offline)
    if not OmegaConf.has_resolver("run_id"):  # run directories: runs started in the same second differ
        OmegaConf.register_new_resolver("run_id", lambda: secrets.token_hex(3), use_cache=True)
    if not OmegaConf.has_resolver("group_options"):
        OmegaConf.register_new_resolver("group_options", group_options)
    for name, resolver in (("auto_accelerator", auto_accelerator), ("auto_precision", auto_precision)):
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, resolver)


def compose(overrides: Sequence[str] = (), config_name: str = "train") -> DictConfig:
    """The config ``lightning-diff <config_name> [overrides]`` would run (``train``, ``sample`` or ``evaluate``).

    Hydra makes no run directory here: pass ``paths.output_dir=...`` for training. The ``hydra:`` resolver
    (run names) answers from this composition; the ``hydra`` node itself is removed."""
    from hydra import compose as compose_config
    from hydra import initialize_config_dir
    from hydra.core.hydra_config import HydraConfig

    with initialize_config_dir(CONFIG_DIR, version_base="1.3"):
        cfg = compose_config(config_name, overrides=list(overrides), return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        del cfg["hydra"]
    return cfg


register_resolvers()
