"""Likelihood oracles on Gaussian data, where every density is closed form."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from lightning_diff import formulations
from lightning_diff.analytic import GaussianMixture
from lightning_diff.data.toy2d import ring_of_gaussians
from lightning_diff.data.transforms import DataTransform, bpd_offset
from lightning_diff.denoiser import Denoiser
from lightning_diff.evaluation.likelihood import bits_per_dim, log_likelihood, ode_bits_per_dim, vlb_bits_per_dim

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


def test_bits_per_dim_offsets_are_the_papers_constants():
    """-log2(scale) bits/dim (docs/likelihood.md#bits-per-dim), pinned to the papers' numbers: 7 for score_sde's (x +
    u) / 256
    centred to [-1, 1) (scale 2/256), 8 for [0, 1) (scale 1/256), log2(127.5) = 6.99435 for EDM's /127.5 - 1."""
    zero = torch.zeros(1, dtype=torch.float64)
    assert bits_per_dim(zero, 3, scale=2 / 256).item() == 7.0
    assert bits_per_dim(zero, 3, scale=1 / 256).item() == 8.0
    assert bits_per_dim(zero, 3, scale=1 / 127.5).item() == pytest.approx(6.994353436858858, abs=1e-12)
    for scale, offset in ((2 / 256, 7.0), (1 / 256, 8.0), (1 / 127.5, 6.994353436858858)):
        assert bpd_offset(DataTransform(scale=scale, offset=-1.0)) == pytest.approx(offset, abs=1e-12)
    # log p = -3 d ln 2 nats is 3 bits/dim of z, plus the offset.
    assert bits_per_dim(torch.tensor([-3 * 5 * math.log(2)]), 5, scale=2 / 256).item() == pytest.approx(10.0)


def _gaussian_nll_bpd(z: torch.Tensor, std: float) -> torch.Tensor:
    """-log2 N(z; MU, std^2 I) / d for z [B, d], from the Gaussian density itself."""
    nats = 0.5 * math.log(2 * math.pi * std**2) + (z - MU) ** 2 / (2 * std**2)
    return nats.mean(1) / math.log(2)


def test_dequantized_ode_bpd_is_the_density_of_the_dequantized_points():
    """EDM pixels z = (x_int + u) / 127.5 - 1 with u ~ U[0, 1)^d drawn from the generator (the draw
    ode_bits_per_dim makes first, exact divergence draws nothing else): per image, the ODE bits/dim equal
    -log2 N(z; MU, S^2 + sigma_min^2) / d + log2(127.5) written out here."""
    d = 3
    gm = _gaussian(d)
    x_int = ((gm.sample(4, torch.Generator().manual_seed(2)) + 1) * 127.5).floor().clamp(0, 255)
    bpd, info = ode_bits_per_dim(
        gm, x_int, scale=1 / 127.5, offset=-1.0, sigma_min=SIGMA_MIN, sigma_max=1e4, divergence="exact",
        generator=torch.Generator().manual_seed(3), rtol=1e-7, atol=1e-7,
    )
    u = torch.rand(x_int.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    z = (x_int + u) / 127.5 - 1
    expected = _gaussian_nll_bpd(z, math.sqrt(S**2 + SIGMA_MIN**2)) + math.log2(127.5)
    # sigma_max = 1e4 keeps the prior's per-image error (about MU |x_T| / sigma_max^2) far below the 0.0056
    # bits/dim between log2(127.5) and 7.
    torch.testing.assert_close(bpd, expected, rtol=0.0, atol=2e-4)
    assert info["nfe"] > 0


def test_dequantized_ode_bpd_bounds_the_discrete_nll_of_a_coarse_toy():
    """Four levels x_int in {0..3}, z = (x_int + u) / 2 - 1 (scale 1/2, offset 1 bit/dim), model density the
    exact N(MU, s^2 I), s^2 = 0.25^2 + sigma_min^2. Its discrete probability is P(x_int) = prod_i [Phi((hi_i - MU)
    / s) - Phi((lo_i - MU) / s)] over the bins [x_int / 2 - 1, (x_int + 1) / 2 - 1). Uniform dequantization gives
    an upper bound (Jensen; docs/likelihood.md#bits-per-dim): bpd >= -log2 P / d. Its expectation over u is closed form,
    (log(2 pi s^2) / 2 + ((c - MU)^2 + 1/48) / (2 s^2)) / ln 2 + 1 per dim (c the bin centre, 1/48 = width^2 / 12):
    the ODE bits/dim average to it, and the gap to the discrete NLL is visible at this bin width."""
    d, n, passes, std = 4, 32, 8, 0.25
    gm, s = GaussianMixture(torch.full((d,), MU), std), math.sqrt(std**2 + SIGMA_MIN**2)
    x_int = ((gm.sample(n, torch.Generator().manual_seed(6)) + 1) * 2).floor().clamp(0, 3)
    lo, hi = x_int / 2 - 1, (x_int + 1) / 2 - 1
    normal = torch.distributions.Normal(torch.tensor(MU, dtype=torch.float64), torch.tensor(s, dtype=torch.float64))
    discrete = -torch.log2(normal.cdf(hi) - normal.cdf(lo)).mean(1)
    centre = (lo + hi) / 2
    nats = 0.5 * math.log(2 * math.pi * s**2) + ((centre - MU) ** 2 + 1 / 48) / (2 * s**2)
    expected = nats.mean(1) / math.log(2) + 1.0
    g = torch.Generator().manual_seed(7)
    per_pass = torch.stack([
        ode_bits_per_dim(gm, x_int, scale=0.5, offset=-1.0, sigma_min=SIGMA_MIN, sigma_max=SIGMA_MAX,
                         divergence="exact", generator=g, rtol=1e-4, atol=1e-4)[0]
        for _ in range(passes)
    ])  # [passes, n]
    err = (per_pass - expected).flatten()
    se = err.std().item() / math.sqrt(err.numel())
    assert (expected > discrete).all()  # Jensen, strictly: the density varies within the bins
    assert abs(err.mean().item()) < 4 * se
    gap = (per_pass.mean() - discrete.mean()).item()
    assert gap > 5 * se and gap == pytest.approx((expected - discrete).mean().item(), abs=4 * se)


def test_ode_prior_refuses_a_small_sigma_max_and_matches_the_mixture_at_50():
    """The ring of 8 Gaussians (mean square 0.51 per dimension) with its exact denoiser and divergence: at
    sigma_max = 50 the ODE log-density equals the exact mixture density; at sigma_max = 1 (NCSN's default)
    the N(0, sigma_max^2 I) prior is off by -0.045 nats/dim on average (within the bound m2 / (2 sigma_max^2)
    = 0.25), which the call refuses, naming sigma_max, the bias bound and the allowed range."""
    gm = ring_of_gaussians()
    x = gm.sample(48, torch.Generator().manual_seed(8))
    exact = gm.log_prob(x, SIGMA_MIN)
    kw = dict(sigma_min=SIGMA_MIN, divergence="exact", rtol=1e-7, atol=1e-7)
    log_prob, info = log_likelihood(gm, x, sigma_max=50.0, **kw)
    torch.testing.assert_close(log_prob, exact, rtol=0.0, atol=1e-3)
    assert info["prior_bias_bound"] == pytest.approx(x.pow(2).mean().item() / (2 * 50.0**2))
    with pytest.raises(ValueError, match=r"likelihood\.sigma_max=1 is too small .* up to 0\.2\d* nats/dim .*"
                                         r"allowed: sigma_max >= 1[56]\.\d+"):
        log_likelihood(gm, x, sigma_max=1.0, **kw)
    biased, info = log_likelihood(gm, x, sigma_max=1.0, max_prior_bias=math.inf, **kw)
    bias = (biased - exact).mean() / 2
    assert -info["prior_bias_bound"] < bias < -0.01  # the refused bias is real and inside its bound


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


def _k_step_bound_oracle(x_int: torch.Tensor, taus: np.ndarray, noises: list, variance: str) -> tuple:
    """Bao et al. 2022 (Analytic-DPM), Sec. 4 / App.: the negative ELBO of the K-step chain tau_1 < ... < tau_K
    (0-based DDPM timesteps, tau_1 = 0) of linear-beta data x_0 = x_int / 127.5 - 1 under the exact (clipped)
    posterior mean of Gaussian data N(MU, S^2 I), in numpy float64, written from the paper:

        L = KL(q(x_tau_K | x_0) || N(0, I)) + sum_{k>=2} KL(q(x_tau_{k-1} | x_tau_k, x_0) || p(x_tau_{k-1} | x_tau_k))
            - log p(x_0 | x_tau_1),

    q(x_s | x_r, x_0) = N(sqrt(abar_s) beta_{r|s} / (1 - abar_r) x_0 + sqrt(alpha_{r|s}) (1 - abar_s) / (1 - abar_r)
    x_r, (1 - abar_s) / (1 - abar_r) beta_{r|s}), alpha_{r|s} = abar_r / abar_s = 1 - beta_{r|s} (their eq. for the
    skip-step posterior; Ho et al. eq. 7 on the sub-sequence). The model's variance: beta~ (fixed_small) or
    beta_{r|s} (fixed_large); the decoder N(x0_hat, beta~ of the chain's second step), discretized on the bins
    x_0 +- 1/255 with open end bins (Ho et al. eq. 13). ``noises[k]``: eps of x_tau_k. Returns (terms [K, B], prior
    [B]) in bits/dim."""
    from scipy.special import ndtr

    T, d = 1000, x_int[0].numel()
    abar = np.cumprod(1 - np.linspace(1e-4, 0.02, T))  # Ho et al. 2020's linear betas
    x0 = x_int.numpy().astype(np.float64) / 127.5 - 1

    def kl(m1, v1, m2, v2):  # KL(N(m1, v1) || N(m2, v2)) per element, nats
        return 0.5 * (np.log(v2 / v1) + v1 / v2 + (m1 - m2) ** 2 / v2 - 1)

    def x0_hat(x_r, a):  # E[x_0 | x_r] of Gaussian data, clipped to [-1, 1]
        return np.clip(MU + S**2 * np.sqrt(a) * (x_r - np.sqrt(a) * MU) / (a * S**2 + 1 - a), -1, 1)

    def posterior(s, r, x_r, y):  # (mean, var) of q(x_s | x_r, x_0 = y)
        skip_beta = 1 - abar[r] / abar[s]
        mean = (np.sqrt(abar[s]) * skip_beta * y + np.sqrt(1 - skip_beta) * (1 - abar[s]) * x_r) / (1 - abar[r])
        return mean, (1 - abar[s]) / (1 - abar[r]) * skip_beta

    terms = np.zeros((len(taus), x0.shape[0]))
    for k, r in enumerate(taus):
        x_r = np.sqrt(abar[r]) * x0 + np.sqrt(1 - abar[r]) * noises[k]
        if k == 0:
            _, var = posterior(taus[0], taus[1], x_r, x0)  # beta~ of the second step (beta~ of tau_1 is 0)
            mean, sd, w = x0_hat(x_r, abar[r]), np.sqrt(var), 1 / 255  # half a bin of x_int / 127.5 - 1
            hi = np.where(x_int.numpy() >= 255, 1.0, ndtr((x0 + w - mean) / sd))
            lo = np.where(x_int.numpy() <= 0, 0.0, ndtr((x0 - w - mean) / sd))
            nats = -np.log(hi - lo)
            assert np.isfinite(nats).all()
        else:
            s = taus[k - 1]
            true_mean, true_var = posterior(s, r, x_r, x0)
            model_mean, _ = posterior(s, r, x_r, x0_hat(x_r, abar[r]))
            model_var = true_var if variance == "fixed_small" else 1 - abar[r] / abar[s]
            nats = kl(true_mean, true_var, model_mean, model_var)
        terms[k] = nats.reshape(len(x0), -1).sum(1) / (d * math.log(2))
    prior = kl(np.sqrt(abar[taus[-1]]) * x0, 1 - abar[taus[-1]], 0.0, 1.0).reshape(len(x0), -1).sum(1)
    return terms, prior / (d * math.log(2))


@pytest.mark.parametrize(
    ("spacing", "variance", "taus"),
    [
        (None, "fixed_small", np.round(np.linspace(0, 999, 10)).astype(int)),  # the default: Bao et al.'s even steps
        ("linspace", "fixed_large", np.round(np.linspace(0, 999, 10)).astype(int)),
        ("quadratic", "fixed_small", (np.linspace(0, np.sqrt(800), 10) ** 2).astype(int)),  # DDIM's / their quad
    ],
)
def test_strided_vlb_is_the_k_step_bound_of_bao_et_al(spacing, variance, taus):
    """``vlb_bits_per_dim(steps=10)`` equals, term by term, the negative ELBO of the 10-step chain that starts at
    timestep 0 (Bao et al. 2022's K-step bound; their code asserts tau_1 = 1, 1-based), written independently in
    numpy above, on the same x_t draws, with the exact posterior mean of Gaussian data."""
    d, n, K = 4, 8, 10
    gm = GaussianMixture(torch.full((d,), MU, dtype=torch.float64), S, shape=(d,))  # MU exact, as the oracle's
    x_int = ((gm.sample(n, torch.Generator().manual_seed(6)) + 1) * 127.5).round().clamp(0, 255)
    options = {} if spacing is None else {"spacing": spacing}
    bpd, info = vlb_bits_per_dim(gm, x_int, formulations.get("ddpm"), scale=1 / 127.5, offset=-1.0,
                                 variance=variance, steps=K, generator=torch.Generator().manual_seed(7), **options)
    g = torch.Generator().manual_seed(7)  # the draws of x_tau_k, k = 1..K in turn
    noises = [torch.randn(x_int.shape, generator=g, dtype=torch.float64).numpy() for _ in range(K)]
    terms, prior = _k_step_bound_oracle(x_int, taus, noises, variance)
    assert info["timesteps"].tolist() == taus.tolist() and info["nfe"] == K
    np.testing.assert_allclose(info["terms_bpd"].numpy(), terms, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(info["prior_bpd"].numpy(), prior, rtol=1e-9, atol=1e-15)
    np.testing.assert_allclose(bpd.numpy(), terms.sum(0) + prior, rtol=1e-9)


def test_strided_vlb_refuses_a_chain_without_timestep_0():
    """``trailing`` (the sampler's default spacing) visits 99, 199, ..., 999 for K = 10: no t = 0, so its decoder would
    score x_0 from x_99. Refused by name, before any network call. At K = T (here T = 40) its chain is the full one,
    accepted, and gives the full chain's bound."""
    ddpm, x_int = formulations.get("ddpm"), torch.zeros(1, 2)
    with pytest.raises(ValueError, match=r"spacing='trailing' with steps=10.*first timestep is 99.*no timestep 0.*"
                                         r"allowed: .*linspace"):
        vlb_bits_per_dim(_gaussian(2), x_int, ddpm, scale=1 / 127.5, offset=-1.0, steps=10, spacing="trailing")
    with pytest.raises(ValueError, match=r"spacing='uniform' is not known.*allowed"):
        vlb_bits_per_dim(_gaussian(2), x_int, ddpm, scale=1 / 127.5, offset=-1.0, steps=10, spacing="uniform")
    short = formulations.get("ddpm", num_timesteps=40)
    bpd = [vlb_bits_per_dim(_gaussian(2), x_int, short, scale=1 / 127.5, offset=-1.0,
                            generator=torch.Generator().manual_seed(0), **options)[0]
           for options in ({"steps": 40, "spacing": "trailing"}, {})]
    torch.testing.assert_close(bpd[0], bpd[1], rtol=1e-12, atol=0)


class EpsAndVariance(torch.nn.Module):
    """A 2C-channel head ``[eps(x_t, t), v(x_t, t)]``: any smooth functions serve; the learned-variance path must
    read ``v`` as iDDPM does (Nichol & Dhariwal 2021 eq. 15)."""

    def forward(self, x_t, t, labels=None):
        t = t.to(x_t.dtype).reshape(-1, *([1] * (x_t.ndim - 1)))
        return torch.cat([0.8 * x_t + 0.1 * torch.sin(t / 7), torch.tanh(1.5 * x_t - t / 40)], dim=1)


def test_vlb_learned_variance_refuses_an_untrained_head():
    """A variance head that no loss trained (every model trained today: the loss reads the first C channels)
    is refused by name, before any network call."""
    ddpm = formulations.get("ddpm", num_timesteps=40)
    x_int = torch.zeros(1, 1, 2, 2)
    with pytest.raises(ValueError, match=r"variance='learned'.*never trained.*allowed: fixed_small, fixed_large"):
        vlb_bits_per_dim(Denoiser(EpsAndVariance(), ddpm), x_int, ddpm, scale=1 / 127.5, offset=-1.0,
                         variance="learned")
    with pytest.raises(ValueError, match=r"variance='learned' needs a lightning_diff Denoiser"):
        vlb_bits_per_dim(_gaussian(4), x_int, ddpm, scale=1 / 127.5, offset=-1.0, variance="learned")


def test_vlb_learned_variance_equals_guided_diffusion(monkeypatch):
    """Every term of the bound of a head marked as trained equals openai/guided-diffusion's ``_vb_terms_bpd``
    (LEARNED_RANGE, epsilon mean, clipped x_0) and ``_prior_bpd`` on the same x_t, T = 40 linear betas."""
    reference = Path(__file__).resolve().parents[1].parent / "shared" / "reference"
    if not (reference / "guided_diffusion").is_dir():
        pytest.skip(f"the official guided-diffusion code is not at {reference / 'guided_diffusion'}")
    monkeypatch.syspath_prepend(str(reference))
    from guided_diffusion import gaussian_diffusion as gd
    from guided_diffusion import losses

    # iDDPM's decoder uses a tanh approximation of the normal CDF; compare against the exact one we use.
    monkeypatch.setattr(losses, "approx_standard_normal_cdf", lambda x: torch.distributions.Normal(0.0, 1.0).cdf(x))
    T = 40
    ddpm = formulations.get("ddpm", num_timesteps=T)
    betas = gd.get_named_beta_schedule("linear", T)
    torch.testing.assert_close(ddpm.betas, torch.from_numpy(betas))
    theirs = gd.GaussianDiffusion(betas=betas, model_mean_type=gd.ModelMeanType.EPSILON,
                                  model_var_type=gd.ModelVarType.LEARNED_RANGE, loss_type=gd.LossType.MSE)
    head = EpsAndVariance()
    x_int = torch.randint(0, 256, (3, 2, 2, 2), generator=torch.Generator().manual_seed(9)).double()
    bpd, info = vlb_bits_per_dim(Denoiser(head, ddpm, variance_trained=True), x_int, ddpm, scale=1 / 127.5,
                                 offset=-1.0, variance="learned", generator=torch.Generator().manual_seed(10))
    x0, g = x_int / 127.5 - 1, torch.Generator().manual_seed(10)  # our loop draws the noise of t = 0, 1, ...
    for t in range(T):
        noise = torch.randn(x0.shape, generator=g, dtype=torch.float64)
        t_batch = torch.full((3,), t, dtype=torch.long)
        x_t = theirs.q_sample(x0, t_batch, noise)
        term = theirs._vb_terms_bpd(head, x0, x_t, t_batch, clip_denoised=True)["output"]
        torch.testing.assert_close(info["terms_bpd"][t], term.double(), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(info["prior_bpd"], theirs._prior_bpd(x0).double(), rtol=1e-4, atol=1e-7)
    fixed, _ = vlb_bits_per_dim(Denoiser(head, ddpm), x_int, ddpm, scale=1 / 127.5, offset=-1.0,
                                generator=torch.Generator().manual_seed(10))
    assert (bpd - fixed).abs().min() > 1e-3  # the variance channels really change the bound


def test_bad_settings_raise():
    gm = _gaussian(2)
    x = torch.zeros(1, 2)
    with pytest.raises(ValueError, match="divergence"):
        log_likelihood(gm, x, sigma_min=0.01, sigma_max=1.0, divergence="skilling")
    with pytest.raises(ValueError, match="sigma_min"):
        log_likelihood(gm, x, sigma_min=1.0, sigma_max=0.5)
    with pytest.raises(ValueError, match="ddpm"):
        vlb_bits_per_dim(gm, x.reshape(1, 1, 2), formulations.get("edm"), scale=1 / 127.5, offset=-1.0)
