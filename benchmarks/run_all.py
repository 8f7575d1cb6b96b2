"""``make bench``: run every performance benchmark in turn and print one table of ratios against the
reference tools' baselines (benchmarks/README.md records a run with its machine).

Each benchmark runs as its own process (its full output is echoed); the ratios are read from the lines it
prints. ``--quick`` passes ``--quick`` to each (a smoke run: the numbers mean nothing). A full run then compares each
ratio with its committed value (``committed.json``) and exits non-zero, naming the rows, when one has fallen more
than 10% below it (for a ``<=`` target, a time ratio: risen more than 10% above it).
Run: ``OMP_NUM_THREADS=1 .venv/bin/python benchmarks/run_all.py [--quick] [--compile]``.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
TOLERANCE = 0.10  # a ratio may fall this fraction below its committed value before make bench fails
X = r"([0-9.]+)x"
# benchmark -> [(what, regex with the ratio as group 1, target)]
ROWS = {
    "training.py": [
        ("EMA update, fused vs AveragedModel (toy2d)", r"EMA update, toy2d .*\(" + X, ">= 1"),
        ("EMA update, fused vs AveragedModel (DDPM++ 56M)", r"EMA update, ddpmpp_cifar10 .*\(" + X, ">= 1"),
        ("Lightning + EMA vs plain loop (toy2d steps/s)", r"\| Lightning \+ EMA .*\| +([0-9.]+) \|$", ">= 0.97"),
        ("Lightning, no EMA vs plain loop", r"\| Lightning, no EMA .*\| +([0-9.]+) \|$", "-"),
        ("real loader vs in-memory batch (steps/s)", r"data loading .*\(([0-9.]+)\)", ">= 0.95"),
        ("torch.compile step speed-up", r"torch.compile .*\(" + X, "report"),
    ],
    "demo_step.py": [
        ("demo step, edm_digits_fast vs edm_digits (one thread)", r"^demo step, edm_digits_fast .* " + X, ">= 1.5"),
        ("demo step, bf16 autocast vs fp32 (CPU with bf16 units)", r"^demo step, \+ bf16 autocast: .* " + X, ">= 1"),
    ],
    "user_wall.py": [
        ("make demo wall / 150 s (every core)", r"^demo wall: .*: " + X, "<= 1"),
        ("first evaluate wall / 90 s (every core)", r"^first evaluate wall: .*: " + X, "<= 1"),
        ("later evaluate wall / 60 s (every core)", r"^later evaluate wall: .*: " + X, "<= 1"),
    ],
    "cli_help.py": [("lightning-diff <command> --help vs the module's own (wall)", r"geometric mean .*: " + X, ">= 5")],
    "metrics.py": [("FID throughput vs torch-fidelity calculate_metrics", r"^FID on .*ratio " + X, ">= 1.5"),
                   ("Inception features vs torch-fidelity (32x32 RGB)", r"^Inception features, .* RGB .*ratio " + X,
                    ">= 1.5"),
                   ("Inception features vs torch-fidelity (8x8 grey)", r"^Inception features, .* grey .*ratio " + X,
                    ">= 1.5")],
    "sampling_speed.py": [
        ("heun float64 (default) vs k-diffusion sample_heun", r"ours heun, float64 state \(default\) .* " + X, ">= 1"),
        ("heun float32 vs k-diffusion sample_heun", r"ours heun, float32 state .* " + X, ">= 1"),
        ("DiffusionModule.sample vs k-diffusion sample_heun", r"ours DiffusionModule.sample .* " + X, ">= 1"),
        ("ddim float64 (default) vs diffusers DDIMPipeline", r"ours ddim, float64 state \(default\) .* " + X, ">= 1"),
        ("ddim float32 vs diffusers DDIMPipeline", r"ours ddim, float32 state .* " + X, ">= 1"),
        ("CFG run / two unguided runs (time)", r"CFG cost: " + X, "<= 1.05"),
    ],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--compile", action="store_true", help="also time module.compile (minutes on a CPU)")
    args = parser.parse_args()
    table = []
    for script, rows in ROWS.items():
        extra = (["--quick"] if args.quick else []) + (["--compile"] if args.compile and script == "training.py"
                                                         else [])
        print(f"=== {script} {' '.join(extra)}", flush=True)
        done = subprocess.run([sys.executable, str(HERE / script), *extra], capture_output=True, text=True)
        print(done.stdout, flush=True)
        if done.returncode != 0:
            print(done.stderr[-3000:], file=sys.stderr)
            raise SystemExit(f"{script} failed (exit {done.returncode})")
        for what, pattern, target in rows:
            found = re.search(pattern, done.stdout, re.MULTILINE)
            table.append((script, what, found.group(1) if found else "not run", target))
    print("| benchmark | measure | ratio | target |\n|---|---|---|---|")
    for row in table:
        print("| " + " | ".join(row) + " |")
    if not args.quick and (worse := regressions(table, json.loads((HERE / "committed.json").read_text()))):
        raise SystemExit("ratios more than 10% worse than their committed values (benchmarks/committed.json):\n"
                         + "\n".join(worse))


def regressions(table: list[tuple[str, str, str, str]], committed: dict[str, float]) -> list[str]:
    """The rows of ``table`` (script, measure, ratio, target) whose ratio is more than ``TOLERANCE`` worse than
    ``committed[measure]``: lower for a speed-up (``>=`` targets), higher for a time ratio (``<=`` targets)."""
    worse = []
    for _, what, ratio, target in table:
        if what not in committed or ratio == "not run":
            continue
        value, reference = float(ratio), committed[what]
        bad = value > reference / (1 - TOLERANCE) if target.startswith("<=") else value < reference * (1 - TOLERANCE)
        if bad:
            worse.append(f"{what}: {value:g} against {reference:g} committed (target {target})")
    return worse


if __name__ == "__main__":
    main()
