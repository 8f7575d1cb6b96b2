"""The one DDPM posterior q(x_{t-1} | x_t, x_0), used by the ``ddpm`` sampler, Analytic-DPM, the
VLB and the hybrid objective, checked once against two oracles: Ho et al. 2020 eq. 6-7 written out in float64
numpy from the betas, and guided-diffusion's ``GaussianDiffusion`` (``posterior_mean_coef1/2``,
``posterior_variance``; the official code in ``../shared/reference``, skipped when absent)."""

from pathlib import Path

import numpy as np
import pytest
import torch

from lightning_diff.formulations.posterior import ddpm_posterior

REFERENCE = Path(__file__).resolve().parents[1].parent / "shared" / "reference"
BETAS = np.linspace(1e-4, 0.02, 1000, dtype=np.float64)  # Ho et al.'s linear schedule, T = 1000


def _ours(betas: np.ndarray):
    """Our posterior of the chain with these betas, as float64 numpy arrays (t = 0 has abar_{-1} = 1)."""
    abar = torch.from_numpy(np.cumprod(1 - betas))
    post = ddpm_posterior(abar, torch.cat([abar.new_ones(1), abar[:-1]]))
    return [v.numpy() for v in post]


def test_matches_ho_eq_6_7_in_float64():
    alphas = 1 - BETAS
    abar = np.cumprod(alphas)
    abar_prev = np.append(1.0, abar[:-1])
    coef_x0 = np.sqrt(abar_prev) * BETAS / (1 - abar)  # eq. 7, weight of x_0 in mu~
    coef_xt = np.sqrt(alphas) * (1 - abar_prev) / (1 - abar)  # eq. 7, weight of x_t in mu~
    variance = (1 - abar_prev) / (1 - abar) * BETAS  # eq. 7, beta~_t
    beta, var, c0, ct = _ours(BETAS)
    np.testing.assert_allclose(beta, BETAS, rtol=1e-12, atol=0)
    np.testing.assert_allclose(var, variance, rtol=1e-12, atol=0)
    np.testing.assert_allclose(c0, coef_x0, rtol=1e-12, atol=0)
    np.testing.assert_allclose(ct, coef_xt, rtol=1e-12, atol=0)
    # Python floats (the samplers' control flow) give the same numbers as tensors
    t = 500
    floats = ddpm_posterior(float(abar[t]), float(abar_prev[t]))
    np.testing.assert_allclose(floats, [BETAS[t], variance[t], coef_x0[t], coef_xt[t]], rtol=1e-12)


def test_matches_guided_diffusion(monkeypatch):
    if not (REFERENCE / "guided_diffusion").is_dir():
        pytest.skip(f"the official guided-diffusion code is not at {REFERENCE / 'guided_diffusion'}")
    monkeypatch.syspath_prepend(str(REFERENCE))
    from guided_diffusion import gaussian_diffusion as gd

    betas = gd.get_named_beta_schedule("cosine", 1000)  # iDDPM's cosine betas
    theirs = gd.GaussianDiffusion(betas=betas, model_mean_type=gd.ModelMeanType.EPSILON,
                                  model_var_type=gd.ModelVarType.FIXED_SMALL, loss_type=gd.LossType.MSE)
    _, var, c0, ct = _ours(np.asarray(betas, dtype=np.float64))
    np.testing.assert_allclose(var, theirs.posterior_variance, rtol=1e-10, atol=0)
    np.testing.assert_allclose(c0, theirs.posterior_mean_coef1, rtol=1e-10, atol=0)
    np.testing.assert_allclose(ct, theirs.posterior_mean_coef2, rtol=1e-10, atol=0)
