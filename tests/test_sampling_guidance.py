"""Guidance wrappers against the exact class-conditional denoisers of a Gaussian mixture
(class = component)."""

import pytest
import torch

from lightning_diff import sampling
from lightning_diff.analytic import GaussianMixture
from lightning_diff.sampling import CFGDenoiser, ClassifierGuidance, schedules

f64 = torch.float64
MEANS, STDS, WEIGHTS = [[-1.0, 0.5], [1.0, -0.5], [0.3, 1.2]], [0.3, 0.4, 0.25], [0.5, 0.3, 0.2]
MIX = GaussianMixture(MEANS, STDS, WEIGHTS)
COMPONENTS = [GaussianMixture(m, s) for m, s in zip(MEANS, STDS, strict=True)]


def conditional(x, sigma, labels=None):
    """Exact D(x; sigma, c): the mixture when labels is None, else each row's own component."""
    if labels is None:
        return MIX(x, sigma)
    every = torch.stack([c(x, sigma) for c in COMPONENTS])  # [K, B, D]
    return every[labels, torch.arange(x.shape[0])]


def exact_classifier(x, sigma):
    """Logits of p(c | x; sigma): log w_c + log N(x; mu_c, (s_c^2 + sigma^2) I) up to a constant."""
    var = torch.tensor(STDS, dtype=f64) ** 2 + sigma.reshape(-1, 1) ** 2  # [B, K]
    sq = ((x[:, None, :] - torch.tensor(MEANS, dtype=f64)) ** 2).sum(-1)
    return torch.tensor(WEIGHTS, dtype=f64).log() - 0.5 * sq / var - var.log()  # -(D/2) log(var) with D = 2


@pytest.fixture
def batch():
    g = torch.Generator().manual_seed(0)
    x = 2 * torch.randn(64, 2, generator=g, dtype=f64)
    sigma = torch.rand(64, generator=g, dtype=f64) * 3 + 0.05
    labels = torch.randint(0, 3, (64,), generator=g)
    return x, sigma, labels


def test_cfg_gamma1_is_conditional_and_gamma0_unconditional_exactly(batch):
    x, sigma, labels = batch
    exact = conditional(x, sigma, labels)
    assert torch.equal(CFGDenoiser(conditional, 1.0)(x, sigma, labels=labels), exact)
    assert torch.equal(CFGDenoiser.from_w(conditional, 0.0)(x, sigma, labels=labels), exact)
    assert torch.equal(CFGDenoiser(conditional, 0.0)(x, sigma, labels=labels), MIX(x, sigma))
    assert torch.equal(CFGDenoiser(conditional, 3.0)(x, sigma), MIX(x, sigma))  # labels=None: unconditional


def test_cfg_matches_the_epsilon_form_with_gamma_one_plus_w(batch):
    """eps~ = (1 + w) eps(x, c) - w eps(x) (Ho & Salimans 2022) with eps = (x - D) / sigma, gamma = 1 + w."""
    x, sigma, labels = batch
    w, s = 2.5, sigma[:, None]
    eps = (1 + w) * (x - conditional(x, sigma, labels)) / s - w * (x - MIX(x, sigma)) / s
    guided = CFGDenoiser.from_w(conditional, w)(x, sigma, labels=labels)
    assert torch.allclose(guided, x - s * eps, atol=1e-12)
    assert CFGDenoiser.from_w(conditional, w).scale == 3.5


def test_classifier_guidance_with_exact_classifier_gives_conditional_denoiser(batch):
    """grad log p(x | c) = grad log p(x) + grad log p(c | x), so scale 1 turns D into D(x; sigma, c)."""
    x, sigma, labels = batch
    guided = ClassifierGuidance(lambda x, s, labels=None: MIX(x, s), exact_classifier, scale=1.0)
    assert torch.allclose(guided(x, sigma, labels=labels), conditional(x, sigma, labels), atol=1e-10)
    assert torch.equal(guided(x, sigma), MIX(x, sigma))


def test_guided_sampling_runs_through_any_sampler_and_counts_calls():
    labels = torch.full((500,), 2)
    x = 20.0 * torch.randn(500, 2, generator=torch.Generator().manual_seed(3), dtype=f64)
    stats = {}
    out = sampling.heun(CFGDenoiser(conditional, 1.0), x, schedules.karras_sigmas(32, 0.002, 20.0),
                        cond={"labels": labels}, stats=stats)
    assert stats["nfe"] == 63
    assert torch.allclose(out.mean(0), torch.tensor(MEANS[2], dtype=f64), atol=0.05)


def test_bad_scales():
    with pytest.raises(ValueError, match="scale=-1"):
        CFGDenoiser(conditional, -1)
    with pytest.raises(ValueError, match="scale=-2"):
        ClassifierGuidance(conditional, exact_classifier, -2)
