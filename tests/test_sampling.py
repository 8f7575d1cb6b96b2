"""Deterministic samplers against exact solutions, the sampler contract (NFE, callbacks, errors, dtypes),
the equivalences of docs/samplers.md#equivalences and per-sample seeding.

Oracle: for one Gaussian N(mu, s^2 I) the ideal denoiser is affine and the PF-ODE in sigma has the closed
form x(sigma) = mu + sqrt(s^2 + sigma^2) / sqrt(s^2 + sigma_0^2) (x_0 - mu). Every sampler's last step to
sigma = 0 is x <- D(x; sigma_min), so the exact output is D(x(sigma_min); sigma_min).
"""

import math

import pytest
import torch

from lightning_diff import formulations, sampling
from lightning_diff.analytic import GaussianMixture
from lightning_diff.formulations import schedules
from lightning_diff.sampling import PerSampleGenerator

f64 = torch.float64
MU, S = torch.tensor([0.3, -0.2], dtype=f64), 0.5
GAUSS = GaussianMixture(MU, S)
MIX = GaussianMixture([[-1.0, 0.5], [1.0, -0.5], [0.3, 1.2]], [0.3, 0.4, 0.25], [0.5, 0.3, 0.2])
SIGMA_MIN, SIGMA_MAX = 0.002, 80.0


def _start(n=8, sigma_max=SIGMA_MAX, seed=0):
    return sigma_max * torch.randn(n, 2, generator=torch.Generator().manual_seed(seed), dtype=f64)


def _exact_output(x0, sigma_max=SIGMA_MAX):
    x_min = MU + math.sqrt(S**2 + SIGMA_MIN**2) / math.sqrt(S**2 + sigma_max**2) * (x0 - MU)
    return GAUSS(x_min, torch.full((x0.shape[0],), SIGMA_MIN, dtype=f64))


@pytest.mark.parametrize("name, order", [("euler", 1), ("heun", 2), ("dpmpp_2m", 2)])
def test_convergence_order_on_exact_gaussian_ode(name, order):
    x0 = _start()
    ref = _exact_output(x0)
    grids = [schedules.karras_sigmas(n, SIGMA_MIN, SIGMA_MAX) for n in (32, 64, 128)]
    errors = [(sampling.sample(name, GAUSS, x0, grid) - ref).abs().max() for grid in grids]
    slopes = [math.log2(a / b) for a, b in zip(errors, errors[1:], strict=False)]
    assert all(abs(s - order) < 0.2 for s in slopes), (errors, slopes)


@pytest.mark.parametrize("tol", [1e-6, 1e-8])
def test_rk45_meets_tolerance_and_reports_steps(tol):
    x0 = _start()
    stats = {}
    grid = schedules.karras_sigmas(10, SIGMA_MIN, SIGMA_MAX)
    out = sampling.rk45(GAUSS, x0, grid, rtol=tol, atol=tol, stats=stats)
    assert (out - _exact_output(x0)).abs().max() < 10 * tol
    assert stats["accepted"].shape == (8,) and (stats["accepted"] > 0).all()
    assert (stats["rejected"] >= 0).all()
    # Each attempt costs 6 evaluations (FSAL) plus the first slope and the starting-step probe.
    attempts = (stats["accepted"] + stats["rejected"]).max().item()
    assert stats["nfe"] == 2 + 6 * attempts


def test_rk45_tighter_tolerance_costs_more_and_is_more_accurate():
    x0, grid = _start(), schedules.karras_sigmas(10, SIGMA_MIN, SIGMA_MAX)
    loose, tight = {}, {}
    e1 = (sampling.rk45(GAUSS, x0, grid, rtol=1e-4, atol=1e-4, stats=loose) - _exact_output(x0)).abs().max()
    e2 = (sampling.rk45(GAUSS, x0, grid, rtol=1e-8, atol=1e-8, stats=tight) - _exact_output(x0)).abs().max()
    assert tight["nfe"] > loose["nfe"] and e2 < e1 / 100


# --- equivalences (docs/samplers.md#equivalences) ---------------------------------------------------------------------
def test_ddim_eta0_equals_euler():
    x0, grid = _start(64, 20.0), schedules.karras_sigmas(30, SIGMA_MIN, 20.0)
    assert torch.allclose(sampling.ddim(MIX, x0, grid), sampling.euler(MIX, x0, grid), atol=1e-6, rtol=0)


def test_rectified_flow_euler_in_t_equals_ddim_on_its_grid():
    """Euler in t on x_t = (1 - t) y + t eps with v = (x_t - y_hat) / t (docs/formulations.md#rf) is DDIM on
    sigma = t / (1 - t)."""
    rf = formulations.get("rf")
    grid = rf.sampling_sigmas(12)
    x0 = _start(64, float(grid[0]))
    t = grid / (1 + grid)
    xt = (1 - t[0]) * x0  # x_t = s(t) x_sigma with s = 1 - t
    for i in range(12):
        y_hat = MIX(xt / (1 - t[i]), torch.full((64,), float(grid[i]), dtype=f64))
        xt = xt + (t[i + 1] - t[i]) * (xt - y_hat) / t[i]
    assert torch.allclose(xt, sampling.ddim(MIX, x0, grid), atol=1e-10, rtol=0)
    ablation = sampling.ablation(MIX, x0, grid, formulation=rf, solver="euler")
    assert torch.allclose(ablation, xt, atol=1e-10, rtol=0)


def test_ddim_eta1_and_ddpm_fixed_small_have_the_same_transition():
    """Both draw x' = m(x) + v z with one z per step; with the same per-sample generators the outputs agree
    sample by sample for every z, so mean m and variance v^2 of the one-step transition are the same.
    fixed_large (beta instead of beta~) must differ."""
    x0, grid = _start(256, 3.0), torch.tensor([3.0, 1.2, 0.0], dtype=f64)
    after_first = {}

    def run(name, **kw):
        keep = lambda p: after_first.__setitem__(name + str(kw), p["x"]) if p["i"] == 1 else None
        sampling.sample(name, MIX, x0, grid, generator=PerSampleGenerator(range(256)), callback=keep, **kw)
        return after_first[name + str(kw)]

    ddim = run("ddim", eta=1.0)
    assert torch.allclose(ddim, run("ddpm", variance="fixed_small"), atol=1e-10, rtol=0)
    assert (ddim - run("ddpm", variance="fixed_large")).abs().max() > 1e-2


def test_heun_equals_edm_algorithm1_for_edm_formulation():
    x0, grid = _start(16, 20.0), schedules.karras_sigmas(18, SIGMA_MIN, 20.0)
    general = sampling.ablation(MIX, x0, grid, formulation=formulations.get("edm"), solver="heun")
    assert torch.allclose(general, sampling.heun(MIX, x0, grid), atol=1e-12, rtol=0)


def test_euler_maruyama_with_noise_scale_zero_is_pf_ode_euler_in_t():
    vp = formulations.get("vp")
    x0, grid = _start(16, vp.sigma_max), vp.sampling_sigmas(40)
    em = sampling.euler_maruyama(MIX, x0, grid, formulation=vp, noise_scale=0.0)
    pf_euler = sampling.ablation(MIX, x0, grid, formulation=vp, solver="euler")
    assert torch.allclose(em, pf_euler, atol=1e-9, rtol=0)


def _state_at_sigma_min(fn, x0, grid, **options):
    """The sigma-frame state before the last step (the callback's x at i = N - 1)."""
    box = {}
    fn(MIX, x0, grid, callback=lambda p: box.__setitem__("x", p["x"]), **options)
    return box["x"]


@pytest.mark.parametrize("name", formulations.names())
def test_ablation_sampler_in_every_formulation_follows_the_same_pf_ode(name):
    """The sigma-frame PF-ODE trajectory does not depend on s(t), sigma(t) (EDM Sec. 3), so Algorithm 1 in
    any formulation's own time and Heun in sigma agree at sigma_min up to their O(h^2) errors: the gap
    shrinks 4x per doubling (or is rounding where t = sigma, s = 1). Compared before the last step, which
    is EDM's Euler step in t (exact to D only where sigma is linear in t)."""
    fm = formulations.get(name)
    gaps = []
    for n in (100, 200):
        grid = schedules.karras_sigmas(n, 0.01, 20.0)
        x0 = _start(16, 20.0)
        general = _state_at_sigma_min(sampling.ablation, x0, grid, formulation=fm, solver="heun")
        gaps.append((general - _state_at_sigma_min(sampling.heun, x0, grid)).abs().max().item())
    assert gaps[1] < 1e-12 or abs(math.log2(gaps[0] / gaps[1]) - 2) < 0.2, gaps
    assert gaps[1] < 3e-3


def test_ablation_generalised_heun_alpha_is_second_order():
    vp, x0 = formulations.get("vp"), _start(16, 20.0)
    gaps = []
    for n in (100, 200):
        grid = schedules.karras_sigmas(n, 0.01, 20.0)
        alpha = _state_at_sigma_min(sampling.ablation, x0, grid, formulation=vp, alpha=0.5)
        gaps.append((alpha - _state_at_sigma_min(sampling.heun, x0, grid)).abs().max().item())
    assert abs(math.log2(gaps[0] / gaps[1]) - 2) < 0.2, gaps


# --- per-sample seeding ---------------------------------------------------------------------------------
STOCHASTIC = [
    ("heun", {"S_churn": 40.0}), ("euler", {"S_churn": 10.0}), ("ddpm", {}), ("ddim", {"eta": 0.7}),
    ("euler_maruyama", {"noise_scale": 0.5}), ("pc", {"step_norm": "sample"}),
    ("annealed_langevin", {"steps_per_level": 3}), ("rk45", {}),
]


@pytest.mark.parametrize("name, options", STOCHASTIC)
def test_sample_depends_only_on_its_seed(name, options):
    grid, shape = schedules.karras_sigmas(8, 0.01, 10.0), (2,)
    seeds = [11, 12, 13, 14, 15, 16]
    big = sampling.initial_noise(seeds, shape, 10.0)
    assert torch.equal(sampling.initial_noise(seeds[2:4], shape, 10.0), big[2:4])
    full = sampling.sample(name, MIX, big, grid, generator=PerSampleGenerator(seeds), **options)
    own = [torch.Generator().manual_seed(s) for s in seeds[2:4]]
    part = sampling.sample(name, MIX, big[2:4], grid, generator=own, **options)
    assert torch.allclose(full[2:4], part, atol=1e-10, rtol=0)
    reseeded = PerSampleGenerator([s + 100 for s in seeds])
    other = sampling.sample(name, MIX, big, grid, generator=reseeded, **options)
    assert (name == "rk45") == torch.allclose(other, full)  # the seed matters for stochastic samplers


# --- contract ------------------------------------------------------------------------------------------
NFE = {  # N steps -> network evaluations
    "euler": lambda n: n, "heun": lambda n: 2 * n - 1, "dpmpp_2m": lambda n: n, "ddim": lambda n: n,
    "ddpm": lambda n: n, "euler_maruyama": lambda n: n, "pc": lambda n: 2 * n,
    "annealed_langevin": lambda n: 100 * n + 1, "ablation": lambda n: 2 * n - 1,
}


@pytest.mark.parametrize("name", list(NFE))
def test_nfe_and_callback_payload(name):
    grid = schedules.karras_sigmas(6, 0.01, 10.0)
    options = {"formulation": formulations.get("vp")} if name == "ablation" else {}
    payloads, stats = [], {}
    x = _start(4, 10.0).float()
    out = sampling.sample(name, MIX, x, grid, stats=stats, callback=payloads.append, **options)
    assert out.dtype == torch.float32 and out.shape == x.shape and torch.isfinite(out).all()
    assert stats["nfe"] == NFE[name](6)
    assert [p["i"] for p in payloads] == list(range(6))
    churn_level = {"sigma_hat"} if name in ("euler", "heun") else set()  # k-diffusion's sample_euler/sample_heun
    assert set(payloads[0]) == {"i", "x", "sigma", "denoised", "nfe"} | churn_level
    assert payloads[0]["x"].dtype == f64 and payloads[-1]["nfe"] <= stats["nfe"]


def test_every_registered_sampler_has_a_config_and_no_config_names_an_unknown_one():
    from pathlib import Path

    from lightning_diff.config import CONFIG_DIR

    assert set(NFE) | {"rk45"} <= set(sampling.names())
    configs = {p.stem for p in Path(CONFIG_DIR, "sampler").glob("*.yaml")} - {"default"}
    assert configs == set(sampling.names())


def test_registry_and_bad_input():
    x, grid = _start(2, 10.0), schedules.karras_sigmas(4, 0.01, 10.0)
    with pytest.raises(ValueError, match="allowed: euler"):
        sampling.sample("nope", MIX, x, grid)
    with pytest.raises(ValueError, match="unknown options \\['etta'\\]"):
        sampling.sample("ddim", MIX, x, grid, etta=1.0)
    with pytest.raises(ValueError, match="ends in 0"):
        sampling.annealed_langevin(MIX, x, grid[:-1])
    with pytest.raises(ValueError, match="decreasing"):
        sampling.euler(MIX, x, grid.flip(0))
    with pytest.raises(ValueError, match="eta=2"):
        sampling.ddim(MIX, x, grid, eta=2)
    with pytest.raises(ValueError, match="variance='learned'"):
        sampling.ddpm(MIX, x, grid, variance="learned")
    with pytest.raises(ValueError, match="solver='rk4'"):
        sampling.ablation(MIX, x, grid, formulation=formulations.get("edm"), solver="rk4")
    with pytest.raises(ValueError, match="formulation=None"):
        sampling.ablation(MIX, x, grid, formulation=None)
    with pytest.raises(ValueError, match="noise_scale=1.5"):
        sampling.euler_maruyama(MIX, x, grid, noise_scale=1.5)
    with pytest.raises(ValueError, match="batch size 3"):
        sampling.ddpm(MIX, x[:3].repeat(2, 1)[:3], grid, generator=PerSampleGenerator([1, 2]))


def test_input_is_not_modified():
    x = _start(4, 10.0)
    copy = x.clone()
    for name in sampling.names():
        options = {"formulation": formulations.get("edm")} if name == "ablation" else {}
        sampling.sample(name, MIX, x, schedules.karras_sigmas(3, 0.01, 10.0), **options)
    assert torch.equal(x, copy)


def test_samplers_drive_a_real_network_denoiser_with_labels():
    """A float32 ``Denoiser`` takes the float64 solver state and per-row sigmas; labels go via ``cond``."""
    from lightning_diff.denoiser import Denoiser
    from lightning_diff.networks.mlp import MLP

    net = Denoiser(MLP(dim=2, hidden=16, depth=2, emb_channels=8, num_classes=3), formulations.get("edm"))
    x, labels = _start(5, 80.0).float(), torch.tensor([0, 1, 2, 0, 1])
    for name in ("heun", "ddpm", "rk45"):
        stats = {}
        out = sampling.sample(name, net, x, schedules.karras_sigmas(4), cond={"labels": labels}, stats=stats,
                              **({"rtol": 1e-2, "atol": 1e-2} if name == "rk45" else {}))
        assert out.dtype == torch.float32 and torch.isfinite(out).all() and stats["nfe"] > 0
