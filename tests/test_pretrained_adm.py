"""Format ``adm``: guided-diffusion ``UNetModel`` state dicts load as our DhariwalUNet on our DDPM, equal to the
reference code on the same (perturbed) weights.

Oracle: openai/guided-diffusion (``shared/reference/guided_diffusion``, imported): ``create_model`` builds the
network, ``create_gaussian_diffusion`` gives its x0-prediction (``p_mean_variance``'s ``pred_xstart``, which
handles learned sigma, ``predict_xstart`` and ``rescale_timesteps``) and its DDIM sampler.
"""

import pytest
import torch

from lightning_diff import sampling
from lightning_diff.formulations import schedules
from lightning_diff.networks import DhariwalUNet
from lightning_diff.pretrained import adm

from .pretrained_fixtures import guided_diffusion_script_util, write_adm_checkpoint

BASE = dict(image_size=16, num_channels=32, num_res_blocks=1, channel_mult="1,2", attention_resolutions="8",
            learn_sigma=False, class_cond=False, num_heads=2, use_scale_shift_norm=True, resblock_updown=False)
VARIANTS = {  # name -> (create_model settings, diffusion settings)
    "uncond-legacy-heads": (BASE, {}),
    "learned-sigma-cond-head-channels-updown-no-scale-shift": (
        dict(BASE, learn_sigma=True, class_cond=True, num_head_channels=16, resblock_updown=True,
             use_scale_shift_norm=False, attention_resolutions="16,8"), {}),
    "new-order-heads-upsample-three-levels-cosine-xstart-rescaled": (
        dict(BASE, image_size=32, channel_mult="1,1,2", num_heads=4, num_heads_upsample=2,
             use_new_attention_order=True, attention_resolutions="16,8"),
        dict(diffusion_steps=100, noise_schedule="cosine", predict_xstart=True, rescale_timesteps=True)),
    "half-width-level-512px-style": (
        dict(BASE, num_channels=64, channel_mult=(0.5, 1, 2), attention_resolutions="4", num_head_channels=32,
             resblock_updown=True, learn_sigma=True), {}),
}


def diffusion_of(settings: dict, **kwargs):
    script_util = guided_diffusion_script_util()
    return script_util.create_gaussian_diffusion(
        steps=settings.get("diffusion_steps", 1000), learn_sigma=settings.get("learn_sigma", False),
        noise_schedule=settings.get("noise_schedule", "linear"), predict_xstart=settings.get("predict_xstart", False),
        rescale_timesteps=settings.get("rescale_timesteps", False), **kwargs)


def flags_of(model: dict, diffusion: dict) -> dict:
    """The flags a user pastes: everything but a tuple channel_mult (which guided-diffusion's flags cannot say)."""
    flags = {k: v for k, v in model.items() if not (k == "channel_mult" and isinstance(v, tuple))}
    return dict(flags, **diffusion)


@pytest.mark.parametrize("name", VARIANTS)
def test_denoiser_equals_guided_diffusions_x0_prediction(name, tmp_path):
    model_settings, diffusion_settings = VARIANTS[name]
    reference = write_adm_checkpoint(tmp_path / "model.pt", **model_settings)
    pretrained = adm.load(tmp_path / "model.pt", **flags_of(model_settings, diffusion_settings))
    net, fm = pretrained.denoiser, pretrained.denoiser.formulation
    diffusion = diffusion_of(dict(model_settings, **diffusion_settings))
    t = torch.tensor([0, fm.num_timesteps // 3, fm.num_timesteps - 1])  # sigma 0.01 .. 157 (linear), one per sample
    sigma = fm.grid.flip(0)[t].float()
    gen = torch.Generator().manual_seed(0)
    size = model_settings["image_size"]
    labels = torch.randint(0, 1000, (3,), generator=gen) if model_settings["class_cond"] else None
    x = torch.randn(3, 3, size, size, generator=gen) * (1 + sigma.reshape(-1, 1, 1, 1))
    x_t = x * fm.alphas_cumprod[t].sqrt().float().reshape(-1, 1, 1, 1)
    with torch.no_grad():
        expected = diffusion.p_mean_variance(reference, x_t, t, clip_denoised=False,
                                             model_kwargs={"y": labels} if labels is not None else None)
        ours = net(x, sigma, labels)
    expected = expected["pred_xstart"]
    errors = ((ours - expected).flatten(1).abs().max(1).values / expected.flatten(1).abs().max(1).values).tolist()
    assert max(errors) < 1e-5, errors  # measured: 4.9e-7 .. 1.2e-6 (float32)
    assert pretrained.num_classes == (1000 if model_settings["class_cond"] else 0)
    assert pretrained.data_shape == (3, size, size) and net.variance_trained == model_settings["learn_sigma"]
    assert net.null_label is None


def test_between_levels_the_timestep_is_snapped_and_the_preconditioning_uses_sigma(tmp_path):
    """Off the source's levels, the network sees the nearest level's timestep and D = x - sigma eps with sigma
    itself (as EDM's iDDPMPrecond); ``round_sigma`` (which samplers apply to their grids) gives that level."""
    reference = write_adm_checkpoint(tmp_path / "model.pt", **BASE)
    net = adm.load(tmp_path / "model.pt", **BASE).denoiser
    level = net.formulation.grid.flip(0)[500]
    sigma = level * 1.0005
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = x - sigma.float() * reference(x / (1 + sigma.float() ** 2).sqrt(), torch.full((2,), 500))
        ours = net(x, sigma.float())
    assert net.round_sigma(sigma) == level
    assert (ours - expected).abs().max() < 1e-5 * expected.abs().max()


@pytest.mark.parametrize("flag, value, message", [
    ("num_channels", 64, r"flag num_channels=64 contradicts the weights in .* \(num_channels=32 by their shapes\)"),
    ("learn_sigma", True, r"flag learn_sigma=True contradicts .*\(learn_sigma=False"),
    ("class_cond", True, r"flag class_cond=True contradicts .*\(class_cond=False"),
    ("channel_mult", "1,2,2", r"flag channel_mult='1,2,2' contradicts .*\(channel_mult='1,2'"),
    ("attention_resolutions", "16", r"flag attention_resolutions='16' contradicts .*\(attention_resolutions='8'"),
    ("use_scale_shift_norm", False, r"flag use_scale_shift_norm=False contradicts .*\(use_scale_shift_norm=True"),
    ("resblock_updown", True, r"flag resblock_updown=True contradicts .*\(resblock_updown=False"),
    ("num_res_blocks", 2, r"flag num_res_blocks=2 contradicts .*\(num_res_blocks=1"),
    ("num_heads", 3, r"num_heads=3 is invalid for attention widths \[64\]"),
    ("clip_denoised", True, r"unknown flags \['clip_denoised'\]; allowed: image_size, num_channels"),
])
def test_a_flag_that_contradicts_the_weights_is_an_error_naming_both(flag, value, message, tmp_path):
    write_adm_checkpoint(tmp_path / "model.pt", **BASE)
    with pytest.raises(ValueError, match="format=adm: " + message):
        adm.load(tmp_path / "model.pt", **dict(BASE, **{flag: value}))


def test_image_size_with_default_channel_mult_contradicting_the_weights_is_an_error(tmp_path):
    write_adm_checkpoint(tmp_path / "model.pt", **BASE)
    flags = {k: v for k, v in BASE.items() if k != "channel_mult"}
    message = r"image_size=64 with channel_mult='' means .*\(1, 2, 3, 4\), but the weights .* \(1, 2\)"
    with pytest.raises(ValueError, match=message):
        adm.load(tmp_path / "model.pt", **dict(flags, image_size=64))


def test_ddim_trajectory_equals_guided_diffusions_ddim_sample_loop(tmp_path):
    """Our DDIM (eta = 0) over the respaced diffusion's own timesteps ("ddim10": 0, 100, ..., 900) equals
    guided-diffusion's ``ddim_sample_loop`` from the same start noise, class-conditional with learned sigma."""
    settings = VARIANTS["learned-sigma-cond-head-channels-updown-no-scale-shift"][0]
    reference = write_adm_checkpoint(tmp_path / "model.pt", **settings)
    net = adm.load(tmp_path / "model.pt", **settings).denoiser
    diffusion = diffusion_of(settings, timestep_respacing="ddim10")
    gen = torch.Generator().manual_seed(2)
    noise, labels = torch.randn(2, 3, 16, 16, generator=gen), torch.tensor([7, 993])
    with torch.no_grad():
        expected = diffusion.ddim_sample_loop(reference, noise.shape, noise=noise, clip_denoised=False,
                                              model_kwargs={"y": labels}, eta=0.0)
        grid = schedules.ddpm_sigmas(net.formulation.grid.flip(0), 10, "linear")
        assert net.formulation.timestep_index(grid[:-1]).tolist() == sorted(diffusion.timestep_map, reverse=True)
        ours = sampling.ddim(net, (1 + grid[0] ** 2).sqrt() * noise.double(), grid, cond={"labels": labels})
    error = ((ours.float() - expected).abs().max() / expected.abs().max()).item()
    assert error < 1e-5, error  # measured: 4.3e-7



@pytest.mark.parametrize("respacing, spacing, steps", [(None, "respace", 250), ("", "respace", 1000),
                                                       ("50", "respace", 50), (100, "respace", 100),
                                                       ("ddim25", "respace_ddim", 25)])
def test_timestep_respacing_sets_the_source_sampler(tmp_path, respacing, spacing, steps):
    """guided-diffusion's timestep_respacing is the grid of the source's sampler (image_sample.py: p_sample_loop,
    clip_denoised=True; learn_sigma=False: FIXED_LARGE, create_gaussian_diffusion's sigma_small=False); unset, the
    model cards' and the ADM paper's 250 steps."""
    write_adm_checkpoint(tmp_path / "model.pt", **BASE)
    flags = {} if respacing is None else {"timestep_respacing": respacing}
    pretrained = adm.load(tmp_path / "model.pt", **BASE, **flags)
    assert pretrained.denoiser.formulation.spacing == spacing and pretrained.denoiser.formulation.num_timesteps == 1000
    assert pretrained.sampler == {"name": "ddpm", "steps": steps,
                                  "options": {"variance": "fixed_large", "clip_denoised": True}}


@pytest.mark.parametrize("settings, message", [
    (dict(model_channels=16, norm_groups=32), r"norm_groups=32 does not divide the block's channels \(16 -> 16\)"),
    (dict(model_channels=33, channel_mult=(0.5, 1)), r"channel_mult=\(0.5, 1\) times model_channels=33"),
    (dict(num_heads=0), "num_heads=0 is invalid; allowed: None or an integer >= 1"),
    (dict(num_classes=10, label_dropout=0.1, with_null_label=False), "label_dropout=0.1 needs a null label"),
])
def test_dhariwal_unet_refuses_settings_it_cannot_build(settings, message):
    with pytest.raises(ValueError, match=message):
        DhariwalUNet(**dict(dict(resolution=8, model_channels=32, channel_mult=(1, 2), num_blocks=1,
                                 attn_resolutions=()), **settings))
