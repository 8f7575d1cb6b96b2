"""``lightning-diff distill``: progressive distillation of a teacher checkpoint, ``ckpt=`` (``configs/distill.yaml``;
the method: ``methods.distillation``)."""

from __future__ import annotations

from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig

from ..checkpoint_io import atomic_write, load_checkpoint
from ..config import CONFIG_DIR
from ..methods.distillation import ProgressiveDistillation
from ..training.builders import build_datamodule, build_logger, load_module, pretrained_flags
from .config_check import check_command
from .renamed import accepts_renamed_keys

__all__ = ["distill", "main"]


def distill(cfg: DictConfig) -> dict:
    """Run ``lightning-diff distill`` (configs/distill.yaml) on a composed config: distils ``cfg.ckpt`` (a checkpoint
    of ``lightning-diff train`` or a released one) and writes the final student to ``cfg.out``. Returns ``{"student":
    path, "history": per-round records, "sigmas": the student's grid}``.

    A ``train`` teacher gives a ``train`` checkpoint with the student's weights (no EMA) and a ``distillation`` entry
    (its grid and history): ``lightning-diff sample ckpt=out sampler=ddim`` samples on the stored grid
    (``DiffusionModule.grid``). A released teacher gives ``{"student": state_dict, "sigmas", "teacher"}``."""
    module = load_module(cfg.ckpt, weights=cfg.weights, pretrained=pretrained_flags(cfg.pretrained))
    datamodule = build_datamodule(cfg)
    if tuple(datamodule.data_shape) != tuple(module.data_shape):
        raise ValueError(f"distill: data has shape {tuple(datamodule.data_shape)} but the teacher was trained on "
                         f"{tuple(module.data_shape)}; allowed: the teacher's data (data=...)")
    distiller = ProgressiveDistillation(module.denoiser, hydra.utils.instantiate(cfg.optimizer), steps=cfg.steps,
                                        rounds=cfg.rounds, steps_per_round=cfg.steps_per_round,
                                        weighting=cfg.weighting, data_shape=module.data_shape,
                                        quality_samples=cfg.quality_samples, conditional=module.conditional)
    trainer = hydra.utils.instantiate(cfg.trainer, logger=build_logger(cfg),
                                      max_steps=cfg.rounds * cfg.steps_per_round)
    trainer.fit(distiller, datamodule=datamodule)
    out, sigmas = Path(cfg.out), distiller.student_grid
    out.parent.mkdir(parents=True, exist_ok=True)
    if "pretrained" in (module.run_config or {}):
        checkpoint = {"student": distiller.student.state_dict(), "sigmas": sigmas, "teacher": str(cfg.ckpt)}
    else:
        checkpoint = load_checkpoint(cfg.ckpt, map_location="cpu")
        checkpoint["state_dict"] = {f"denoiser.{k}": v for k, v in distiller.student.state_dict().items()}
        checkpoint.pop("current_model_state", None)  # the EMA's raw weights: the student has one set
        checkpoint["distillation"] = {"sigmas": sigmas.tolist(), "history": distiller.history}
        checkpoint["run_config"]["own_sampler"] = {"name": "ddim"}  # the student is trained for DDIM steps
    atomic_write(out, lambda f: torch.save(checkpoint, f))  # an interrupted write leaves no partial file
    return {"student": str(out), "history": distiller.history, "sigmas": sigmas.tolist()}


@accepts_renamed_keys("distill")
@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="distill")
def main(cfg: DictConfig) -> None:
    check_command(cfg, "distill")  # every '+key' read, numbers and choices valid: before any work
    result = distill(cfg)
    for record in result["history"]:
        print("round {round}: {steps} steps ".format(**record)
              + " ".join(f"{k}={v:.4g}" for k, v in record.items() if k not in ("round", "steps")))
    print(f"student: {result['student']} ({len(result['sigmas']) - 1} DDIM steps on sigmas "
          f"{[round(s, 4) for s in result['sigmas']]})")


if __name__ == "__main__":
    main()
