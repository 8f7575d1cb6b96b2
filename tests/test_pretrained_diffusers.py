"""Format ``diffusers``: saved diffusers models and pipelines load as our ``Denoiser`` equal to diffusers' own.

Oracles: the diffusers model itself on the same perturbed weights, the x0-prediction of its scheduler's
``prediction_type`` on the scheduler's own ``alphas_cumprod`` (float64 formulas below), and diffusers'
``DDIMScheduler`` loop for the trajectory.
"""

from __future__ import annotations

from contextlib import nullcontext

import pytest
import torch

from lightning_diff.pretrained import diffusers_folder
from lightning_diff.sampling.ancestral import ddim

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny networks: one intra-op thread

diffusers = pytest.importorskip("diffusers", reason="diffusers (dev / extra 'pretrained') is not installed")

TIMESTEPS = (0, 1, 500, 999)  # sigma from ~0.01 to ~160 for the schedules below


def perturb(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Move every parameter off its init (diffusers zero-initialises DiT's adaLN and output layers)."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.eval()


def tiny_unet(out_channels: int = 3, num_class_embeds: int | None = None) -> torch.nn.Module:
    """UNet2DModel: 2 levels of 32 channels, 16x16, attention at the lower level."""
    torch.manual_seed(0)
    return perturb(diffusers.UNet2DModel(
        sample_size=16, in_channels=3, out_channels=out_channels, block_out_channels=(32, 32), layers_per_block=1,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=8, attention_head_dim=8, num_class_embeds=num_class_embeds))


def tiny_dit() -> torch.nn.Module:
    """DiTTransformer2DModel: 2 layers of width 32, 8x8x4 latents, patch 2, 10 classes + null, learned sigma."""
    torch.manual_seed(0)
    return perturb(diffusers.DiTTransformer2DModel(
        num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=8, num_layers=2, sample_size=8,
        patch_size=2, num_embeds_ada_norm=10))


def tiny_vae() -> torch.nn.Module:
    torch.manual_seed(0)
    return diffusers.AutoencoderKL(block_out_channels=(8,), norm_num_groups=4, latent_channels=4,
                                   sample_size=8).eval()


def source_x0(model, scheduler, x: torch.Tensor, t: int, labels) -> torch.Tensor:
    """diffusers' x0-prediction at timestep t for ``x_t = sqrt(abar_t) x`` (float64 formulas): epsilon
    ``(x_t - sqrt(1 - abar) eps) / sqrt(abar)`` (Ho et al. 2020 eq. 15), v_prediction ``sqrt(abar) x_t -
    sqrt(1 - abar) v`` (Salimans & Ho 2022 sec. 4), sample: the output itself."""
    abar = scheduler.alphas_cumprod[t].double()
    x_t = (abar.sqrt() * x.double()).float()
    with torch.no_grad():
        out = model(x_t, torch.full((x.shape[0],), t), class_labels=labels).sample[:, : x.shape[1]].double()
    kind, x_t = scheduler.config.prediction_type, x_t.double()
    if kind == "epsilon":
        return (x_t - (1 - abar).sqrt() * out) / abar.sqrt()
    if kind == "v_prediction":
        return abar.sqrt() * x_t - (1 - abar).sqrt() * out
    return out


def sigma_of(scheduler, t) -> torch.Tensor:
    abar = scheduler.alphas_cumprod[t].double()
    return ((1 - abar) / abar).sqrt()


def max_relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.double() - want).abs().max() / want.abs().max()).item()


def save(kind: str, root, model, scheduler=None, flags_only=False):
    """Save ``model`` the way diffusers does: a model folder, or a DDPMPipeline / DiTPipeline folder."""
    if kind == "model":
        model.save_pretrained(root)
    elif kind == "ddpm_pipeline":
        diffusers.DDPMPipeline(unet=model, scheduler=scheduler).save_pretrained(root)
    else:
        diffusers.DiTPipeline(transformer=model, vae=tiny_vae(), scheduler=scheduler).save_pretrained(root)
    return root


VARIANTS = {  # name -> (model builder, saved as, scheduler, loader flags, labels: conditional / None)
    "unet_epsilon_linear_model_folder": (tiny_unet, "model", diffusers.DDPMScheduler(), {}, [None]),
    "unet_v_scaled_linear_conditional": (
        lambda: tiny_unet(num_class_embeds=10), "ddpm_pipeline",
        diffusers.DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                prediction_type="v_prediction"), {}, [torch.tensor([0, 4, 9])]),
    "unet_sample_cosine_learned_variance": (
        lambda: tiny_unet(out_channels=6), "ddpm_pipeline",
        diffusers.DDIMScheduler(beta_schedule="squaredcos_cap_v2", prediction_type="sample"), {}, [None]),
    "unet_trained_betas_flags": (
        tiny_unet, "model", diffusers.DDPMScheduler(trained_betas=torch.linspace(2e-4, 0.03, 1000).tolist()),
        dict(trained_betas=torch.linspace(2e-4, 0.03, 1000).tolist(), prediction_type="epsilon"), [None]),
    "dit_learned_sigma_cfg": (tiny_dit, "dit_pipeline", diffusers.DDIMScheduler(), {},
                              [torch.tensor([0, 4, 9]), None]),
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_loaded_model_equals_diffusers(tmp_path, variant):
    """load(folder)(x, sigma_t, labels) == the source's x0-prediction at t in TIMESTEPS to 1e-5 relative."""
    build, kind, scheduler, flags, label_cases = VARIANTS[variant]
    model = build()
    folder = save(kind, tmp_path / variant, model, scheduler)
    with pytest.warns(UserWarning, match="DDPMScheduler defaults") if kind == "model" and not flags else nullcontext():
        pretrained = diffusers_folder.load(folder, **flags)
    channels = model.config.in_channels
    size = model.config.sample_size
    assert pretrained.data_shape == (channels, size, size)
    assert pretrained.denoiser.variance_trained == (model.config.out_channels == 2 * channels)
    assert (pretrained.decoder is not None) == (kind == "dit_pipeline")
    x = torch.randn(3, channels, size, size, generator=torch.Generator().manual_seed(1))
    errors = []
    for labels in label_cases:
        source_labels = labels
        if labels is None and pretrained.num_classes:  # unconditional = the null label (DiT's class dropout)
            assert pretrained.denoiser.null_label == pretrained.num_classes
            source_labels = torch.full((3,), pretrained.num_classes)
        for t in TIMESTEPS:
            with torch.no_grad():
                got = pretrained.denoiser(x, sigma_of(scheduler, t), labels)
            errors.append(max_relative_error(got, source_x0(model, scheduler, x, t, source_labels)))
    print(f"diffusers {variant}: max relative error {max(errors):.2e}")
    assert max(errors) < 1e-5


def test_conditional_unet_has_no_null_label(tmp_path):
    """A UNet2DModel's class table has no unconditional row: labels=None is an error, not a silent label."""
    folder = save("model", tmp_path / "unet", tiny_unet(num_class_embeds=10))
    denoiser = diffusers_folder.load(folder, prediction_type="epsilon", num_train_timesteps=1000,
                                     beta_schedule="linear", beta_start=1e-4, beta_end=0.02).denoiser
    assert denoiser.null_label is None
    with pytest.raises(ValueError, match="without a null label"):
        denoiser(torch.randn(1, 3, 16, 16), 1.0)


@pytest.mark.parametrize("spacing, prediction_type", [("leading", "epsilon"), ("trailing", "v_prediction")])
def test_ddim_trajectory_equals_diffusers(tmp_path, spacing, prediction_type):
    """Our DDIM(eta=0) on the formulation's grid == diffusers' DDIMScheduler loop (set_timesteps(10),
    step(eta=0), set_alpha_to_one=True, clip_sample=False) from the same start noise."""
    scheduler = diffusers.DDIMScheduler(timestep_spacing=spacing, prediction_type=prediction_type, clip_sample=False)
    model = tiny_unet()
    pretrained = diffusers_folder.load(save("ddpm_pipeline", tmp_path / "p", model, scheduler))
    scheduler.set_timesteps(10)
    sigmas = pretrained.denoiser.formulation.sampling_sigmas(10)
    torch.testing.assert_close(sigmas[:-1], sigma_of(scheduler, scheduler.timesteps), rtol=1e-12, atol=0)
    noise = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    x = noise
    with torch.no_grad():
        for t in scheduler.timesteps:
            x = scheduler.step(model(x, t).sample, t, x, eta=0.0).prev_sample
        ours = ddim(pretrained.denoiser, noise * (1 + sigmas[0] ** 2).sqrt(), sigmas, eta=0.0)
    error = max_relative_error(ours, x.double())
    print(f"diffusers ddim {spacing} {prediction_type}: max relative error {error:.2e}")
    assert error < 1e-5


def test_flag_contradicting_the_scheduler_raises(tmp_path):
    folder = save("ddpm_pipeline", tmp_path / "p", tiny_unet(), diffusers.DDPMScheduler())
    with pytest.raises(ValueError, match="prediction_type='v_prediction' contradicts"):
        diffusers_folder.load(folder, prediction_type="v_prediction")
    with pytest.raises(ValueError, match="unknown flags"):
        diffusers_folder.load(folder, guidance_scale=4.0)


def test_learned_variance_contradicting_the_model_raises(tmp_path):
    folder = save("ddpm_pipeline", tmp_path / "p", tiny_unet(), diffusers.DDPMScheduler(variance_type="learned"))
    with pytest.raises(ValueError, match="variance_type='learned'"):
        diffusers_folder.load(folder)


def test_dit_pipeline_decoder_is_the_pipelines_vae(tmp_path):
    """DiTPipeline decodes ``vae.decode(latents / scaling_factor).sample``; our decoder does the same."""
    folder = save("dit_pipeline", tmp_path / "p", tiny_dit(), diffusers.DDIMScheduler())
    decoder = diffusers_folder.load(folder).decoder
    vae = diffusers.AutoencoderKL.from_pretrained(folder / "vae", low_cpu_mem_usage=False).eval()
    latents = torch.randn(2, 4, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(decoder(latents), vae.decode(latents / vae.config.scaling_factor).sample)


def test_hub_dit_layout_with_transformer2dmodel_loads(tmp_path):
    """The Hub's DiT pipelines (facebook/DiT-XL-2-256) save the transformer as ``Transformer2DModel``;
    diffusers remaps it to ``DiTTransformer2DModel`` and the load gives the same denoiser."""
    import json

    model = tiny_dit()
    folder = save("dit_pipeline", tmp_path / "p", model, diffusers.DDIMScheduler())
    config_path = folder / "transformer" / "config.json"
    config = json.loads(config_path.read_text())
    config_path.write_text(json.dumps({**config, "_class_name": "Transformer2DModel", "norm_type": "ada_norm_zero"}))
    denoiser = diffusers_folder.load(folder).denoiser
    assert type(denoiser.backbone.model).__name__ == "DiTTransformer2DModel"
    x, labels = torch.randn(2, 4, 8, 8), torch.tensor([1, 2])
    with torch.no_grad():
        got = denoiser(x, sigma_of(diffusers.DDIMScheduler(), 500), labels)
    assert max_relative_error(got, source_x0(model, diffusers.DDIMScheduler(), x, 500, labels)) < 1e-5
