"""Optimised step schedules on 8x8 digits: tuned grids against EDM's time steps at NFE 5, 7 and 10 for Euler,
DPM-Solver++(2M) and UniPC (docs/tune_steps.md).

The model is edm_digits' (configs/experiment/edm_digits.yaml: the 0.7M-parameter U-Net, 2,000 steps): ``--ckpt``,
else the same recipe trained from scratch once into ``--out/runs`` (``reproduction.trained``, reused by a rerun).
For each sampler and NFE, ``tune_grid`` (what ``lightning-diff tune-steps`` runs, with its model record) tunes the
grid on the tuning seeds 10^6 .. 10^6 + 63 from EDM's time steps (rho 7) and writes the grid file; the model is then
sampled on that file (``sampler.time_steps={file: ...}``) and on EDM's time steps on the held-out seeds 0 .. N-1:
Fréchet distance (``fd``) and KID in the small digits classifier's features (``reproduction.quality``, a record
beside the model's checkpoint each), with the endpoint error against the Heun reference on the file's own 64
held-out seeds (10^6 + 64 ..).

Writes ``table.md``, ``results.json``, ``tune_steps.png`` and ``grids/<sampler>-nfe<N>.json`` into ``--out`` (and,
without ``--quick``, copies them next to this script).

Usage: ``python experiments/tune_steps/run.py [--num-samples 1024] [--max-evals 120] [--ckpt PATH] [--out DIR]
[--quick]``
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from lightning_diff.cli.reproduction import (  # noqa: E402
    argument_parser,
    edm_digits_model,
    markdown_table,
    quality,
    write_results,
)
from lightning_diff.cli.tune_steps import model_record, module_sampler  # noqa: E402
from lightning_diff.sampling import SamplerSettings  # noqa: E402
from lightning_diff.sampling.grid_file import write_grid_file  # noqa: E402
from lightning_diff.sampling.tuned_grid import REFERENCE_SAMPLER, tune_grid  # noqa: E402

HERE = Path(__file__).resolve().parent
SAMPLERS = ("euler", "dpmpp_2m", "unipc")
NFES = (5, 7, 10)
TUNING_SEED, NUM_SEEDS = 1_000_000, 64  # tune-steps' defaults: apart from the held-out seeds 0 .. N-1


def reference_cached(sample):
    """``sample`` with the reference solves remembered: every tuning shares them (same seeds, same grid)."""
    cache = {}

    def cached(settings, seeds):
        if settings.name != REFERENCE_SAMPLER:
            return sample(settings, seeds)
        key = (tuple(settings.time_steps["sigmas"]), tuple(seeds))
        if key not in cache:
            cache[key] = sample(settings, seeds)
        return cache[key]

    return cached


def table(rows: list[dict]) -> str:
    header = ["sampler", "NFE", "fd EDM rho 7", "fd tuned", "kid EDM rho 7", "kid tuned", "endpoint MSE EDM rho 7",
              "endpoint MSE tuned", "evaluations", "tuned sigmas"]
    body = [[r["sampler"], r["nfe"], r["karras"]["fd"], r["tuned"]["fd"], r["karras"]["kid"], r["tuned"]["kid"],
             r["loss"]["heldout"]["initial"], r["loss"]["heldout"]["tuned"], r["evaluations"],
             ", ".join(f"{s:.3g}" for s in r["sigmas"][1:-1])] for r in rows]
    return markdown_table(header, body)


def figure(rows: list[dict]):
    """FD against NFE per sampler (tuned and EDM's time steps), and the grids at the largest NFE."""
    fig, axes = plt.subplots(1, len(SAMPLERS) + 1, figsize=(4 * (len(SAMPLERS) + 1), 3.6))
    for ax, name in zip(axes, SAMPLERS, strict=False):
        mine = [r for r in rows if r["sampler"] == name]
        nfes = [r["nfe"] for r in mine]
        ax.plot(nfes, [r["karras"]["fd"] for r in mine], marker="o", label="EDM time steps, rho 7")
        ax.plot(nfes, [r["tuned"]["fd"] for r in mine], marker="s", label="tuned (tune-steps)")
        ax.set(title=name, xlabel="NFE", ylabel="FD, small classifier (lower better)", xticks=nfes)
        ax.legend(fontsize=8)
    last = axes[-1]
    largest = max(r["nfe"] for r in rows)
    for r in (r for r in rows if r["nfe"] == largest):
        last.plot(range(len(r["sigmas"]) - 1), r["sigmas"][:-1], marker="s", label=f"tuned, {r['sampler']}")
    karras = next(r for r in rows if r["nfe"] == largest)["initial"]
    last.plot(range(len(karras) - 1), karras[:-1], marker="o", color="black", label="EDM time steps, rho 7")
    last.set(yscale="log", xlabel="step i", ylabel="sigma_i (the last step goes to 0)", title=f"grids at NFE {largest}")
    last.legend(fontsize=8)
    fig.suptitle("Optimised step schedules on digits (LD3's objective, Tong et al. 2025)")
    return fig


def main() -> None:
    parser = argument_parser(__doc__, "tune_steps")
    parser.add_argument("--num-samples", type=int, default=1024, help="held-out samples per grid (seeds 0..N-1)")
    parser.add_argument("--max-evals", type=int, default=120, help="evaluations of the objective per tuning")
    parser.add_argument("--ckpt", default=None, help="the model (default: the edm_digits recipe, trained here)")
    args = parser.parse_args()
    quick = args.quick
    num_samples, max_evals = (32, 4) if quick else (args.num_samples, args.max_evals)
    nfes, seeds = ((3,), 4) if quick else (NFES, NUM_SEEDS)
    start, out = time.time(), Path(args.out)
    module, data, ckpt = edm_digits_model(args.ckpt, Path(args.out) / "runs", quick=args.quick)
    print(f"model {ckpt} ready ({time.time() - start:.0f} s)", flush=True)
    sample, record, rows = reference_cached(module_sampler(module)), model_record(module, ckpt), []
    formulation = module.formulation
    for name in SAMPLERS:
        for nfe in nfes:
            content = tune_grid(sample, SamplerSettings(name=name), nfe, formulation=formulation,
                                seeds=range(TUNING_SEED, TUNING_SEED + seeds),
                                heldout_seeds=range(TUNING_SEED + seeds, TUNING_SEED + 2 * seeds), max_evals=max_evals)
            path = out / "grids" / f"{name}-nfe{nfe}.json"
            path.parent.mkdir(parents=True, exist_ok=True)
            content = write_grid_file(path, {**content, "model": record})
            edm = {"name": name, "steps": content["steps"], "options": {},
                   "time_steps": {k: content["initial"][k] for k in ("sigma_min", "sigma_max", "rho")}}
            scores = {grid: quality(module, data, sampler, num_samples=num_samples) for grid, sampler in
                      (("karras", edm), ("tuned", {"name": name, "options": {}, "time_steps": {"file": str(path)}}))}
            rows.append({"sampler": name, "nfe": nfe, **scores, "loss": content["loss"], "sigmas": content["sigmas"],
                         "initial": content["initial"]["sigmas"], "evaluations": content["method"]["evaluations"],
                         "reference_steps": content["method"]["reference"]["steps"], "key": content["key"]})
            print(f"{name} NFE {nfe}: fd {scores['karras']['fd']:.4g} -> {scores['tuned']['fd']:.4g}, endpoint MSE "
                  f"{content['loss']['heldout']['initial']:.3g} -> {content['loss']['heldout']['tuned']:.3g} "
                  f"({time.time() - start:.0f} s)", flush=True)
    text = (f"The digits EDM model of experiment=edm_digits ({ckpt}); grids tuned on {seeds} tuning seeds with "
            f"{max_evals} "
            f"evaluations of the objective each (Heun reference, {rows[0]['reference_steps']} steps), scored on "
            f"held-out seeds 0..{num_samples - 1}: fd, Fréchet distance, and kid, kernel distance, in the small digits "
            f"classifier's features (lower better), and the endpoint MSE against the reference on {seeds} other "
            f"held-out seeds.\n\n{table(rows)}")
    write_results(out, text, {"rows": rows, "args": vars(args), "model": record, "wall_time_s": time.time() - start},
                  {"tune_steps.png": figure(rows)}, publish_to=None if quick else HERE)
    if not quick:
        shutil.copytree(out / "grids", HERE / "grids", dirs_exist_ok=True)
    print(f"done in {time.time() - start:.0f} s wall")


if __name__ == "__main__":
    main()
