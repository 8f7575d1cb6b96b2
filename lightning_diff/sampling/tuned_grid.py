"""Optimised step schedules: the sigma grid of a deterministic sampler at a budget of network evaluations, tuned for
one model (``lightning-diff tune-steps``; docs/tune_steps.md has the method with numbers).

The method is the objective of LD3 (Tong, Hoang, Liu, Van den Broeck & Niepert 2025, "Learning to Discretize
Denoising Diffusion ODEs", ICLR 2025, arXiv:2405.15506): the global error of the few-step sampler against a
fine-grid ("teacher") solve of the same PF-ODE from the same start noise, on tuning seeds,

    L(sigma) = 1 / (S D) sum_s || Phi(x^s; sigma) - Psi(x^s) ||^2,   x^s = sigma_max n^s                      (1)

with ``Phi(x; sigma)`` the sampler on the grid ``sigma_max = sigma_0 > ... > sigma_{N-1} > sigma_N = 0`` and ``Psi``
EDM's Heun on EDM's time steps (Karras et al. 2022, eq. 5, rho 7) with ``reference_steps`` steps, both solving the
PF-ODE ``dx/dsigma = (x - D(x; sigma)) / sigma`` (Karras et al. 2022, eq. 4 with sigma(t) = t, s(t) = 1).
What differs from LD3: the plain objective (1) without their soft teacher forcing (a slack ball around x^s), the
squared L2 distance (not LPIPS), and a derivative-free optimiser (Powell's method, ``scipy.optimize.minimize``),
since the samplers run under ``no_grad`` on Python float grids. The N - 1 interior levels are parametrised so that
every parameter vector is a valid grid, decreasing and inside ``[sigma_floor, sigma_max]`` (v clipped to [-10, 10]):

    log sigma_i = log sigma_max - log(sigma_max / sigma_floor) sum_{j <= i} w_j,  w = softmax(v_1..v_{N-1}, 0)  (2)

(``w_N``, the last weight, is the unused range between sigma_{N-1} and sigma_floor). sigma_max and the final 0 are
fixed; the search starts from EDM's time steps with the formulation's sigma_min, sigma_max and ``rho``, which are
also the baseline the result is compared with, on the tuning seeds and on held-out seeds.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence

import numpy as np
import torch
from scipy import optimize

from ..analytic import GaussianMixture
from ..formulations import Formulation
from ..formulations.schedules import karras_sigmas
from . import registry
from .noise import PerSampleGenerator
from .settings import SamplerSettings

__all__ = ["METHOD", "PAPER", "Sample", "check_deterministic", "endpoint_error", "grid_of", "on_grid",
           "parameters_of", "steps_for_nfe", "tune_grid"]

METHOD = "ld3-endpoint-l2"  # the file's method name: objective (1), parametrisation (2), Powell
PAPER = ("Tong, Hoang, Liu, Van den Broeck & Niepert 2025, Learning to Discretize Denoising Diffusion ODEs "
         "(ICLR 2025, arXiv:2405.15506)")
REFERENCE_SAMPLER = "heun"  # Psi of (1): EDM's Heun (Algorithm 1) on EDM's time steps
V_BOUND = 10.0  # v clipped to [-10, 10] in (2): each gap >= e^-20 / N of the log range, float64 levels distinct

Sample = Callable[[SamplerSettings, Sequence[int]], tuple[torch.Tensor, int]]
"""``sample(settings, seeds) -> (endpoints [S, ...], network evaluations per sample)``: the model sampled with
``settings`` from the start noise of ``seeds`` (the same noise for the same seed, whatever the grid)."""


def on_grid(settings: SamplerSettings, sigmas: torch.Tensor) -> SamplerSettings:
    """``settings`` on the explicit grid ``sigmas`` (``time_steps={"sigmas": [...]}``)."""
    return dataclasses.replace(settings, steps=None, time_steps={"sigmas": sigmas.tolist()})


def endpoint_error(endpoints: torch.Tensor, reference: torch.Tensor) -> float:
    """Objective (1): the mean over samples and elements of the squared difference, in float64."""
    return float(((endpoints.double() - reference.double()) ** 2).mean())


def grid_of(v: np.ndarray, sigma_max: float, sigma_floor: float) -> torch.Tensor:
    """Parametrisation (2): ``N - 1`` numbers ``v`` -> the grid ``[sigma_max, sigma_1, ..., sigma_{N-1}, 0]``
    (float64 ``[N + 1]``), strictly decreasing, its levels in ``(sigma_floor, sigma_max]``; ``v`` is clipped to
    ``[-V_BOUND, V_BOUND]``."""
    logits = np.append(np.clip(np.asarray(v, dtype=np.float64), -V_BOUND, V_BOUND), 0.0)
    weights = np.exp(logits - logits.max())
    weights /= weights.sum()
    fractions = np.cumsum(weights)[:-1]  # in (0, 1): sigma_1 .. sigma_{N-1}
    levels = np.exp(math.log(sigma_max) - math.log(sigma_max / sigma_floor) * fractions)
    return torch.tensor([sigma_max, *levels.tolist(), 0.0], dtype=torch.float64)


def parameters_of(sigmas: torch.Tensor, sigma_floor: float) -> np.ndarray:
    """The inverse of ``grid_of``: ``v`` with ``grid_of(v, sigmas[0], sigma_floor) == sigmas`` (to rounding), for a
    grid whose last positive level is above ``sigma_floor``."""
    logs = np.log(np.append(sigmas[:-1].numpy(), sigma_floor))  # log sigma_0 .. log sigma_{N-1}, log sigma_floor
    gaps = -np.diff(logs)  # proportional to w_1 .. w_N
    v = np.log(gaps[:-1]) - np.log(gaps[-1]) if (gaps > 0).all() else np.full(len(gaps) - 1, np.inf)
    if not (np.abs(v) <= V_BOUND).all():
        raise ValueError(f"the grid {sigmas.tolist()} is not one of parametrisation (2): it must decrease, end above "
                         f"sigma_floor={sigma_floor}, and its log gaps stay within a factor e^{2 * V_BOUND:g}")
    return v


def check_deterministic(settings: SamplerSettings, formulation: Formulation) -> None:
    """Objective (1) compares endpoints with the PF-ODE's, so the sampler must not draw noise: run it twice on the
    exact denoiser of data ``N(0, 0.5^2)`` from one start with two noise generators; ValueError naming the sampler,
    its options and the deterministic samplers of the registry (at their default options) when the two differ."""
    if _draws_noise(settings, formulation):
        deterministic = [name for name in registry.SAMPLERS
                         if not _draws_noise(SamplerSettings(name=name), formulation, quiet=True)]
        raise ValueError(f"sampler={settings.name} with sampler.options={settings.options} draws noise while it "
                         "samples, so its endpoint is no function of the start noise and no grid can match the "
                         f"PF-ODE's; allowed: a deterministic sampler ({', '.join(deterministic)}; churn or eta 0)")


def _draws_noise(settings: SamplerSettings, formulation: Formulation, quiet: bool = False) -> bool:
    """Whether ``settings`` ends elsewhere with another noise generator (``check_deterministic``); with ``quiet``,
    a sampler that cannot run here counts as drawing noise (it is not offered)."""
    denoiser = GaussianMixture(torch.zeros(1), stds=0.5).denoise  # EDM's sigma_data: the exact D of N(0, 0.5^2)
    try:
        sigmas = settings.sigmas(formulation)
        x = torch.full((1, 1), float(sigmas[0]), dtype=torch.float64)
        a, b = (registry.sample(settings.name, denoiser, x, sigmas, generator=PerSampleGenerator([seed]),
                                **settings.call_options(formulation)) for seed in (0, 1))
    except (ValueError, TypeError, AttributeError):
        if quiet:
            return True
        raise
    return not torch.equal(a, b)


def steps_for_nfe(sample: Sample, settings: SamplerSettings, nfe: int, grid: Callable[[int], torch.Tensor],
                  seed: int) -> int:
    """The step count at which ``settings`` spends exactly ``nfe`` network evaluations per sample (counted by
    ``sample`` on ``grid(steps)`` for one ``seed``: Euler N, Heun 2N - 1, DPM-Solver++(2M) and UniPC N). ValueError
    naming ``nfe`` and the budgets the sampler has around it when none does."""
    counts = {}
    for steps in range(1, nfe + 1):
        counts[steps] = sample(on_grid(settings, grid(steps)), [seed])[1]
        if counts[steps] >= nfe:
            break
    if counts[steps] != nfe:
        near = sorted({counts.get(steps - 1), counts[steps]} - {None})
        raise ValueError(f"nfe={nfe} is not a budget of sampler={settings.name}: {steps} steps take "
                         f"{counts[steps]} network evaluations per sample; allowed: nfe={' or '.join(map(str, near))}")
    if steps < 2:
        raise ValueError(f"nfe={nfe} gives sampler={settings.name} one step, whose grid [sigma_max, 0] has no level "
                         "to tune; allowed: a budget of 2 steps or more")
    return steps


def tune_grid(sample: Sample, settings: SamplerSettings, nfe: int, *, formulation: Formulation,
              seeds: Sequence[int], heldout_seeds: Sequence[int] = (), reference_steps: int = 128,
              rho: float = 7.0, max_evals: int = 200, floor_ratio: float = 0.1, xtol: float = 1e-2,
              ftol: float = 1e-4) -> dict:
    """Tune the grid of ``settings`` (a deterministic sampler) at ``nfe`` network evaluations per sample by
    minimising objective (1) on ``seeds`` over parametrisation (2) with Powell's method, from EDM's time steps with
    ``rho`` (module docstring).

    Args:
        sample: samples the model (``Sample``).
        formulation: the model's: its ``sigma_min``, ``sigma_max`` set the initial grid and sigma_max.
        seeds, heldout_seeds: tuning seeds, and seeds only scored at the end (tuned and initial grid).
        reference_steps: steps of the Heun reference solve (``2 reference_steps - 1`` evaluations per seed).
        max_evals: evaluations of (1) Powell may spend (``maxfev``; each samples every tuning seed).
        floor_ratio: sigma_floor = floor_ratio * formulation.sigma_min, the lowest level (2) can reach.
        xtol, ftol: Powell's tolerances on v and on the relative decrease of (1).
    Returns:
        The grid file's content (``grid_file.write_grid_file``) but the model: ``sigmas`` (float64 values as a
        list), ``steps``, ``nfe``, ``sampler``, ``method``, ``initial`` and ``loss`` (objective (1) of the tuned
        and the initial grid on the tuning and the held-out seeds; the tuned one is never above the initial on the
        tuning seeds).
    """
    check_deterministic(settings, formulation)
    seeds, heldout_seeds = [int(s) for s in seeds], [int(s) for s in heldout_seeds]
    sigma_min, sigma_max = formulation.sigma_min, formulation.sigma_max
    sigma_floor = floor_ratio * sigma_min
    steps = steps_for_nfe(sample, settings, nfe, lambda n: karras_sigmas(n, sigma_min, sigma_max, rho), seeds[0])
    initial = karras_sigmas(steps, sigma_min, sigma_max, rho)
    reference_grid = {"sigma_min": sigma_min, "sigma_max": sigma_max, "rho": 7.0}  # EDM's time steps
    reference = on_grid(SamplerSettings(name=REFERENCE_SAMPLER, batch_size=settings.batch_size),
                        karras_sigmas(reference_steps, **reference_grid))
    target = sample(reference, seeds)[0]

    def loss(grid: torch.Tensor, on: Sequence[int] = seeds, goal: torch.Tensor = target) -> float:
        return endpoint_error(sample(on_grid(settings, grid), on)[0], goal)

    initial_loss = loss(initial)
    best = {"grid": initial, "loss": initial_loss, "evaluations": 1}

    def objective(v: np.ndarray) -> float:
        grid = grid_of(v, sigma_max, sigma_floor)
        value = loss(grid)
        best["evaluations"] += 1
        if value < best["loss"]:
            best.update(grid=grid, loss=value)
        return value

    optimize.minimize(objective, parameters_of(initial, sigma_floor), method="Powell",
                      options={"maxfev": max_evals, "xtol": xtol, "ftol": ftol})
    losses = {"tuning": {"tuned": best["loss"], "initial": initial_loss}, "heldout": None}
    if heldout_seeds:
        goal = sample(reference, heldout_seeds)[0]
        losses["heldout"] = {name: loss(grid, heldout_seeds, goal) for name, grid in
                             (("tuned", best["grid"]), ("initial", initial))}
    method = {"name": METHOD, "paper": PAPER, "objective": "mean squared endpoint error against the reference (1)",
              "reference": {"sampler": REFERENCE_SAMPLER, "steps": reference_steps, "time_steps": reference_grid},
              "optimizer": "scipy.optimize.minimize(method='Powell')", "max_evals": max_evals,
              "evaluations": best["evaluations"], "sigma_floor": sigma_floor, "xtol": xtol, "ftol": ftol,
              "seeds": {"tuning": seeds, "heldout": heldout_seeds}}
    return {"sigmas": best["grid"].tolist(), "steps": steps, "nfe": nfe,
            "sampler": {"name": settings.name, "options": dict(settings.options)}, "method": method,
            "initial": {"sigmas": initial.tolist(), "rho": rho, "sigma_min": sigma_min, "sigma_max": sigma_max},
            "loss": losses}
