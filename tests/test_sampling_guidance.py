"""Guidance wrappers against the exact class-conditional denoisers of a Gaussian mixture (class = component):
classifier-free guidance at gamma != 1 against its closed form, one concatenated network batch per step and
the honest NFE, classifier guidance in both input frames with an exact classifier and with a float32
``nn.Module``."""

import math

import pytest
import torch
from torch import nn

from lightning_diff import formulations, sampling
from lightning_diff.analytic import GaussianMixture
from lightning_diff.denoiser import Denoiser
from lightning_diff.formulations import schedules
from lightning_diff.networks.mlp import MLP
from lightning_diff.sampling import CFGDenoiser, ClassifierGuidance

f64 = torch.float64
MEANS, STDS, WEIGHTS = [[-1.0, 0.5], [1.0, -0.5], [0.3, 1.2]], [0.3, 0.4, 0.25], [0.5, 0.3, 0.2]
MIX = GaussianMixture(MEANS, STDS, WEIGHTS)
COMPONENTS = [GaussianMixture(m, s) for m, s in zip(MEANS, STDS, strict=True)]
NULL = len(MEANS)  # the null label: "unconditional"


class ExactConditional:
    """Exact D(x; sigma, c): each row's own component; the null label (or labels=None) is the mixture.
    Records the batch size of every call."""

    null_label = NULL

    def __init__(self):
        self.batches = []

    def __call__(self, x, sigma, labels=None):
        self.batches.append(x.shape[0])
        if labels is None:
            return MIX(x, sigma)
        every = torch.stack([c(x, sigma) for c in COMPONENTS] + [MIX(x, sigma)])  # [K + 1, B, D]
        return every[labels, torch.arange(x.shape[0])]


def closed_form_cfg(x, sigma, labels, gamma):
    """D_gamma = D_uncond + gamma (D_cond - D_uncond) from the exact denoisers (Ho & Salimans 2022)."""
    every = torch.stack([c(x, sigma) for c in COMPONENTS])
    cond = every[labels, torch.arange(x.shape[0])]
    return MIX(x, sigma) + gamma * (cond - MIX(x, sigma))


def sigma_frame_classifier(x, sigma):
    """Logits of p(c | x; sigma): log w_c + log N(x; mu_c, (s_c^2 + sigma^2) I) up to a constant."""
    var = torch.tensor(STDS, dtype=f64) ** 2 + sigma.reshape(-1, 1) ** 2  # [B, K]
    sq = ((x[:, None, :] - torch.tensor(MEANS, dtype=f64)) ** 2).sum(-1)
    return torch.tensor(WEIGHTS, dtype=f64).log() - 0.5 * sq / var - var.log()  # -(D/2) log(var) with D = 2


# Ho et al. 2020's forward process, built here from its betas: x_t = sqrt(abar_t) y + sqrt(1 - abar_t) n.
ABAR = torch.cumprod(1 - torch.linspace(1e-4, 0.02, 1000, dtype=f64), 0)


def xt_frame_classifier(x_t, t):
    """Logits of p(c | x_t; t) as guided-diffusion's classifiers take them: x_t in the DDPM frame, t the integer
    timestep index. x_t | c ~ N(sqrt(abar_t) mu_c, (abar_t s_c^2 + 1 - abar_t) I)."""
    assert torch.equal(t, t.round()) and t.min() >= 0 and t.max() <= 999, t
    abar = ABAR[t.long()].reshape(-1, 1)
    var = abar * torch.tensor(STDS, dtype=f64) ** 2 + 1 - abar
    sq = ((x_t[:, None, :] - abar.sqrt()[..., None] * torch.tensor(MEANS, dtype=f64)) ** 2).sum(-1)
    return torch.tensor(WEIGHTS, dtype=f64).log() - 0.5 * sq / var - var.log()


class Float32Classifier(nn.Module):
    """The sigma-frame exact classifier as an ordinary float32 module: a (identity) linear input layer and
    float32 parameters, so float64 inputs fail inside ``nn.Linear``."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(2, 2)
        nn.init.eye_(self.inp.weight)
        nn.init.zeros_(self.inp.bias)
        self.means = nn.Parameter(torch.tensor(MEANS))
        self.log_var = nn.Parameter(torch.tensor(STDS).log() * 2)
        self.log_weights = nn.Parameter(torch.tensor(WEIGHTS).log())

    def forward(self, x, sigma):
        x = self.inp(x)
        var = self.log_var.exp() + sigma.reshape(-1, 1) ** 2
        sq = ((x[:, None, :] - self.means) ** 2).sum(-1)
        return self.log_weights - 0.5 * sq / var - var.log()


@pytest.fixture
def batch():
    g = torch.Generator().manual_seed(0)
    x = 2 * torch.randn(64, 2, generator=g, dtype=f64)
    sigma = torch.rand(64, generator=g, dtype=f64) * 3 + 0.05
    labels = torch.randint(0, 3, (64,), generator=g)
    return x, sigma, labels


# --- classifier-free guidance -------------------------------------------------------------------------
@pytest.mark.parametrize("gamma", [2.5, 0.4, 0.0])
def test_cfg_equals_the_closed_form_at_gamma(batch, gamma):
    x, sigma, labels = batch
    guided = CFGDenoiser(ExactConditional(), gamma)(x, sigma, labels=labels)
    assert torch.allclose(guided, closed_form_cfg(x, sigma, labels, gamma), atol=1e-12, rtol=0)


def test_cfg_gamma1_is_the_conditional_denoiser_in_one_pass(batch):
    x, sigma, labels = batch
    denoiser = ExactConditional()
    assert torch.equal(CFGDenoiser(denoiser, 1.0)(x, sigma, labels=labels), denoiser(x, sigma, labels))
    assert torch.equal(CFGDenoiser(denoiser, 3.0)(x, sigma), MIX(x, sigma))  # labels=None: unconditional
    assert denoiser.batches == [64] * 3


def test_cfg_matches_the_epsilon_form_with_gamma_one_plus_w(batch):
    """eps~ = (1 + w) eps(x, c) - w eps(x) (Ho & Salimans 2022) with eps = (x - D) / sigma, gamma = 1 + w."""
    x, sigma, labels = batch
    w, s = 2.5, sigma[:, None]
    eps = (1 + w) * (x - closed_form_cfg(x, sigma, labels, 1.0)) / s - w * (x - MIX(x, sigma)) / s
    guided = CFGDenoiser.from_w(ExactConditional(), w)(x, sigma, labels=labels)
    assert torch.allclose(guided, x - s * eps, atol=1e-12)
    assert CFGDenoiser.from_w(ExactConditional(), w).scale == 3.5


def test_cfg_runs_one_concatenated_batch_equal_to_two_calls():
    """A real float32 network: one forward pass on [x; x] with [labels; null] (EDM2 / diffusers) equals the
    conditional and unconditional passes run apart, to float32 round-off."""
    torch.manual_seed(0)
    net = Denoiser(MLP(dim=2, hidden=32, depth=2, emb_channels=16, num_classes=3), formulations.get("edm"))
    for p in net.parameters():
        p.data.normal_(0, 0.3)  # zero-initialised output layers would hide a wrong split
    batches = []
    net.backbone.register_forward_pre_hook(lambda m, args: batches.append(args[0].shape[0]))
    x, sigma, labels = torch.randn(6, 2, dtype=f64), torch.full((6,), 1.3, dtype=f64), torch.tensor([0, 1, 2] * 2)
    with torch.no_grad():
        guided = CFGDenoiser(net, 2.5)(x, sigma, labels=labels)
        assert batches == [12]
        apart = torch.lerp(net(x, sigma, None), net(x, sigma, labels), 2.5)
    assert net.null_label == 3
    assert torch.allclose(guided, apart, atol=1e-6, rtol=1e-6)
    assert (guided - net(x, sigma, labels)).abs().max() > 1e-2  # guidance changed something


def test_guided_sampling_follows_the_closed_form_and_counts_two_passes_per_evaluation():
    """Heun through CFG at gamma = 2.5 equals Heun through the closed-form guided denoiser; each guided
    evaluation is two network passes per sample, so NFE = 2 (2N - 1)."""
    labels = torch.tensor([0, 1, 2, 2] * 25)
    x = 20.0 * torch.randn(100, 2, generator=torch.Generator().manual_seed(3), dtype=f64)
    grid = schedules.karras_sigmas(32, 0.002, 20.0)
    guided_stats, exact_stats, payloads = {}, {}, []
    denoiser = ExactConditional()
    out = sampling.heun(CFGDenoiser(denoiser, 2.5), x, grid, cond={"labels": labels}, stats=guided_stats,
                        callback=payloads.append)
    exact = sampling.heun(lambda x, s, labels: closed_form_cfg(x, s, labels, 2.5), x, grid,
                          cond={"labels": labels}, stats=exact_stats)
    assert torch.allclose(out, exact, atol=1e-10, rtol=0)
    assert exact_stats["nfe"] == 63 and guided_stats["nfe"] == 126 and payloads[0]["nfe"] == 2
    assert denoiser.batches == [200] * 63  # one concatenated batch per evaluation


def test_autoguidance_with_a_separate_network_is_two_calls_and_two_passes(batch):
    x, sigma, labels = batch
    good, weak = ExactConditional(), ExactConditional()
    guided = CFGDenoiser(good, 2.5, uncond_denoiser=weak)
    assert torch.allclose(guided(x, sigma, labels=labels), closed_form_cfg(x, sigma, labels, 2.5), atol=1e-12)
    assert good.batches == [64] and weak.batches == [64]
    stats = {}
    sampling.euler(guided, x, schedules.karras_sigmas(5, 0.01, 3.0), cond={"labels": labels}, stats=stats)
    assert stats["nfe"] == 10
    sampling.euler(guided, x, schedules.karras_sigmas(5, 0.01, 3.0), stats=stats)  # no labels: one pass
    assert stats["nfe"] == 5


def test_cfg_needs_a_null_label_or_a_separate_unconditional_network():
    with pytest.raises(ValueError, match="null_label"):
        CFGDenoiser(lambda x, s, labels=None: x, 2.0)
    unconditional = Denoiser(MLP(dim=2, hidden=8, depth=1, emb_channels=8), formulations.get("edm"))
    assert unconditional.null_label is None
    with pytest.raises(ValueError, match="null_label"):
        CFGDenoiser(unconditional, 2.0)
    CFGDenoiser(lambda x, s, labels=None: x, 2.0, null_label=7)  # an explicit null label is enough


# --- classifier guidance -------------------------------------------------------------------------------
def test_classifier_guidance_in_the_sigma_frame_gives_the_conditional_denoiser(batch):
    """grad log p(x | c) = grad log p(x) + grad log p(c | x), so scale 1 turns D into D(x; sigma, c)."""
    x, sigma, labels = batch
    guided = ClassifierGuidance(lambda x, s, labels=None: MIX(x, s), sigma_frame_classifier, 1.0, frame="sigma")
    assert torch.allclose(guided(x, sigma, labels=labels), closed_form_cfg(x, sigma, labels, 1.0), atol=1e-10)
    assert torch.equal(guided(x, sigma), MIX(x, sigma))


def test_classifier_guidance_in_the_x_t_frame_of_ddpm_gives_the_conditional_denoiser():
    """A guided-diffusion-style classifier p(c | x_t; t) on x_t = sqrt(abar_t) x and the integer timestep:
    grad_x = sqrt(abar_t) grad_{x_t}, so scale 1 again gives the exact conditional denoiser."""
    g = torch.Generator().manual_seed(1)
    t = torch.randint(100, 700, (64,), generator=g)  # sigma from 0.2 to 3: s = sqrt(abar) far from 1
    sigma = ((1 - ABAR[t]) / ABAR[t]).sqrt()
    x = MIX.sample(64, g) + sigma[:, None] * torch.randn(64, 2, generator=g, dtype=f64)
    labels = torch.randint(0, 3, (64,), generator=g)
    guided = ClassifierGuidance(lambda x, s, labels=None: MIX(x, s), xt_frame_classifier, 1.0, frame="x_t",
                                formulation=formulations.get("ddpm"))
    exact = closed_form_cfg(x, sigma, labels, 1.0)
    assert torch.allclose(guided(x, sigma, labels=labels), exact, atol=1e-9)
    # The same classifier read as a sigma-frame one (gradient not rescaled, wrong inputs) misses it.
    wrong = ClassifierGuidance(lambda x, s, labels=None: MIX(x, s),
                               lambda x, s: xt_frame_classifier(x, t.to(f64)), 1.0, frame="sigma")
    assert (wrong(x, sigma, labels=labels) - exact).abs().max() > 1e-2


def test_classifier_guidance_in_the_x_t_frame_of_vp_uses_continuous_time():
    """VP (Song et al. 2021): x_t = exp(-B(t)/2) x_0 + sqrt(1 - exp(-B(t))) n, B(t) = beta_min t + beta_d t^2 / 2."""
    vp = formulations.get("vp")
    t = torch.linspace(0.05, 0.6, 64, dtype=f64)
    B = 0.1 * t + 19.9 * t**2 / 2
    sigma = torch.expm1(B).sqrt()
    g = torch.Generator().manual_seed(2)
    x = MIX.sample(64, g) + sigma[:, None] * torch.randn(64, 2, generator=g, dtype=f64)
    labels = torch.randint(0, 3, (64,), generator=g)

    def classifier(x_t, time):
        abar = torch.exp(-(0.1 * time + 19.9 * time**2 / 2)).reshape(-1, 1)
        var = abar * torch.tensor(STDS, dtype=f64) ** 2 + 1 - abar
        sq = ((x_t[:, None, :] - abar.sqrt()[..., None] * torch.tensor(MEANS, dtype=f64)) ** 2).sum(-1)
        return torch.tensor(WEIGHTS, dtype=f64).log() - 0.5 * sq / var - var.log()

    guided = ClassifierGuidance(lambda x, s, labels=None: MIX(x, s), classifier, 1.0, frame="x_t", formulation=vp)
    assert torch.allclose(guided(x, sigma, labels=labels), closed_form_cfg(x, sigma, labels, 1.0), atol=1e-9)


def test_classifier_guidance_with_a_float32_module_inside_a_float64_sampler(batch):
    x, sigma, labels = batch
    guided = ClassifierGuidance(lambda x, s, labels=None: MIX(x, s), Float32Classifier(), 1.0, frame="sigma")
    out = guided(x, sigma, labels=labels)
    assert out.dtype == f64
    assert torch.allclose(out, closed_form_cfg(x, sigma, labels, 1.0), atol=1e-4)
    stats = {}
    samples = sampling.heun(guided, x, schedules.karras_sigmas(4, 0.01, 3.0), cond={"labels": labels}, stats=stats)
    assert torch.isfinite(samples).all() and stats["nfe"] == 7  # classifier passes are not network passes


@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
def test_ancestral_samplers_apply_the_guidance_themselves_with_the_denoisers_nfe(sampler):
    """ddpm / ddim split a ClassifierGuidance into the unguided denoiser and the classifier's gradient
    (tests/test_classifier_guidance_algorithms.py: Algorithm 1 / 2 against guided-diffusion): NFE counts the denoiser's
    passes only, scale 0 is the unguided sampler exactly, and a positive scale moves the samples."""
    labels = torch.tensor([0, 1, 2, 2] * 4)
    x = 3.0 * torch.randn(16, 2, generator=torch.Generator().manual_seed(4), dtype=f64)
    grid = formulations.get("ddpm").sampling_sigmas(6)

    def run(denoiser):
        stats = {}
        out = sampling.sample(sampler, denoiser, x, grid, cond={"labels": labels}, stats=stats,
                              generator=torch.Generator().manual_seed(5))
        return out, stats["nfe"]

    unguided = run(lambda x, s, labels=None: MIX(x, s))
    off = run(ClassifierGuidance(lambda x, s, labels=None: MIX(x, s), sigma_frame_classifier, 0.0, frame="sigma"))
    on = run(ClassifierGuidance(lambda x, s, labels=None: MIX(x, s), sigma_frame_classifier, 2.0, frame="sigma"))
    assert torch.equal(off[0], unguided[0]) and unguided[1] == off[1] == on[1] == 6
    assert (on[0] - unguided[0]).abs().max() > 1e-2


def test_guidance_wrappers_pass_round_sigma_through():
    iddpm = formulations.get("iddpm")
    net = Denoiser(MLP(dim=2, hidden=8, depth=1, emb_channels=8, num_classes=3), iddpm)
    sigma = torch.tensor([0.3, 5.0, 81.0], dtype=f64)
    for wrapper in (CFGDenoiser(net, 2.0), ClassifierGuidance(net, sigma_frame_classifier, frame="sigma")):
        assert torch.equal(wrapper.round_sigma(sigma), iddpm.round_sigma(sigma))
        assert not torch.equal(wrapper.round_sigma(sigma), sigma)


def test_bad_settings():
    with pytest.raises(ValueError, match="scale=-1"):
        CFGDenoiser(ExactConditional(), -1)
    with pytest.raises(ValueError, match="scale=-2"):
        ClassifierGuidance(MIX, sigma_frame_classifier, -2, frame="sigma")
    with pytest.raises(ValueError, match="frame='x0'"):
        ClassifierGuidance(MIX, sigma_frame_classifier, frame="x0")
    with pytest.raises(ValueError, match="formulation"):
        ClassifierGuidance(MIX, xt_frame_classifier, frame="x_t")  # x_t needs the formulation's s(t) and t
    assert math.isclose(CFGDenoiser.from_w(ExactConditional(), 0.5).scale, 1.5)


class _LearnedVarianceMixture:
    """The exact mixture denoiser with a learned-variance head (v = 0), taking labels (ignored)."""

    def __init__(self):
        from lightning_diff.analytic import GaussianMixture

        self.mix = GaussianMixture(torch.tensor([[1.0, 0.0], [-1.0, 0.0]], dtype=torch.float64), 0.3)

    def __call__(self, x, sigma, labels=None):
        return self.mix(x, sigma)

    def forward_with_variance(self, x, sigma, labels=None):
        return self.mix(x, sigma), torch.zeros_like(x)


def test_a_guided_evaluation_counts_two_passes_through_the_learned_variance_head():
    """``ddpm variance=learned`` wraps the denoiser in a head that must pass the guidance wrapper's ``network_passes``
    through: under CFG every step costs 2 network passes (before: 1, half the true NFE of the DiT recipe's records)."""
    from lightning_diff.formulations.schedules import karras_sigmas

    model = _LearnedVarianceMixture()
    guided = sampling.CFGDenoiser(model, 2.0, null_label=2)
    stats, steps = {}, 5
    sampling.ddpm(guided, torch.randn(3, 2, dtype=torch.float64) * 10, karras_sigmas(steps, 0.01, 10.0),
                  variance="learned", cond={"labels": torch.tensor([0, 1, 0])}, stats=stats,
                  generator=torch.Generator().manual_seed(0))
    assert stats["nfe"] == 2 * steps
