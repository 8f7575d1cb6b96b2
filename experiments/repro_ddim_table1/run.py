"""DDIM's Table 1 (Song, Meng & Ermon 2021) at toy scale on 8x8 digits: sample quality against steps S and eta.

One DDPM (``formulation=ddpm``: linear betas 1e-4..0.02, T = 1000, eps prediction; edm_digits' tiny U-Net at half
width, trained with iDDPM's hybrid loss so that repro_likelihood can reuse it: its mean is trained by L_simple
alone) is sampled on strided grids of S in {10, 20, 50, 100} steps (the formulation's trailing spacing) by

- DDIM (eq. 12) with eta in {0, 0.2, 0.5, 1}: sigma_t(eta) = eta sqrt((1 - a_{t-1}) / (1 - a_t))
  sqrt(1 - a_t / a_{t-1}) (eq. 16; ``sampler=ddim``), eta = 1 being DDPM's posterior variance beta-tilde;
- DDPM with DDIM's sigma-hat_t = sqrt(1 - a_t / a_{t-1}) (Sec. 5.1, ``a`` = alpha-bar): the beta of the strided
  step, i.e. Ho et al.'s larger variance (``sampler=ddpm``, ``variance=fixed_large``, beta re-derived on the
  strided grid).

Quality: Fréchet distance (FD) and KID in the small digits classifier's features against the training digits
(``lightning_diff.cli.reproduction.quality``), the same seeds for every setting; Inception FID, with the small FD of
the same images, on the sigma-hat row (the row whose quality changes most with S) from fewer samples (Inception
on 299x299 upsamples is the CPU's most expensive step).

Usage: ``python experiments/repro_ddim_table1/run.py [--out DIR] [--models DIR] [--quick]``
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from lightning_diff.cli.reproduction import (
    DIGITS_DDPM,
    argument_parser,
    digits_ddpm,
    markdown_table,
    quality,
    write_results,
)

HERE = Path(__file__).resolve().parent
ETAS = (0.0, 0.2, 0.5, 1.0)
SIGMA_HAT = "sigma-hat"
# DDIM Table 1's rows, top to bottom: label -> (sampler name, options).
ROWS = {**{f"eta={eta:g}": ("ddim", {"eta": eta}) for eta in ETAS}, SIGMA_HAT: ("ddpm", {"variance": "fixed_large"})}
STEPS = (10, 20, 50, 100)  # DDIM Table 1's columns S (dim(tau))
NUM_IMAGES = 1000  # samples per cell (seeds 0..999)
INCEPTION_ROW, INCEPTION_IMAGES = SIGMA_HAT, 250  # the row also scored by Inception FID, on fewer samples


def sampler(row: str, steps: int) -> dict:
    """The ``configs/sampler`` node of a table row (a key of ``ROWS``) at ``steps`` steps."""
    name, options = ROWS[row]
    return {"name": name, "steps": steps, "options": options}


def tables(scores: dict[str, dict[int, dict]], inception: dict[int, dict], inception_images: int) -> str:
    """FD and KID tables (rows: the samplers of ``scores`` in order, columns: S), and the Inception check.

    ``scores``: row -> steps -> ``{"fd", "kid", ...}``; ``inception``: steps -> ``{"fid", "fd", ...}`` of the
    ``INCEPTION_ROW`` sampler on ``inception_images`` samples."""
    steps = sorted({s for by_steps in scores.values() for s in by_steps})
    header = ["sampler", *(f"S={s}" for s in steps)]
    fd = markdown_table(header, [[row, *(by_steps[s]["fd"] for s in steps)] for row, by_steps in scores.items()])
    kid = markdown_table(header, [[row, *(by_steps[s]["kid"] for s in steps)]
                                  for row, by_steps in scores.items()])
    check = markdown_table(header, [[f"{INCEPTION_ROW}, {metric}", *(inception[s][key] for s in steps)]
                                    for metric, key in (("Inception FID", "fid"), ("FD", "fd"))])
    return (f"FD (small digits classifier's features; lower is better):\n\n{fd}\n"
            f"KID (same features):\n\n{kid}\nInception FID and small-classifier FD of the same "
            f"{inception_images} samples of the {INCEPTION_ROW} "
            f"row (both should rank the columns alike):\n\n{check}")


def figure(scores: dict[str, dict[int, dict]]):
    """FD against S (log-log), one line per row."""
    fig, ax = plt.subplots(figsize=(5.5, 4))
    for row, by_steps in scores.items():
        steps = sorted(by_steps)
        ax.plot(steps, [by_steps[s]["fd"] for s in steps], marker="o", label=row,
                linestyle="--" if row == SIGMA_HAT else "-")
    ax.set(xscale="log", yscale="log", xlabel="S (sampling steps)", ylabel="FD (small digits classifier)",
           title="DDIM Table 1's shape: DDPM on 8x8 digits")
    ax.set_xticks(sorted({s for by_steps in scores.values() for s in by_steps}), minor=False)
    ax.get_xaxis().set_major_formatter(plt.ScalarFormatter())
    ax.legend()
    return fig


def main() -> None:
    args = argument_parser(__doc__, "repro_ddim_table1", models=True).parse_args()
    torch.manual_seed(0)
    out = Path(args.out)
    steps, num_images, inception_images = ((2, 3), 16, 16) if args.quick else (STEPS, NUM_IMAGES, INCEPTION_IMAGES)
    module, data = digits_ddpm(args.models, quick=args.quick)
    scores = {}
    for row in ROWS:
        scores[row] = {}
        for s in steps:
            scores[row][s] = quality(module, data, sampler(row, s), num_samples=num_images)
            print(f"{row:10s} S={s:3d} FD={scores[row][s]['fd']:.4g} KID={scores[row][s]['kid']:.4g}", flush=True)
    inception = {s: quality(module, data, sampler(INCEPTION_ROW, s), num_samples=inception_images, inception=True)
                 for s in steps}
    table = (f"DDPM (linear betas, T=1000) on 8x8 digits, {num_images} samples (seeds 0..{num_images - 1}) per "
             f"cell against the 1,617 training digits.\n\n{tables(scores, inception, inception_images)}")
    record = {"model": list(DIGITS_DDPM), "num_images": num_images, "samplers": ROWS,
              "scores": {row: {str(s): v for s, v in by_steps.items()} for row, by_steps in scores.items()},
              "inception_row": INCEPTION_ROW, "inception_images": inception_images,
              "inception": {str(s): v for s, v in inception.items()}}
    write_results(out, table, record, {"fd_vs_steps.png": figure(scores)},
                  publish_to=None if args.quick else HERE)


if __name__ == "__main__":
    main()
