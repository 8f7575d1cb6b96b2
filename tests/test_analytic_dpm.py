"""Analytic-DPM (Bao et al. 2022): the Monte Carlo moment of the score, the optimal reverse variance and its bounds,
checked against the closed forms of Gaussian data, and the VLB / ancestral sampler with ``variance=analytic``.

Gaussian data ``y ~ N(mu, s^2 I)`` give closed forms everywhere. In the DDPM frame ``x_k = sqrt(abar_k) y +
sqrt(1 - abar_k) eps`` the marginal variance per dimension is ``v_k = abar_k s^2 + 1 - abar_k``, so the score's
moment is ``Gamma_k = E ||grad log q_k||^2 / d = 1 / v_k`` (in the sigma-frame ``x = y + sigma eps``: ``1 / (s^2 +
sigma^2)``, and ``E ||eps_hat||^2 / d = sigma^2 / (s^2 + sigma^2)``).
"""

from __future__ import annotations

import math

import pytest
import torch

from lightning_diff import formulations
from lightning_diff.analytic import GaussianMixture
from lightning_diff.denoiser import Denoiser
from lightning_diff.evaluation.likelihood import vlb_bits_per_dim
from lightning_diff.networks.mlp import MLP
from lightning_diff.sampling import PerSampleGenerator, analytic_dpm, ddpm
from lightning_diff.sampling.noise import initial_noise

MU, S, D = 0.3, 0.5, 8  # Gaussian data N(MU, S^2 I_D)


def _gaussian(d: int = D) -> GaussianMixture:
    return GaussianMixture(torch.full((d,), MU), S)


def _abar(sigmas: torch.Tensor) -> torch.Tensor:
    return 1 / (1 + sigmas.to(torch.float64) ** 2)


def _exact_moments(sigmas: torch.Tensor) -> analytic_dpm.ScoreMoments:
    """The exact eps moment of Gaussian data, sigma^2 / (S^2 + sigma^2), at the positive levels."""
    levels = sigmas[sigmas > 0].to(torch.float64)
    return analytic_dpm.ScoreMoments(levels, levels**2 / (S**2 + levels**2), num_samples=0)


def _gaussian_reverse_variance(sigmas: torch.Tensor) -> torch.Tensor:
    """Var(x_{n-1} | x_n) of the (strided) chain for Gaussian data, per dimension, VP frame, every step of ``sigmas``.

    The chain's transition between any two of its levels is ``x_n = sqrt(alpha) x_{n-1} + sqrt(1 - alpha) z``,
    ``alpha = abar_n / abar_{n-1}``, z independent of x_{n-1} (DDPM's forward process). So (x_{n-1}, x_n) is jointly
    Gaussian with ``Var x_{n-1} = v_{n-1}``, ``Var x_n = v_n``, ``Cov = sqrt(alpha) v_{n-1}``, and
    ``Var(x_{n-1} | x_n) = v_{n-1} - alpha v_{n-1}^2 / v_n``, constant in x_n. The reverse Gaussian kernel that
    minimises KL(q || p) matches it (moment matching), which is what Bao et al.'s Theorem 1 estimates. At the last
    step x_{n-1} = x_0 = y: v = S^2 (abar = 1)."""
    abar = _abar(sigmas)
    v = abar * S**2 + 1 - abar
    alpha = abar[:-1] / abar[1:]
    return v[1:] - alpha * v[1:] ** 2 / v[:-1]


def _grid(num_steps: int | None, T: int = 1000) -> torch.Tensor:
    ddpm_formulation = formulations.get("ddpm", num_timesteps=T)
    if num_steps is None:
        return torch.cat([ddpm_formulation.grid, torch.zeros(1, dtype=torch.float64)])
    return ddpm_formulation.sampling_sigmas(num_steps)


def test_estimated_gamma_is_the_gaussian_closed_form():
    """Gamma_n estimated from M samples with the exact denoiser equals 1 / v_n at every level of a strided grid,
    within 5 Monte Carlo standard errors: per item, ||eps_hat||^2 / d = m chi^2_d / d, relative sd sqrt(2 / (d M))."""
    gm, sigmas, M = _gaussian(), _grid(25), 4000
    data = gm.sample(M, torch.Generator().manual_seed(0))
    moments = analytic_dpm.estimate_moments(gm, data, sigmas, num_samples=M, batch_size=1000)
    abar = _abar(sigmas[:-1])
    closed = 1 / (abar * S**2 + 1 - abar)
    rel_error = (moments.gamma() / closed - 1).abs()
    assert moments.sigmas.numel() == 25
    assert rel_error.max() < 5 * math.sqrt(2 / (D * M)), rel_error.max()


@pytest.mark.parametrize("num_steps", [10, 25, None])
def test_optimal_variance_is_the_gaussian_reverse_variance(num_steps):
    """With the exact moment of Gaussian data, Thm 1's variance equals Var(x_{n-1} | x_n) of the strided chain
    (closed form above) at every step, the last one included; with the estimated moment, within Monte Carlo error
    (the moment's error times the width of Thm 2's bracket, coef^2 sigma^2: loose at high noise, where 1 - m is
    tiny and the moment's relative error is what it is, tight at low noise)."""
    sigmas = _grid(num_steps)
    closed = _gaussian_reverse_variance(sigmas)
    exact = analytic_dpm.optimal_variances(sigmas, _exact_moments(sigmas))
    torch.testing.assert_close(exact, closed, rtol=1e-9, atol=0)

    gm, M = _gaussian(), 500
    data = gm.sample(M, torch.Generator().manual_seed(1))
    estimated = analytic_dpm.optimal_variances(sigmas, analytic_dpm.estimate_moments(gm, data, sigmas, num_samples=M,
                                                                                     batch_size=M))
    lower, upper = analytic_dpm.variance_bounds(sigmas)
    m = _exact_moments(sigmas).eps_moments
    tolerance = 5 * math.sqrt(2 / (D * M)) * m * (upper - lower)
    assert ((estimated - closed).abs() <= tolerance + 1e-15).all()
    # where the Monte Carlo error is small (low noise) the check separates the optimal variance from beta~
    assert ((closed - lower) > tolerance).sum() >= 2


def _paper_bounds(sigmas: torch.Tensor, half_range: float):
    """Bao et al. 2022 Thm 2 as printed, with lambda^2 = beta~_n: lower lambda^2; upper lambda^2 +
    (sqrt(betabar_n / alpha_n) - sqrt(betabar_{n-1} - lambda^2))^2 and, for data in [a, b]^d, lambda^2 +
    (sqrt(abar_{n-1}) - sqrt(betabar_{n-1} - lambda^2) sqrt(abar_n / betabar_n))^2 ((b - a) / 2)^2."""
    abar = _abar(sigmas)
    a_n, a_prev = abar[:-1], abar[1:]
    alpha, bb_n, bb_prev = a_n / a_prev, 1 - a_n, 1 - a_prev
    lam2 = bb_prev / bb_n * (1 - alpha)
    rest = (bb_prev - lam2).clamp(min=0).sqrt()
    upper = lam2 + ((bb_n / alpha).sqrt() - rest) ** 2
    upper_data = lam2 + (a_prev.sqrt() - rest * (a_n / bb_n).sqrt()) ** 2 * half_range**2
    return lam2, upper, upper_data


def test_bounds_of_theorem_2_clip_the_estimate():
    """A denoiser D = -x has E||eps_hat||^2 / d = 4 (E|y|^2 / d + sigma^2) / sigma^2 > 1 (far beyond its Monte
    Carlo error): the estimate falls below beta~ and is clipped to the lower bound. D = x has eps_hat = 0: the
    estimate is the first upper bound, and with data in [-1, 1] the data-range bound takes over exactly where
    sigma > 1."""
    sigmas = _grid(20)
    lam2, upper, upper_data = _paper_bounds(sigmas, half_range=1.0)
    data = _gaussian().sample(200, torch.Generator().manual_seed(2))

    def negate(x, sigma, **cond):
        return -x

    def identity(x, sigma, **cond):
        return x

    low = analytic_dpm.optimal_variances(sigmas, analytic_dpm.estimate_moments(negate, data, sigmas, num_samples=200))
    torch.testing.assert_close(low, lam2, rtol=1e-9, atol=0)
    moments = analytic_dpm.estimate_moments(identity, data, sigmas, num_samples=200)
    torch.testing.assert_close(analytic_dpm.optimal_variances(sigmas, moments), upper, rtol=1e-9, atol=1e-300)
    bounded = analytic_dpm.ScoreMoments(moments.sigmas, moments.eps_moments, 200, data_range=(-1.0, 1.0))
    clipped = analytic_dpm.optimal_variances(sigmas, bounded)
    above = sigmas[:-1] > 1
    assert above.any() and (~above).any()
    torch.testing.assert_close(clipped[above], upper_data[above], rtol=1e-9, atol=0)
    torch.testing.assert_close(clipped[~above], upper[~above], rtol=1e-9, atol=1e-300)
    assert (upper_data[above] < upper[above]).all()


def _mixture() -> GaussianMixture:
    means = torch.tensor([[0.5, 0.5, -0.5, 0.0], [-0.5, 0.0, 0.5, 0.5], [0.0, -0.5, 0.0, -0.5]])
    return GaussianMixture(means, 0.12, weights=[0.5, 0.3, 0.2], shape=(1, 2, 2))


def test_vlb_with_analytic_variance_is_not_worse_than_fixed():
    """With the exact Gaussian-mixture denoiser, the VLB (bits/dim, T = 1000 linear betas) with the analytic
    variance is <= fixed_small and <= fixed_large on the full chain and on strided chains of 10, 25 and 100
    steps (same images, same noise). The moments are estimated once on the full grid, from fresh mixture draws."""
    gm, scale, offset = _mixture(), 1 / 127.5, -1.0
    formulation = formulations.get("ddpm")
    train = gm.sample(500, torch.Generator().manual_seed(3))
    moments = analytic_dpm.estimate_moments(gm, train, _grid(None), num_samples=500, batch_size=500,
                                            data_range=(-1.0, 1.0))
    x_int = ((gm.sample(24, torch.Generator().manual_seed(4)) - offset) / scale).round().clamp(0, 255)
    for num_steps in (10, 25, 100, None):
        vlb = {}
        for variance in ("fixed_small", "fixed_large", "analytic"):
            bpd, info = vlb_bits_per_dim(gm, x_int, formulation, scale=scale, offset=offset, variance=variance,
                                         moments=moments if variance == "analytic" else None, steps=num_steps,
                                         generator=torch.Generator().manual_seed(5))
            vlb[variance] = float(bpd.mean())
        assert info["nfe"] == (num_steps or 1000)
        assert vlb["analytic"] <= min(vlb["fixed_small"], vlb["fixed_large"]), (num_steps, vlb)


def test_ddpm_sampler_with_analytic_variance_reproduces_gaussian_marginals():
    """On Gaussian data, the exact mean and the exact reverse variance make every step of the 10-step strided chain
    map the true marginal to the true marginal, so the output (the posterior mean at the last level sigma_1, no
    noise on the last step) has variance S^2 - S^2 sigma_1^2 / (S^2 + sigma_1^2) per dimension. With estimated
    moments the analytic sampler hits it within Monte Carlo error; fixed_small (beta~) does not."""
    gm, sigmas, n, d = _gaussian(16), _grid(10), 2000, 16
    moments = analytic_dpm.estimate_moments(gm, gm.sample(2000, torch.Generator().manual_seed(6)), sigmas,
                                            num_samples=2000, batch_size=2000)
    sigma_1 = float(sigmas[-2])
    target = S**2 - S**2 * sigma_1**2 / (S**2 + sigma_1**2)
    spread = {}
    for variance in ("analytic", "fixed_small"):
        x = float(sigmas[0]) * torch.randn(n, d, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
        out = ddpm(gm, x, sigmas, variance=variance, moments=moments if variance == "analytic" else None,
                   generator=torch.Generator().manual_seed(8))
        spread[variance] = float(out.var(dim=0).mean())
    assert abs(spread["analytic"] / target - 1) < 5 * math.sqrt(2 / (n * d)) + 0.02, spread
    assert abs(spread["fixed_small"] / target - 1) > 0.1, spread


def test_bad_settings_raise():
    gm, sigmas = _gaussian(), _grid(10)
    x = torch.zeros(2, D, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"variance='analytic' needs moments=analytic_dpm.ScoreMoments"):
        ddpm(gm, x, sigmas, variance="analytic")
    with pytest.raises(ValueError, match=r"moments are only read with variance='analytic'"):
        ddpm(gm, x, sigmas, moments=_exact_moments(sigmas))
    with pytest.raises(ValueError, match=r"miss the grid's levels"):
        ddpm(gm, x, _grid(25), variance="analytic", moments=_exact_moments(sigmas))
    with pytest.raises(ValueError, match=r"num_samples=50 is invalid; allowed: an integer in \[1, 10\]"):
        analytic_dpm.estimate_moments(gm, torch.zeros(10, D), sigmas, num_samples=50)
    with pytest.raises(ValueError, match=r"moments go with variance='analytic' only"):
        vlb_bits_per_dim(gm, torch.zeros(1, 1, 2, 4), formulations.get("ddpm"), scale=1 / 127.5, offset=-1.0,
                         variance="analytic")


def test_moments_are_independent_of_the_batch_size():
    gm, sigmas = _gaussian(), _grid(10)
    data = gm.sample(30, torch.Generator().manual_seed(9))
    a = analytic_dpm.estimate_moments(gm, data, sigmas, num_samples=20, batch_size=20, seed=3)
    b = analytic_dpm.estimate_moments(gm, data, sigmas, num_samples=20, batch_size=7, seed=3)
    torch.testing.assert_close(a.eps_moments, b.eps_moments, rtol=1e-12, atol=0)


class _Counting(Denoiser):
    calls = 0

    def forward(self, *args, **kwargs):
        type(self).calls += 1
        return super().forward(*args, **kwargs)


def test_cache_is_keyed_by_weights_grid_and_samples(tmp_path):
    """The second call reads the file (no network call); other weights, another grid or another M recompute; a
    file whose recorded key differs from its name is not reused (warning, recomputed)."""
    formulation = formulations.get("ddpm", num_timesteps=50)
    model = _Counting(MLP(dim=2, hidden=8, depth=1, emb_channels=8), formulation)
    data, sigmas = torch.randn(40, 2, generator=torch.Generator().manual_seed(0)), formulation.sampling_sigmas(5)

    def run(grid=sigmas, num_samples=16):
        _Counting.calls = 0
        moments = analytic_dpm.cached_moments(model, data, grid, cache_dir=tmp_path, num_samples=num_samples)
        return moments, _Counting.calls

    first, calls = run()
    assert calls == 5 and len(list(tmp_path.glob("*.json"))) == 1
    again, calls = run()
    assert calls == 0
    torch.testing.assert_close(again.eps_moments, first.eps_moments, rtol=0, atol=0)
    assert run(num_samples=20)[1] == 5
    assert run(grid=formulation.sampling_sigmas(4))[1] == 4
    before = set(tmp_path.glob("*.json"))
    with torch.no_grad():
        model.backbone.out[-1].bias.add_(0.1)
    changed, calls = run()
    assert calls == 5 and not torch.equal(changed.eps_moments, first.eps_moments)
    (path,) = set(tmp_path.glob("*.json")) - before
    path.write_text(path.read_text().replace('"key": "', '"key": "0'))
    with pytest.warns(UserWarning, match="does not hold the moments of this model"):
        assert run()[1] == 5


@pytest.fixture(scope="module")
def digits_ddpm_ckpt(tmp_path_factory):
    """A checkpoint of a 3-step ddpm run (T = 100) on digits (tiny U-Net), written by ``lightning_diff.cli.train``."""
    from lightning_diff.cli.train import train
    from tests.helpers import compose_config

    out = tmp_path_factory.mktemp("digits_ddpm_run")
    cfg = compose_config("train", ["logger=csv", "callbacks.progress=null", "++trainer.enable_progress_bar=false",
                                   "callbacks.sample_grid=null", "data=digits", "network.model_channels=8",
                                   "formulation=ddpm", "formulation.num_timesteps=100", "trainer.max_steps=3",
                                   "data.batch_size=16"], out)
    return train(cfg)["checkpoint"]


def test_sample_cli_and_vlb_with_analytic_variance(digits_ddpm_ckpt, tmp_path):
    """``lightning-diff sample sampler=ddpm sampler.options.variance=analytic`` estimates the moments on the run's
    training data, caches them and samples; the VLB on a strided chain estimates them on its own chain (timesteps 0,
    33, 66, 99: it holds t = 0, the sampler's trailing grid 24, 49, 74, 99 does not), caches them beside the
    sampler's and reuses them. ``evaluate`` refuses the sampler's trailing chain for the VLB before any work."""
    import numpy as np
    from omegaconf import OmegaConf

    from lightning_diff.cli.sample import main
    from lightning_diff.evaluation import split_vlb
    from lightning_diff.training.builders import build_datamodule, load_module
    from tests.helpers import compose_config

    cache = tmp_path / "cache"
    cfg = compose_config("sample", [f"ckpt={digits_ddpm_ckpt}", "num_samples=3", "sampler=ddpm", "sampler.steps=4",
                                    "sampler.options.variance=analytic", "analytic_dpm.num_samples=32",
                                    f"analytic_dpm.cache_dir={cache}", f"out={tmp_path / 'out'}", "device=cpu"])
    main(cfg)
    assert np.load(tmp_path / "out" / "samples.npz")["images"].shape == (3, 1, 8, 8)
    assert len(list(cache.glob("*.json"))) == 1

    module = load_module(digits_ddpm_ckpt)
    datamodule = build_datamodule(OmegaConf.create(module.run_config))
    for _ in range(2):
        values, protocol = split_vlb(module, datamodule, num_images=4, batch_size=4, variance="analytic", steps=4,
                                     analytic_samples=32, analytic_cache_dir=str(cache))
        assert math.isfinite(values["vlb_bpd"]) and protocol["nfe"] == 4 and protocol["analytic_samples"] == 32
        assert protocol["spacing"] == "linspace" and len(list(cache.glob("*.json"))) == 2  # the 2nd call reused it

    from lightning_diff.cli.evaluate import evaluate

    cfg = compose_config("evaluate", [f"ckpt={digits_ddpm_ckpt}", "metrics=[fid,vlb]", "metrics.vlb.steps=4",
                                      "metrics.vlb.spacing=trailing", f"metrics.cache_dir={tmp_path / 'none'}",
                                      "device=cpu"])
    with pytest.raises(ValueError, match=r"likelihood.spacing='trailing' with steps=4: the chain's first timestep "
                                         r"is 24"):
        evaluate(cfg)
    assert not (tmp_path / "none").exists()


def test_per_sample_noise_is_the_samplers():
    """Sanity of the plumbing: the analytic sampler on a PerSampleGenerator gives row i from seed i alone."""
    gm, sigmas = _gaussian(), _grid(5)
    moments = _exact_moments(sigmas)

    def run(seeds):
        gen = PerSampleGenerator(seeds)
        return ddpm(gm, initial_noise(gen, (D,), float(sigmas[0])), sigmas, variance="analytic", moments=moments,
                    generator=gen)

    torch.testing.assert_close(run([4, 5, 6])[1:], run([5, 6]), rtol=0, atol=1e-12)
