"""Progressive distillation on 8x8 digits (Salimans & Ho 2022): 64 -> 32 -> 16 -> 8 -> 4 DDIM steps.

Trains the digits EDM teacher (configs/experiment/edm_digits.yaml; cached by ``reproduction.trained``) unless
``--teacher CKPT`` is given, distils it with ``methods.distillation.ProgressiveDistillation`` and measures, per
round, the student's deterministic DDIM samples and the teacher's DDIM samples at the same step count on the same
seeds 0..N-1:

- ``fd``: Fréchet distance to the training digits in the small digits classifier's features (the reproductions'
  quality measure, ``metrics/small_classifier.py``; lower is better);
- ``rms_to_base``: RMS distance (model space [-1, 1]) to the teacher's 64-step DDIM samples from the same noise:
  how well the few-step sampler reproduces the many-step one;
- ``realistic``: share of samples at most as far from the nearest training digit as 95% of held-out real digits
  are (the realism check of experiments/edm_digits/check_digits.py; uniform noise scores 0%).

Writes ``table.md``, ``results.json`` and ``distillation.png`` into ``--out`` (and, without ``--quick``, copies them
next to this script).

Usage: ``python experiments/repro_distillation/run.py [--teacher CKPT] [--steps-per-round 400] [--out DIR] [--quick]``
"""

from __future__ import annotations

import functools
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytorch_lightning as pl  # noqa: E402
import torch  # noqa: E402
from matplotlib.ticker import NullLocator  # noqa: E402
from sklearn.model_selection import train_test_split  # noqa: E402
from sklearn.neighbors import NearestNeighbors  # noqa: E402

from lightning_diff.cli.reproduction import QUICK_TRAINING, argument_parser, markdown_table, trained, write_results  # noqa: E402
from lightning_diff.config import compose  # noqa: E402
from lightning_diff.data.digits import digits_uint8  # noqa: E402
from lightning_diff.data.transforms import to_uint8  # noqa: E402
from lightning_diff.evaluation import split_batch, split_view  # noqa: E402
from lightning_diff.evaluation.metrics import compute_metrics  # noqa: E402
from lightning_diff.evaluation.metrics.small_classifier import extractor_name  # noqa: E402
from lightning_diff.methods.distillation import ProgressiveDistillation  # noqa: E402
from lightning_diff.training.builders import build_datamodule, load_module  # noqa: E402

HERE = Path(__file__).resolve().parent
TEACHER = ["experiment=edm_digits"]
BASE_STEPS = 64  # the round-0 teacher's DDIM steps (Salimans & Ho: 1024 on CIFAR-10)


def realism():
    """``samples [N, 1, 8, 8] in [-1, 1] -> share`` (check_digits.py's nearest-neighbour test)."""
    x_int, labels = digits_uint8()
    x = x_int.numpy().reshape(len(x_int), -1) / 255.0
    x_tr, x_te = train_test_split(x, test_size=0.2, random_state=0, stratify=labels.numpy())
    neighbours = NearestNeighbors(n_neighbors=1).fit(x_tr)
    threshold = np.quantile(neighbours.kneighbors(x_te)[0][:, 0], 0.95)

    def share(samples: torch.Tensor) -> float:
        images = ((samples.clamp(-1, 1) + 1) * 127.5).round().reshape(len(samples), -1).numpy() / 255.0
        return float((neighbours.kneighbors(images)[0][:, 0] <= threshold).mean())

    return share


def small_classifier_fd(data):
    """``samples [N, *data_shape] in model space -> FD`` to ``data``'s training split in its small classifier's
    features (the samples rounded to uint8 as the metrics do)."""
    dataset, _, count = split_view(data, "train")
    reference = split_batch(dataset, data.transform, 0, count)[0]

    def fd(samples: torch.Tensor) -> float:
        return compute_metrics(to_uint8(samples, data.transform), reference, ["fid"],
                               feature_extractor=extractor_name(data.name), device="cpu")["fid"]

    return fd


def round_table(history: list[dict], base: dict) -> str:
    """One row per DDIM step count: the round-0 teacher at ``BASE_STEPS``, then each round's student and the
    teacher's own DDIM at the student's step count."""
    keys = ("fd", "rms_to_base", "realistic")
    header = ["DDIM steps", *(f"{who} {k}" for k in keys for who in ("student", "teacher"))]
    rows = [[f"{BASE_STEPS} (teacher)", *(v for k in keys for v in (base[k], base[k]))]]
    rows += [[r["steps"], *(r[f"{who}_{k}"] for k in keys for who in ("student", "teacher"))] for r in history]
    return markdown_table(header, rows)


def figure(history: list[dict], base: dict):
    """FD and RMS distance to the 64-step samples against DDIM steps: distilled student vs teacher DDIM."""
    steps = [r["steps"] for r in history]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    panels = (("fd", "FD, small classifier (lower better)", "log"),
              ("rms_to_base", f"RMS distance to the {BASE_STEPS}-step samples", "linear"))
    for ax, (key, label, yscale) in zip(axes, panels, strict=True):
        ax.plot(steps, [r[f"student_{key}"] for r in history], marker="o", label="distilled student (DDIM)")
        ax.plot(steps, [r[f"teacher_{key}"] for r in history], marker="s", label="teacher (DDIM)")
        ax.axhline(base[key], color="grey", linestyle=":", label=f"teacher, {BASE_STEPS} steps")
        ax.set_xscale("log", base=2)
        ax.set(yscale=yscale, xlabel="sampling steps", ylabel=label, xticks=steps, xticklabels=[str(s) for s in steps])
        ax.xaxis.set_minor_locator(NullLocator())
        ax.legend(fontsize=8)
    fig.suptitle("Progressive distillation on digits (Salimans & Ho 2022, Fig. 4's shape)")
    return fig


def main() -> None:
    parser = argument_parser(__doc__, "repro_distillation")
    parser.add_argument("--teacher", default=None, help="checkpoint of lightning-diff train (default: train one)")
    parser.add_argument("--steps-per-round", type=int, default=400)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--seeds", type=int, default=512)
    args = parser.parse_args()
    if args.quick:
        args.steps_per_round, args.rounds, args.seeds = 2, 2, 16
    out = Path(args.out)
    start = time.time()
    quick = list(QUICK_TRAINING) if args.quick else []
    if args.teacher is None:
        module, data = trained("teacher", [*TEACHER, *quick], out / "runs")
    else:
        module, data = load_module(args.teacher), build_datamodule(compose(["data=digits"], "train"))
    print(f"teacher ready ({time.time() - start:.0f} s)", flush=True)
    pl.seed_everything(0)
    share, fd = realism(), small_classifier_fd(data)
    distiller = ProgressiveDistillation(
        module.denoiser, functools.partial(torch.optim.Adam, lr=args.lr), steps=BASE_STEPS, rounds=args.rounds,
        steps_per_round=args.steps_per_round, data_shape=module.data_shape, quality_samples=args.seeds,
        quality=lambda samples: {"fd": fd(samples), "realistic": share(samples)})
    trainer = pl.Trainer(accelerator="cpu", max_steps=args.rounds * args.steps_per_round, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         limit_val_batches=0)
    trainer.fit(distiller, datamodule=data)
    samples = distiller.base_samples()
    base = {"fd": fd(samples), "rms_to_base": 0.0, "realistic": share(samples)}
    text = (f"EDM teacher on digits, distilled {args.rounds} rounds of {args.steps_per_round} Adam steps (lr "
            f"{args.lr}, batch {data.batch_size}); deterministic DDIM on {args.seeds} seeds. fd: Fréchet distance "
            f"in the small digits classifier's features (lower better); rms_to_base: RMS distance to the teacher's "
            f"{BASE_STEPS}-step samples; realistic: share of samples as close to a training digit as 95% of "
            f"held-out digits.\n\n{round_table(distiller.history, base)}")
    write_results(out, text, {"history": distiller.history, "teacher_base": base, "args": vars(args),
                              "teacher": args.teacher or TEACHER},
                  {"distillation.png": figure(distiller.history, base)}, publish_to=None if args.quick else HERE)
    print(f"done in {time.time() - start:.0f} s wall")


if __name__ == "__main__":
    main()
