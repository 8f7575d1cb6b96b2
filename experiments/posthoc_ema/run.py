"""Post-hoc EMA on 8x8 digits (Karras et al. 2024, Sec. 3): sample quality against the EMA length from one run.

Trains the digits EDM recipe (configs/experiment/edm_digits.yaml, 2,000 steps) at half width once with
``callbacks/posthoc_ema=edm2`` (profiles sigma_rel 0.05 and 0.10, a snapshot every 25 steps: 80; cached by
``reproduction.trained``), builds the EMA of each length in ``SIGMA_RELS`` at the final step with
``lightning-diff posthoc-ema``'s function, and measures each with the demo's sampler (deterministic Heun, 18 steps,
35 NFE) on seeds 0..N-1: Fréchet distance (``fd``) and KID in the small digits classifier's features
(``metrics/small_classifier.py``), as the other reproductions do. The run's own EMA (EDM's half-life with ramp-up,
the demo's) is measured beside them.

Writes ``table.md``, ``results.json`` and ``posthoc_ema.png`` into ``--out`` (and, without ``--quick``, copies them
next to this script); each measurement is also a record beside the run's checkpoint (``lightning-diff leaderboard``
shows its ``sigma_rel`` in the options column).

Usage: ``python experiments/posthoc_ema/run.py [--num-samples 1024] [--out DIR] [--quick]``
"""

from __future__ import annotations

import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from lightning_diff.cli.posthoc_ema import posthoc_ema  # noqa: E402
from lightning_diff.cli.reproduction import (  # noqa: E402
    QUICK_TRAINING,
    argument_parser,
    markdown_table,
    quality,
    trained,
    write_results,
)
from lightning_diff.training.builders import load_module  # noqa: E402

HERE = Path(__file__).resolve().parent
SIGMA_RELS = (0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.2, 0.25)  # EDM2 Fig. 5's range, the tracked two inside
# The digits EDM recipe (2,000 steps) at half width (16 channels, 0.18M parameters): what fits the shared 2-core CPU
MODEL = ["experiment=edm_digits", "network.model_channels=16", "callbacks/posthoc_ema=edm2",
         "callbacks.posthoc_ema.every_n_steps=25"]
SAMPLER = {"name": "heun", "steps": 18, "options": {}}  # the demo's: EDM Algorithm 1, 35 NFE


def table(rows: list[dict], own: dict) -> str:
    """One row per sigma_rel (the best FD marked) and the run's own EMA."""
    best = min(rows, key=lambda r: r["fd"])
    header = ["sigma_rel", "gamma", "profile fit error", "coefficient sum", "fd", "kid", "kid std"]
    body = [[f"**{r['sigma_rel']:g} (best)**" if r is best else f"{r['sigma_rel']:g}", r["gamma"], r["fit_error"],
             f"{r['coefficient_sum']:.6f}", r["fd"], r["kid"], r["kid_std"]] for r in rows]
    body.append(["run's own EMA (EDM half-life)", "", "", "", own["fd"], own["kid"], own["kid_std"]])
    return markdown_table(header, body)


def figure(rows: list[dict], own: dict, tracked: list[float]):
    """FD against sigma_rel with the best marked, the run's own EMA and the tracked lengths; the fit error."""
    sigma_rels, fds = [r["sigma_rel"] for r in rows], [r["fd"] for r in rows]
    best = min(rows, key=lambda r: r["fd"])
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    left.plot(sigma_rels, fds, marker="o", label="post-hoc EMA, one run")
    left.plot([best["sigma_rel"]], [best["fd"]], marker="*", markersize=16, color="tab:red", linestyle="none",
              label=f"best: sigma_rel {best['sigma_rel']:g}, FD {best['fd']:.3g}")
    left.axhline(own["fd"], color="grey", linestyle=":", label=f"the run's own EMA (EDM half-life), FD {own['fd']:.3g}")
    for value in tracked:
        left.axvline(value, color="tab:green", alpha=0.3, linewidth=3)
    left.set(xscale="log", xlabel="EMA length sigma_rel (tracked: green)", ylabel="FD, small classifier (lower better)")
    left.legend(fontsize=8)
    fitted = [r for r in rows if r["fit_error"] > 1e-9]  # the tracked lengths are exact (0): off a log axis
    right.plot([r["sigma_rel"] for r in fitted], [r["fit_error"] for r in fitted], marker="o")
    for value in tracked:
        right.axvline(value, color="tab:green", alpha=0.3, linewidth=3)
    right.set(xscale="log", yscale="log", xlabel="sigma_rel (tracked, exact: green)",
              ylabel="relative L2 error of the profile fit")
    fig.suptitle("Post-hoc EMA on digits (Karras et al. 2024, Sec. 3 / Fig. 5's shape)")
    return fig


def main() -> None:
    parser = argument_parser(__doc__, "posthoc_ema")
    parser.add_argument("--num-samples", type=int, default=1024, help="samples per EMA length (seeds 0..N-1)")
    args = parser.parse_args()
    quick = [*QUICK_TRAINING, "callbacks.posthoc_ema.every_n_steps=1"] if args.quick else []
    num_samples = 32 if args.quick else args.num_samples
    start, out = time.time(), Path(args.out)
    module, data = trained("edm_digits_posthoc_ema" + ("_quick" if args.quick else ""), [*MODEL, *quick],
                           out / "runs")
    print(f"model ready ({time.time() - start:.0f} s)", flush=True)
    snapshots = Path(module.run_config["paths"]["output_dir"]) / "posthoc_ema"
    rows = []
    for record in posthoc_ema(snapshots, SIGMA_RELS, out=out / "posthoc"):
        scores = quality(load_module(record["checkpoint"]), data, SAMPLER, num_samples=num_samples)
        rows.append({**record, **scores})
        print(f"sigma_rel {record['sigma_rel']:g}: fd {scores['fd']:.4g} ({time.time() - start:.0f} s)", flush=True)
    own = quality(module, data, SAMPLER, num_samples=num_samples)
    tracked = rows[0]["tracked"]
    config = module.run_config
    text = (f"The digits EDM recipe (experiment=edm_digits) at {config['network']['model_channels']} channels "
            f"({config['trainer']['max_steps']} steps of batch {data.batch_size}), post-hoc EMA from "
            f"{rows[0]['snapshots']} snapshots of sigma_rel {tracked} at step {rows[0]['step']}; deterministic Heun, "
            f"18 steps, on {num_samples} seeds. fd: Fréchet distance in the small digits classifier's features "
            "(lower better); profile fit error: relative L2 error of the least-squares profile (Appendix C.3).\n\n"
            f"{table(rows, own)}")
    write_results(out, text, {"rows": [{k: v for k, v in r.items() if k != "checkpoint"} for r in rows],
                              "own_ema": own, "args": vars(args), "model": [*MODEL, *quick],
                              "wall_time_s": time.time() - start},
                  {"posthoc_ema.png": figure(rows, own, tracked)}, publish_to=None if args.quick else HERE)
    print(f"done in {time.time() - start:.0f} s wall")


if __name__ == "__main__":
    main()
