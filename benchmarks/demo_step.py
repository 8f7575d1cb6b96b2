"""The demo's training step: ``experiment=edm_digits_fast`` (what ``make demo`` trains) against ``edm_digits`` (the
demo before, the experiments' shared recipe), and each of the fast preset's changes alone.

Every variant is one full optimizer step of the composed preset (the objective's loss with the backbone under the
run's precision, backward, the optimizer's step) on the same batch of 128 training digits, in this process, the
variants interleaved ``--repeats`` times; the median ms per step of ``--steps`` steps after ``--warmup``. The
bf16 rows only mean something on a CPU with bf16 units (printed first): elsewhere the preset resolves to fp32.
Clock: ``--clock cpu`` (default) or ``wall`` (``benchmarks/clock.py``).
Usage: ``OMP_NUM_THREADS=1 python benchmarks/demo_step.py [--quick] [--clock cpu|wall]``.
"""

from __future__ import annotations

import argparse
import statistics
from collections.abc import Callable

import clock
import hydra
import torch

from lightning_diff.config import compose, cpu_has_native_bf16
from lightning_diff.training.builders import build_datamodule, build_module

# name -> overrides; the first is the baseline, the last the demo's preset
VARIANTS = {
    "edm_digits (fp32, Adam, 32/64 channels)": ["experiment=edm_digits"],
    "+ bf16 autocast": ["experiment=edm_digits", "trainer.precision=bf16-mixed"],
    "+ fused Adam": ["experiment=edm_digits", "+optimizer.fused=true"],
    "+ 32/32 channels": ["experiment=edm_digits", "network.channel_mult=[1,1]"],
    "edm_digits_fast (all three)": ["experiment=edm_digits_fast"],
}


def training_step(overrides: list[str]) -> Callable[[], None]:
    """One optimizer step of the composed run on a fixed batch of its training data."""
    cfg = compose([*overrides, "paths.output_dir=unused"])
    data = build_datamodule(cfg)
    data.setup("fit")
    torch.manual_seed(0)
    module = build_module(cfg, data)
    x, labels, _ = module._split(next(iter(data.train_dataloader())))
    optimizer = hydra.utils.instantiate(cfg.optimizer)(module.parameters())
    bf16 = cfg.trainer.precision == "bf16-mixed"

    def step() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):  # Lightning's CPU bf16-mixed
            loss, _ = module.objective(module.denoiser, x, labels)
        loss.mean().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="2 steps, 1 repeat: a smoke run")
    clock.add_argument(parser)
    args = parser.parse_args()
    if args.quick:
        args.steps, args.warmup, args.repeats = 2, 1, 1
    fast_precision = compose(["experiment=edm_digits_fast"]).trainer.precision
    print(f"clock: {clock.use(args.clock)}, threads: {torch.get_num_threads()}, CPU bf16 units: "
          f"{cpu_has_native_bf16()} (edm_digits_fast resolves to {fast_precision})")
    steps = {name: training_step(overrides) for name, overrides in VARIANTS.items()}
    for step in steps.values():
        for _ in range(args.warmup):
            step()
    times = {name: [] for name in steps}
    for _ in range(args.repeats):
        for name, step in steps.items():
            start = clock.now()
            for _ in range(args.steps):
                step()
            times[name].append((clock.now() - start) / args.steps * 1000)
    base = statistics.median(times[next(iter(times))])
    for name, ms in times.items():
        median = statistics.median(ms)
        print(f"demo step, {name}: {median:.1f} ms (spread {(max(ms) - min(ms)) / median:.0%}), "
              f"speed-up vs edm_digits {base / median:.2f}x")


if __name__ == "__main__":
    main()
