"""Autoguidance and guidance intervals on 8x8 digits (Karras et al. 2024; Kynkäänniemi et al. 2024) at toy scale.

One class-conditional model of the digits EDM recipe (repro_guidance's: configs/experiment/edm_digits.yaml with
``module.conditional=true``, label dropout 0.1) trained for ``TRAIN_STEPS`` steps, whose run keeps a checkpoint every
``WEAK_STEP`` steps; the weaker model of autoguidance is its checkpoint at step ``WEAK_STEP`` (the same run, a quarter
of the training). Each row
samples the same seeds (asked class ``seed % 10``) with EDM's deterministic Heun at a matched budget of network passes
(``BUDGET_STEPS`` guided steps: NFE 2 (2 N - 1)); a row whose evaluations cost less (no guidance; an interval) gets the
step count whose NFE is closest to the budget without passing it. Per row:

- fidelity: the share of samples the small digits classifier reads as the asked class (repro_guidance's
  ``class_accuracy``);
- quality and diversity: Fréchet distance (FD) and KID to the training digits in that classifier's features
  (``lightning_diff.cli.reproduction.quality``, which also writes each row's leaderboard record), lower is better.

Usage: ``python experiments/autoguidance/run.py [--out DIR] [--quick]``
"""

from __future__ import annotations

import dataclasses
import importlib.util
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from lightning_diff import sampling  # noqa: E402
from lightning_diff.cli.reproduction import (  # noqa: E402
    QUICK_TRAINING,
    argument_parser,
    markdown_table,
    quality,
    trained,
    write_results,
)
from lightning_diff.data.transforms import to_uint8  # noqa: E402
from lightning_diff.evaluation import generate  # noqa: E402
from lightning_diff.evaluation.generate import load_guidance  # noqa: E402
from lightning_diff.sampling import Guidance  # noqa: E402

HERE = Path(__file__).resolve().parent
TRAIN_STEPS = 600  # edm_digits' 2,000 steps cut to fit 15 minutes of the shared 2-core CPU with the evaluation
WEAK_STEP = 150  # the weaker model: the same run's checkpoint at this step (a quarter of the training)
NUM_SAMPLES = 400  # samples per row (seeds 0..399, 40 per asked class)
QUICK_WEAK_STEP = 2  # --quick: of QUICK_TRAINING's 4 steps
BUDGET_STEPS = 10  # guided Heun steps of the matched budget: NFE 2 (2 * 10 - 1) = 38
INTERVAL = (0.28, 5.42)  # Kynkäänniemi et al. 2024's interval for EDM2-S: guided where 0.28 < sigma <= 5.42
SCALES = (1.25, 1.5, 2.0)  # gamma of the guided rows (EDM2's autoguidance and CFG-with-interval optima are about 2)
METHODS = [  # (name, guidance.kind, guidance.interval); autoguidance's ckpt: the run's WEAK_STEP checkpoint
    ("CFG", "cfg", None),
    ("CFG, interval", "cfg", INTERVAL),
    ("autoguidance", "autoguidance", None),
    ("autoguidance, interval", "autoguidance", INTERVAL),
]
ROWS = [("no guidance", "cfg", 1.0, None)] + [(name, kind, gamma, interval) for name, kind, interval in METHODS
                                              for gamma in SCALES]  # (name, kind, gamma, interval)


def _repro_guidance():
    """experiments/repro_guidance/run.py (its model recipe, small classifier and class accuracy), a sibling script."""
    spec = importlib.util.spec_from_file_location("repro_guidance", HERE.parent / "repro_guidance" / "run.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class _Free:
    """A denoiser that costs nothing (D = 0), with a null label: what ``nfe`` runs the sampler on."""

    null_label = 0

    def __call__(self, x, sigma, labels=None):
        return torch.zeros_like(x)


def nfe(steps: int, guidance: Guidance, formulation) -> int:
    """Network passes per sample of Heun with ``steps`` steps on ``formulation``'s grid under ``guidance``, as the
    sampler counts them (``sampling.core.network_passes``): 2 per guided evaluation, 1 outside the interval."""
    free = _Free()
    guided = dataclasses.replace(guidance, weak=free).wrap(free)
    stats, sigmas = {}, formulation.sampling_sigmas(steps)
    sampling.heun(guided, torch.zeros(1, 1, dtype=torch.float64), sigmas, cond={"labels": torch.tensor([1])},
                  stats=stats)
    return stats["nfe"]


def matched_steps(guidance: Guidance, formulation, budget: int, max_steps: int = 64) -> int:
    """The Heun step count whose NFE under ``guidance`` is the largest not above ``budget``."""
    fitting = [s for s in range(2, max_steps + 1) if nfe(s, guidance, formulation) <= budget]
    return max(fitting)


def weak_checkpoint(run_dir: Path, step: int) -> str:
    """The run's checkpoint at ``step`` (``callbacks.checkpoint`` keeps one per ``every_n_train_steps``)."""
    matches = sorted((run_dir / "checkpoints").glob(f"step*{step:07d}.ckpt"))
    if not matches:
        raise FileNotFoundError(f"no checkpoint of step {step} in {run_dir / 'checkpoints'}: the run must keep its "
                                "periodic checkpoints (callbacks.checkpoint.save_top_k=-1)")
    return str(matches[0])


def evaluate_rows(module, data, weak: str, num_samples: int, repro) -> list[dict]:
    """One row per ``ROWS`` entry: its steps at the matched NFE, the measured NFE, class accuracy, FD and KID on
    seeds ``0 .. num_samples - 1``."""
    classifier, _ = repro.load_small_classifier()
    budget = nfe(BUDGET_STEPS, Guidance(scale=2.0), module.formulation)  # any gamma != 1: 2 passes everywhere
    rows = []
    for name, kind, scale, interval in ROWS:
        guidance = load_guidance(Guidance(kind=kind, scale=scale, interval=interval,
                                          ckpt=weak if kind == "autoguidance" else None), module)
        sampler = {"name": "heun", "steps": matched_steps(guidance, module.formulation, budget)}
        scores = quality(module, data, sampler, num_samples=num_samples, guidance=guidance)
        samples, asked, stats = generate(module, range(num_samples), sampler=sampler, guidance=guidance,
                                         progress=False)
        accuracy = repro.class_accuracy(classifier, to_uint8(samples, data.transform), asked)
        rows.append({"name": name, "kind": guidance.kind, "scale": guidance.scale,
                     "interval": None if guidance.interval is None else list(guidance.interval),
                     "steps": sampler["steps"], "nfe": stats["nfe"], "budget": budget, "accuracy": accuracy,
                     **{k: scores[k] for k in ("fd", "kid", "kid_std")}})
        print(f"{name:24s} steps={sampler['steps']} NFE={stats['nfe']} accuracy={accuracy:.3f} "
              f"FD={scores['fd']:.4g} KID={scores['kid']:.4g}", flush=True)
    return rows


def table(rows: list[dict]) -> str:
    """One row per guidance setting."""
    def interval(r) -> str:
        return "all" if r["interval"] is None else f"({r['interval'][0]:g}, {r['interval'][1]:g}]"

    return markdown_table(["guidance", "gamma", "sigma interval", "Heun steps", "NFE", "class accuracy", "FD", "KID"],
                          [[r["name"], r["scale"], interval(r), r["steps"], r["nfe"], r["accuracy"], r["fd"], r["kid"]]
                           for r in rows])


def figure(rows: list[dict]):
    """FD (left) and class accuracy (right) against gamma, one line per guidance method (dashed: with the interval),
    the unguided model as a grey line."""
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    unguided = rows[0]
    for ax, key, label in ((left, "fd", "FD, small classifier (lower better)"),
                           (right, "accuracy", "class accuracy (higher better)")):
        ax.axhline(unguided[key], color="grey", lw=1, label=f"no guidance (NFE {unguided['nfe']})")
        for i, (name, _, interval) in enumerate(METHODS):
            mine = [r for r in rows[1:] if r["name"] == name]
            ax.plot([r["scale"] for r in mine], [r[key] for r in mine], marker="o", color=f"C{i // 2}",
                    ls="--" if interval else "-", label=f"{name} (NFE {mine[0]['nfe']})")
        ax.set(xlabel="guidance scale gamma (1 = none)", ylabel=label)
    left.legend(fontsize=8)
    fig.suptitle("CFG and autoguidance (an earlier checkpoint) on digits, with and without the interval "
                 f"({INTERVAL[0]:g}, {INTERVAL[1]:g}], at matched NFE")
    return fig


def main() -> None:
    args = argument_parser(__doc__, "autoguidance").parse_args()
    out = Path(args.out)
    repro = _repro_guidance()
    weak_step = QUICK_WEAK_STEP if args.quick else WEAK_STEP
    keep = ["callbacks.checkpoint.save_top_k=-1", f"callbacks.checkpoint.every_n_train_steps={weak_step}"]
    quick = list(QUICK_TRAINING) if args.quick else []
    num_samples = 16 if args.quick else NUM_SAMPLES
    model = [*repro.MODEL, f"trainer.max_steps={TRAIN_STEPS}", *keep]
    module, data = trained("cond_digits_snapshots", [*model, *quick], out / "runs")
    run_dir = Path(module.run_config["paths"]["output_dir"])
    weak = weak_checkpoint(run_dir, weak_step)
    rows = evaluate_rows(module, data, weak, num_samples, repro)
    text = (f"Class-conditional EDM model of the digits (label dropout {repro.LABEL_DROPOUT}, "
            f"{module.run_config['trainer']['max_steps']} steps); autoguidance's weaker model: the same run's "
            f"checkpoint at step {weak_step}. Deterministic Heun at a matched budget of {rows[0]['budget']} network "
            f"passes per sample (guided Heun {BUDGET_STEPS} steps), {num_samples} samples (seeds 0..{num_samples - 1}, "
            f"asked class seed % 10). Class accuracy: the small digits classifier; FD/KID in its features against the "
            f"training digits, lower is better.\n\n{table(rows)}")
    write_results(out, text, {"rows": rows, "num_samples": num_samples, "model": model,
                              "weak_step": weak_step, "interval": list(INTERVAL), "scales": list(SCALES)},
                  {"guidance.png": figure(rows)}, publish_to=None if args.quick else HERE)


if __name__ == "__main__":
    main()
