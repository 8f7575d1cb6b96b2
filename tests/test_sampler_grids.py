"""Samplers between any two noise levels (docs/samplers.md#grids): a grid may end at sigma_N > 0, and then the
sampler returns the state at sigma_N with no final denoising jump (k-diffusion's convention).

Oracles: (1) the run over a joined grid equals a run from s0 to s1 followed by one from s1 to 0 (bit for bit for
one-step methods: their steps see the same floats in the same order); (2) for one Gaussian N(mu, s^2 I) the PF-ODE
in the sigma-frame has the closed form x(sigma_b) = mu + sqrt(s^2 + sigma_b^2) / sqrt(s^2 + sigma_a^2) (x_a - mu)
(docs/samplers.md, tests/test_sampling.py), so ODE samplers from sigma_a to sigma_b > 0 must reach it.
"""

import math

import pytest
import torch

from lightning_diff import formulations, sampling
from lightning_diff.analytic import GaussianMixture
from lightning_diff.formulations import schedules
from lightning_diff.sampling.core import check_grid

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny networks: one intra-op thread

f64 = torch.float64
MU, S = torch.tensor([0.3, -0.2], dtype=f64), 0.5
GAUSS = GaussianMixture(MU, S)
MIX = GaussianMixture([[-1.0, 0.5], [1.0, -0.5], [0.3, 1.2]], [0.3, 0.4, 0.25], [0.5, 0.3, 0.2])
VP = formulations.get("vp")


def _start(sigma, n=16, seed=0):
    return sigma * torch.randn(n, 2, generator=torch.Generator().manual_seed(seed), dtype=f64)


def _pf_ode_map(x, sigma_a, sigma_b):
    """Closed-form PF-ODE map of N(MU, S^2 I) from sigma_a to sigma_b."""
    return MU + math.sqrt(S**2 + sigma_b**2) / math.sqrt(S**2 + sigma_a**2) * (x - MU)


# (name, options, bit-identical): one-step methods split exactly; ablation rescales by s(t) at both ends.
SPLITTABLE = [
    ("euler", {}, True), ("heun", {}, True), ("ddim", {}, True), ("ddim", {"eta": 0.7}, True),
    ("ddpm", {}, True), ("euler_maruyama", {"formulation": VP}, True), ("pc", {}, True),
    ("ablation", {"formulation": VP}, False), ("ablation", {"formulation": VP, "solver": "euler"}, False),
]


@pytest.mark.parametrize("name, options, exact", SPLITTABLE, ids=lambda v: v if isinstance(v, str) else None)
def test_split_run_equals_joined_grid(name, options, exact):
    grid = schedules.karras_sigmas(12, 0.002, 80.0)
    head, tail = grid[:7], grid[6:]  # head ends at grid[6] > 0, tail starts there
    assert head[-1] > 0
    x = _start(80.0)
    joined = sampling.sample(name, MIX, x, grid, generator=torch.Generator().manual_seed(1), **options)
    gen = torch.Generator().manual_seed(1)  # one stream across both halves: the same draws in the same order
    stats = {}
    middle = sampling.sample(name, MIX, x, head, generator=gen, stats=stats, **options)
    split = sampling.sample(name, MIX, middle, tail, generator=gen, **options)
    two_stage = name in ("heun", "pc") or (name == "ablation" and options.get("solver", "heun") == "heun")
    assert stats["nfe"] == (12 if two_stage else 6)  # 6 steps; Heun's last step above 0 keeps its correction
    if exact:
        assert torch.equal(joined, split)
    else:
        torch.testing.assert_close(joined, split, rtol=0, atol=1e-12)


@pytest.mark.parametrize("name, order, steps, tol", [("euler", 1, 160, 1e-2), ("ddim", 1, 160, 1e-2),
                                                     ("heun", 2, 80, 1e-3), ("dpmpp_2m", None, 80, 5e-5),
                                                     ("rk45", None, 4, 1e-6)])
def test_ode_samplers_between_two_levels_match_closed_form(name, order, steps, tol):
    """Error against the closed-form map below ``tol`` at ``steps`` (|x| <= 1.2 there), and halving the steps
    multiplies it by 2^order (the method's order is kept on a grid that ends above 0)."""
    sigma_a, sigma_b = 20.0, 0.3
    x = MU + _start(sigma_a)
    options = {"rtol": 1e-8, "atol": 1e-8} if name == "rk45" else {}
    errors = []
    for n in (steps // 2, steps):
        grid = schedules.karras_sigmas(n, sigma_b, sigma_a)[:-1]  # ends at sigma_b, no 0
        out = sampling.sample(name, GAUSS, x, grid, **options)
        errors.append((out - _pf_ode_map(x, sigma_a, sigma_b)).abs().max().item())
    assert errors[1] < tol, errors
    if order is not None:
        assert abs(math.log2(errors[0] / errors[1]) - order) < 0.2, errors


def test_ablation_in_vp_time_between_two_levels_matches_closed_form():
    sigma_a, sigma_b = 20.0, 0.3
    x = MU + _start(sigma_a)
    grid = VP.sampling_sigmas(64)[:-1]
    grid = grid[(grid <= sigma_a) & (grid >= sigma_b)]
    out = sampling.ablation(GAUSS, x, grid, formulation=VP)
    error = (out - _pf_ode_map(x, float(grid[0]), float(grid[-1]))).abs().max().item()
    assert error < 1e-3, error


def test_grid_end_above_zero_is_snapped_and_validated():
    ddpm = formulations.get("ddpm")
    snapped = check_grid(torch.tensor([10.0, 1.0, 0.1003], dtype=f64), torch.zeros(1, 2), "euler", ddpm)
    assert snapped[-1] > 0 and snapped[-1] in ddpm.grid.tolist()
    x = torch.zeros(2, 2)
    with pytest.raises(ValueError, match="sigmas=.*allowed: strictly decreasing noise levels >= 0"):
        sampling.euler(MIX, x, torch.tensor([1.0, 0.5, -0.1]))
    with pytest.raises(ValueError, match="annealed_langevin: sigmas ends at 0.5; allowed: a grid that ends in 0"):
        sampling.annealed_langevin(MIX, x, torch.tensor([1.0, 0.5]))
