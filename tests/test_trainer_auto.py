"""trainer=auto (the default): the GPU when CUDA is available, the CPU otherwise, with a precision that suits it."""

import hydra
import pytest
import torch
from hydra import compose as hydra_compose
from hydra import initialize_config_dir
from pytorch_lightning.accelerators import CPUAccelerator

from lightning_diff import config
from lightning_diff.checkpoint_io import AtomicCheckpointIO
from lightning_diff.cli.train import train
from lightning_diff.config import CONFIG_DIR, compose, cpu_has_native_bf16

from .helpers import compose_config


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


@pytest.mark.parametrize("flags, native", [
    ("fpu sse2 avx2 avx512f avx512bw avx512_vnni avx512_bf16 avx512_vbmi", True),  # AMD Zen 4
    ("fpu avx2 avx512f avx512bw amx_bf16 amx_tile amx_int8", True),  # Intel Sapphire Rapids
    ("fpu avx2 avx512f avx512bw avx512_vnni", False),  # Cascade Lake: bf16 only emulated (2-3x slower)
    ("fpu sse2 avx2 fma", False),
])
def test_cpu_bf16_units_are_read_from_cpuinfo(tmp_path, flags, native):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(f"processor\t: 0\nflags\t\t: {flags}\n\nprocessor\t: 1\nflags\t\t: {flags}\n")
    assert cpu_has_native_bf16(str(cpuinfo)) is native
    assert cpu_has_native_bf16(str(tmp_path / "absent")) is False  # not Linux: fp32


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the machine without a GPU")
@pytest.mark.parametrize("native", [True, False])
def test_the_demo_asks_bf16_only_on_a_cpu_with_bf16_units(tmp_path, monkeypatch, native):
    """experiment=edm_digits_fast (make demo) trains under bf16 autocast where the CPU multiplies bf16 in hardware,
    in fp32 elsewhere; trainer=auto alone keeps fp32 on every CPU (the other presets' numbers were made in fp32)."""
    monkeypatch.setattr(config, "cpu_has_native_bf16", lambda: native)
    demo = compose(["experiment=edm_digits_fast", f"paths.output_dir={tmp_path}"]).trainer
    assert demo.precision == ("bf16-mixed" if native else "32-true")
    assert _trainer_cfg(tmp_path).precision == "32-true"
    assert _trainer_cfg(tmp_path, "experiment=edm_digits").precision == "32-true"


def test_an_unknown_cpu_precision_choice_is_refused(tmp_path):
    with pytest.raises(Exception, match="cpu='bf17'; allowed: fp32, native_bf16"):
        _ = _trainer_cfg(tmp_path, "trainer.precision=${auto_precision:bf17}").precision


def test_the_demo_trains_under_bf16_with_fused_adam(tmp_path):
    """The demo's optimizer and precision on this CPU (bf16 forced, whatever its units): fused Adam runs on the
    CPU, the weights and their EMA stay float32 and finite."""
    cfg = compose_config("train", ["experiment=edm_digits_fast", "trainer.precision=bf16-mixed", "logger=csv",
                                   "callbacks.progress=null", "++trainer.enable_progress_bar=false",
                                   "network.model_channels=8", "trainer.max_steps=3", "lr_scheduler.warmup_steps=1",
                                   "data.batch_size=16", "callbacks.sample_grid.num_samples=4"], tmp_path)
    state = torch.load(train(cfg)["checkpoint"], map_location="cpu", weights_only=False)
    assert state["optimizer_states"][0]["param_groups"][0]["fused"] is True
    assert state["run_config"]["trainer"]["precision"] == "bf16-mixed"
    weights = [v for k, v in state["state_dict"].items() if v.is_floating_point()]
    assert weights and all(v.dtype == torch.float32 and v.isfinite().all() for v in weights)
