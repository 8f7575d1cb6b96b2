"""`make test-slow`: the commands of experiments/pretrained/README.md on 64 images, with tiny checkpoints of each
format built locally by the reference code (no download) and a synthetic published-statistics file: the
commands, flags and records work end to end (a smoke test, not a reproduction)."""

import json
import sys

import numpy as np
import pytest
import torch

from lightning_diff import cli
from tests.pretrained_fixtures import reference_or_skip, write_adm_checkpoint, write_edm_pickle

pytestmark = pytest.mark.slow

ADM = dict(image_size=16, num_channels=32, num_res_blocks=1, channel_mult="1,2", attention_resolutions="8",
           learn_sigma=True, class_cond=True, num_heads=2, use_scale_shift_norm=True, resblock_updown=True)


def _edm(folder):
    write_edm_pickle(folder / "edm.pkl", label_dim=10, img_resolution=8, model_channels=16, channel_mult=[1],
                     num_blocks=1, attn_resolutions=[8])
    return [f"ckpt={folder / 'edm.pkl'}", "sampler=heun", "sampler.steps=18", "seed_protocol=edm"]


def _adm(folder):
    write_adm_checkpoint(folder / "adm.pt", **ADM)
    flags = [f"+pretrained.{k}={v!r}" if isinstance(v, str) else f"+pretrained.{k}={str(v).lower()}"
             for k, v in ADM.items()]
    return [f"ckpt={folder / 'adm.pt'}", *flags, "sampler=ddpm", "sampler.steps=25"]


def _dit(folder):
    reference_or_skip("dit")
    import models as dit_models
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    net = dit_models.DiT(input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=1, num_heads=2,
                         num_classes=10, class_dropout_prob=0.1)
    torch.save(net.state_dict(), folder / "dit.pt")
    AutoencoderKL(block_out_channels=(8,), norm_num_groups=4, latent_channels=4, sample_size=8).save_pretrained(
        folder / "vae")
    return [f"ckpt={folder / 'dit.pt'}", "+pretrained.num_heads=2", f"+pretrained.vae={folder / 'vae'}",
            "guidance=1.5", "sampler=ddpm", "sampler.steps=25"]


def _diffusers(folder):
    import diffusers

    torch.manual_seed(0)
    unet = diffusers.UNet2DModel(sample_size=16, in_channels=3, out_channels=3, block_out_channels=(32, 32),
                                 layers_per_block=1, down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                                 up_block_types=("AttnUpBlock2D", "UpBlock2D"), norm_num_groups=8,
                                 attention_head_dim=8)
    diffusers.DDPMPipeline(unet=unet, scheduler=diffusers.DDPMScheduler()).save_pretrained(folder / "pipe")
    return [f"ckpt={folder / 'pipe'}", "sampler=ddim", "sampler.steps=25"]


@pytest.mark.parametrize("build", [_edm, _adm, _dit, _diffusers], ids=["edm", "adm", "dit", "diffusers"])
def test_recipe_commands_on_64_images(build, tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["lightning-diff"])
    monkeypatch.setenv("HYDRA_FULL_ERROR", "1")
    monkeypatch.setenv("LIGHTNING_DIFF_CACHE", str(tmp_path / "cache"))
    args = build(tmp_path)
    reference = tmp_path / "ref.npz"
    np.savez(reference, mu=np.zeros(2048), sigma=np.eye(2048))  # the layout of NVlabs/edm's fid-refs
    cli.main(["sample", *args, "num_samples=64", "sampler.batch_size=32", "device=cpu", f"out={tmp_path / 'out'}"])
    images = np.load(tmp_path / "out" / "samples.npz")["images"]
    assert images.shape[0] == 64 and images.dtype == np.uint8 and images.shape[1] == 3
    cli.main(["evaluate", *args, "metrics=[fid]", "metrics.num_samples=64", f"metrics.reference={reference}",
              "metrics.fid.method=eigvals", "device=cpu", "progress=false", "name=smoke"])
    record = json.loads(next(tmp_path.rglob("eval-smoke.json")).read_text())
    assert np.isfinite(record["metrics"]["fid"]) and record["protocol"]["weights"] == "released"
    assert record["protocol"]["samples"]["reference"]["published"] == str(reference.resolve())
