"""The formulation core against the papers: EDM Table 1 constants, closed-form ideal denoisers,
the loss each paper trains with, training densities (KS tests), derivatives and inverses."""

import math
from pathlib import Path

import pytest
import torch
from scipy import stats

from lightning_diff import formulations
from lightning_diff.analytic import GaussianMixture
from lightning_diff.denoiser import Denoiser

ALL = formulations.names()
f64 = torch.float64


def test_registry_has_all_eight_and_the_consistency_parametrisation():
    assert sorted(ALL) == sorted(["edm", "vp", "subvp", "ve", "ncsn", "ddpm", "iddpm", "rf", "consistency"])


# --- EDM Table 1 and its footnotes (docs/formulations.md#constants-and-their-sources) ---------------------------------
def test_edm_table1_constants():
    vp = formulations.get("vp")
    s = vp.sigma(torch.tensor([1.0, 1e-3], dtype=f64))
    assert s[0].item() == pytest.approx(152.17, abs=5e-3)
    assert s[1].item() == pytest.approx(0.01049, abs=5e-6)
    iddpm = formulations.get("iddpm")
    assert iddpm.u[8].item() == pytest.approx(80.20, abs=5e-3)
    assert iddpm.u[999].item() == pytest.approx(0.006425, abs=5e-7)
    assert iddpm.u[1000].item() == 0
    t = torch.linspace(1e-3, 1, 50, dtype=f64)
    torch.testing.assert_close(vp.c_noise(vp.sigma(t)), 999 * t, rtol=1e-9, atol=1e-9)


def test_iddpm_sampling_grid_starts_at_j0():
    fm = formulations.get("iddpm")
    sig = fm.sampling_sigmas(18)
    assert sig[0].item() == pytest.approx(80.2037, abs=1e-3) and sig[-1] == 0 and sig[-2] == fm.u[999]
    assert torch.all(sig[:-1] > sig[1:])


def test_ddpm_grid_is_ho_et_al():
    fm = formulations.get("ddpm")
    betas = torch.linspace(1e-4, 0.02, 1000, dtype=f64)
    abar = torch.cumprod(1 - betas, 0)
    torch.testing.assert_close(fm.grid.flip(0), ((1 - abar) / abar).sqrt())
    cos = formulations.get("ddpm", beta_schedule="cosine")
    # Nichol & Dhariwal eq. 17: abar_t = f(t)/f(0) (before clipping betas to 0.999, which only touches t ~ T).
    t = torch.arange(1, 1001, dtype=f64) / 1000
    f = torch.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2 / math.cos(0.008 / 1.008 * math.pi / 2) ** 2
    torch.testing.assert_close(cos.alphas_cumprod[:990], f[:990], rtol=1e-10, atol=1e-12)


# --- preconditioning: the papers' closed forms, NVlabs/edm, the ideal denoiser -----------------------------
def _ddpm_linear_sigmas() -> torch.Tensor:
    """Ho et al. 2020: beta linear 1e-4..0.02, T = 1000; sigma_i = sqrt((1 - abar_i) / abar_i), i = 0..999."""
    abar = torch.cumprod(1 - torch.linspace(1e-4, 0.02, 1000, dtype=f64), 0)
    return ((1 - abar) / abar).sqrt()


def _vp_t(sigma, B):
    """Song et al. 2021 VP/sub-VP: B(t) = int_0^t beta = 0.1 t + 19.9 t^2 / 2 solved for t."""
    return ((0.1**2 + 2 * 19.9 * B).sqrt() - 0.1) / 19.9


def _closed_forms(name: str, sigma: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """``(c_skip, c_out, c_in, c_noise)`` of each paper at ``sigma`` (default constants), written out here:
    EDM Table 1 (VP, VE, iDDPM, EDM; docs/formulations.md#the-families); sub-VP from score_sde's ``subVPSDE`` (x_t =
    sqrt(abar) y +
    (1 - abar) n, score = -F / (1 - abar), so sigma = 2 sinh(B/2), s = sqrt(abar) = (sqrt(sigma^2 + 4) - sigma)/2);
    DDPM from Ho et al. (eps-prediction, x_t = sqrt(abar_i) (y + sigma_i n), the 0-based index i fed);
    NCSN (Song & Ermon 2019; NCSNv2 s = F / sigma, so D = x + sigma F; the level index fed); rectified flow
    (docs/formulations.md#rf: x_t = (1 - t) y + t eps, t = sigma / (1 + sigma), v-prediction, 999 t fed)."""
    one = torch.ones_like(sigma)
    if name == "edm":
        sd = 0.5
        return sd**2 / (sigma**2 + sd**2), sigma * sd / (sigma**2 + sd**2).sqrt(), 1 / (sd**2 + sigma**2).sqrt(), \
            sigma.log() / 4
    if name == "vp":
        return one, -sigma, 1 / (sigma**2 + 1).sqrt(), 999 * _vp_t(sigma, torch.log(1 + sigma**2))
    if name == "subvp":
        return one, -sigma, ((sigma**2 + 4).sqrt() - sigma) / 2, 999 * _vp_t(sigma, 2 * torch.asinh(sigma / 2))
    if name == "ve":
        return one, sigma, one, (sigma / 2).log()
    if name == "ncsn":  # sigma_i = 1 * (0.01 / 1)^(i / 9), i = 0..9
        return one, sigma, one, torch.round(-4.5 * torch.log10(sigma))
    if name == "ddpm":
        index = (sigma.reshape(-1, 1) - _ddpm_linear_sigmas()).abs().argmin(1).to(f64)
        return one, -sigma, 1 / (1 + sigma**2).sqrt(), index
    if name == "iddpm":
        u = formulations.get("iddpm").u  # the grid itself is pinned by test_edm_table1_constants
        return one, -sigma, 1 / (sigma**2 + 1).sqrt(), 999 - (sigma.reshape(-1, 1) - u[:1000]).abs().argmin(1).to(f64)
    if name == "consistency":  # Song et al. 2023, Appendix C (eps = 0.002), with EDM's c_in and c_noise
        sd, eps = 0.5, 0.002
        return sd**2 / ((sigma - eps) ** 2 + sd**2), sd * (sigma - eps) / (sd**2 + sigma**2).sqrt(), \
            1 / (sd**2 + sigma**2).sqrt(), sigma.log() / 4
    assert name == "rf"
    return 1 / (1 + sigma), -sigma / (1 + sigma), 1 / (1 + sigma), 999 * sigma / (1 + sigma)


def _test_sigmas(fm) -> torch.Tensor:
    """Noise levels the network of ``fm`` knows: a log-spaced range, or grid levels for discrete families."""
    if fm.discrete:
        return fm.grid[torch.linspace(0, fm.grid.numel() - 1, 7).round().long()].to(f64)
    return torch.logspace(math.log10(fm.sigma_min), math.log10(fm.sigma_max), 9, dtype=f64)


@pytest.mark.parametrize("name", ALL)
def test_preconditioning_is_the_papers_closed_form(name):
    fm = formulations.get(name)
    sigma = _test_sigmas(fm)
    ours = (fm.c_skip(sigma), fm.c_out(sigma), fm.c_in(sigma), fm.c_noise(sigma))
    for what, a, b in zip(("c_skip", "c_out", "c_in", "c_noise"), ours, _closed_forms(name, sigma), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10, msg=lambda m, w=what: f"{name} {w}: {m}")


class RecordingModel(torch.nn.Module):
    """Stands in for a backbone in NVlabs/edm's preconditioners and ours: records its input and noise label
    and returns the fixed ``F`` (the first ``out_channels`` of it)."""

    F: torch.Tensor

    def __init__(self, img_resolution=4, in_channels=1, out_channels=1, label_dim=0, **kwargs):
        super().__init__()
        self.out_channels = out_channels

    def forward(self, x, noise_labels, class_labels=None, labels=None):
        self.x_in, self.noise_labels = x, noise_labels
        return RecordingModel.F.repeat(1, self.out_channels // RecordingModel.F.shape[1], 1, 1).to(x.dtype)


@pytest.mark.parametrize(("name", "precond"), [("vp", "VPPrecond"), ("ve", "VEPrecond"), ("iddpm", "iDDPMPrecond"),
                                               ("edm", "EDMPrecond")])
def test_preconditioning_equals_nvlabs_edm(name, precond, monkeypatch):
    """Same x, sigma and network output F through NVlabs/edm's preconditioner and our Denoiser: the same D, the
    same network input c_in x and the same c_noise (EDM Table 1 as its authors coded it)."""
    reference = Path(__file__).resolve().parents[1].parent / "shared" / "reference" / "edm"
    if not (reference / "training" / "networks.py").is_file():
        pytest.skip(f"the official NVlabs/edm code is not at {reference}")
    monkeypatch.syspath_prepend(str(reference))
    from training import networks

    monkeypatch.setattr(networks, "RecordingModel", RecordingModel, raising=False)
    theirs = getattr(networks, precond)(img_resolution=4, img_channels=1, model_type="RecordingModel")
    fm = formulations.get(name)
    g = torch.Generator().manual_seed(0)
    sigma = _test_sigmas(fm).float()
    x = torch.randn(len(sigma), 1, 4, 4, generator=g)
    RecordingModel.F = torch.randn(x.shape, generator=g)
    D_theirs = theirs(x, sigma)
    their_in, their_noise = theirs.model.x_in, theirs.model.noise_labels
    ours = Denoiser(RecordingModel(), fm)
    D_ours = ours(x, sigma)
    torch.testing.assert_close(D_ours, D_theirs, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours.backbone.x_in, their_in, rtol=1e-5, atol=1e-6)
    # VP: ours computes ln(1 + sigma^2) as NVlabs does (not log1p, 5% off at sigma_min = 0.0032 in float32).
    torch.testing.assert_close(ours.backbone.noise_labels, their_noise.float(), rtol=1e-5, atol=1e-6)


class PaperTarget(torch.nn.Module):
    """Returns what each paper's network regresses on, computed from the exact D* of Gaussian data and the
    papers' definitions (never from the formulation): eps = (x - D*) / sigma for the eps-prediction families,
    sigma * score = (D* - x) / sigma for VE/NCSN, v = eps - y for rectified flow, and EDM's effective target
    (D* - c_skip x) / c_out with EDM Table 1's c_skip, c_out (sigma_data = 0.5)."""

    def __init__(self, name, x, sigma, D_star):
        super().__init__()
        self.name, self.x, self.sigma, self.D_star = name, x, sigma.reshape(-1, 1, 1, 1), D_star

    def forward(self, net_in, c_noise, labels=None):
        x, sigma, D_star = self.x, self.sigma, self.D_star
        eps = (x - D_star) / sigma
        if self.name in ("vp", "subvp", "ddpm", "iddpm"):
            return eps
        if self.name in ("ve", "ncsn"):
            return -eps
        if self.name == "rf":
            return eps - D_star
        if self.name == "consistency":  # Song et al. 2023, Appendix C: c_skip, c_out shifted by eps = 0.002
            c_skip, c_out = 0.25 / ((sigma - 0.002) ** 2 + 0.25), 0.5 * (sigma - 0.002) / (sigma**2 + 0.25).sqrt()
            return (D_star - c_skip * x) / c_out
        assert self.name == "edm"
        return (D_star - 0.25 / (sigma**2 + 0.25) * x) / (sigma * 0.5 / (sigma**2 + 0.25).sqrt())


@pytest.mark.parametrize("name", ALL)
def test_papers_ideal_target_gives_the_closed_form_denoiser(name):
    """D* = MU + s^2 / (s^2 + sigma^2) (x - MU) for y ~ N(MU, s^2 I) (docs/formulations.md#the-ideal-denoiser): a
    network that outputs its
    paper's ideal target makes the Denoiser return D*."""
    fm = formulations.get(name)
    mu, s = 0.3, 0.5
    gm = GaussianMixture(torch.full((16,), mu, dtype=f64), s, shape=(1, 4, 4))
    g = torch.Generator().manual_seed(1)
    y = gm.sample(64, g)
    sigma = fm.round_sigma(fm.sample_training_sigma((64,), g).to(f64))
    x = y + sigma.reshape(-1, 1, 1, 1) * torch.randn(y.shape, generator=g, dtype=f64)
    sv = sigma.reshape(-1, 1, 1, 1)
    D_star = mu + s**2 / (s**2 + sv**2) * (x - mu)
    D = Denoiser(PaperTarget(name, x, sigma, D_star), fm)(x, sigma)
    torch.testing.assert_close(D, D_star, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("name", ["vp", "subvp", "ddpm"])
def test_network_input_is_the_papers_x_t(name):
    """VP-type families feed the network each paper's x_t: VP (Song et al. 2021) sqrt(abar) y + sqrt(1 - abar) n,
    sub-VP sqrt(abar) y + (1 - abar) n, with abar = exp(-(0.1 t + 19.9 t^2 / 2)); DDPM (Ho et al. eq. 4)
    sqrt(abar_i) y + sqrt(1 - abar_i) n. In EDM's frame x = x_t / sqrt(abar) = y + sigma n."""
    fm = formulations.get(name)
    if name == "ddpm":
        i = torch.tensor([0, 10, 500, 999])
        abar = torch.cumprod(1 - torch.linspace(1e-4, 0.02, 1000, dtype=f64), 0)[i]
        std = (1 - abar).sqrt()
    else:
        t = torch.tensor([1e-3, 0.1, 0.5, 1.0], dtype=f64)
        abar = torch.exp(-(0.1 * t + 19.9 * t**2 / 2))
        std = (1 - abar).sqrt() if name == "vp" else 1 - abar
        torch.testing.assert_close(fm.sigma(t), std / abar.sqrt())
    sigma = (std / abar.sqrt())[:, None]
    y, n = torch.randn(4, 5, dtype=f64), torch.randn(4, 5, dtype=f64)
    x_t = abar.sqrt()[:, None] * y + std[:, None] * n
    torch.testing.assert_close(fm.c_in(sigma) * (y + sigma * n), x_t)


def test_rf_input_is_linear_interpolation():
    fm = formulations.get("rf")
    t = torch.tensor([0.1, 0.5, 0.9], dtype=f64)
    sigma = fm.sigma(t)
    y, n = torch.randn(3, 4, dtype=f64), torch.randn(3, 4, dtype=f64)
    x_t = (1 - t[:, None]) * y + t[:, None] * n
    torch.testing.assert_close(fm.c_in(sigma)[:, None] * (y + sigma[:, None] * n), x_t)
    torch.testing.assert_close(fm.c_noise(sigma), 999 * t)


def test_edm_unit_variance_input_and_target():
    """EDM §5/App. B.6: c_in and the effective target have unit variance when Var(y) = sigma_data^2."""
    fm = formulations.get("edm")
    g = torch.Generator().manual_seed(0)
    y = 0.5 * torch.randn(200000, generator=g, dtype=f64)
    n = torch.randn(200000, generator=g, dtype=f64)
    for sig in (0.01, 0.5, 10.0):
        sigma = torch.tensor(sig, dtype=f64)
        x = y + sigma * n
        assert (fm.c_in(sigma) * x).var().item() == pytest.approx(1, abs=0.02)
        target = (y - fm.c_skip(sigma) * x) / fm.c_out(sigma)
        assert target.var().item() == pytest.approx(1, abs=0.02)


# --- the loss ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ALL)
def test_effective_weight_is_one(name):
    """lambda(sigma) c_out(sigma)^2 = 1 (EDM Table 1 for VP/VE/iDDPM/EDM; DDPM L_simple, NCSN, RF); consistency keeps
    EDM's lambda with Song et al.'s c_out, (sigma - 0.002)^2 / sigma^2 (0 at its boundary, where D = x)."""
    fm = formulations.get(name)
    sigma = torch.logspace(-3, 2, 40, dtype=f64)
    expected = (1 - 0.002 / sigma) ** 2 if name == "consistency" else torch.ones_like(sigma)
    torch.testing.assert_close(fm.loss_weight(sigma) * fm.c_out(sigma) ** 2, expected)


class FixedOutput(torch.nn.Module):
    def __init__(self, out):
        super().__init__()
        self.out = out

    def forward(self, x, c_noise, labels=None):
        return self.out


def test_ddpm_loss_is_l_simple():
    fm = formulations.get("ddpm")
    y = torch.rand(8, 1, 4, 4) * 2 - 1
    eps = torch.randn_like(y)
    eps_theta = torch.randn_like(y)
    sigma = fm.grid[torch.randint(0, 1000, (8,))].float()
    loss, _ = Denoiser(FixedOutput(eps_theta), fm).loss(y, sigma=sigma, noise=eps)
    torch.testing.assert_close(loss, ((eps_theta - eps) ** 2).flatten(1).mean(1), rtol=1e-4, atol=1e-5)


def test_rf_loss_is_velocity_mse():
    fm = formulations.get("rf")
    y = torch.rand(8, 2) * 2 - 1
    eps, v_theta = torch.randn_like(y), torch.randn_like(y)
    sigma = fm.sigma(torch.rand(8, dtype=f64) * 0.9 + 0.05).float()
    loss, _ = Denoiser(FixedOutput(v_theta), fm).loss(y, sigma=sigma, noise=eps)
    torch.testing.assert_close(loss, ((v_theta - (eps - y)) ** 2).mean(1), rtol=1e-4, atol=1e-5)


# --- training densities: KS tests against the papers' distributions -------------------------------------
def _cdf_checks():
    vp = formulations.get("vp")
    return {
        "edm": (lambda s: s.log(), stats.norm(-1.2, 1.2).cdf),
        "ve": (lambda s: s.log(), stats.uniform(math.log(0.02), math.log(100 / 0.02)).cdf),
        "vp": (lambda s: vp.t_of_sigma(s), stats.uniform(1e-5, 1 - 1e-5).cdf),
        "subvp": (lambda s: formulations.get("subvp").t_of_sigma(s), stats.uniform(1e-5, 1 - 1e-5).cdf),
        "rf": (lambda s: s / (1 + s), stats.uniform(0, 1).cdf),
    }


@pytest.mark.parametrize("name", ["edm", "ve", "vp", "subvp", "rf"])
def test_training_sigma_density(name):
    fm = formulations.get(name)
    transform, cdf = _cdf_checks()[name]
    sigma = fm.sample_training_sigma((20000,), torch.Generator().manual_seed(3)).to(f64)
    assert stats.kstest(transform(sigma).numpy(), cdf).pvalue > 1e-3


def test_ks_detects_a_wrong_density():
    """The KS check above can fail: EDM's sigmas are not log-normal(-1.0, 1.2)."""
    sigma = formulations.get("edm").sample_training_sigma((20000,), torch.Generator().manual_seed(3))
    assert stats.kstest(sigma.log().numpy(), stats.norm(-1.0, 1.2).cdf).pvalue < 1e-6


def test_rf_logit_normal_is_edm_lognormal():
    fm = formulations.get("rf", t_distribution="logit_normal", logit_mean=0.2, logit_std=0.8)
    sigma = fm.sample_training_sigma((20000,), torch.Generator().manual_seed(4)).to(f64)
    t = sigma / (1 + sigma)
    assert stats.kstest(torch.logit(t).numpy(), stats.norm(0.2, 0.8).cdf).pvalue > 1e-3


@pytest.mark.parametrize("name", ["ddpm", "iddpm", "ncsn"])
def test_discrete_training_levels_are_uniform(name):
    fm = formulations.get(name)
    sigma = fm.sample_training_sigma((50000,), torch.Generator().manual_seed(5)).to(f64)
    assert torch.equal(fm.round_sigma(sigma), sigma.to(f64)) or torch.allclose(fm.round_sigma(sigma), sigma, rtol=1e-6)
    K = fm.grid.numel()
    counts = torch.bincount(fm.nearest_index(sigma), minlength=K).numpy()
    assert stats.chisquare(counts).pvalue > 1e-3


# --- schedule calculus --------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ALL)
def test_derivatives_match_autograd(name):
    fm = formulations.get(name)
    t = fm.t_of_sigma(torch.logspace(-1.5, 1.5, 25, dtype=f64)).requires_grad_(True)
    for fn, deriv in ((fm.sigma, fm.sigma_deriv), (fm.s, fm.s_deriv)):
        (grad,) = torch.autograd.grad((fn(t) + 0 * t).sum(), t)  # + 0 t: constant s(t) = 1
        torch.testing.assert_close(deriv(t.detach()), grad, rtol=1e-7, atol=1e-10)


@pytest.mark.parametrize("name", ALL)
def test_t_of_sigma_inverts_sigma(name):
    fm = formulations.get(name)
    sigma = torch.logspace(-2, 2, 30, dtype=f64)
    torch.testing.assert_close(fm.sigma(fm.t_of_sigma(sigma)), sigma, rtol=1e-9, atol=0)


def test_sde_coefficients_of_song_et_al():
    t = torch.linspace(0.01, 1, 20, dtype=f64)
    beta = 0.1 + 19.9 * t
    vp, subvp = formulations.get("vp"), formulations.get("subvp")
    torch.testing.assert_close(vp.f(t), -0.5 * beta)
    torch.testing.assert_close(vp.g(t) ** 2, beta)
    B = 0.1 * t + 0.5 * 19.9 * t**2
    torch.testing.assert_close(subvp.f(t), -0.5 * beta)
    torch.testing.assert_close(subvp.g(t) ** 2, beta * (1 - torch.exp(-2 * B)))
    ve = formulations.get("ve")  # sigma = sqrt(t): g^2 = d sigma^2 / dt = 1
    torch.testing.assert_close(ve.g(t), torch.ones_like(t))


@pytest.mark.parametrize("name", ALL)
def test_sampling_sigmas_and_dtypes(name):
    fm = formulations.get(name)
    sig = fm.sampling_sigmas(10)
    assert sig.dtype == f64 and sig.shape == (11,) and sig[-1] == 0 and torch.all(sig[:-1] > sig[1:])
    assert sig[0] <= fm.sigma_max * (1 + 1e-9) and sig[-2] >= fm.sigma_min * (1 - 1e-9)
    for dtype in (torch.float32, f64):
        s = torch.tensor([0.1, 1.0], dtype=dtype)
        for fn in (fm.c_skip, fm.c_out, fm.c_in, fm.c_noise, fm.loss_weight, fm.round_sigma):
            assert fn(s).dtype == dtype


# --- errors -------------------------------------------------------------------------------------------
def test_unknown_name_lists_allowed():
    with pytest.raises(ValueError, match=r"formulation='nope' is not known; allowed: edm, vp"):
        formulations.get("nope")


@pytest.mark.parametrize(("name", "kw", "pattern"), [
    ("edm", dict(sigma_min=-1.0), r"formulation=edm: sigma_min=-1.0 is invalid"),
    ("ve", dict(sigma_min=5.0, sigma_max=1.0), r"formulation=ve: sigma_min=5.0 must be < sigma_max=1.0"),
    ("ncsn", dict(num_timesteps=1), r"num_timesteps=1 is invalid; allowed: an integer >= 2"),
    ("ddpm", dict(beta_schedule="sqrt"), r"beta_schedule='sqrt' is not known; allowed"),
    ("ddpm", dict(num_timesteps=20), r"num_timesteps=20 reaches beta=1 .*allowed: all betas < 1"),
    ("rf", dict(t_max=1.0), r"need 0 < t_min < t_max < 1"),
    ("vp", dict(epsilon_t=2.0), r"epsilon_t=2.0 is invalid"),
    ("edm", dict(sigma_dta=0.5), r"formulation=edm: bad settings \['sigma_dta'\]"),
])
def test_bad_constants_are_named(name, kw, pattern):
    with pytest.raises(ValueError, match=pattern):
        formulations.get(name, **kw)
