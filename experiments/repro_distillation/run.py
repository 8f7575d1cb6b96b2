"""Progressive distillation on 8x8 digits (Salimans & Ho 2022): 64 -> 32 -> 16 -> 8 -> 4 DDIM steps.

Trains the demo's EDM teacher (configs/experiment/edm_digits.yaml) unless ``--teacher CKPT`` is given, distils it
with ``lightning_diff.distillation.ProgressiveDistillation`` and prints, per round, the student's quality and the
teacher's DDIM quality at the same step count (a Markdown table, pasted into README.md):

- ``rms_to_base``: RMS distance (model space [-1, 1]) of the samples to the teacher's 64-step DDIM samples from the
  same noise (seeds 0..N-1): how well the few-step sampler reproduces the many-step one.
- ``realistic``: share of samples at most as far from the nearest training digit as 95% of held-out real digits
  are (the realism check of experiments/edm_digits/check_digits.py; uniform noise scores 0%).

Usage: ``python experiments/repro_distillation/run.py [--teacher CKPT] [--steps-per-round 400] [--out DIR]``
"""

from __future__ import annotations

import argparse
import functools
import json
import time
from pathlib import Path

import numpy as np
import pytorch_lightning as pl
import torch
from sklearn.model_selection import train_test_split
from sklearn.neighbors import NearestNeighbors

from lightning_diff.builders import build_datamodule, load_module
from lightning_diff.config import compose
from lightning_diff.data.digits import digits_uint8
from lightning_diff.distillation import ProgressiveDistillation
from lightning_diff.train import train


def realism():
    """``samples [N, 1, 8, 8] in [-1, 1] -> {"realistic": share}`` (check_digits.py's nearest-neighbour test)."""
    x_int, labels = digits_uint8()
    x = x_int.numpy().reshape(len(x_int), -1) / 255.0
    x_tr, x_te = train_test_split(x, test_size=0.2, random_state=0, stratify=labels.numpy())
    neighbours = NearestNeighbors(n_neighbors=1).fit(x_tr)
    threshold = np.quantile(neighbours.kneighbors(x_te)[0][:, 0], 0.95)

    def quality(samples: torch.Tensor) -> dict:
        images = ((samples.clamp(-1, 1) + 1) * 127.5).round().reshape(len(samples), -1).numpy() / 255.0
        return {"realistic": float((neighbours.kneighbors(images)[0][:, 0] <= threshold).mean())}

    return quality


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher", default=None, help="checkpoint of lightning-diff train (default: train one)")
    parser.add_argument("--steps-per-round", type=int, default=400)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--seeds", type=int, default=512)
    parser.add_argument("--out", default="outputs/repro_distillation")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.time()
    if args.teacher is None:
        cfg = compose(["experiment=edm_digits", "logger=csv", "callbacks.sample_grid=null", "trainer=cpu",
                       "callbacks.progress=null", "++trainer.enable_progress_bar=false",
                       f"paths.output_dir={out / 'teacher'}"], "train")
        args.teacher = train(cfg)["checkpoint"]
    print(f"teacher: {args.teacher} ({time.time() - start:.0f} s)")
    module = load_module(args.teacher)
    data = build_datamodule(compose(["data=digits"], "train"))
    distiller = ProgressiveDistillation(module.denoiser, functools.partial(torch.optim.Adam, lr=args.lr), steps=64,
                                        rounds=args.rounds, steps_per_round=args.steps_per_round,
                                        data_shape=module.data_shape, quality_seeds=args.seeds, quality=realism())
    trainer = pl.Trainer(accelerator="cpu", max_steps=args.rounds * args.steps_per_round, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         limit_val_batches=0)
    trainer.fit(distiller, datamodule=data)
    teacher64 = realism()(distiller.ddim_samples(distiller.reference, distiller.grids[0], range(args.seeds)))
    rows = ["| DDIM steps | student rms_to_base | teacher rms_to_base | student realistic | teacher realistic |",
            "|---|---|---|---|---|",
            f"| 64 (teacher) | 0 | 0 | {teacher64['realistic']:.1%} | {teacher64['realistic']:.1%} |"]
    for r in distiller.history:
        rows.append(f"| {r['steps']} | {r['student_rms_to_base']:.4f} | {r['teacher_rms_to_base']:.4f} | "
                    f"{r['student_realistic']:.1%} | {r['teacher_realistic']:.1%} |")
    table = "\n".join(rows)
    print(table)
    (out / "history.json").write_text(json.dumps({"history": distiller.history, "teacher": str(args.teacher),
                                                  "teacher_64": teacher64, "args": vars(args),
                                                  "seconds": time.time() - start}, indent=1))
    (out / "table.md").write_text(table + "\n")


if __name__ == "__main__":
    main()
