"""Sampler accuracy against network evaluations (NFE) on a 2-D Gaussian mixture with its exact denoiser.

Deterministic samplers: RMS distance of the final samples to a high-accuracy reference solve of the same
PF-ODE (rk45, rtol = atol = 1e-10) from the same start noise. Stochastic samplers: log-likelihood gap
(mean true log p of the samples minus E_data[log p]) and the 2-Wasserstein distance to fresh data
samples (exact assignment); ``data floor`` is W2 between two data sets of the same size.

Run: ``OMP_NUM_THREADS=1 .venv/bin/python benchmarks/samplers.py`` (CPU, about a minute).
"""

from __future__ import annotations

import argparse

import torch
from scipy.optimize import linear_sum_assignment

from lightning_diff import formulations, sampling
from lightning_diff.analytic import GaussianMixture
from lightning_diff.formulations import schedules

MIX = GaussianMixture([[-1.0, 0.5], [1.0, -0.5], [0.3, 1.2]], [0.3, 0.4, 0.25], [0.5, 0.3, 0.2])
NFES = (10, 20, 35, 50, 100)
SIGMA_MIN, SIGMA_MAX = 0.002, 80.0  # EDM's sampling range


def karras(n):
    return schedules.karras_sigmas(n, SIGMA_MIN, SIGMA_MAX)


# name -> (sampler, steps for a given NFE, options); NFE = steps for one-evaluation-per-step samplers.
DETERMINISTIC = {
    "euler": ("euler", lambda nfe: nfe, {}),
    "heun": ("heun", lambda nfe: (nfe + 1) // 2, {}),
    "dpmpp_2m": ("dpmpp_2m", lambda nfe: nfe, {}),
    "ddim(eta=0)": ("ddim", lambda nfe: nfe, {}),
    "ablation vp heun": ("ablation", lambda nfe: (nfe + 1) // 2,
                         {"formulation": formulations.get("vp")}),
    "ablation rf euler": ("ablation", lambda nfe: nfe,
                          {"formulation": formulations.get("rf"), "solver": "euler"}),
}
STOCHASTIC = {
    "heun churn=40": ("heun", lambda nfe: (nfe + 1) // 2, {"S_churn": 40.0}),
    "ddpm fixed_small": ("ddpm", lambda nfe: nfe, {}),
    "ddpm fixed_large": ("ddpm", lambda nfe: nfe, {"variance": "fixed_large"}),
    "ddim eta=1": ("ddim", lambda nfe: nfe, {"eta": 1.0}),
    "euler_maruyama": ("euler_maruyama", lambda nfe: nfe, {}),
    "sde family 0.5": ("euler_maruyama", lambda nfe: nfe, {"noise_scale": 0.5}),
    "pc (1 corrector)": ("pc", lambda nfe: nfe // 2, {}),
    # NCSN: 10 geometric levels in [0.01, 10], steps_per_level = (NFE - 1) // 10 (at least 1).
    "annealed_langevin": ("annealed_langevin", None, {"step_size": 1e-4}),
}


def w2(a: torch.Tensor, b: torch.Tensor) -> float:
    """Exact 2-Wasserstein distance between two equal-size point clouds (optimal assignment)."""
    cost = torch.cdist(a, b).pow(2).numpy()
    rows, cols = linear_sum_assignment(cost)
    return float(cost[rows, cols].mean() ** 0.5)


def main(num_samples: int = 2000, w2_samples: int = 1000) -> None:
    g = torch.Generator().manual_seed(0)
    x0 = SIGMA_MAX * torch.randn(num_samples, 2, generator=g, dtype=torch.float64)
    reference = sampling.rk45(MIX, x0, karras(2), rtol=1e-10, atol=1e-10)

    print(f"Deterministic: RMS error vs rk45(1e-10) reference, {num_samples} samples, Karras grid "
          f"[{SIGMA_MIN}, {SIGMA_MAX}], rho=7")
    print(f"{'sampler':20s}" + "".join(f"{'NFE ' + str(n):>13s}" for n in NFES))
    for label, (name, steps, options) in DETERMINISTIC.items():
        row = []
        for nfe in NFES:
            stats = {}
            out = sampling.sample(name, MIX, x0, karras(steps(nfe)), stats=stats, **options)
            err = (out - reference).pow(2).sum(1).mean().sqrt().item()
            row.append(f"{err:.2e}@{stats['nfe']}")
        print(f"{label:20s}" + "".join(f"{c:>13s}" for c in row))
    print(f"{'rk45 (tol: nfe)':20s}", end="")
    for tol in (1e-2, 1e-3, 1e-4, 1e-5, 1e-6):
        stats = {}
        out = sampling.rk45(MIX, x0, karras(2), rtol=tol, atol=tol, stats=stats)
        err = (out - reference).pow(2).sum(1).mean().sqrt().item()
        print(f"  {tol:.0e}: {err:.1e}@{stats['nfe']}", end="")
    print()

    data = MIX.sample(200_000, torch.Generator().manual_seed(1))
    data_loglik = MIX.log_prob(data).mean().item()
    floor = w2(data[:w2_samples], data[w2_samples:2 * w2_samples])
    print(f"\nStochastic: log-likelihood gap (nats) / W2 to data, {num_samples} samples "
          f"(W2 on {w2_samples}); data floor W2 = {floor:.3f}, E[log p] = {data_loglik:.3f}")
    print(f"{'sampler':20s}" + "".join(f"{'NFE ' + str(n):>18s}" for n in NFES))
    for label, (name, steps, options) in STOCHASTIC.items():
        row = []
        for nfe in NFES:
            if name == "annealed_langevin":
                options = {**options, "steps_per_level": max(1, (nfe - 1) // 10)}
                grid = schedules.loglinear_sigmas(10, 0.01, 10.0)
            else:
                grid = karras(steps(nfe))
            stats = {}
            gen = torch.Generator().manual_seed(2)
            out = sampling.sample(name, MIX, x0, grid, generator=gen, stats=stats, **options)
            gap = MIX.log_prob(out).mean().item() - data_loglik
            row.append(f"{gap:+.3f}/{w2(out[:w2_samples], data[-w2_samples:]):.3f}@{stats['nfe']}")
        print(f"{label:20s}" + "".join(f"{c:>18s}" for c in row))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-samples", type=int, default=2000)
    parser.add_argument("--w2-samples", type=int, default=1000)
    args = parser.parse_args()
    main(args.num_samples, args.w2_samples)
