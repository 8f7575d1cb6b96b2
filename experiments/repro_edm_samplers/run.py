"""EDM's sampler study (Karras et al. 2022, Figure 2 / Table 2 and Figure 4) at toy scale on 8x8 digits.

Two models of the digits EDM recipe (configs/experiment/edm_digits.yaml): one EDM-trained, one VP-trained
(``formulation=vp``). Each is sampled by Euler, EDM's Heun, DDIM (eta = 0) and DPM-Solver++(2M) at several step
counts on the model's own grid; the VP model also by EDM Figure 2's ablation chain: Euler and Heun in VP's own
``sigma(t), s(t)`` (``sampler=ablation``: Euler there is VP's original deterministic sampler) and EDM's Heun on EDM's
time steps (eq. 5, rho = 7 between sigma 0.002 and 80, Table 1). Then the stochastic Heun (Algorithm 2) of the EDM
model at 35 NFE against S_churn (Figure 4's shape). Quality: Fréchet distance (FD) and KID in the small digits
classifier's features (``lightning_diff.cli.reproduction.quality``), the same seeds for every setting.

Usage: ``python experiments/repro_edm_samplers/run.py [--out DIR] [--quick]``
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from lightning_diff.cli.reproduction import (  # noqa: E402
    QUICK_TRAINING,
    argument_parser,
    markdown_table,
    quality,
    trained,
    write_results,
)

HERE = Path(__file__).resolve().parent
MODELS = {"edm": ["experiment=edm_digits"], "vp": ["experiment=edm_digits", "formulation=vp"]}
EDM_STEPS = {"sigma_min": 0.002, "sigma_max": 80.0, "rho": 7.0}  # EDM Table 1, "Ours" column

# Curves: label -> (sampler name, options, on EDM's time steps?).
CURVES = {
    "euler": ("euler", {}, False),
    "heun": ("heun", {}, False),
    "ddim": ("ddim", {"eta": 0.0}, False),
    "dpmpp_2m": ("dpmpp_2m", {}, False),
    "euler, own s(t), sigma(t)": ("ablation", {"solver": "euler"}, False),
    "heun, own s(t), sigma(t)": ("ablation", {"solver": "heun"}, False),
    "heun, EDM time steps": ("heun", {}, True),
}
# On the EDM model the formulation's own s(t) = 1, sigma(t) = t and time steps are EDM's: the last three are "heun".
MODEL_CURVES = {"edm": ["euler", "heun", "ddim", "dpmpp_2m"], "vp": list(CURVES)}
CHURN = [0.0, 0.5, 1.0, 2.0, 4.0, 8.0]  # gamma_i = min(S_churn / N, sqrt(2) - 1): 8 / 18 is past the cap


def curve_steps(curve: str, heun_steps: int) -> int:
    """Steps of ``curve`` at the NFE of Heun with ``heun_steps`` steps, 2N - 1 (EDM Algorithm 1: the last step to
    sigma = 0 is an Euler step): N for Heun's method, 2N - 1 for the first-order and multistep solvers."""
    name, options, _ = CURVES[curve]
    second_order = name == "heun" or (name == "ablation" and options.get("solver", "heun") == "heun")
    return heun_steps if second_order else 2 * heun_steps - 1


def sweep(module, data, curve: str, heun_steps, num_images: int) -> list[dict]:
    """FD/KID of one curve at the NFE of Heun with each of ``heun_steps`` steps (``curve_steps``):
    ``[{"curve", "steps", "nfe", "fd", "kid", "kid_std"}]``."""
    name, options, edm_steps = CURVES[curve]
    rows = []
    for n in heun_steps:
        steps = curve_steps(curve, n)
        sampler = {"name": name, "steps": steps, "options": options}
        scores = quality(module, data, {**sampler, "time_steps": EDM_STEPS} if edm_steps else sampler,
                         num_samples=num_images)
        rows.append({"curve": curve, "steps": steps, **scores})
        print(f"{curve:28s} N={steps:3d} NFE={rows[-1]['nfe']:3d} FD={scores['fd']:.4g}", flush=True)
    return rows


def churn_sweep(module, data, steps: int, num_images: int) -> list[dict]:
    """EDM Algorithm 2 (stochastic Heun, S_noise = 1, churn on all levels) at ``steps`` steps vs S_churn."""
    rows = []
    for churn in CHURN:
        scores = quality(module, data, {"name": "heun", "steps": steps, "options": {"S_churn": churn}},
                         num_samples=num_images)
        rows.append({"S_churn": churn, "steps": steps, **scores})
        print(f"S_churn={churn:5g} FD={scores['fd']:.4g}", flush=True)
    return rows


def sampler_table(results: dict) -> str:
    """One row per (model, curve): FD at each NFE of the sweep."""
    nfes = sorted({r["nfe"] for rows in results.values() for r in rows})
    header = ["model", "sampler", *(f"FD @ NFE {n}" for n in nfes)]
    body = []
    for model, rows in results.items():
        for curve in MODEL_CURVES[model]:
            body.append([model, curve, *(r["fd"] for r in rows if r["curve"] == curve)])
    return markdown_table(header, body)


def figure(results: dict, churn: list[dict]):
    """FD vs NFE (log x) per model, and FD vs S_churn."""
    fig, axes = plt.subplots(1, len(results) + 1, figsize=(5 * (len(results) + 1), 4))
    for ax, (model, rows) in zip(axes, results.items(), strict=False):
        for curve in MODEL_CURVES[model]:
            points = [(r["nfe"], r["fd"]) for r in rows if r["curve"] == curve]
            style = {"marker": "x", "ls": "--"} if curve == "ddim" else {"marker": "o"}  # ddim (eta 0) = euler
            ax.plot(*zip(*points, strict=True), label=curve, **style)
        ax.set(xscale="log", yscale="log", xlabel="NFE", ylabel="FD (small classifier)", title=f"{model}-trained")
        ax.legend(fontsize=7)
    ax = axes[-1]
    ax.plot([r["S_churn"] for r in churn], [r["fd"] for r in churn], marker="o")
    ax.set_xscale("symlog", linthresh=0.5)
    ax.set(xticks=[r["S_churn"] for r in churn], xticklabels=[f"{r['S_churn']:g}" for r in churn],
           xlabel="S_churn", ylabel="FD (small classifier)",
           title=f"EDM model, stochastic Heun, NFE {churn[0]['nfe']}")
    return fig


def main() -> None:
    args = argument_parser(__doc__, "repro_edm_samplers").parse_args()
    torch.manual_seed(0)
    out = Path(args.out)
    quick = list(QUICK_TRAINING) if args.quick else []
    heun_steps, churn_steps = ([2], 2) if args.quick else ([3, 5, 9, 17], 18)
    num_images = 16 if args.quick else 500
    results, modules = {}, {}
    for model, overrides in MODELS.items():
        module, data = trained(model, [*overrides, *quick], out / "runs")
        modules[model] = (module, data)
        results[model] = [row for curve in MODEL_CURVES[model]
                          for row in sweep(module, data, curve, heun_steps, num_images)]
    churn = churn_sweep(*modules["edm"], churn_steps, num_images)
    fid = quality(*modules["edm"], {"name": "heun", "steps": churn_steps}, num_samples=num_images, inception=True)
    churn_table = markdown_table(["S_churn", "NFE", "FD", "KID"],
                                 [[r["S_churn"], r["nfe"], r["fd"], r["kid"]] for r in churn])
    table = (f"FD in the small digits classifier's features, {num_images} samples (seeds 0..{num_images - 1}), "
             f"lower is better.\n\n{sampler_table(results)}\nStochastic Heun (EDM Algorithm 2) of the EDM model, "
             f"{churn_steps} steps:\n\n{churn_table}\nInception FID of the EDM model's Heun {churn_steps} steps "
             f"(S_churn 0): {fid['fid']:.4g} (small-classifier FD {fid['fd']:.4g}).\n")
    write_results(out, table, {"samplers": results, "churn": churn, "inception_row": fid, "num_images": num_images},
                  {"fd_vs_nfe.png": figure(results, churn)}, publish_to=None if args.quick else HERE)


if __name__ == "__main__":
    main()
