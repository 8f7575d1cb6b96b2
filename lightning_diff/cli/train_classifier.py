"""``lightning-diff train-classifier``: train a noise-conditional classifier for classifier guidance
(``configs/classifier.yaml``; the classifier itself: ``methods.classifier``)."""

from __future__ import annotations

import hydra
import pytorch_lightning as pl
from omegaconf import DictConfig, OmegaConf

from ..config import CONFIG_DIR
from ..methods.classifier import NoisyClassifierModule, build_classifier_network
from ..training.builders import build_callbacks, build_datamodule, build_logger
from .config_check import check_command
from .renamed import accepts_renamed_keys

__all__ = ["train", "main"]


def train(cfg: DictConfig) -> dict:
    """Train one classifier as ``cfg`` (``configs/classifier.yaml``) describes; returns the final metrics and the
    checkpoint path."""
    pl.seed_everything(cfg.seed, workers=True)
    datamodule = build_datamodule(cfg)
    lr_scheduler = hydra.utils.instantiate(cfg.lr_scheduler) if cfg.get("lr_scheduler") else None
    module = NoisyClassifierModule(
        build_classifier_network(cfg.network, datamodule.data_shape, datamodule.num_classes),
        hydra.utils.instantiate(cfg.formulation), frame=cfg.classifier.frame,
        optimizer=hydra.utils.instantiate(cfg.optimizer), lr_scheduler=lr_scheduler,
        val_buckets=cfg.classifier.val_buckets, data_shape=datamodule.data_shape, num_classes=datamodule.num_classes,
        data_transform=datamodule.transform, run_config=OmegaConf.to_container(cfg, resolve=True))
    trainer = hydra.utils.instantiate(cfg.trainer, logger=build_logger(cfg), callbacks=build_callbacks(cfg))
    trainer.fit(module, datamodule=datamodule)
    result = {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}
    ckpt = trainer.checkpoint_callback
    if ckpt is not None and ckpt.last_model_path:
        result["checkpoint"] = ckpt.last_model_path
    return result


@accepts_renamed_keys("classifier")
@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="classifier")
def main(cfg: DictConfig) -> None:
    check_command(cfg, "classifier")  # every '+key' read, numbers and choices valid: before any work
    result = train(cfg)
    print(" ".join(f"{key}: {value:.4g}" if isinstance(value, float) else f"{key}: {value}"
                   for key, value in sorted(result.items()) if key.startswith(("val/acc", "checkpoint"))))


if __name__ == "__main__":
    main()
