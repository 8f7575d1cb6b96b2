"""The samplers behave like k-diffusion's where they share its signature: they run without
autograd (k-diffusion decorates every sampler with ``@torch.no_grad()``), and Euler/Heun with churn report the
churned level ``sigma_hat`` in the callback dict beside the grid level ``sigma``.

Oracle for ``sigma_hat``: k-diffusion's ``sample_euler``/``sample_heun`` (EDM Algorithm 2, lines 4-5):
``gamma = min(s_churn / (len(sigmas) - 1), 2 ** 0.5 - 1)`` on ``[s_tmin, s_tmax]``, ``sigma_hat = sigma (1 + gamma)``.
"""

import inspect
import math

import pytest
import torch
from torch import nn

from lightning_diff import formulations, sampling
from lightning_diff.denoiser import Denoiser
from lightning_diff.formulations import schedules

torch.set_num_threads(1)


class TinyBackbone(nn.Module):
    """``F(x, c_noise, labels)``: one linear map of ``[B, 2]`` inputs (parameters require grad)."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(2, 2)

    def forward(self, x, c_noise, labels=None):
        return self.linear(x) * (1 + 0 * c_noise.reshape(-1, 1))


FEW_STEPS = {"annealed_langevin": {"steps_per_level": 2}}


@pytest.mark.parametrize("name", list(sampling.SAMPLERS))
def test_sampler_builds_no_graph_on_a_trainable_denoiser(name):
    formulation = formulations.get("edm")
    denoiser = Denoiser(TinyBackbone(), formulation)
    assert all(p.requires_grad for p in denoiser.parameters())
    options = dict(FEW_STEPS.get(name, {}))
    if "formulation" in inspect.signature(sampling.SAMPLERS[name]).parameters:
        options["formulation"] = formulation
    grid = schedules.karras_sigmas(3, 0.01, 10.0)
    x = 10.0 * torch.randn(4, 2, generator=torch.Generator().manual_seed(0))
    out = sampling.SAMPLERS[name](denoiser, x, grid, **options)
    assert not out.requires_grad and out.grad_fn is None, f"{name} returned a tensor with grad_fn {out.grad_fn}"


@pytest.mark.parametrize("name", ["euler", "heun"])
def test_churn_callback_reports_sigma_hat(name):
    s_churn, steps = 2.0, 4
    grid = schedules.karras_sigmas(steps, 0.01, 10.0)
    payloads = []
    denoiser = lambda x, sigma, **cond: 0.5 * x  # continuous: round_sigma is the identity
    x = 10.0 * torch.randn(3, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    sampling.SAMPLERS[name](denoiser, x, grid, S_churn=s_churn, generator=torch.Generator().manual_seed(2),
                            callback=payloads.append)
    gamma = min(s_churn / steps, 2**0.5 - 1)  # k-diffusion sample_euler/sample_heun
    for payload, sigma in zip(payloads, grid[:-1].tolist(), strict=True):
        assert math.isclose(float(payload["sigma"]), sigma, rel_tol=1e-12)
        assert math.isclose(float(payload["sigma_hat"]), sigma * (1 + gamma), rel_tol=1e-12)
