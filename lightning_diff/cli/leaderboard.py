"""``lightning-diff leaderboard``: collect records, rank them by protocol beside the papers' numbers and write the
outputs (``configs/leaderboard.yaml``; the tables and pages: ``evaluation.leaderboard``)."""

from __future__ import annotations

import hydra
from omegaconf import DictConfig, OmegaConf

from ..config import CONFIG_DIR
from ..evaluation.leaderboard import build, collect, collect_wandb, log_wandb_table, to_markdown, write_outputs
from .config_check import check_command

__all__ = ["leaderboard", "main"]


def leaderboard(cfg: DictConfig, wandb_api=None) -> dict:
    """Run ``configs/leaderboard.yaml``: collect, build, write. ``wandb_api``: the W&B public API object (None:
    ``wandb.Api()`` when ``cfg.wandb`` names sources). Returns ``{"board", "paths"}``."""
    runs = [cfg.runs] if isinstance(cfg.runs, str) else list(cfg.runs or [])
    sources = [cfg.wandb] if isinstance(cfg.wandb, str) else list(cfg.wandb or [])
    if not runs and not sources:
        raise ValueError("runs=[] and wandb=[] name no input; allowed: runs=[folder|glob|eval-*.json|multirun folder] "
                         "and/or wandb=[entity/project|entity/project/sweeps/<id>]")
    skipped: list = []
    records, sweeps = collect(runs, skipped)
    if sources:
        import wandb

        more, more_sweeps = collect_wandb(sources, wandb_api or wandb.Api(), skipped)
        records, sweeps = records + more, sweeps + more_sweeps
    published = OmegaConf.to_container(cfg.leaderboard, resolve=True)["entries"] if cfg.get("leaderboard") else []
    board = build(records, cfg.metric, published=published, direction=cfg.direction, skipped=skipped,
                  sweeps=sweeps)
    paths = write_outputs(board, cfg.out, cfg.title, cfg.figures)
    if cfg.wandb_table:
        import wandb

        run = wandb.init(project=cfg.wandb_table, job_type="leaderboard")
        log_wandb_table(board, run)
        run.finish()
    return {"board": board, "paths": paths}


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="leaderboard")
def main(cfg: DictConfig) -> None:
    check_command(cfg, "leaderboard")  # every '+key' read, numbers and choices valid: before any work
    result = leaderboard(cfg)
    print(to_markdown(result["board"]))
    print("written: " + ", ".join(str(p) for p in result["paths"].values()))


if __name__ == "__main__":
    main()
