"""The sampler set users know from k-diffusion and diffusers: ``euler_ancestral``, ``dpm_2``, ``dpm_2_ancestral``,
``lms``, ``dpmpp_2s_ancestral``, ``dpmpp_sde``, ``dpmpp_2m_sde``, ``dpmpp_3m_sde``, ``unipc``, ``deis``.

Oracles:
- crowsonkb/k-diffusion's own ``k_diffusion/sampling.py`` (PyPI ``k-diffusion==0.1.1.post1``, installed without its
  training extras; loaded without the package ``__init__``, which imports clean-fid, CLIP and kornia) on the same
  exact Gaussian-mixture denoiser, Karras rho = 7 grid and noise: its ``noise_sampler`` returns the Gaussians our
  sampler draws from the same per-sample seeds (for ``dpmpp_sde``, the two sub-step increments of one Brownian path,
  as its ``BrownianTreeNoiseSampler`` gives them), and with its real Brownian tree the output variance agrees;
- diffusers' ``UniPCMultistepScheduler`` / ``DEISMultistepScheduler`` with x0 prediction (``prediction_type="sample"``)
  on the same sigma grid, in the VP frame ``x_t = x / sqrt(1 + sigma^2)``;
- the PF-ODE endpoint from scipy's DOP853 at tolerance 1e-13, for the convergence orders.
"""

import importlib
import importlib.util
import math
import sys
import types

import numpy as np
import pytest
import torch

from lightning_diff import formulations, sampling
from lightning_diff.analytic import GaussianMixture
from lightning_diff.formulations import schedules
from lightning_diff.sampling import PerSampleGenerator, initial_noise, randn_like

pytestmark = pytest.mark.usefixtures("one_thread")

f64 = torch.float64
MIX = GaussianMixture([[-1.0, 0.5], [1.0, -0.5], [0.3, 1.2]], [0.3, 0.4, 0.25], [0.5, 0.3, 0.2])
SIGMA_MIN, SIGMA_MAX = 0.002, 80.0
SEEDS = [3, 1, 4, 1, 5, 9]
NEW = ["euler_ancestral", "dpm_2", "dpm_2_ancestral", "lms", "dpmpp_2s_ancestral", "dpmpp_sde", "dpmpp_2m_sde",
       "dpmpp_3m_sde", "unipc", "deis"]
STOCHASTIC = {"euler_ancestral": {"eta": 0.7, "s_noise": 1.1}, "dpm_2_ancestral": {"eta": 0.7, "s_noise": 1.1},
              "dpmpp_2s_ancestral": {"eta": 0.7, "s_noise": 1.1}, "dpmpp_2m_sde": {"eta": 0.7, "s_noise": 1.1},
              "dpmpp_3m_sde": {"eta": 0.7, "s_noise": 1.1}, "dpmpp_sde": {"eta": 0.7, "s_noise": 1.1}}


def _start(n=6, sigma_max=SIGMA_MAX, seed=0):
    return sigma_max * torch.randn(n, 2, generator=torch.Generator().manual_seed(seed), dtype=f64)


def _grid(n, end_in_zero=True):
    grid = schedules.karras_sigmas(n, SIGMA_MIN, SIGMA_MAX).to(f64)
    return grid if end_in_zero else grid[:-1]


def _generators(seeds=SEEDS):
    return [torch.Generator().manual_seed(s) for s in seeds]


def _relative(a, b):
    return ((a - b).norm() / b.norm()).item()


# --- k-diffusion's sampling.py, the oracle --------------------------------------------------------------
@pytest.fixture(scope="module")
def kd():
    """``k_diffusion.sampling`` without running ``k_diffusion/__init__`` (its training extras are not installed)."""
    pytest.importorskip("torchsde")
    pytest.importorskip("torchdiffeq")
    spec = importlib.util.find_spec("k_diffusion")
    if spec is None:
        pytest.skip("k-diffusion is not installed (pip install --no-deps k-diffusion==0.1.1.post1)")
    added = "k_diffusion" not in sys.modules
    if added:
        package = types.ModuleType("k_diffusion")
        package.__path__ = list(spec.submodule_search_locations)
        sys.modules["k_diffusion"] = package
    yield importlib.import_module("k_diffusion.sampling")
    if added:
        for name in [m for m in sys.modules if m == "k_diffusion" or m.startswith("k_diffusion.")]:
            del sys.modules[name]


def _same_draws(x):
    """A k-diffusion ``noise_sampler`` returning, call by call, the normals our sampler draws from ``SEEDS``."""
    generators = _generators()
    return lambda sigma, sigma_next: randn_like(x, generators)


def _brownian_pairs(x):
    """A ``noise_sampler`` for ``sample_dpmpp_sde``: per step it is called for ``(sigma, sigma_s)`` then
    ``(sigma, sigma')`` and must return ``(W(sigma) - W(.)) / sqrt(length)`` of ONE Brownian path in sigma (what its
    BrownianTree returns). From the two normals (z, c) our sampler draws: ``W(sigma) - W(sigma_s) = sqrt(sigma -
    sigma_s) z`` and the full increment adds the independent ``W(sigma_s) - W(sigma') = sqrt(sigma_s - sigma') c``."""
    generators, pending = _generators(), {}

    def noise(sigma, sigma_to):
        sigma, sigma_to = float(sigma), float(sigma_to)
        if not pending:
            pending.update(z=randn_like(x, generators), c=randn_like(x, generators), sigma_s=sigma_to)
            return pending["z"]
        z, c, sigma_s = pending.pop("z"), pending.pop("c"), pending.pop("sigma_s")
        return (math.sqrt(sigma - sigma_s) * z + math.sqrt(sigma_s - sigma_to) * c) / math.sqrt(sigma - sigma_to)
    return noise


DETERMINISTIC_K = [("dpm_2", {}, "sample_dpm_2"), ("lms", {}, "sample_lms"), ("lms", {"order": 2}, "sample_lms"),
                   ("dpmpp_2m", {}, "sample_dpmpp_2m"), ("dpmpp_2m_sde", {"eta": 0.0}, "sample_dpmpp_2m_sde"),
                   ("dpmpp_2m_sde", {"eta": 0.0, "solver_type": "heun"}, "sample_dpmpp_2m_sde"),
                   ("dpmpp_3m_sde", {"eta": 0.0}, "sample_dpmpp_3m_sde"),
                   ("euler_ancestral", {"eta": 0.0}, "sample_euler_ancestral"),
                   ("dpm_2_ancestral", {"eta": 0.0}, "sample_dpm_2_ancestral"),
                   ("dpmpp_2s_ancestral", {"eta": 0.0}, "sample_dpmpp_2s_ancestral"),
                   ("dpmpp_sde", {"eta": 0.0}, "sample_dpmpp_sde")]


@pytest.mark.parametrize("end_in_zero", [True, False])
@pytest.mark.parametrize("name, options, oracle", DETERMINISTIC_K)
def test_deterministic_samplers_equal_k_diffusion(kd, name, options, oracle, end_in_zero):
    x, grid = _start(), _grid(12, end_in_zero)
    ours = sampling.sample(name, MIX, x, grid, **options)
    theirs = getattr(kd, oracle)(MIX, x, grid, disable=True, **options)
    assert _relative(ours, theirs) < 1e-5, _relative(ours, theirs)


@pytest.mark.parametrize("end_in_zero", [True, False])
@pytest.mark.parametrize("name", list(STOCHASTIC))
def test_stochastic_samplers_equal_k_diffusion_with_the_same_noise(kd, name, end_in_zero):
    x, grid, options = _start(), _grid(12, end_in_zero), dict(STOCHASTIC[name])
    ours = sampling.sample(name, MIX, x, grid, generator=_generators(), **options)
    noise = _brownian_pairs(x) if name == "dpmpp_sde" else _same_draws(x)
    theirs = getattr(kd, f"sample_{name}")(MIX, x, grid, disable=True, noise_sampler=noise, **options)
    assert _relative(ours, theirs) < 1e-5, _relative(ours, theirs)


def test_dpmpp_sde_stage_fraction_r_equals_k_diffusion(kd):
    x, grid = _start(), _grid(10, end_in_zero=False)
    ours = sampling.dpmpp_sde(MIX, x, grid, generator=_generators(), eta=0.5, r=0.3)
    theirs = kd.sample_dpmpp_sde(MIX, x, grid, disable=True, noise_sampler=_brownian_pairs(x), eta=0.5, r=0.3)
    assert _relative(ours, theirs) < 1e-5


def test_dpm_2_churn_equals_k_diffusion(kd):
    """k-diffusion's ``sample_dpm_2`` draws its churn noise with ``torch.randn_like`` (the global generator) on every
    step; with churn on every step (s_tmin = 0, s_tmax = inf) our global-generator draws come in the same order."""
    x, grid = _start(), _grid(12)
    torch.manual_seed(5)
    ours = sampling.dpm_2(MIX, x, grid, s_churn=3.0, s_noise=1.02)
    torch.manual_seed(5)
    theirs = kd.sample_dpm_2(MIX, x, grid, disable=True, s_churn=3.0, s_noise=1.02)
    assert _relative(ours, theirs) < 1e-5


@pytest.mark.parametrize("grid", [[2.0, 0.2], [5.0, 1.0, 0.2]])
def test_dpmpp_sde_noise_has_the_brownian_trees_variance(kd, grid):
    """With k-diffusion's real BrownianTreeNoiseSampler (torchsde), ``dpmpp_sde``'s output on Gaussian data (a linear
    denoiser, so Gaussian output) has the variance ours has. The two sample variances of n draws differ by
    N(0, 2 (2/n) v^2): 5 standard deviations is 10/sqrt(n) relative (5% at n = 40000). Independent sub-step
    increments instead of the bridge give 0.056 instead of 0.094 on [2, 0.2] (-40%)."""
    n, gauss = 40000, GaussianMixture([[0.0]], 0.3)
    x = grid[0] * torch.randn(n, 1, generator=torch.Generator().manual_seed(0), dtype=f64)
    grid = torch.tensor(grid, dtype=f64)
    ours = sampling.dpmpp_sde(gauss, x, grid, generator=torch.Generator().manual_seed(1))
    torch.manual_seed(3)  # the tree's seed (k-diffusion draws it from the global generator)
    theirs = kd.sample_dpmpp_sde(gauss, x, grid, disable=True)
    assert abs(ours.var().item() / theirs.var().item() - 1) < 10 / math.sqrt(n), (ours.var(), theirs.var())


# --- diffusers' UniPC and DEIS, the oracle ---------------------------------------------------------------
def _diffusers_run(scheduler, x, grid):
    """diffusers' loop on our float64 ``grid`` (replacing the scheduler's own sigmas; ``len(grid) - 1`` steps) with
    the exact mixture as x0-prediction in the VP frame ``x_t = alpha x``, ``alpha = 1 / sqrt(1 + sigma^2)``."""
    scheduler.set_timesteps(len(grid) - 1)
    assert len(scheduler.timesteps) == len(grid) - 1
    scheduler.sigmas = grid.clone()
    scheduler.set_begin_index(0)
    alpha = lambda sigma: 1 / math.sqrt(1 + sigma**2)
    sample = x * alpha(float(grid[0]))
    for i, timestep in enumerate(scheduler.timesteps):
        sigma = float(grid[i])
        denoised = MIX(sample / alpha(sigma), torch.full((x.shape[0],), sigma, dtype=f64))
        sample = scheduler.step(denoised, timestep, sample).prev_sample
    return sample / alpha(float(grid[-1]))


@pytest.mark.parametrize("steps", [8, 20])
@pytest.mark.parametrize("lower_order_final", [True, False])
@pytest.mark.parametrize("solver_type", ["bh1", "bh2"])
@pytest.mark.parametrize("order", [1, 2, 3])
def test_unipc_equals_diffusers(order, solver_type, lower_order_final, steps):
    """On a grid ending at sigma_min (diffusers' ``final_sigmas_type="sigma_min"``): there diffusers is defined for
    every setting (at sigma = 0, bh1 gives NaN: ``B(h) = h = inf`` times a zero)."""
    diffusers = pytest.importorskip("diffusers")
    x, grid = _start(), _grid(steps, end_in_zero=False)
    scheduler = diffusers.UniPCMultistepScheduler(prediction_type="sample", solver_order=order,
                                                  solver_type=solver_type, lower_order_final=lower_order_final)
    theirs = _diffusers_run(scheduler, x, grid)
    ours = sampling.unipc(MIX, x, grid, order=order, solver_type=solver_type, lower_order_final=lower_order_final)
    assert _relative(ours, theirs) < 1e-5, _relative(ours, theirs)


@pytest.mark.parametrize("order", [1, 2, 3])
def test_unipc_to_zero_equals_diffusers(order):
    """diffusers' defaults (bh2, lower_order_final, final_sigmas_type="zero") end in sigma = 0."""
    diffusers = pytest.importorskip("diffusers")
    x, grid = _start(), _grid(10)
    theirs = _diffusers_run(diffusers.UniPCMultistepScheduler(prediction_type="sample", solver_order=order), x, grid)
    assert _relative(sampling.unipc(MIX, x, grid, order=order), theirs) < 1e-5


@pytest.mark.parametrize("steps", [8, 20])
@pytest.mark.parametrize("lower_order_final", [True, False])
@pytest.mark.parametrize("order", [1, 2, 3])
def test_deis_equals_diffusers(order, lower_order_final, steps):
    """diffusers' DEIS never ends in 0 (its last sigma is the smallest training level, or sigma_min repeated; at 0
    its coefficients are 0 * log 0 = NaN), so the grid ends at sigma_min; 8 steps apply lower_order_final (< 15)."""
    diffusers = pytest.importorskip("diffusers")
    x, grid = _start(), _grid(steps, end_in_zero=False)
    scheduler = diffusers.DEISMultistepScheduler(prediction_type="sample", solver_order=order,
                                                 lower_order_final=lower_order_final)
    theirs = _diffusers_run(scheduler, x, grid)
    ours = sampling.deis(MIX, x, grid, order=order, lower_order_final=lower_order_final)
    assert _relative(ours, theirs) < 1e-5, _relative(ours, theirs)


@pytest.mark.parametrize("order", [2, 3])
def test_deis_step_to_zero_is_the_limit_of_steps_to_small_sigma(order):
    """At sigma' = 0 the log-rho coefficients are their limit (rho log rho -> 0): a full-order step to 0 (20 steps,
    so no lower_order_final) is the limit of steps to sigma' -> 0; the gap shrinks like sigma' log sigma'."""
    x, grid = _start(), _grid(20)
    at_zero = sampling.deis(MIX, x, grid, order=order)
    gaps = []
    for tiny in (1e-6, 1e-9):
        near = grid.clone()
        near[-1] = tiny
        gaps.append((sampling.deis(MIX, x, near, order=order) - at_zero).abs().max().item())
    assert torch.isfinite(at_zero).all() and gaps[1] < 1e-6 and gaps[1] < gaps[0] / 100, gaps


# --- convergence orders on the mixture's PF-ODE -----------------------------------------------------------
ORDERS = [("euler_ancestral", {"eta": 0.0}, 1), ("dpm_2", {}, 2), ("dpm_2_ancestral", {"eta": 0.0}, 2), ("lms", {}, 4),
          ("dpmpp_2s_ancestral", {"eta": 0.0}, 2), ("dpmpp_sde", {"eta": 0.0}, 2), ("dpmpp_2m_sde", {"eta": 0.0}, 2),
          ("dpmpp_2m_sde", {"eta": 0.0, "solver_type": "heun"}, 2),
          ("dpmpp_3m_sde", {"eta": 0.0}, 2),  # k-diffusion's third-order term has half its Taylor weight: order 2
          *[("unipc", {"order": p, "solver_type": t, "lower_order_final": False}, p + 1)
            for p in (1, 2, 3) for t in ("bh1", "bh2")],
          *[("deis", {"order": p}, p) for p in (1, 2, 3)]]
ORDER_STEPS = (128, 256, 512)


@pytest.fixture(scope="module")
def pf_ode_endpoint():
    """``(x0, x(sigma_min))``: the mixture's PF-ODE ``dx/dsigma = (x - D) / sigma`` from 80 to 0.002 (DOP853,
    tolerance 1e-13)."""
    from scipy.integrate import solve_ivp

    x0 = _start(4)

    def slope(sigma, flat):
        x = torch.from_numpy(flat).reshape(-1, 2)
        return ((x - MIX(x, torch.full((x.shape[0],), sigma, dtype=f64))) / sigma).reshape(-1).numpy()
    solution = solve_ivp(slope, (SIGMA_MAX, SIGMA_MIN), x0.reshape(-1).numpy(), method="DOP853", rtol=1e-13, atol=1e-13)
    return x0, torch.from_numpy(solution.y[:, -1]).reshape(-1, 2)


@pytest.mark.parametrize("name, options, order", ORDERS)
def test_convergence_order_on_the_mixture_pf_ode(pf_ode_endpoint, name, options, order):
    """Karras grids of 128, 256, 512 steps ending at sigma_min (so the error is the ODE solver's, not the last jump);
    the least-squares slope of log error against log N is the order (eta = 0: the PF-ODE). docs/samplers.md lists
    the slopes."""
    x0, reference = pf_ode_endpoint
    errors = [(sampling.sample(name, MIX, x0, _grid(n, end_in_zero=False), **options) - reference).abs().max().item()
              for n in ORDER_STEPS]
    slope = -np.polyfit(np.log(ORDER_STEPS), np.log(errors), 1)[0]
    assert abs(slope - order) < 0.2, (errors, slope)


# --- every formulation through the existing path ---------------------------------------------------------
@pytest.mark.parametrize("name", NEW)
@pytest.mark.parametrize("formulation", formulations.names())
def test_every_formulation_grid_ends_near_the_data(formulation, name):
    """On ``formulation.sampling_sigmas(64)`` (NCSN: its 10 levels) with the exact mixture denoiser and default options,
    the samples are finite and near the data. Tolerance: an exact PF-ODE/SDE run reaches p(x; sigma_min) and its last
    step to 0 only shrinks towards the component means, so each sample lies within 6 standard deviations
    sqrt(s_k^2 + sigma_min^2) of a mean unless a 2-D Gaussian radius exceeds 6 (probability e^-18 per sample); the
    samplers' discretisation error at 64 steps must stay inside that."""
    fm = formulations.get(formulation)
    grid = fm.sampling_sigmas(10 if formulation == "ncsn" else 64)
    seeds = list(range(32))
    x = initial_noise(seeds, (2,), float(grid[0]))
    out = sampling.sample(name, MIX, x, grid, generator=PerSampleGenerator(seeds))
    spread = torch.sqrt(MIX.stds**2 + float(grid[-2]) ** 2)
    distance = (torch.cdist(out, MIX.means) / spread).min(dim=1).values
    assert torch.isfinite(out).all() and distance.max() < 6, distance.max()


# --- the contract ------------------------------------------------------------------------------------------
NFE = {"euler_ancestral": lambda n: n, "dpm_2": lambda n: 2 * n - 1, "dpm_2_ancestral": lambda n: 2 * n - 1,
       "lms": lambda n: n, "dpmpp_2s_ancestral": lambda n: 2 * n - 1, "dpmpp_sde": lambda n: 2 * n - 1,
       "dpmpp_2m_sde": lambda n: n, "dpmpp_3m_sde": lambda n: n, "unipc": lambda n: n, "deis": lambda n: n}


@pytest.mark.parametrize("name", NEW)
def test_registered_with_nfe_callback_and_dtype(name):
    assert name in sampling.SAMPLERS and name in sampling.__all__
    payloads, stats = [], {}
    x = _start(4, 10.0).float()
    out = sampling.sample(name, MIX, x, schedules.karras_sigmas(6, 0.01, 10.0), stats=stats,
                          callback=payloads.append, generator=_generators(SEEDS[:4]))
    assert out.dtype == torch.float32 and out.shape == x.shape and torch.isfinite(out).all()
    assert stats["nfe"] == NFE[name](6)
    assert [p["i"] for p in payloads] == list(range(6))
    churn_level = {"sigma_hat"} if name == "dpm_2" else set()
    assert set(payloads[0]) == {"i", "x", "sigma", "denoised", "nfe"} | churn_level
    assert payloads[0]["x"].dtype == f64


SEEDED = {**STOCHASTIC, "dpm_2": {"s_churn": 5.0}}


@pytest.mark.parametrize("name", list(SEEDED))
def test_sample_depends_only_on_its_seed(name):
    grid, seeds = schedules.karras_sigmas(8, 0.01, 10.0), [11, 12, 13, 14, 15, 16]
    big = initial_noise(seeds, (2,), 10.0)
    full = sampling.sample(name, MIX, big, grid, generator=PerSampleGenerator(seeds), **SEEDED[name])
    part = sampling.sample(name, MIX, big[2:4], grid, generator=_generators(seeds[2:4]), **SEEDED[name])
    assert torch.allclose(full[2:4], part, atol=1e-10, rtol=0)
    reseeded = PerSampleGenerator([s + 100 for s in seeds])
    other = sampling.sample(name, MIX, big, grid, generator=reseeded, **SEEDED[name])
    assert not torch.allclose(other, full)


@pytest.mark.parametrize("eta", [0.0, 0.5, 1.0])
def test_euler_ancestral_is_ddim_with_eta(eta):
    """``D + sigma_down eps + sigma_up z`` both (docs/samplers.md#ddim), the same noise from the same seeds."""
    x, grid = _start(), _grid(10)
    ancestral = sampling.euler_ancestral(MIX, x, grid, eta=eta, generator=_generators())
    assert torch.allclose(ancestral, sampling.ddim(MIX, x, grid, eta=eta, generator=_generators()), atol=1e-9, rtol=0)


class SnappedMixture:
    """The exact mixture behind an iDDPM network's levels: records every sigma it is called with."""

    def __init__(self):
        self.formulation, self.seen = formulations.get("iddpm"), []

    def round_sigma(self, sigma):
        return self.formulation.round_sigma(sigma)

    def __call__(self, x, sigma, **cond):
        self.seen.append(sigma.clone())
        return MIX(x, sigma)


@pytest.mark.parametrize("name", ["dpm_2", "dpm_2_ancestral", "dpmpp_2s_ancestral", "dpmpp_sde"])
def test_intermediate_stages_are_snapped_to_the_networks_levels(name):
    """The stages inside a step (DPM-Solver-2's midpoint, DPM-Solver++(2S)'s r = 1/2 point) are snapped to a discrete
    network's levels as the grid is (core.check_grid), so the network only sees its own levels."""
    denoiser = SnappedMixture()
    options = {"s_churn": 5.0} if name == "dpm_2" else {}
    out = sampling.sample(name, denoiser, _start(3), schedules.karras_sigmas(6, 0.01, 80.0),
                          generator=_generators(SEEDS[:3]), **options)
    levels = set(denoiser.formulation.u[:-1].tolist())
    seen = set(torch.cat(denoiser.seen).tolist())
    assert torch.isfinite(out).all() and seen <= levels, sorted(seen - levels)[:5]


def test_a_stage_snapped_onto_the_current_level_makes_the_dpmpp_sde_step_first_order():
    """On consecutive iDDPM levels ``dpmpp_sde``'s stage at r = 0.1 of the step (nearer sigma) snaps onto sigma
    itself: the step is then a first-order ancestral step with no stage evaluation instead of dividing by r = 0."""
    denoiser = SnappedMixture()
    levels = denoiser.formulation.u[:-1]  # decreasing network levels
    grid = torch.cat([levels[-5:], torch.zeros(1, dtype=levels.dtype)])  # the 5 smallest levels, then 0
    stats = {}
    out = sampling.dpmpp_sde(denoiser, float(grid[0]) * _start(3, 1.0), grid, stats=stats,
                             generator=_generators(SEEDS[:3]), r=0.1)
    assert torch.isfinite(out).all() and set(torch.cat(denoiser.seen).tolist()) <= set(levels.tolist())
    assert stats["nfe"] == 5, stats  # one evaluation per step


@pytest.mark.parametrize("name, options, match", [
    ("euler_ancestral", {"eta": -1.0}, "eta=-1.0 is invalid; allowed: a finite number >= 0"),
    ("dpm_2_ancestral", {"s_noise": float("nan")}, "s_noise=nan is invalid"),
    ("dpm_2", {"s_churn": -1.0}, "s_churn=-1.0 is invalid"),
    ("dpm_2", {"s_tmin": 2.0, "s_tmax": 1.0}, "s_tmax=1.0 is invalid; allowed: a number >= s_tmin=2.0"),
    ("lms", {"order": 0}, "order=0 is invalid; allowed: an integer >= 1"),
    ("lms", {"order": 2.5}, "order=2.5 is invalid"),
    ("unipc", {"order": 4}, "order=4 is not known; allowed: 1, 2, 3"),
    ("unipc", {"solver_type": "bh3"}, "solver_type='bh3' is not known; allowed: bh1, bh2"),
    ("unipc", {"lower_order_final": "yes"}, "lower_order_final='yes' is not known; allowed: True, False"),
    ("deis", {"order": 0}, "order=0 is not known; allowed: 1, 2, 3"),
    ("dpmpp_2m_sde", {"solver_type": "euler"}, "solver_type='euler' is not known; allowed: midpoint, heun"),
    ("dpmpp_3m_sde", {"eta": -0.5}, "eta=-0.5 is invalid"),
    ("dpmpp_sde", {"r": 0.0}, "r=0.0 is invalid; allowed: 0 < r <= 1"),
    ("dpmpp_2s_ancestral", {"solver_type": "heun"}, "unknown options \\['solver_type'\\]"),
])
def test_bad_options_name_the_setting_the_value_and_what_is_allowed(name, options, match):
    with pytest.raises(ValueError, match=f"sampler={name}: {match}"):
        sampling.sample(name, MIX, _start(2), _grid(4), **options)
