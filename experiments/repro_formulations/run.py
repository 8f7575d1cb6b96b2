"""The eight formulations at an equal training budget on 8x8 digits (EDM, Karras et al. 2022, Sec. 3 and Table 2).

Every formulation of configs/formulation (ddpm, iddpm, ncsn, vp, subvp, ve, edm, rf) trains edm_digits' network
(configs/experiment/edm_digits.yaml: tiny_unet, Adam lr 2e-3, EMA) for the same steps and batch. Each model is
then scored by sample quality with its paper's own sampler (``OWN_SAMPLERS``; the papers' 1000-level samplers cut
to 100 levels to fit the CPU budget) and with EDM's Heun at 18 steps (35 NFE) on its formulation's grid, and by the
probability-flow ODE bits/dim of the held-out digits (``evaluation.split_bits_per_dim``; uniform dequantization).
Quality: Fréchet distance (FD) and KID in the small digits classifier's features (``reproduction.quality``).

Usage: ``python experiments/repro_formulations/run.py [--out DIR] [--quick]``
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from lightning_diff.cli.reproduction import argument_parser, markdown_table, quality, trained, write_results  # noqa: E402
from lightning_diff.evaluation.split_likelihood import split_bits_per_dim  # noqa: E402

HERE = Path(__file__).resolve().parent
FORMULATIONS = ("ddpm", "iddpm", "ncsn", "vp", "subvp", "ve", "edm", "rf")
# Equal budget for all: the digits EDM recipe for these steps and batch; --quick: a few steps, few samples and images.
BUDGET = {"full": {"steps": 500, "batch": 64, "num_images": 256, "bpd_images": 180},
          "quick": {"steps": 4, "batch": 16, "num_images": 16, "bpd_images": 8}}
# The paper's sampler of each formulation (its configs/experiment preset), at 100 levels instead of 1000:
OWN_SAMPLERS = {
    # Ho et al. 2020: ancestral sampling (configs/sampler/ddpm.yaml's default variance, beta-tilde)
    "ddpm": {"name": "ddpm", "steps": 100, "options": {"variance": "fixed_small"}},
    # Nichol & Dhariwal 2021 sample ancestrally with the learned variance; an L_simple model has none: beta-tilde
    "iddpm": {"name": "ddpm", "steps": 100, "options": {"variance": "fixed_small"}},
    # Song & Ermon 2019: annealed Langevin over the L = 10 levels, 10 steps per level (paper: 100), eps = 8e-5
    # (its 2e-5 for [0, 1] data, x 4 for [-1, 1]: configs/experiment/ncsn_cifar10.yaml)
    "ncsn": {"name": "annealed_langevin", "steps": None, "options": {"step_size": 8e-5, "steps_per_level": 10}},
    # Song et al. 2021: reverse-SDE predictor (Euler-Maruyama), no corrector, for VP and sub-VP
    "vp": {"name": "euler_maruyama", "steps": 100, "options": {"noise_scale": 1.0}},
    "subvp": {"name": "euler_maruyama", "steps": 100, "options": {"noise_scale": 1.0}},
    # Song et al. 2021: predictor-corrector for VE (reverse diffusion + one Langevin step, snr 0.16)
    "ve": {"name": "pc", "steps": 100, "options": {"predictor": "reverse_diffusion", "corrector_steps": 1,
                                                   "snr": 0.16}},
    # Karras et al. 2022: Heun, 18 steps
    "edm": {"name": "heun", "steps": 18, "options": {}},
    # Liu et al. 2023: adaptive RK45 on the ODE, tolerances 1e-5
    "rf": {"name": "rk45", "steps": None, "options": {"rtol": 1e-5, "atol": 1e-5}},
}
HEUN_STEPS = 18  # EDM Algorithm 1: 18 steps, 35 NFE, on each formulation's grid (NCSN's has only its L = 10 levels)
BPD = {"rtol": 1e-4, "atol": 1e-4}  # RK45 tolerances of the ODE bits/dim (score_sde: 1e-5)


def heun(formulation) -> dict:
    """EDM's Heun with 18 steps on ``formulation``'s grid, or on all its levels when it has fewer."""
    return {"name": "heun", "steps": min(HEUN_STEPS, formulation.max_sampling_steps or HEUN_STEPS), "options": {}}


def bits_per_dim(module, data, num_images: int) -> dict:
    """``{"bpd": ..., "nfe": ...}`` on ``num_images`` held-out digits, or ``{"bpd": None, "why": ...}`` when the
    likelihood refuses the formulation (NCSN's sigma_max = 1 is too small a prior for [-1, 1] data)."""
    try:
        result, protocol = split_bits_per_dim(module, data, split="test", num_images=num_images,
                                              batch_size=num_images, **BPD)
    except ValueError as err:
        return {"bpd": None, "why": str(err)}
    return {"bpd": result["bpd"], "nfe": protocol["nfe"]}


def training(budget: dict, name: str) -> list[str]:
    """The overrides of formulation ``name``'s run: the digits EDM recipe at the budget's steps and batch."""
    return ["experiment=edm_digits", f"formulation={name}", f"trainer.max_steps={budget['steps']}",
            f"data.batch_size={budget['batch']}"]


def evaluate(name: str, budget: dict, root: Path) -> dict:
    """Train ``formulation=name`` (cached) and score it: own sampler, Heun 35 NFE, bits/dim."""
    module, data = trained(name, training(budget, name), root)
    own = quality(module, data, OWN_SAMPLERS[name], num_samples=budget["num_images"])
    heun35 = quality(module, data, heun(module.formulation), num_samples=budget["num_images"])
    row = {"formulation": name, "own_sampler": OWN_SAMPLERS[name], "own": own, "heun35": heun35,
           **bits_per_dim(module, data, budget["bpd_images"])}
    print(f"{name:6s} own FD {own['fd']:.4g} (NFE {own['nfe']}), Heun FD {heun35['fd']:.4g} (NFE {heun35['nfe']}), "
          f"bpd {row['bpd']}", flush=True)
    return row


def results_table(rows: list[dict]) -> str:
    """formulation x (own sampler, its NFE, FD own, FD Heun-35, bits/dim)."""
    def sampler(s: dict) -> str:
        return s["name"] + "".join(f" {k}={v}" for k, v in s["options"].items() if k in ("variance", "predictor"))

    header = ["formulation", "own sampler", "NFE", "FD own", "KID own", "Heun NFE", "FD Heun", "KID Heun",
              "bits/dim"]
    return markdown_table(header, [
        [r["formulation"], sampler(r["own_sampler"]), r["own"]["nfe"], r["own"]["fd"], r["own"]["kid"],
         r["heun35"]["nfe"], r["heun35"]["fd"], r["heun35"]["kid"], "refused" if r["bpd"] is None else r["bpd"]]
        for r in rows])


def figure(rows: list[dict]):
    """Bars: FD with the own sampler and with Heun-35 per formulation (log y)."""
    names = [r["formulation"] for r in rows]
    x = torch.arange(len(rows)).tolist()
    fig, ax = plt.subplots(figsize=(8, 4))
    ax.bar([i - 0.2 for i in x], [r["own"]["fd"] for r in rows], width=0.4, label="own sampler")
    ax.bar([i + 0.2 for i in x], [r["heun35"]["fd"] for r in rows], width=0.4, label="EDM Heun, 35 NFE")
    ax.set(xticks=x, xticklabels=names, yscale="log", ylabel="FD (small classifier)",
           title="Eight formulations, equal training budget (digits 8x8)")
    ax.legend()
    return fig


def main() -> None:
    args = argument_parser(__doc__, "repro_formulations").parse_args()
    torch.manual_seed(0)
    out, budget = Path(args.out), BUDGET["quick" if args.quick else "full"]
    rows = [evaluate(name, budget, out / "runs") for name in FORMULATIONS]
    edm, data = trained("edm", training(budget, "edm"), out / "runs")
    fid = quality(edm, data, heun(edm.formulation), num_samples=budget["num_images"], inception=True)
    n = budget["num_images"]
    table = (f"Every formulation: the digits EDM recipe (experiment=edm_digits) for {budget['steps']} steps of batch "
             f"{budget['batch']}. FD and KID "
             f"in the small digits classifier's features, {n} samples (seeds 0..{n - 1}), lower is better; bits/dim: "
             f"probability-flow ODE on {budget['bpd_images']} held-out digits (RK45 rtol = atol = {BPD['rtol']:g}).\n\n"
             f"{results_table(rows)}\nInception FID of the EDM model's Heun-35 samples: {fid['fid']:.4g} "
             f"(small-classifier FD {fid['fd']:.4g}).\n")
    write_results(out, table, {"rows": rows, "inception_row": fid, "budget": budget, "bpd_settings": BPD},
                  {"fd_by_formulation.png": figure(rows)}, publish_to=None if args.quick else HERE)


if __name__ == "__main__":
    main()
