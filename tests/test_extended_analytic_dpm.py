"""Extended-Analytic-DPM (``lightning_diff.sampling.analytic_dpm``; Bao et al. ICML 2022) on Gaussian data.

Data ``y ~ N(MU, S^2 I)``; at ``x = y + sigma eps`` the noise given x is Gaussian:
``E[eps | x] = sigma (x - MU) / (S^2 + sigma^2)``, ``Var[eps | x] = S^2 / (S^2 + sigma^2)``, so the exact heads are
``E[eps^2 | x] = Var + E^2`` (SN) and ``E[(eps - eps_hat)^2 | x] = Var + (E - eps_hat)^2`` (NPR, any mean). The oracle
for the reverse step is the forward chain itself: ``(x_{n-1}, x_n)`` is jointly Gaussian in the VP frame, so
``q(x_{n-1} | x_n) = N(m*, v*)`` by Gaussian conditioning, and the KL-optimal diagonal variance around a model mean
``mu`` is ``v* + (m* - mu)^2``, derived here without the paper's formula.
"""

import math

import pytest
import torch
from torch import nn

from lightning_diff import sampling
from lightning_diff.denoiser import Denoiser
from lightning_diff.formulations import EDM, VP
from lightning_diff.objectives.second_moment import SecondMoment
from lightning_diff.sampling import analytic_dpm
from lightning_diff.sampling.analytic_dpm import denoise_with_head, step_variance
from lightning_diff.sampling.settings import SamplerSettings

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny networks: one intra-op thread


MU, S, DIM = torch.tensor([0.5, -1.0, 0.25], dtype=torch.float64), 0.6, 3


class GaussianWithHead:
    """The exact denoiser of ``N(MU, S^2 I)`` shifted by ``bias`` (an imperfect mean), with the exact head of ``kind``
    (scaled by ``scale``); ``formulation`` gives the objective its p(sigma) and lambda."""

    formulation = EDM()

    def __init__(self, kind, bias=0.0, scale=1.0):
        self.kind, self.bias, self.scale = kind, bias, scale

    def _moments(self, x, sigma):
        sigma = sigma.reshape(-1, *([1] * (x.ndim - 1))).to(torch.float64)
        x = x.to(torch.float64)
        mean_eps = sigma * (x - MU) / (S**2 + sigma**2)
        return sigma, mean_eps, S**2 / (S**2 + sigma**2)

    def __call__(self, x, sigma, **cond):
        return self.forward_with_moment(x, sigma)[0]

    def forward_with_moment(self, x, sigma, **cond):
        sigma, mean_eps, var_eps = self._moments(x, sigma)
        D = x.to(torch.float64) - sigma * mean_eps + self.bias
        eps_hat = (x - D) / sigma
        head = var_eps + (mean_eps**2 if self.kind == "sn" else (mean_eps - eps_hat) ** 2)
        return D.to(x.dtype), (self.scale * head).to(x.dtype)


def reverse_oracle(x, sigma, sigma_next, D):
    """``(v* + (m* - mu)^2, v*)`` per element in the VP frame of x_{n-1}: Gaussian conditioning of the chain, and the
    model mean ``mu`` of Ho et al. eq. 7 with ``x0_hat = D``."""
    abar, abar_prev = 1 / (1 + sigma**2), 1 / (1 + sigma_next**2)
    alpha = abar / abar_prev
    var_prev = abar_prev * S**2 + 1 - abar_prev  # Var(x_{n-1}), per element
    var_n = abar * S**2 + 1 - abar
    cov = math.sqrt(alpha) * var_prev
    x_n = math.sqrt(abar) * x
    m_star = math.sqrt(abar_prev) * MU + cov / var_n * (x_n - math.sqrt(abar) * MU)
    v_star = var_prev - cov**2 / var_n
    beta = 1 - alpha
    mu = math.sqrt(abar_prev) * beta / (1 - abar) * D + math.sqrt(alpha) * (1 - abar_prev) / (1 - abar) * x_n
    return v_star + (m_star - mu) ** 2, torch.full_like(x, v_star)


@pytest.mark.parametrize("sigma, sigma_next", [(0.8, 0.5), (3.0, 0.2), (0.05, 0.01)])
def test_step_variance_is_the_optimal_diagonal_variance_of_the_gaussian_chain(sigma, sigma_next):
    x = MU + math.sqrt(S**2 + sigma**2) * torch.randn(64, DIM, dtype=torch.float64)
    s = torch.full((64,), sigma, dtype=torch.float64)
    for bias in (0.0, 0.3):  # exact and imperfect mean
        D, head = GaussianWithHead("npr", bias).forward_with_moment(x, s)
        optimal, _ = reverse_oracle(x, sigma, sigma_next, D)
        torch.testing.assert_close(step_variance("npr", sigma, sigma_next, x, D, head), optimal, rtol=1e-10, atol=0)
    D, head = GaussianWithHead("sn").forward_with_moment(x, s)
    _, v_star = reverse_oracle(x, sigma, sigma_next, D)
    torch.testing.assert_close(step_variance("sn", sigma, sigma_next, x, D, head), v_star, rtol=1e-10, atol=0)
    D, head = GaussianWithHead("sn", bias=0.3).forward_with_moment(x, s)  # SN assumes a perfect mean: not optimal
    optimal, _ = reverse_oracle(x, sigma, sigma_next, D)
    assert not torch.allclose(step_variance("sn", sigma, sigma_next, x, D, head), optimal, rtol=1e-3)


@pytest.mark.parametrize("kind", ["sn", "npr"])
def test_ddpm_sampler_with_exact_heads_equals_analytic_dpm_with_exact_moments(kind):
    """With a perfect mean on Gaussian data E[(eps - eps_hat)^2 | x] = Var[eps | x] is the same for every x, so the
    per-element variance is Analytic-DPM's with the exact moment m = sigma^2 / (S^2 + sigma^2): the same draws."""
    sigmas = torch.tensor([20.0, 5.0, 2.0, 1.0, 0.5, 0.2, 0.05, 0.0], dtype=torch.float64)
    levels = sigmas[:-1]
    moments = analytic_dpm.ScoreMoments(levels, levels**2 / (S**2 + levels**2), num_samples=0)
    start = sampling.initial_noise(range(200), (DIM,), float(sigmas[0]))

    def run(variance, **options):
        generator = sampling.PerSampleGenerator(range(200))
        sampling.initial_noise(generator, (DIM,), 1.0)  # the same stream position as a sampler after its start
        return sampling.ddpm(GaussianWithHead(kind), start, sigmas, variance=variance, generator=generator,
                             **options)

    torch.testing.assert_close(run(kind), run("analytic", moments=moments), rtol=0, atol=1e-10)


@pytest.mark.parametrize("kind, bias", [("sn", 0.0), ("npr", 0.3)])
def test_objective_head_is_minimised_by_the_closed_form(kind, bias):
    """The head's regression ``||a h*(x) - T||^2`` over many (y, eps) at one sigma is least at a = 1: the least-squares
    ``a* = E[h* T] / E[h*^2]`` is 1 within Monte Carlo error, since h* = E[T | x]."""
    generator = torch.Generator().manual_seed(0)
    y = MU + S * torch.randn(40000, DIM, dtype=torch.float64, generator=generator)
    noise = torch.randn(y.shape, dtype=torch.float64, generator=generator)
    sigma = torch.full((len(y),), 0.7)
    losses = {}
    for scale in (0.8, 1.0, 1.25):
        loss, _ = SecondMoment(kind)(GaussianWithHead(kind, bias, scale), y, sigma=sigma, noise=noise.float())
        losses[scale] = float(loss.mean())
    assert losses[1.0] < losses[0.8] and losses[1.0] < losses[1.25], losses
    oracle = GaussianWithHead(kind, bias)
    x = y.float() + 0.7 * noise.float()
    D, head = oracle.forward_with_moment(x, sigma)
    eps_hat = (x - D) / 0.7
    target = noise.float() ** 2 if kind == "sn" else (noise.float() - eps_hat) ** 2
    a_star = float((head * target).sum() / (head**2).sum())
    assert abs(a_star - 1) < 0.02, a_star


class TwoHeads(nn.Module):
    """A backbone with 2C output channels (prediction and head) for C-channel data."""

    def __init__(self, channels, out_channels):
        super().__init__()
        self.linear = nn.Linear(channels + 1, out_channels)

    def forward(self, x, c_noise, labels=None):
        return self.linear(torch.cat([x, c_noise[:, None]], dim=1))


def test_denoiser_heads_and_objective_on_a_network():
    torch.manual_seed(0)
    denoiser = Denoiser(TwoHeads(DIM, 2 * DIM), EDM())
    y, noise, sigma = torch.randn(8, DIM), torch.randn(8, DIM), torch.rand(8) + 0.1
    x = y + sigma[:, None] * noise
    D, head = denoise_with_head(denoiser, x, sigma)
    torch.testing.assert_close(D, denoiser(x, sigma))
    assert head.shape == x.shape
    loss, _ = SecondMoment("sn")(denoiser, y, sigma=sigma, noise=noise)
    dsm, _ = denoiser.loss(y, sigma=sigma, noise=noise)
    torch.testing.assert_close(loss, dsm + ((head - noise**2) ** 2).mean(1))
    loss.mean().backward()  # trains both heads
    assert denoiser.backbone.linear.weight.grad[DIM:].abs().sum() > 0
    with pytest.raises(ValueError, match="network.out_channels=6"):
        denoise_with_head(Denoiser(TwoHeads(DIM, DIM), EDM()), x, sigma)
    with pytest.raises(ValueError, match="objective.kind='x'.*allowed: sn, npr"):
        SecondMoment("x")
    with pytest.raises(ValueError, match="variance='bad'"):
        sampling.ddpm(GaussianWithHead("sn"), x.double(), torch.tensor([1.0, 0.0]), variance="bad")


@pytest.mark.parametrize("kind", ["sn", "npr"])
def test_sampler_setting_with_a_head_variance_passes_the_config_check(kind):
    settings = SamplerSettings("ddpm", steps=10, options={"variance": kind})
    assert settings.check(VP()) is settings


@pytest.mark.parametrize("option, kind", [("sn_dpm", "sn"), ("npr_dpm", "npr")])
def test_objective_configs(option, kind):
    from hydra.utils import instantiate

    from .helpers import compose_config

    objective = instantiate(compose_config("train", [f"objective={option}"]).objective)
    assert type(objective) is SecondMoment and objective.kind == kind and objective.name == option
