"""Shared test helpers: compose the project's Hydra configs in-process."""

from __future__ import annotations

from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from omegaconf import open_dict

CONFIG_DIR = str(Path(__file__).resolve().parent.parent / "configs")


def compose_config(config_name: str, overrides: list[str], output_dir: Path):
    """Compose ``configs/<config_name>.yaml`` with ``overrides``; ``paths.output_dir`` is ``output_dir``."""
    from lightning_diff.builders import register_resolvers

    register_resolvers()
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose(config_name, overrides=overrides, return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        cfg.paths.output_dir = str(output_dir)
        del cfg["hydra"]
    return cfg
