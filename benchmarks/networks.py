"""Training cost of the backbones on this CPU, and what Lightning adds to it.

For each preset: milliseconds per image of one forward + backward of the backbone alone (plain PyTorch,
the EDM loss through ``Denoiser.loss``), then of a full training step (forward, backward, Adam) in a plain
PyTorch loop and in ``Trainer.fit`` of the project's ``DiffusionModule`` (timed from
``on_train_batch_start`` to ``on_train_batch_end``, so data loading and Trainer setup are excluded), and the
ratio Lightning / plain. Medians over ``--steps`` steps after ``--warmup`` steps; both loops run the same
network, data, formulation and optimizer in the same process.

Run: ``OMP_NUM_THREADS=1 .venv/bin/python benchmarks/networks.py`` (tiny presets, about a minute);
add ``--paper ddpmpp_cifar10 --skip-tiny --steps 3`` for a paper preset at batch 2 (seconds per step).
"""

from __future__ import annotations

import argparse
import copy
import functools
import logging
import statistics
import time
import warnings
from pathlib import Path

import hydra
import pytorch_lightning as pl
import torch
from omegaconf import OmegaConf

from lightning_diff import formulations
from lightning_diff.config import CONFIG_DIR
from lightning_diff.denoiser import Denoiser
from lightning_diff.training.module import DiffusionModule

CONFIGS = Path(CONFIG_DIR) / "network"
# preset -> data shape it runs on here (tiny presets take channels / resolution from the data)
TINY = {"mlp": (2,), "tiny_unet": (3, 16, 16), "ddpmpp_tiny": (3, 16, 16), "ncsnpp_tiny": (3, 16, 16),
        "adm_tiny": (3, 16, 16), "dit_tiny": (3, 16, 16)}
PAPER = {"ddpmpp_cifar10": (3, 32, 32), "ncsnpp_cifar10": (3, 32, 32), "adm_imagenet64": (3, 64, 64),
         "dit_s2": (4, 32, 32), "dit_b2": (4, 32, 32), "dit_l2": (4, 32, 32), "dit_xl2": (4, 32, 32)}
DATA_KEYS = {"in_channels": lambda s: s[0], "dim": lambda s: s[0], "resolution": lambda s: s[-1]}


def build(preset: str, shape: tuple[int, ...]) -> torch.nn.Module:
    cfg = OmegaConf.load(CONFIGS / f"{preset}.yaml")
    fill = {k: fn(shape) for k, fn in DATA_KEYS.items() if k in cfg and cfg[k] is None}
    if "num_classes" in cfg:
        fill["num_classes"] = 0  # unconditional: the same cost in both loops
    return hydra.utils.instantiate(cfg, **fill)


def time_plain(network, data, steps: int, warmup: int, optimize: bool) -> float:
    """Median seconds of one step (forward + backward [+ Adam]) in a plain PyTorch loop."""
    denoiser = Denoiser(network, formulations.get("edm")).train()
    opt = torch.optim.Adam(denoiser.parameters(), lr=1e-4)
    times = []
    for i in range(warmup + steps):
        start = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss = denoiser.loss(data[i % len(data)])[0].mean()
        loss.backward()
        if optimize:
            opt.step()
        times.append(time.perf_counter() - start)
    return statistics.median(times[warmup:])


class _StepTimer(pl.Callback):
    def __init__(self):
        self.times, self._start = [], 0.0

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        self.times.append(time.perf_counter() - self._start)


def time_lightning(network, data, steps: int, warmup: int) -> float:
    """Median seconds of one ``DiffusionModule`` training step under ``Trainer.fit``."""
    module = DiffusionModule(network, formulations.get("edm"),
                             optimizer=functools.partial(torch.optim.Adam, lr=1e-4))
    loader = torch.utils.data.DataLoader(torch.cat(data), batch_size=data[0].shape[0], shuffle=False)
    timer = _StepTimer()
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_steps=warmup + steps, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         callbacks=[timer], limit_val_batches=0, num_sanity_val_steps=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "few workers" / "no validation" advice
        trainer.fit(module, loader)
    return statistics.median(timer.times[warmup:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8, help="batch size for the tiny presets")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per measurement")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps before timing")
    parser.add_argument("--paper", nargs="*", default=[], choices=sorted(PAPER),
                        help="paper presets to add (batch 2)")
    parser.add_argument("--skip-tiny", action="store_true", help="time only the --paper presets")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    logging.getLogger("pytorch_lightning").setLevel(logging.WARNING)  # Trainer start-up banners

    rows = []
    runs = [] if args.skip_tiny else [(p, s, args.batch) for p, s in TINY.items()]
    runs += [(p, PAPER[p], 2) for p in args.paper]
    for preset, shape, batch in runs:
        torch.manual_seed(0)
        network = build(preset, shape)
        gen = torch.Generator().manual_seed(0)
        data = [torch.randn(batch, *shape, generator=gen) for _ in range(4)]
        n = args.steps
        fwd_bwd = time_plain(copy.deepcopy(network), data, n, args.warmup, optimize=False)
        plain = time_plain(copy.deepcopy(network), data, n, args.warmup, optimize=True)
        lightning = time_lightning(copy.deepcopy(network), data, n, args.warmup)
        params = sum(p.numel() for p in network.parameters())
        rows.append((preset, "x".join(map(str, shape)), batch, params, 1e3 * fwd_bwd / batch,
                     1e3 * plain / batch, 1e3 * lightning / batch, lightning / plain))

    head = ("preset", "data", "batch", "params", "fwd+bwd ms/img", "plain step ms/img",
            "Lightning step ms/img", "Lightning/plain")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), medians of {args.steps} steps")
    print(" | ".join(head))
    for preset, data_shape, batch, params, fb, plain, light, ratio in rows:
        print(f"{preset} | {data_shape} | {batch} | {params / 1e6:.3f}M | {fb:.2f} | {plain:.2f} | "
              f"{light:.2f} | {ratio:.2f}")


if __name__ == "__main__":
    main()
