"""trainer=auto (the default): the GPU when CUDA is available, the CPU otherwise, with a precision that suits it."""

import hydra
import pytest
import torch
from hydra import compose as hydra_compose
from hydra import initialize_config_dir
from pytorch_lightning.accelerators import CPUAccelerator

from lightning_diff.checkpoint_io import AtomicCheckpointIO
from lightning_diff.config import CONFIG_DIR, compose


def _trainer_cfg(tmp_path, *overrides):
    return compose(["trainer=auto", f"paths.output_dir={tmp_path}", *overrides]).trainer


def test_default_trainer_is_auto():
    with initialize_config_dir(CONFIG_DIR, version_base="1.3"):
        cfg = hydra_compose("train", return_hydra_config=True)
    assert cfg.hydra.runtime.choices.trainer == "auto"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the machine without a GPU")
def test_auto_without_a_gpu_builds_a_full_precision_cpu_trainer(tmp_path):
    cfg = _trainer_cfg(tmp_path)
    assert (cfg.accelerator, cfg.devices, cfg.precision) == ("cpu", 1, "32-true")
    trainer = hydra.utils.instantiate(cfg, logger=False)
    assert isinstance(trainer.accelerator, CPUAccelerator)
    assert trainer.num_devices == 1
    assert trainer.precision == "32-true"
    assert isinstance(trainer.strategy.checkpoint_io, AtomicCheckpointIO)  # shared with trainer=cpu


@pytest.mark.parametrize("bf16, precision", [(True, "bf16-mixed"), (False, "16-mixed")])
def test_auto_with_cuda_resolves_to_one_gpu(tmp_path, monkeypatch, bf16, precision):
    """bf16 autocast where the GPU computes in bf16 (Ampere and newer), fp16 with loss scaling before."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    asked = []

    def is_bf16_supported(including_emulation=True):
        asked.append(including_emulation)
        return bf16 and not including_emulation  # emulated bf16 would be slow: it must not count

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", is_bf16_supported)
    cfg = _trainer_cfg(tmp_path)
    assert (cfg.accelerator, cfg.devices, cfg.precision) == ("gpu", 1, precision)
    assert asked == [False]
    assert cfg.plugins[0]._target_ == "lightning_diff.checkpoint_io.AtomicCheckpointIO"


def test_auto_settings_can_be_overridden(tmp_path):
    cfg = _trainer_cfg(tmp_path, "trainer.precision=bf16-mixed", "trainer.accelerator=cpu")
    assert (cfg.accelerator, cfg.precision) == ("cpu", "bf16-mixed")
