"""Likelihood oracles on Gaussian data, where every density is closed form."""

from __future__ import annotations

import math

import pytest
import torch

from lightning_diff import formulations
from lightning_diff.analytic import GaussianMixture
from lightning_diff.data.transforms import DataTransform, dequantize
from lightning_diff.likelihood import (
    bits_per_dim,
    log_likelihood,
    ode_bits_per_dim,
    vlb_bits_per_dim,
)

MU, S = 0.3, 0.5  # Data y ~ N(MU, S^2 I).
SIGMA_MIN, SIGMA_MAX = 0.01, 80.0


def _gaussian(d: int) -> GaussianMixture:
    return GaussianMixture(torch.full((d,), MU), S, shape=(d,))


@pytest.mark.parametrize(
    ("divergence", "probe", "rel"), [("exact", "rademacher", 1e-3), ("hutchinson", "rademacher", 1e-2)]
)
def test_ode_log_likelihood_matches_closed_form(divergence, probe, rel):
    gm = _gaussian(4)
    g = torch.Generator().manual_seed(0)
    x = gm.sample(6, g)
    log_prob, info = log_likelihood(
        gm,
        x,
        sigma_min=SIGMA_MIN,
        sigma_max=SIGMA_MAX,
        divergence=divergence,
        probe=probe,
        probes=2,
        generator=g,
    )
    exact = gm.log_prob(x, SIGMA_MIN)  # log N(x; MU, (S^2 + sigma_min^2) I)
    assert info["nfe"] > 10
    # The ODE part alone: swap the N(0, sigma_max^2 I) prior for the true p(.; sigma_max),
    # N(MU, S^2 + sigma_max^2).
    ode_only = log_prob - info["prior_logp"] + gm.log_prob(info["x_prior"], SIGMA_MAX)
    torch.testing.assert_close(ode_only, exact, rtol=rel, atol=0.0)
    # With the contract's prior, the prior's mismatch (mean MU ignored) stays below 1%.
    torch.testing.assert_close(log_prob, exact, rtol=1e-2, atol=0.0)


def test_hutchinson_with_gaussian_probes_is_unbiased():
    """Gaussian probes have |v|^2 != d: per sample the estimate is off, on average it is right."""
    d, n = 8, 48
    gm = _gaussian(d)
    g = torch.Generator().manual_seed(1)
    x = gm.sample(n, g)
    log_prob, _ = log_likelihood(
        gm,
        x,
        sigma_min=SIGMA_MIN,
        sigma_max=SIGMA_MAX,
        probe="gaussian",
        probes=2,
        generator=g,
        rtol=1e-4,
        atol=1e-4,
    )
    err = log_prob - gm.log_prob(x, SIGMA_MIN)
    assert err.std() > 0.1  # the probes really are random
    assert err.mean().abs() < 4 * err.std() / math.sqrt(n)


def test_bits_per_dim_offsets_and_dequantized_ode():
    assert bits_per_dim(torch.zeros(1), 3, scale=2 / 256).item() == pytest.approx(7.0)
    assert bits_per_dim(torch.zeros(1), 3, scale=1 / 127.5).item() == pytest.approx(math.log2(127.5))
    assert math.log2(127.5) == pytest.approx(6.9944, abs=1e-4)
    # Dequantized ODE bpd of integer data = the exact density's bpd of the same dequantized points.
    scale, offset, d = 1 / 127.5, -1.0, 3
    gm = _gaussian(d)
    x_int = ((gm.sample(4, torch.Generator().manual_seed(2)) + 1) * 127.5).round().clamp(0, 255)
    bpd, info = ode_bits_per_dim(
        gm,
        x_int,
        scale=scale,
        offset=offset,
        sigma_min=SIGMA_MIN,
        sigma_max=SIGMA_MAX,
        passes=2,
        divergence="exact",
        generator=torch.Generator().manual_seed(3),
    )
    g = torch.Generator().manual_seed(3)
    expected = (
        sum(
            bits_per_dim(
                gm.log_prob(dequantize(x_int, g, DataTransform(scale, offset), dtype=torch.float64), SIGMA_MIN),
                d,
                scale=scale,
            )
            for _ in range(2)
        )
        / 2
    )
    torch.testing.assert_close(bpd, expected, rtol=2e-3, atol=0.0)
    assert info["nfe"] > 0


def _discrete_gaussian_nll_bpd(x_int, scale, offset):
    """Exact -log2 P(x_int) / d for y ~ N(MU, S^2) binned at x_int (+- scale/2, edge bins open)."""
    n = torch.distributions.Normal(
        torch.tensor(MU, dtype=torch.float64), torch.tensor(S, dtype=torch.float64)
    )
    z = scale * x_int + offset
    hi = torch.where(x_int >= 255, torch.ones_like(z), n.cdf(z + scale / 2))
    lo = torch.where(x_int <= 0, torch.zeros_like(z), n.cdf(z - scale / 2))
    return -torch.log2(hi - lo).flatten(1).mean(1)


def test_vlb_of_exact_model_bounds_true_nll_and_is_close():
    """The exact denoiser of Gaussian data, E[x0 | x_t] = MU + S^2 sqrt(abar) (x_t - sqrt(abar) MU) /
    (abar S^2 + 1 - abar), i.e. eps*(x_t) = sqrt(1 - abar) (x_t - sqrt(abar) MU) / (abar S^2 + 1 - abar):
    its VLB (T = 1000) upper-bounds the data's true discrete NLL on average, and is close to it."""
    d, n = 4, 64
    scale, offset = 1 / 127.5, -1.0
    gm = _gaussian(d)
    ddpm = formulations.get("ddpm")
    x_int = ((gm.sample(n, torch.Generator().manual_seed(4)) - offset) / scale).round().clamp(0, 255)
    # The oracle in the DDPM frame: check the closed-form eps against the sigma-frame denoiser once.
    abar = ddpm.alphas_cumprod[500]
    x_t = torch.randn(3, d, dtype=torch.float64)
    eps_closed = (1 - abar).sqrt() * (x_t - abar.sqrt() * MU) / (abar * S**2 + 1 - abar)
    x0_hat = gm(x_t / abar.sqrt(), ((1 - abar) / abar).sqrt())
    torch.testing.assert_close((x_t - abar.sqrt() * x0_hat) / (1 - abar).sqrt(), eps_closed)

    true_bpd = _discrete_gaussian_nll_bpd(x_int, scale, offset).mean()
    vlb = {}
    for variance in ("fixed_small", "fixed_large"):
        bpd, info = vlb_bits_per_dim(
            gm,
            x_int,
            ddpm,
            scale=scale,
            offset=offset,
            variance=variance,
            generator=torch.Generator().manual_seed(5),
        )
        vlb[variance] = bpd.mean()
    assert info["nfe"] == 1000 and info["terms_bpd"].shape == (1000, n)
    # beta_t is close to the true reverse variance at small t for this data (beta~_t is half of it), so
    # the large variance gives the tighter bound (Ho et al. 2020 sec. 3.2; Nichol & Dhariwal Fig. 2).
    assert vlb["fixed_small"] > vlb["fixed_large"] > true_bpd
    assert vlb["fixed_large"] - true_bpd < 0.025 * true_bpd


def test_bad_settings_raise():
    gm = _gaussian(2)
    x = torch.zeros(1, 2)
    with pytest.raises(ValueError, match="divergence"):
        log_likelihood(gm, x, sigma_min=0.01, sigma_max=1.0, divergence="skilling")
    with pytest.raises(ValueError, match="sigma_min"):
        log_likelihood(gm, x, sigma_min=1.0, sigma_max=0.5)
    with pytest.raises(ValueError, match="ddpm"):
        vlb_bits_per_dim(gm, x.reshape(1, 1, 2), formulations.get("edm"), scale=1 / 127.5, offset=-1.0)
