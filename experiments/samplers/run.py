"""The sampler set users know (k-diffusion's and diffusers' names) on one digits model: Fréchet distance against the
number of network evaluations (NFE 5, 9 and 19) for each sampler of docs/samplers.md that runs on EDM's time steps.

The model is the digits EDM recipe (configs/experiment/edm_digits.yaml: the 0.7M-parameter U-Net, 2,000 steps, EMA
weights): ``--ckpt``, else trained from scratch once into ``--out/runs`` (``reproduction.trained``, reused by a
rerun). Every sampler runs on the formulation's own grid (EDM's time steps, rho 7, sigma 80 -> 0.002, then 0) with the
step count that spends the budget: N steps for the one-evaluation samplers, (NFE + 1) / 2 for the two-evaluation ones
(their last step, to sigma = 0, is an Euler step). Quality: Fréchet distance (``fd``) and KID in the small digits
classifier's features on the held-out seeds 0 .. N-1 (``reproduction.quality``: one record each beside the model's
checkpoint); the stochastic samplers draw their noise per seed, so a rerun gives the same numbers.

Writes ``table.md``, ``results.json`` and ``samplers.png`` into ``--out`` (and, without ``--quick``, next to this
script).

Usage: ``python experiments/samplers/run.py [--ckpt PATH] [--num-samples 1024] [--out DIR] [--quick]``
"""

from __future__ import annotations

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

HERE = Path(__file__).resolve().parent
NFES = (5, 9, 19)
# label -> (sampler, options, network evaluations per step but the last); k-diffusion's and diffusers' defaults
SAMPLERS = {
    "euler": ("euler", {}, 1),
    "heun": ("heun", {}, 2),
    "dpmpp_2m": ("dpmpp_2m", {}, 1),
    "lms (order 4)": ("lms", {}, 1),
    "deis (order 2)": ("deis", {}, 1),
    "deis (order 3)": ("deis", {"order": 3}, 1),
    "unipc bh1 (order 2)": ("unipc", {"solver_type": "bh1"}, 1),
    "unipc bh2 (order 2)": ("unipc", {}, 1),
    "unipc bh2 (order 3)": ("unipc", {"order": 3}, 1),
    "dpm_2": ("dpm_2", {}, 2),
    "euler_ancestral": ("euler_ancestral", {}, 1),
    "dpm_2_ancestral": ("dpm_2_ancestral", {}, 2),
    "dpmpp_2s_ancestral": ("dpmpp_2s_ancestral", {}, 2),
    "dpmpp_sde": ("dpmpp_sde", {}, 2),
    "dpmpp_2m_sde": ("dpmpp_2m_sde", {}, 1),
    "dpmpp_3m_sde": ("dpmpp_3m_sde", {}, 1),
}
STOCHASTIC = {"euler_ancestral", "dpm_2_ancestral", "dpmpp_2s_ancestral", "dpmpp_sde", "dpmpp_2m_sde", "dpmpp_3m_sde"}


def steps_for(nfe: int, evaluations_per_step: int) -> int:
    """The step count whose NFE is ``nfe``: ``nfe`` one-evaluation steps, or ``(nfe + 1) / 2`` two-evaluation steps
    whose last (to sigma = 0) is an Euler step (NFE = 2N - 1)."""
    return nfe if evaluations_per_step == 1 else (nfe + 1) // 2


def table(rows: list[dict], nfes, num_samples: int, ckpt: str) -> str:
    """``table.md``: the setup in one line, then FD and KID per sampler and NFE."""
    header = ["sampler", "stochastic", *(f"fd NFE {n}" for n in nfes), *(f"kid NFE {n}" for n in nfes)]
    body = [[r["label"], "yes" if r["sampler"] in STOCHASTIC else "no", *(r["scores"][n]["fd"] for n in nfes),
             *(r["scores"][n]["kid"] for n in nfes)] for r in rows]
    return (f"EDM model on digits ({ckpt}), EMA weights, EDM's time steps (rho 7); {num_samples} samples on "
            f"held-out seeds 0..{num_samples - 1} per cell: fd, Fréchet distance, and kid, kernel distance, in the "
            f"small digits classifier's features (lower is better).\n\n{markdown_table(header, body)}")


def figure(rows: list[dict]):
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    for ax, stochastic in zip(axes, (False, True), strict=True):
        for row in rows:
            if (row["sampler"] in STOCHASTIC) == stochastic:
                points = sorted((r["nfe"], r["fd"]) for r in row["scores"].values())
                ax.plot(*zip(*points, strict=True), marker="o", label=row["label"])
        ax.set(xscale="log", yscale="log", xlabel="NFE", xticks=list(NFES), xticklabels=[str(n) for n in NFES],
               title="stochastic samplers" if stochastic else "deterministic (PF-ODE) samplers")
        ax.legend(fontsize=7)
    axes[0].set_ylabel("FD (small classifier), lower is better")
    return fig


def main() -> None:
    parser = argument_parser(__doc__, "samplers")
    parser.add_argument("--ckpt", default=None, help="the model (default: the edm_digits recipe, trained here)")
    parser.add_argument("--num-samples", type=int, default=1024, help="held-out samples per setting (seeds 0..N-1)")
    args = parser.parse_args()
    nfes, num_samples = ((3,), 16) if args.quick else (NFES, args.num_samples)
    start = time.time()
    module, data, ckpt = edm_digits_model(args.ckpt, Path(args.out) / "runs", quick=args.quick)
    print(f"model {ckpt} ready ({time.time() - start:.0f} s)", flush=True)
    rows = []
    for label, (name, options, per_step) in SAMPLERS.items():
        scores = {}
        for nfe in nfes:
            sampler = {"name": name, "steps": steps_for(nfe, per_step), "options": options}
            scores[nfe] = quality(module, data, sampler, num_samples=num_samples)
            if scores[nfe]["nfe"] != nfe:
                raise RuntimeError(f"{label}: {sampler['steps']} steps took NFE {scores[nfe]['nfe']}, not {nfe}")
        rows.append({"label": label, "sampler": name, "options": options, "scores": scores})
        print(f"{label}: fd " + ", ".join(f"{scores[n]['fd']:.4g} (NFE {n})" for n in nfes) +
              f" ({time.time() - start:.0f} s)", flush=True)
    text = table(rows, nfes, num_samples, ckpt)
    write_results(args.out, text, {"rows": rows, "args": vars(args), "ckpt": ckpt, "wall_time_s": time.time() - start},
                  {"samplers.png": figure(rows)}, publish_to=None if args.quick else HERE)
    print(f"done in {time.time() - start:.0f} s wall")


if __name__ == "__main__":
    main()
