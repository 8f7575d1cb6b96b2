"""Training throughput: ``DiffusionModule`` under Lightning vs a plain PyTorch loop, and the cost of EMA.

Same process, backbone, data loader, optimiser and batch for every variant; each variant runs
``--repeats`` times interleaved and the median steps/s over the timed steps (after ``--warmup``) is
reported. Then the EMA update alone: ``EMA``'s fused update (cached lists, one ``_foreach_lerp_`` per
dtype group) against ``AveragedModel.update_parameters`` (the update it replaced), interleaved, on the
case's backbone and on EDM's DDPM++ CIFAR-10 network (56M parameters).
Clock: ``--clock cpu`` (default) or ``wall`` (``benchmarks/clock.py``).
Usage: ``OMP_NUM_THREADS=1 python benchmarks/training.py [--case toy2d|digits] [--quick] [--clock cpu|wall]``.
"""

from __future__ import annotations

import argparse
import statistics
import time

import clock
import pytorch_lightning as pl
import torch

from lightning_diff import formulations
from lightning_diff.callbacks import EMA, FixedDecay
from lightning_diff.config import compose
from lightning_diff.data import DigitsDataModule, Toy2DDataModule
from lightning_diff.networks import MLP, TinyUNet
from lightning_diff.training.builders import build_network
from lightning_diff.training.module import DiffusionModule

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
            start = clock.now()
        x, _ = next(batches)
        loss = module.denoiser.loss(x)[0].mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return steps / (clock.now() - start)


class _Clock(pl.Callback):
    def __init__(self, warmup: int):
        self.warmup, self.start, self.end = warmup, None, None

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        if trainer.global_step == self.warmup and self.start is None:
            self.start = clock.now()

    def on_train_end(self, trainer, module):
        self.end = clock.now()


def lightning_loop(case: str, steps: int, warmup: int, ema: bool) -> float:
    """Steps/s of ``Trainer.fit`` (no logger, checkpoints, progress bar or validation: the loop itself)."""
    timer = _Clock(warmup)
    callbacks = [timer] + ([EMA()] if ema else [])
    trainer = pl.Trainer(accelerator="cpu", max_steps=warmup + steps, logger=False, callbacks=callbacks,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         limit_val_batches=0)
    trainer.fit(_module(case), CASES[case][0]())
    return steps / (timer.end - timer.start)


def ema_update_ms(network: torch.nn.Module, repeats: int, calls: int) -> tuple[float, float]:
    """Median milliseconds of one EMA update: (``AveragedModel.update_parameters``, ``EMA``'s fused update),
    the two timed interleaved on the same weights; the averages stay bit-identical (checked)."""
    from torch.optim.swa_utils import AveragedModel

    ema = EMA(FixedDecay(0.999))
    ema.beta = 0.999
    ema._average_model = AveragedModel(network, use_buffers=False, multi_avg_fn=ema._lerp)
    old = AveragedModel(network, use_buffers=False, multi_avg_fn=ema._lerp)
    old.update_parameters(network), ema._average_model.update_parameters(network)  # initial copies
    times: dict[str, list[float]] = {"old": [], "fused": []}
    for _ in range(repeats):
        for name, update in (("old", lambda: old.update_parameters(network)),
                             ("fused", lambda: ema._update(network))):
            start = clock.now()
            for _ in range(calls):
                update()
            times[name].append(1000 * (clock.now() - start) / calls)
    for a, b in zip(old.module.state_dict().values(), ema._average_model.module.state_dict().values(), strict=True):
        assert torch.equal(a, b), "fused EMA update differs from AveragedModel's"
    return statistics.median(times["old"]), statistics.median(times["fused"])


def ddpmpp_cifar10() -> torch.nn.Module:
    """EDM's DDPM++ CIFAR-10 backbone, as ``experiment=edm_cifar10_uncond_vp`` builds it (3x32x32, no classes)."""
    cfg = compose(["experiment=edm_cifar10_uncond_vp", "paths.output_dir=unused"])
    return build_network(cfg, (3, 32, 32), num_classes=0, conditional=False)


def compile_speedup(case: str, steps: int, repeats: int, fullgraph: bool = True) -> None:
    """``module.compile``: seconds of the first compiled training step (the compile time) and the median step
    time eager vs compiled, interleaved, on the same batch (a synthetic in-memory batch: no loader)."""
    eager = _module(case)
    compiled = DiffusionModule(CASES[case][1](), formulations.get("edm"),
                               compile="fullgraph" if fullgraph else True)
    compiled.load_state_dict(eager.state_dict())
    x = next(iter(CASES[case][0]().train_dataloader()))[0]

    def step(module):
        module.zero_grad(set_to_none=True)
        module.denoiser.loss(x)[0].mean().backward()

    start = time.perf_counter()  # wall time: inductor compiles in worker processes that the CPU clock misses
    step(compiled)
    compile_s = time.perf_counter() - start
    times: dict[str, list[float]] = {"eager": [], "compiled": []}
    for _ in range(repeats):
        for name, module in (("eager", eager), ("compiled", compiled)):
            start = clock.now()
            for _ in range(steps):
                step(module)
            times[name].append(1000 * (clock.now() - start) / steps)
    t_eager, t_compiled = statistics.median(times["eager"]), statistics.median(times["compiled"])
    print(f"torch.compile ({case}, fullgraph={fullgraph}): compile (first step) {compile_s:.1f} s wall; "
          f"forward+backward eager {t_eager:.2f} ms, compiled {t_compiled:.2f} ms ({t_eager / t_compiled:.2f}x)")


def loader_vs_memory(case: str, steps: int, repeats: int) -> None:
    """Training steps/s of the plain loop fed by the real data loader vs one batch held in memory."""
    module = _module(case)
    optimizer = module.configure_optimizers()
    loader = _infinite(CASES[case][0]().train_dataloader())
    x_fixed = next(loader)[0]

    def run(from_loader: bool) -> float:
        start = clock.now()
        for _ in range(steps):
            x = next(loader)[0] if from_loader else x_fixed
            loss = module.denoiser.loss(x)[0].mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        return steps / (clock.now() - start)

    rates: dict[str, list[float]] = {"loader": [], "memory": []}
    for _ in range(repeats):
        rates["loader"].append(run(True))
        rates["memory"].append(run(False))
    loader_rate, memory_rate = statistics.median(rates["loader"]), statistics.median(rates["memory"])
    print(f"data loading ({case}): real loader {loader_rate:.1f} steps/s, in-memory batch {memory_rate:.1f} "
          f"steps/s ({loader_rate / memory_rate:.3f})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--case", choices=sorted(CASES), default="toy2d")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--warmup", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="a smoke run: few steps, no 56M network")
    parser.add_argument("--compile", action="store_true", help="also time module.compile (minutes on a CPU)")
    clock.add_argument(parser)
    args = parser.parse_args()
    args.clock = clock.use(args.clock)
    if args.quick:
        args.steps, args.warmup, args.repeats = 10, 2, 1
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
          f"threads={torch.get_num_threads()} clock={args.clock}")
    print(f"| {'variant':<20} | steps/s | ms/step | vs plain |")
    print(f"|{'-' * 22}|---------|---------|----------|")
    for name, rate in median.items():
        print(f"| {name:<20} | {rate:7.1f} | {1000 / rate:7.2f} | {rate / plain:8.3f} |")
    ema_ms = 1000 / median["Lightning + EMA"] - 1000 / median["Lightning, no EMA"]
    print(f"EMA cost: {ema_ms:.3f} ms per optimizer step")
    networks = {args.case: _module(args.case)}
    if not args.quick:
        networks["ddpmpp_cifar10"] = ddpmpp_cifar10()
    for name, network in networks.items():
        n_params = sum(p.numel() for p in network.parameters())
        old_ms, fused_ms = ema_update_ms(network, args.repeats, 5 if args.quick else 50)
        print(f"EMA update, {name} ({n_params / 1e6:.2f}M parameters): AveragedModel {old_ms:.3f} ms, "
              f"fused {fused_ms:.3f} ms ({old_ms / fused_ms:.2f}x); bit-identical")
    loader_vs_memory(args.case, args.steps, args.repeats)
    if args.compile:
        compile_speedup(args.case, max(args.steps // 10, 2), args.repeats)


if __name__ == "__main__":
    main()
