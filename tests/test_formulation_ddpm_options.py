"""The DDPM formulation's source options: explicit ``betas``, the network's target ``prediction`` (eps, x0, v)
and ``timestep_scale``.

Oracles: diffusers' ``DDIMScheduler`` (its ``trained_betas``, ``prediction_type`` epsilon / sample /
v_prediction, ``add_noise`` and ``get_velocity``: the training target of its examples) and openai/guided-diffusion's
``create_gaussian_diffusion`` (``predict_xstart``, ``rescale_timesteps``; ``shared/reference/guided_diffusion``,
imported), all driving the same fixed toy network.
"""

import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from lightning_diff import formulations, sampling
from lightning_diff.denoiser import Denoiser

diffusers = pytest.importorskip("diffusers")

REFERENCE = Path(__file__).resolve().parent.parent.parent / "shared" / "reference"
PREDICTION_TYPES = {"eps": "epsilon", "x0": "sample", "v": "v_prediction"}  # ours -> diffusers'


class ToyNetwork(nn.Module):
    """A fixed network F(x_t, t) that depends on every input: channels mixed, t through a cosine."""

    def forward(self, x, c_noise, labels=None):
        t = c_noise.reshape(-1, *(1,) * (x.ndim - 1)).to(x.dtype)
        return torch.tanh(1.3 * x.flip(1) + 0.4 * x) * torch.cos(t / 150) + 0.1 * torch.sin(t / 70)


def source_model(x_t, t):
    """The same network as the sources call it: ``model(x_t, t)``."""
    return ToyNetwork()(x_t, torch.as_tensor(t).reshape(-1).expand(x_t.shape[0]).float())


@pytest.mark.parametrize("prediction", ["eps", "x0", "v"])
def test_ddim_equals_diffusers_ddim_scheduler_for_each_prediction_type_with_its_betas(prediction):
    """Our DDIM (eta = 0) over diffusers' trailing grid, with diffusers' scaled-linear betas passed as ``betas``,
    equals ``DDIMScheduler.step`` with the matching ``prediction_type`` from the same start noise."""
    steps = 8
    scheduler = diffusers.DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                        prediction_type=PREDICTION_TYPES[prediction], clip_sample=False,
                                        timestep_spacing="trailing")
    scheduler.set_timesteps(steps)
    noise = torch.randn(4, 3, 4, 4, generator=torch.Generator().manual_seed(1))
    sample = noise.clone()
    for t in scheduler.timesteps:
        sample = scheduler.step(source_model(sample, t), t, sample, eta=0.0).prev_sample

    fm = formulations.get("ddpm", betas=scheduler.betas.double(), prediction=prediction)
    grid = fm.sampling_sigmas(steps)
    torch.testing.assert_close(fm.timestep_index(grid[:-1]), scheduler.timesteps)
    ours = sampling.ddim(Denoiser(ToyNetwork(), fm), (1 + grid[0] ** 2).sqrt() * noise.double(), grid)
    assert (ours.float() - sample).abs().max() < 1e-5 * sample.abs().max()  # measured: 4e-7 .. 1.3e-6


@pytest.mark.parametrize("prediction", ["eps", "x0", "v"])
def test_loss_is_the_sources_mse_on_its_own_target(prediction):
    """lambda(sigma) ||D - y||^2 at a training level equals diffusers' training loss ||F(x_t, t) - target||^2
    (target: the noise, the sample, or ``get_velocity``), sample by sample."""
    scheduler = diffusers.DDIMScheduler(prediction_type=PREDICTION_TYPES[prediction])
    fm = formulations.get("ddpm", prediction=prediction)
    gen = torch.Generator().manual_seed(2)
    y, noise = torch.randn(3, 2, 4, 4, generator=gen), torch.randn(3, 2, 4, 4, generator=gen)
    t = torch.tensor([0, 411, 999])
    x_t = scheduler.add_noise(y, noise, t)
    target = {"eps": noise, "x0": y, "v": scheduler.get_velocity(y, noise, t)}[prediction]
    reference = ((ToyNetwork()(x_t, t.float()) - target) ** 2).flatten(1).mean(1)
    sigma = fm.grid.flip(0)[t].float()
    ours, _ = Denoiser(ToyNetwork(), fm).loss(y, sigma=sigma, noise=noise)
    torch.testing.assert_close(ours, reference, rtol=2e-4, atol=0)


@pytest.fixture(scope="module")
def guided_diffusion():
    if not (REFERENCE / "guided_diffusion" / "script_util.py").exists():
        pytest.skip(f"reference code absent: {REFERENCE / 'guided_diffusion'}")
    sys.path.insert(0, str(REFERENCE))
    from guided_diffusion import script_util

    return script_util


@pytest.mark.parametrize("predict_xstart", [False, True])
def test_x0_prediction_and_timestep_scale_equal_guided_diffusions_rescaled_timesteps(guided_diffusion,
                                                                                      predict_xstart):
    """improved/guided-diffusion with ``rescale_timesteps`` feeds ``t * 1000 / T`` to the network; with
    ``predict_xstart`` the output is x0. Our D at its levels equals its ``p_mean_variance`` ``pred_xstart``."""
    T = 50
    diffusion = guided_diffusion.create_gaussian_diffusion(steps=T, noise_schedule="cosine",
                                                           predict_xstart=predict_xstart, rescale_timesteps=True)
    fm = formulations.get("ddpm", num_timesteps=T, beta_schedule="cosine", timestep_scale=1000 / T,
                          prediction="x0" if predict_xstart else "eps")
    x_t = torch.randn(3, 3, 4, 4, generator=torch.Generator().manual_seed(3))
    t = torch.tensor([0, 17, T - 1])
    reference = diffusion.p_mean_variance(source_model, x_t, t, clip_denoised=False)["pred_xstart"]
    abar = fm.alphas_cumprod[t].reshape(-1, 1, 1, 1)
    ours = Denoiser(ToyNetwork(), fm)(x_t.double() / abar.sqrt(), fm.grid.flip(0)[t])
    torch.testing.assert_close(ours.float(), reference, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("settings, message", [
    ({"betas": [0.1, 0.2, 1.0], "num_timesteps": 3}, r"betas\[2\]=1.0 is invalid; allowed: every beta in \(0, 1\)"),
    ({"betas": [0.1, -0.2, 0.3], "num_timesteps": 3}, r"betas\[1\]=-0.2 is invalid"),
    ({"betas": [0.1, 0.2]}, "betas has 2 entries but num_timesteps=1000"),
    ({"betas": [[0.1, 0.2]], "num_timesteps": 2}, r"betas has shape \(1, 2\); allowed: a 1-D sequence"),
    ({"prediction": "epsilon"}, r"prediction='epsilon' is not known; allowed: \('eps', 'x0', 'v'\)"),
    ({"timestep_scale": 0.0}, "timestep_scale=0.0 is invalid; allowed: a finite number > 0"),
])
def test_bad_options_are_refused_naming_the_setting(settings, message):
    with pytest.raises(ValueError, match="formulation=ddpm: " + message):
        formulations.get("ddpm", **settings)


def test_explicit_betas_replace_the_schedule_and_are_logged():
    betas = torch.linspace(1e-3, 0.2, 10, dtype=torch.float64)
    fm = formulations.get("ddpm", num_timesteps=10, betas=betas.tolist())
    torch.testing.assert_close(fm.alphas_cumprod, torch.cumprod(1 - betas, 0), rtol=0, atol=0)
    assert fm.config()["betas"] == betas.tolist() and "betas" not in formulations.get("ddpm").config()
