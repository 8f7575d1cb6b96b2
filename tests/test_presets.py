"""The paper presets (configs/experiment/<paper>_*.yaml): each composes, its network has the paper's
size (counted on the meta device against the reference code where it is available, else the paper's or the
official code's number), one optimizer step runs at tiny width (+smoke=true), the global batch is split exactly
over the processes, and experiments/presets.md is the table its script writes from the headers.

Each preset is composed once (``_composed``, read-only). One optimizer step of one preset per network family
runs in ``make test`` (SongUNet end to end in test_smoke_run_of_a_preset_finishes); the other presets, which
differ from these in values and formulation only, step in ``make test-slow``."""

from __future__ import annotations

import functools
import importlib.util
import subprocess
import sys
from pathlib import Path

import hydra
import pytest
import torch
from omegaconf import OmegaConf, open_dict

from lightning_diff.config import apply_smoke, check_global_batch, split_global_batch
from lightning_diff.training.builders import build_datamodule, build_module, build_network

from .helpers import compose_config

ROOT = Path(__file__).resolve().parents[1]
REFERENCE = ROOT.parent / "shared" / "reference"
spec = importlib.util.spec_from_file_location("make_presets_table", ROOT / "experiments" / "make_presets_table.py")
make_presets_table = importlib.util.module_from_spec(spec)
spec.loader.exec_module(make_presets_table)

PRESETS = sorted(make_presets_table.paper_presets())
# One preset per network family steps in make test (DhariwalUNet, diffusers, DiT, RefineNet; SongUNet runs end to end
# in test_smoke_run_of_a_preset_finishes); every other preset steps in make test-slow.
STEPPED_FAST = ["edm_imagenet64_cond_adm", "ddpm_cifar10", "dit_xl2_imagenet256", "ncsnv2_cifar10"]
STEPPED = [pytest.param(p, marks=() if p in STEPPED_FAST else pytest.mark.slow) for p in PRESETS
           if p != "edm_cifar10_cond_vp"]


@functools.cache
def _composed(preset: str):
    """The preset's composed config (cached: do not modify it)."""
    return compose_config("train", [f"experiment={preset}"])

# Trainable parameters of the official code's network for the preset (preset -> (count, source)). The EDM presets
# and DiT are also counted from the reference code itself below, when it is present.
OFFICIAL_COUNTS = {
    "edm_cifar10_cond_vp": (55_735_299, "NVlabs/edm SongUNet ddpmpp, label_dim 10 (EDM Table 7: 55.73M)"),
    "edm_cifar10_uncond_vp": (55_733_891, "NVlabs/edm SongUNet ddpmpp, label_dim 0"),
    "edm_cifar10_cond_ve": (56_400_643, "NVlabs/edm SongUNet ncsnpp, label_dim 10"),
    "edm_cifar10_uncond_ve": (56_397_827, "NVlabs/edm SongUNet ncsnpp, label_dim 0"),
    "edm_ffhq64_uncond_vp": (61_805_571, "NVlabs/edm SongUNet ddpmpp 64x64, cres 1,2,2,2 (EDM Table 7: 61.80M)"),
    "edm_afhqv2_64_uncond_vp": (61_805_571, "as FFHQ-64"),
    "edm_imagenet64_cond_adm": (295_899_267, "NVlabs/edm DhariwalUNet (EDM Table 7: 295.90M)"),
    # score_sde_pytorch models built from configs/<sde>/cifar10_*_continuous.py (NCSN++: minus its 128 frozen
    # Fourier weights, a parameter there and a buffer here).
    "vp_ddpmpp_cifar10": (61_804_419, "score_sde_pytorch cifar10_ddpmpp_continuous"),
    "subvp_ddpmpp_deep_cifar10": (106_632_579, "score_sde_pytorch cifar10_ddpmpp_deep_continuous"),
    "ve_ncsnpp_cifar10": (62_758_915 - 128, "score_sde_pytorch cifar10_ncsnpp_continuous"),
    "ve_ncsnpp_deep_cifar10": (107_587_075 - 128, "score_sde_pytorch cifar10_ncsnpp_deep_continuous"),
    "rf_cifar10": (61_804_419, "RectifiedFlow cifar10_rf_gaussian_ddpmpp = score_sde DDPM++ continuous"),
    "dit_xl2_imagenet256": (675_129_632 - 256 * 1152, "facebookresearch/DiT train.py count minus its frozen pos table"),
    "ddpm_cifar10": (35_746_307, "diffusers UNet2DModel with google/ddpm-cifar10-32's config (Ho et al.: 35.7M)"),
    # ermongroup's own networks at ngf 128 (counted from the mirror in tests/test_refinenet.py).
    "ncsn_cifar10": (30_117_635, "ermongroup/ncsn CondRefineNetDilated, ngf 128, L = 10"),
    "ncsnv2_cifar10": (29_694_083, "ermongroup/ncsnv2 NCSNv2, ngf 128"),
}
# Presets whose network is not the paper's (stated in their headers): (ours, the paper's network, source).
STATED_DIFFERENCES = {
    "iddpm_cifar10": (57_094_662, 52_546_438, "guided-diffusion UNetModel, iDDPM CIFAR-10 flags, learn_sigma"),
}
UNPUBLISHED_COUNTS = {"fm_ot_cifar10": 171_268_099}  # App. E gives sizes, not a count (its header)


def _network_on_meta(cfg) -> torch.nn.Module:
    if "model" in cfg.network:  # a diffusers model inside DiffusersBackbone: its sizes are its own
        with torch.device("meta"):
            return hydra.utils.instantiate(cfg.network)
    with torch.device("meta"):
        return build_network(cfg, (cfg.network.in_channels, cfg.network.resolution, cfg.network.resolution),
                             cfg.network.num_classes, bool(cfg.network.num_classes))


def _count(net: torch.nn.Module) -> int:
    return sum(p.numel() for p in net.parameters())


def test_presets_compose_and_state_their_sources():
    headers = make_presets_table.paper_presets()
    for preset in PRESETS:
        cfg, fields = _composed(preset), headers[preset]
        assert {"paper", "source", "headline", "gpu_days", "params", "exact", "differs", "run"} <= set(fields), preset
        assert cfg.experiment_name == preset and f"experiment={preset}" in fields["run"]
        assert cfg.global_batch_size > 0, preset
        assert OmegaConf.missing_keys(cfg) <= {"data.root", "data.path"}, preset  # the user's data


def test_all_issue_presets_exist():
    names = {"ddpm_cifar10", "iddpm_cifar10", "ncsn_cifar10", "ncsnv2_cifar10", "vp_ddpmpp_cifar10",
             "subvp_ddpmpp_deep_cifar10", "ve_ncsnpp_cifar10", "ve_ncsnpp_deep_cifar10", "edm_ffhq64_uncond_vp",
             "edm_afhqv2_64_uncond_vp", "edm_imagenet64_cond_adm", "dit_xl2_imagenet256", "rf_cifar10",
             "fm_ot_cifar10"} | {f"edm_cifar10_{c}_{a}" for c in ("cond", "uncond") for a in ("vp", "ve")}
    assert names == set(PRESETS)


def test_every_preset_has_a_counted_network():
    assert set(OFFICIAL_COUNTS) | set(STATED_DIFFERENCES) | set(UNPUBLISHED_COUNTS) == set(PRESETS)


@pytest.mark.parametrize("preset", sorted(OFFICIAL_COUNTS))
def test_network_has_the_official_parameter_count(preset):
    count, source = OFFICIAL_COUNTS[preset]
    assert _count(_network_on_meta(_composed(preset))) == count, source


@pytest.mark.parametrize("preset", sorted(STATED_DIFFERENCES) + sorted(UNPUBLISHED_COUNTS))
def test_network_that_differs_has_the_count_its_header_states(preset):
    ours, paper, _ = STATED_DIFFERENCES.get(preset, (UNPUBLISHED_COUNTS.get(preset), None, None))
    assert _count(_network_on_meta(_composed(preset))) == ours
    params = make_presets_table.paper_presets()[preset]["params"]
    assert f"ours {ours / 1e6:.2f}M" in params
    assert paper is None or f"{paper / 1e6:.1f}M" in params or f"{paper / 1e6:.2f}M" in params


def _edm_reference():
    if not (REFERENCE / "edm" / "training" / "networks.py").exists():
        pytest.skip(f"reference code absent: {REFERENCE / 'edm'} (see shared/reference/README.md)")
    sys.path.insert(0, str(REFERENCE / "edm"))
    try:
        from training import networks
    finally:
        sys.path.remove(str(REFERENCE / "edm"))
    return networks


@pytest.mark.parametrize("preset", [p for p in PRESETS if p.startswith("edm_")])
def test_edm_network_matches_the_reference_count(preset):
    """NVlabs/edm's own SongUNet / DhariwalUNet, built with the preset's settings, on the meta device."""
    networks = _edm_reference()
    net_cfg = OmegaConf.to_container(_composed(preset).network)
    cls = getattr(networks, net_cfg.pop("_target_").rpartition(".")[2])
    renamed = {"resolution": "img_resolution", "num_classes": "label_dim"}
    kwargs = {renamed.get(k, k): v for k, v in net_cfg.items()}
    kwargs["out_channels"] = kwargs["out_channels"] or kwargs["in_channels"]
    for ours_only in ("channels_per_head", "with_null_label"):  # EDM's ADM: 64 channels per head, no null label
        kwargs.pop(ours_only, None)
    with torch.device("meta"):
        reference = cls(**kwargs)
    assert _count(_network_on_meta(_composed(preset))) == _count(reference)


def test_dit_matches_the_reference_count():
    if not (REFERENCE / "dit" / "models.py").exists():
        pytest.skip(f"reference code absent: {REFERENCE / 'dit'}")
    pytest.importorskip("timm", reason="facebookresearch/DiT models.py needs timm")
    sys.path.insert(0, str(REFERENCE / "dit"))
    try:
        import models
    finally:
        sys.path.remove(str(REFERENCE / "dit"))
    with torch.device("meta"):
        reference = models.DiT_XL_2()
    ours = _network_on_meta(_composed("dit_xl2_imagenet256"))
    assert _count(ours) == _count(reference) - reference.pos_embed.numel()  # a frozen parameter there, a buffer here


@pytest.mark.parametrize("preset", STEPPED)
def test_one_optimizer_step_at_tiny_width(preset, tmp_path):
    """+smoke=true: the preset's formulation, loss, optimizer, schedule and augmentation at tiny width on random
    images of its data shape; one optimizer step updates every trained parameter and leaves them finite (the
    weights themselves may not move: the ramp-ups give the first step learning rate 0, as EDM's and score_sde's)."""
    cfg = compose_config("train", [f"experiment={preset}", "+smoke=true"], tmp_path)
    assert apply_smoke(cfg)
    check_global_batch(cfg)
    datamodule = build_datamodule(cfg)
    module = build_module(cfg, datamodule)
    trainer = hydra.utils.instantiate(cfg.trainer, logger=False, callbacks=[], enable_checkpointing=False,
                                      enable_progress_bar=False, max_steps=1, limit_val_batches=0)
    trainer.fit(module, datamodule=datamodule)
    state = trainer.optimizers[0].state
    assert trainer.global_step == 1 and state
    assert all(int(s["step"]) == 1 for s in state.values())
    assert all(p.isfinite().all() for p in module.parameters())


def test_smoke_run_of_a_preset_finishes(tmp_path):
    """The full command: python -m lightning_diff.cli.train experiment=edm_cifar10_cond_vp +smoke=true (SongUNet)."""
    from lightning_diff.cli.train import train

    cfg = compose_config("train", ["experiment=edm_cifar10_cond_vp", "+smoke=true"], tmp_path)
    result = train(cfg)
    assert Path(result["checkpoint"]).exists() and result["train/loss"] > 0


def test_smoke_true_on_the_command_line():
    """Hydra reads `+smoke=true` as a boolean, which cannot name a config: the entry point rewrites it."""
    out = subprocess.run([sys.executable, "-m", "lightning_diff.cli.train", "experiment=ncsnv2_cifar10", "+smoke=true",
                          "--cfg", "job"], capture_output=True, text=True, check=True, cwd=ROOT).stdout
    cfg = OmegaConf.create(out)
    assert cfg.data._target_.endswith("RandomImagesDataModule") and cfg.trainer.max_steps == 2


# --- global batch, length and ramp-up in images ------------------------------------------------------------------
def test_global_batch_split_matches_edm():
    # EDM training_loop.py: batch_gpu_total = batch / world; rounds = batch_gpu_total // batch_gpu.
    assert split_global_batch(512, 8) == (64, 1)
    assert split_global_batch(4096, 32, 32) == (32, 4)
    assert split_global_batch(512, 1, 48) == (32, 16)  # the smallest exact accumulation under the limit
    with pytest.raises(ValueError, match=r"global_batch_size=512 is not divisible by the 3 training processes"):
        split_global_batch(512, 3)


def test_batch_follows_the_devices():
    cfg = compose_config("train", ["experiment=edm_imagenet64_cond_adm", "trainer.devices=8", "+trainer.num_nodes=4",
                                   "trainer.accelerator=cpu"])
    assert (cfg.data.batch_size, cfg.trainer.accumulate_grad_batches) == (128, 1)
    cfg = compose_config("train", ["experiment=edm_imagenet64_cond_adm", "trainer.devices=8", "+trainer.num_nodes=4",
                                   "trainer.accelerator=cpu", "max_batch_per_process=32"])
    assert (cfg.data.batch_size, cfg.trainer.accumulate_grad_batches) == (32, 4)
    cfg = compose_config("train", ["experiment=edm_cifar10_cond_vp", "trainer.devices=3", "trainer.accelerator=cpu"])
    with pytest.raises(ValueError, match="global_batch_size=512 is not divisible by the 3"):
        _ = cfg.data.batch_size


def test_overriding_the_per_process_batch_alone_is_refused():
    cfg = compose_config("train", ["experiment=edm_cifar10_cond_vp", "data.batch_size=64"])
    with pytest.raises(ValueError, match=r"data.batch_size=64 x 1 processes .* global_batch_size=512"):
        check_global_batch(cfg)


def test_lengths_and_ramp_up_in_images_are_edm_steps():
    cfg = _composed("edm_cifar10_cond_vp")
    assert cfg.trainer.max_steps == 390_625  # 200 Mimg / 512
    assert cfg.lr_scheduler.warmup_steps == 10e6 / 512  # 19531.25: lr x min(n_img / 10 Mimg, 1) exactly
    cfg = compose_config("train", ["experiment=edm_imagenet64_cond_adm"])
    assert cfg.trainer.max_steps == 610_352  # ceil(2500 Mimg / 4096): EDM stops at the first step past 2500 Mimg
    with open_dict(cfg):
        cfg.global_batch_size = 2048
    assert cfg.lr_scheduler.warmup_steps == 10e6 / 2048


# --- the generated table -------------------------------------------------------------------------------------------
def test_presets_table_is_current():
    written = (ROOT / "experiments" / "presets.md").read_text()
    assert written == make_presets_table.render(), "stale: run python experiments/make_presets_table.py"
