"""Stochastic samplers reproduce a 2-D Gaussian mixture (exact denoiser as the model).

With n = 4000 samples the standard error of a mean coordinate is about sqrt(0.9 / n) = 0.015, of a
covariance entry about 0.02, and of the mean true log-likelihood about 0.02 nats; the tolerances below
(0.07, 0.08, 0.08) are about 4 standard errors plus the discretisation bias at the stated step counts.
The negative control shows the same check rejects a sampler with 10% too much noise (S_noise = 1.1).
"""

import pytest
import torch

from lightning_diff import formulations, sampling
from lightning_diff.analytic import GaussianMixture
from lightning_diff.formulations import schedules

MIX = GaussianMixture([[-1.0, 0.5], [1.0, -0.5], [0.3, 1.2]], [0.3, 0.4, 0.25], [0.5, 0.3, 0.2])
N_SAMPLES, SIGMA_MAX = 4000, 20.0
TOL_MEAN, TOL_COV, TOL_LOGLIK = 0.07, 0.08, 0.08


@pytest.fixture(scope="module")
def data_loglik():
    """E_data[log p(y)], from 400k exact draws (standard error 0.002 nats)."""
    return MIX.log_prob(MIX.sample(400_000, torch.Generator().manual_seed(1))).mean().item()


def _gaps(name, sigmas, **options):
    generator = torch.Generator().manual_seed(2)
    x = float(sigmas[0]) * torch.randn(N_SAMPLES, 2, generator=generator, dtype=torch.float64)
    out = sampling.sample(name, MIX, x, sigmas, generator=generator, **options)
    mean_gap = (out.mean(0) - MIX.mean()).abs().max().item()
    cov_gap = (torch.cov(out.T) - MIX.covariance()).abs().max().item()
    return mean_gap, cov_gap, MIX.log_prob(out).mean().item()


def karras(n):
    return schedules.karras_sigmas(n, 0.002, SIGMA_MAX)


CASES = {
    "heun_churn": ("heun", karras(64), {"S_churn": 40.0}),
    "ddpm_fixed_small": ("ddpm", karras(200), {}),
    "ddpm_fixed_large": ("ddpm", karras(200), {"variance": "fixed_large"}),
    "ddim_eta1": ("ddim", karras(200), {"eta": 1.0}),
    "ddim_eta05": ("ddim", karras(200), {"eta": 0.5}),
    "euler_maruyama": ("euler_maruyama", karras(500), {}),
    "euler_maruyama_vp": ("euler_maruyama", formulations.get("vp").sampling_sigmas(500),
                          {"formulation": formulations.get("vp")}),
    "sde_family_half": ("euler_maruyama", karras(500), {"noise_scale": 0.5}),
    "pc_reverse_diffusion": ("pc", karras(200), {}),
    "pc_euler_maruyama": ("pc", karras(200), {"predictor": "euler_maruyama"}),
    "annealed_langevin": ("annealed_langevin", schedules.loglinear_sigmas(10, 0.01, 10.0),
                          {"step_size": 1e-4, "steps_per_level": 100}),
}


@pytest.mark.parametrize("case", list(CASES))
def test_stochastic_sampler_reproduces_mixture(case, data_loglik):
    name, sigmas, options = CASES[case]
    mean_gap, cov_gap, loglik = _gaps(name, sigmas, **options)
    assert mean_gap < TOL_MEAN and cov_gap < TOL_COV, (mean_gap, cov_gap)
    assert abs(loglik - data_loglik) < TOL_LOGLIK, loglik - data_loglik


def test_negative_control_too_much_noise_is_detected(data_loglik):
    _, cov_gap, loglik = _gaps("heun", karras(64), S_churn=40.0, S_noise=1.1)
    assert cov_gap > TOL_COV or abs(loglik - data_loglik) > TOL_LOGLIK
