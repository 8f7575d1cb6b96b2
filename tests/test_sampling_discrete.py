"""Samplers on discrete formulations: the network only sees its own noise levels (EDM's ``round_sigma``), and
strided DDIM / DDPM grids reproduce the reference samplers they come from.

Oracles: NVlabs/edm ``generate.py`` ``edm_sampler`` (re-implemented below, rounding the grid and the churned
level to the nearest iDDPM level u_j); the DDIM code's ``generalized_steps`` (ermongroup/ddim
``functions/denoising.py``, transcribed, repeats and all); openai/guided-diffusion's ``SpacedDiffusion``
(``shared/reference/guided_diffusion``, imported) with an epsilon model built from the exact mixture denoiser.
"""

import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from lightning_diff import formulations, sampling
from lightning_diff.analytic import GaussianMixture
from lightning_diff.denoiser import Denoiser
from lightning_diff.formulations import schedules
from lightning_diff.networks.mlp import MLP
from lightning_diff.sampling import PerSampleGenerator

f64 = torch.float64
MIX = GaussianMixture([[-0.6, 0.3], [0.5, -0.4], [0.2, 0.7]], [0.2, 0.25, 0.15], [0.5, 0.3, 0.2])
REFERENCE = Path(__file__).resolve().parent.parent.parent / "shared" / "reference"


def iddpm_network(seed=0):
    """A tiny float32 MLP preconditioned by iDDPM, recording every sigma the Denoiser is called with."""
    torch.manual_seed(seed)
    net = Denoiser(MLP(dim=2, hidden=16, depth=2, emb_channels=8), formulations.get("iddpm"))
    for p in net.parameters():
        p.data.normal_(0, 0.2)
    net.seen = []
    net.register_forward_pre_hook(lambda m, args: net.seen.append(torch.as_tensor(args[1]).clone()))
    return net


def nearest_level(u, sigma):
    """EDM's ``round_sigma`` for iDDPM: the nearest u_j, j < M (NVlabs/edm ``iDDPMPrecond.round_sigma``)."""
    return u[(u[:-1] - sigma).abs().argmin()].item()


def edm_sampler(net, latents, t_steps, generator, S_churn, S_min=0.0, S_max=float("inf"), S_noise=1.0):
    """NVlabs/edm ``generate.py`` ``edm_sampler``: grid and churned level snapped to the network's levels."""
    u = net.formulation.u
    num_steps = len(t_steps)
    t_steps = [nearest_level(u, t) for t in t_steps] + [0.0]
    x_next = latents.to(f64) * t_steps[0]
    for i, (t_cur, t_next) in enumerate(zip(t_steps[:-1], t_steps[1:], strict=True)):
        x_cur = x_next
        gamma = min(S_churn / num_steps, math.sqrt(2) - 1) if S_min <= t_cur <= S_max else 0
        t_hat = nearest_level(u, t_cur + gamma * t_cur)
        x_hat = x_cur + math.sqrt(t_hat**2 - t_cur**2) * S_noise * generator.randn(x_cur.shape, f64)
        d_cur = (x_hat - net(x_hat, t_hat).to(f64)) / t_hat
        x_next = x_hat + (t_next - t_hat) * d_cur
        if i < num_steps - 1:
            d_prime = (x_next - net(x_next, t_next).to(f64)) / t_next
            x_next = x_hat + (t_next - t_hat) * (0.5 * d_cur + 0.5 * d_prime)
    return x_next


def test_heun_with_churn_on_iddpm_evaluates_only_the_networks_levels_and_is_edms_sampler():
    net, seeds = iddpm_network(), [5, 6, 7, 8]
    levels = set(net.formulation.u[:-1].tolist())
    grid = net.formulation.sampling_sigmas(8)
    latents = PerSampleGenerator(seeds).randn((4, 2), f64)
    with torch.no_grad():
        ours = sampling.heun(net, latents * grid[0], grid, S_churn=40.0, generator=PerSampleGenerator(seeds))
        seen = torch.cat(net.seen).unique().tolist()
        assert set(seen) <= levels, sorted(set(seen) - levels)[:5]  # the churned levels are snapped too
        reference = edm_sampler(net, latents, grid[:-1].tolist(), PerSampleGenerator(seeds), S_churn=40.0)
    assert torch.allclose(ours, reference, atol=1e-10, rtol=0)


SAMPLER_OPTIONS = {"euler": {"S_churn": 10.0}, "heun": {"S_churn": 10.0}, "ddim": {"eta": 0.5}, "ddpm": {},
                   "dpmpp_2m": {}, "euler_maruyama": {}, "pc": {}, "annealed_langevin": {"steps_per_level": 2},
                   "ablation": {"formulation": formulations.get("iddpm")}}


@pytest.mark.parametrize("name", list(SAMPLER_OPTIONS))
def test_fixed_grid_samplers_snap_an_off_grid_schedule_to_the_networks_levels(name):
    """A Karras grid (off the iDDPM levels) is snapped before the first step, as EDM's samplers do."""
    net = iddpm_network()
    grid = schedules.karras_sigmas(6, 0.01, 80.0)
    with torch.no_grad():
        sampling.sample(name, net, 80.0 * torch.randn(3, 2, dtype=f64), grid, generator=PerSampleGenerator([1, 2, 3]),
                        **SAMPLER_OPTIONS[name])
    seen = set(torch.cat(net.seen).tolist())
    assert seen <= set(net.formulation.u[:-1].tolist()), sorted(seen)[:5]


def test_denoiser_round_sigma_delegates_to_the_formulation_and_a_too_fine_grid_is_refused():
    net = iddpm_network()
    sigma = torch.tensor([0.05, 1.0, 79.0, 0.0], dtype=f64)
    assert torch.equal(net.round_sigma(sigma), net.formulation.round_sigma(sigma))
    edm = Denoiser(MLP(dim=2, hidden=8, depth=1, emb_channels=8), formulations.get("edm"))
    assert torch.equal(edm.round_sigma(sigma), sigma)
    fine = schedules.karras_sigmas(400, 0.002, 80.0)  # two Karras levels near sigma_min share an iDDPM level
    with pytest.raises(ValueError, match="round_sigma"):
        sampling.euler(net, 80.0 * torch.randn(2, 2, dtype=f64), fine)


# --- strided DDIM / DDPM against their references ----------------------------------------------------
def ddim_code_sequence(T, S):
    """ermongroup/ddim runners/diffusion.py, skip_type "quad"."""
    return [int(s) for s in list(np.linspace(0, np.sqrt(T * 0.8), S) ** 2)]


ABAR = torch.cumprod(1 - torch.linspace(1e-4, 0.02, 1000, dtype=f64), 0)  # Ho et al. 2020's betas


def epsilon_model(x_t, t):
    """eps(x_t, t) of the exact mixture in the DDPM frame x_t = sqrt(abar_t) (y + sigma_t n)."""
    abar = ABAR[t.long()].reshape(-1, 1)
    sigma = ((1 - abar) / abar).sqrt()
    x = x_t / abar.sqrt()
    return (x - MIX(x, sigma.flatten())) / sigma


def ddim_code_generalized_steps(x, seq, eta=0.0):
    """ermongroup/ddim functions/denoising.py ``generalized_steps`` (eta = 0), float64, one model call per
    entry of seq: a repeated entry is a step from t to the same t. Returns (x_0, model calls)."""
    def compute_alpha(t):
        return torch.cat([torch.ones(1, dtype=f64), ABAR])[t + 1]  # abar with abar_{-1} = 1
    seq_next = [-1] + list(seq[:-1])
    calls = 0
    for i, j in zip(reversed(seq), reversed(seq_next), strict=True):
        at, at_next = compute_alpha(i), compute_alpha(j)
        et = epsilon_model(x, torch.full((x.shape[0],), i))
        calls += 1
        x0_t = (x - et * (1 - at).sqrt()) / at.sqrt()
        c1 = eta * ((1 - at / at_next) * (1 - at_next) / (1 - at)).sqrt()
        c2 = ((1 - at_next) - c1**2).sqrt()
        x = at_next.sqrt() * x0_t + c2 * et
    return x, calls


@pytest.mark.parametrize("S", [50, 100])
def test_ddim_on_the_quadratic_grid_equals_the_ddim_code_which_spends_S_evaluations(S):
    """DDIM's CIFAR-10 protocol: the repeats the DDIM code runs are identity steps, so dropping them leaves
    the sample unchanged; the code spends S network evaluations, the grid its distinct timesteps."""
    ddpm = formulations.get("ddpm", spacing="quadratic")
    with pytest.warns(UserWarning, match="repeated"):
        grid = ddpm.sampling_sigmas(S)
    noise = torch.randn(256, 2, generator=torch.Generator().manual_seed(S), dtype=f64)
    stats = {}
    ours = sampling.ddim(MIX, float(grid[0]) * noise, grid, stats=stats)
    seq = ddim_code_sequence(1000, S)
    reference, calls = ddim_code_generalized_steps(math.sqrt(1 - ABAR[seq[-1]]) * noise, seq)
    assert torch.allclose(ours, reference, atol=1e-9, rtol=0)
    assert calls == S and stats["nfe"] == len(set(seq)) == grid.numel() - 1 < S


@pytest.fixture(scope="module")
def guided_diffusion():
    if not (REFERENCE / "guided_diffusion" / "respace.py").exists():
        pytest.skip(f"reference code absent: {REFERENCE / 'guided_diffusion'}")
    sys.path.insert(0, str(REFERENCE))
    from guided_diffusion import gaussian_diffusion, respace

    return gaussian_diffusion, respace


@pytest.mark.parametrize("spacing, steps", [("quadratic", 50), ("trailing", 61), ("linspace", 27), ("linear", 30)])
@pytest.mark.parametrize("name", ["ddpm", "ddim"])
def test_strided_ddpm_and_ddim_equal_guided_diffusions_respaced_samplers(guided_diffusion, name, spacing, steps):
    """guided-diffusion's ``SpacedDiffusion`` keeps a set of timesteps (repeats dropped, as here); its
    ``p_sample_loop`` (fixed_small) and ``ddim_sample_loop`` (eta = 0) on the same timesteps, the same start
    and the same global noise stream give the same samples (its coefficients are float32:
    ``_extract_into_tensor``)."""
    gd, respace = guided_diffusion
    ddpm = formulations.get("ddpm", spacing=spacing)
    timesteps = schedules.ddpm_timesteps(1000, steps, spacing).tolist()
    if len(set(timesteps)) != steps:
        with pytest.warns(UserWarning):
            grid = ddpm.sampling_sigmas(steps)
    else:
        grid = ddpm.sampling_sigmas(steps)
    diffusion = respace.SpacedDiffusion(
        use_timesteps=timesteps, betas=gd.get_named_beta_schedule("linear", 1000),
        model_mean_type=gd.ModelMeanType.EPSILON, model_var_type=gd.ModelVarType.FIXED_SMALL,
        loss_type=gd.LossType.MSE)
    noise = torch.randn(128, 2, generator=torch.Generator().manual_seed(steps), dtype=f64)
    loop = diffusion.p_sample_loop if name == "ddpm" else diffusion.ddim_sample_loop
    torch.manual_seed(11)
    reference = loop(epsilon_model, (128, 2), noise=math.sqrt(1 - ABAR[max(timesteps)]) * noise,
                     clip_denoised=False, device="cpu")
    torch.manual_seed(11)
    ours = sampling.sample(name, MIX, float(grid[0]) * noise, grid)  # generator=None: the global stream
    assert grid.numel() - 1 == len(diffusion.timestep_map)
    assert torch.allclose(ours, reference, atol=2e-5, rtol=0), (ours - reference).abs().max()
