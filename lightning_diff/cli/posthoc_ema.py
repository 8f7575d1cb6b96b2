"""``lightning-diff posthoc-ema``: any EMA length of a finished run from its post-hoc EMA snapshots
(``configs/posthoc-ema.yaml``; the method: ``callbacks.posthoc_ema``, Karras et al. 2024, Appendix C.3)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig, ListConfig

from ..callbacks.posthoc_ema import SNAPSHOT_KEY, read_snapshots, reconstruct
from ..checkpoint_io import atomic_write, check_writable
from ..config import CONFIG_DIR
from .config_check import check_command

__all__ = ["checkpoint_name", "main", "posthoc_ema", "sigma_rels"]


def checkpoint_name(sigma_rel: float) -> str:
    """``posthoc-ema-0.1.ckpt`` for ``sigma_rel=0.1``."""
    return f"posthoc-ema-{sigma_rel:g}.ckpt"


def sigma_rels(value) -> list[float]:
    """``sigma_rel=0.1`` or ``sigma_rel=[0.05,0.1]`` as a list (``-m sigma_rel=0.05,0.1`` sweeps one per job)."""
    return list(value) if isinstance(value, (list, tuple, ListConfig)) else [value]


def posthoc_ema(ckpt_dir: str | Path, sigma_rel: Sequence[float], out: str | Path | None = None) -> list[dict]:
    """Reconstruct each ``sigma_rel`` at the newest snapshot in ``ckpt_dir`` and write it to
    ``<out>/posthoc-ema-<sigma_rel>.ckpt`` (``out`` None: ``ckpt_dir``), atomically: the newest snapshot's checkpoint
    entries (``run_config``, data shape...) with the reconstruction as its ``state_dict`` (the EMA weights of
    ``sample`` and ``evaluate``), ``global_step`` the snapshot's step, and the reconstruction's record as
    ``run_config["posthoc_ema"]`` (records and the leaderboard's options column carry its ``sigma_rel``).
    Returns the records, each with its ``checkpoint`` path."""
    read_snapshots(ckpt_dir)  # a folder without snapshots fails before out= is made
    out = check_writable(ckpt_dir, f"ckpt_dir={ckpt_dir}") if out is None else check_writable(out, f"out={out}")
    state_dicts, records, newest = reconstruct(ckpt_dir, sigma_rel)
    if not isinstance(newest.get("run_config"), dict):
        raise ValueError(f"ckpt_dir={ckpt_dir}: the snapshots hold no run_config (not written during lightning-diff "
                         "train); allowed: the snapshot folder of a lightning-diff train run")
    template = {k: v for k, v in newest.items() if k not in (SNAPSHOT_KEY, "profiles")}
    for state_dict, record in zip(state_dicts, records, strict=True):
        checkpoint = {**template, "state_dict": state_dict, "global_step": record["step"],
                      "run_config": {**newest["run_config"], "posthoc_ema": record}}
        record["checkpoint"] = str(atomic_write(out / checkpoint_name(record["sigma_rel"]),
                                                lambda file, c=checkpoint: torch.save(c, file)))
    return records


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="posthoc-ema")
def main(cfg: DictConfig) -> None:
    check_command(cfg, "posthoc-ema")  # every '+key' read, numbers and choices valid: before any work
    for record in posthoc_ema(cfg.ckpt_dir, sigma_rels(cfg.sigma_rel), cfg.out):
        print(f"sigma_rel={record['sigma_rel']:g} (gamma {record['gamma']:.3f}) at step {record['step']} "
              f"({record['images']} images) from {record['snapshots']} snapshots of sigma_rel {record['tracked']}: "
              f"profile fit error {record['fit_error']:.2e}, coefficient sum {record['coefficient_sum']:.6f} -> "
              f"{record['checkpoint']}")


if __name__ == "__main__":
    main()
