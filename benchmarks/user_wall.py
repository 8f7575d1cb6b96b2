"""What a new user waits for, in wall seconds on this machine's cores: ``make demo`` once installed (the training
command and the digit check), the README's CPU ``evaluate`` of that checkpoint the first time (reference statistics
cached by ``make install``'s ``lightning-diff reference``, timed separately) and a second time, each a fresh process.

    .venv/bin/python benchmarks/user_wall.py [--quick]

Prints each time against its target (issue 24: demo <= 150 s, first evaluate <= 90 s, later <= 60 s) as a ratio
``time / target`` (<= 1 meets it). The children run with every core (``OMP_NUM_THREADS`` unset), as a user's
commands do, in a temporary run folder and cache; ``--quick`` is a smoke run (20 training steps, 16 samples).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TARGETS = {"demo": 150.0, "first evaluate": 90.0, "later evaluate": 60.0}  # seconds (issue 24)


def timed(args: list[str], env: dict) -> float:
    """Wall seconds of ``python args`` run from the repository root (its output echoed on failure)."""
    start = time.perf_counter()
    done = subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        print(done.stdout[-2000:], done.stderr[-3000:], file=sys.stderr)
        raise SystemExit(f"{' '.join(args[:3])} failed (exit {done.returncode})")
    print(done.stdout.strip().splitlines()[-1] if done.stdout.strip() else "", flush=True)
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="20 training steps, 16 samples: a smoke run")
    args = parser.parse_args()
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}  # every core, as a user's command
    with tempfile.TemporaryDirectory() as tmp:
        env.update(LIGHTNING_DIFF_CACHE=str(Path(tmp) / "cache"), WANDB_MODE="offline", WANDB_DIR=tmp)
        run = Path(tmp) / "demo"
        quick_train = ["trainer.max_steps=20"] if args.quick else []
        quick_eval = ["metrics.num_samples=16", "metrics.kid.subset_size=8"] if args.quick else \
            ["metrics.num_samples=256", "metrics.kid.subset_size=100"]
        quick_ref = ["metrics.reference_num_images=32"] if args.quick else []
        times = {"demo": timed(["-m", "lightning_diff", "train", "experiment=edm_digits_fast",
                                f"hydra.run.dir={run}",
                                *quick_train], env)}
        times["demo"] += timed(["experiments/edm_digits/check_digits.py", str(run / "samples.npz")], env)
        reference = timed(["-m", "lightning_diff", "reference", "data=digits", "progress=false", *quick_ref], env)
        evaluate = ["-m", "lightning_diff", "evaluate", f"ckpt={run / 'checkpoints' / 'last.ckpt'}",
                    "metrics=[fid,kid]", *quick_eval, *quick_ref, "progress=false", "wandb=false"]
        times["first evaluate"] = timed([*evaluate, "name=first"], env)
        times["later evaluate"] = timed([*evaluate, "name=later"], env)
    print(f"reference statistics of the digits (make install): {reference:.1f} s")
    for what, seconds in times.items():
        print(f"{what} wall: {seconds:.1f} s, target {TARGETS[what]:.0f} s: {seconds / TARGETS[what]:.2f}x")


if __name__ == "__main__":
    main()
