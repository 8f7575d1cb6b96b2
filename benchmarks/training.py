"""Training throughput: ``DiffusionModule`` under Lightning vs a plain PyTorch loop, and the cost of EMA.

Same process, backbone, data loader, optimiser and batch for every variant; each variant runs
``--repeats`` times interleaved and the median steps/s over the timed steps (after ``--warmup``) is
reported. Usage: ``OMP_NUM_THREADS=1 python benchmarks/training.py [--case toy2d|digits]``.
"""

from __future__ import annotations

import argparse
import statistics
import time

import pytorch_lightning as pl
import torch

from lightning_diff import formulations
from lightning_diff.callbacks import EMA
from lightning_diff.data import DigitsDataModule, Toy2DDataModule
from lightning_diff.module import DiffusionModule
from lightning_diff.networks import MLP, TinyUNet

CASES = {  # name -> (data module, backbone); small enough for a shared CPU
    "toy2d": (lambda: Toy2DDataModule(num_samples=20_000, batch_size=256),
              lambda: MLP(dim=2, hidden=128, depth=3)),
    "digits": (lambda: DigitsDataModule(batch_size=64),
               lambda: TinyUNet(in_channels=1, model_channels=16, channel_mult=(1, 2), num_blocks=1)),
}


def _module(case: str) -> DiffusionModule:
    torch.manual_seed(0)
    return DiffusionModule(CASES[case][1](), formulations.get("edm"),
                           optimizer=lambda params: torch.optim.Adam(params, lr=1e-3))


def _infinite(loader):
    while True:
        yield from loader


def plain_loop(case: str, steps: int, warmup: int) -> float:
    """Steps/s of the textbook loop over the same ``Denoiser.loss``."""
    module, data = _module(case), CASES[case][0]()
    optimizer = module.configure_optimizers()
    batches = _infinite(data.train_dataloader())
    for step in range(warmup + steps):
        if step == warmup:
            start = time.perf_counter()
        x, _ = next(batches)
        loss = module.denoiser.loss(x)[0].mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return steps / (time.perf_counter() - start)


class _Clock(pl.Callback):
    def __init__(self, warmup: int):
        self.warmup, self.start, self.end = warmup, None, None

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        if trainer.global_step == self.warmup and self.start is None:
            self.start = time.perf_counter()

    def on_train_end(self, trainer, module):
        self.end = time.perf_counter()


def lightning_loop(case: str, steps: int, warmup: int, ema: bool) -> float:
    """Steps/s of ``Trainer.fit`` (no logger, checkpoints, progress bar or validation: the loop itself)."""
    clock = _Clock(warmup)
    callbacks = [clock] + ([EMA()] if ema else [])
    trainer = pl.Trainer(accelerator="cpu", max_steps=warmup + steps, logger=False, callbacks=callbacks,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         limit_val_batches=0)
    trainer.fit(_module(case), CASES[case][0]())
    return steps / (clock.end - clock.start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--case", choices=sorted(CASES), default="toy2d")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--warmup", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    variants = {"plain PyTorch loop": lambda: plain_loop(args.case, args.steps, args.warmup),
                "Lightning, no EMA": lambda: lightning_loop(args.case, args.steps, args.warmup, ema=False),
                "Lightning + EMA": lambda: lightning_loop(args.case, args.steps, args.warmup, ema=True)}
    rates = {name: [] for name in variants}
    for _ in range(args.repeats):
        for name, run in variants.items():
            rates[name].append(run())
    median = {name: statistics.median(values) for name, values in rates.items()}
    plain = median["plain PyTorch loop"]
    print(f"case={args.case} steps={args.steps} warmup={args.warmup} repeats={args.repeats} "
          f"threads={torch.get_num_threads()}")
    print(f"| {'variant':<20} | steps/s | ms/step | vs plain |")
    print(f"|{'-' * 22}|---------|---------|----------|")
    for name, rate in median.items():
        print(f"| {name:<20} | {rate:7.1f} | {1000 / rate:7.2f} | {rate / plain:8.3f} |")
    ema_ms = 1000 / median["Lightning + EMA"] - 1000 / median["Lightning, no EMA"]
    print(f"EMA cost: {ema_ms:.3f} ms per optimizer step")


if __name__ == "__main__":
    main()
