"""Reflow on the 8-Gaussian ring (Liu et al. 2023, Sec. 5.1's toy): straightness and few-step quality before and after.

The 1-rectified flow is exact: the ideal denoiser of the ring (``Toy2DDataModule().mixture``), i.e. the optimum of
the rf loss on independent pairs, so "before" has no training error. Its ODE (heun, 32 steps) draws 16384 pairs; an
MLP trained on them with ``objective=reflow`` is the 2-rectified flow. Both are scored on 2000 held-out noises:
straightness S (eq. 1 of ``methods.reflow``, 100 Euler steps), and for 1, 2 and 4 Euler steps the W2 to 2000 data
points and the mean exact log-density of the samples. Writes ``reflow.png`` and ``results.md`` here.
Usage: ``python experiments/reflow/run.py [train_steps]`` (CPU, a few minutes).
"""

from __future__ import annotations

import functools
import sys
import tempfile
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pytorch_lightning as pl  # noqa: E402
import torch  # noqa: E402

from lightning_diff import sampling
from lightning_diff.data import Toy2DDataModule  # noqa: E402
from lightning_diff.formulations import RectifiedFlow  # noqa: E402
from lightning_diff.methods import reflow  # noqa: E402
from lightning_diff.networks import MLP  # noqa: E402
from lightning_diff.objectives import Reflow  # noqa: E402
from lightning_diff.sampling.settings import SamplerSettings
from lightning_diff.training.module import DiffusionModule  # noqa: E402

HERE = Path(__file__).resolve().parent


def main(train_steps: int = 3000) -> None:
    torch.set_num_threads(2)
    mixture, formulation = Toy2DDataModule().mixture, RectifiedFlow()
    pairs = reflow.draw_couplings(mixture, range(16384), (2,), SamplerSettings("heun", steps=32, batch_size=4096),
                                  formulation)
    with tempfile.TemporaryDirectory() as folder:
        path = reflow.save_couplings(pairs, Path(folder) / "pairs.pt")
        pl.seed_everything(0)
        module = DiffusionModule(MLP(dim=2, hidden=128, depth=3), formulation, data_shape=(2,),
                                 objective=Reflow(), optimizer=functools.partial(torch.optim.Adam, lr=2e-3))
        trainer = pl.Trainer(max_steps=train_steps, accelerator="cpu", logger=False, enable_checkpointing=False,
                             enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0)
        trainer.fit(module, datamodule=reflow.ReflowPairsDataModule(str(path), batch_size=512))
    module.eval()
    z = sampling.PerSampleGenerator(range(10**6, 10**6 + 2000)).randn((2000, 2), dtype=torch.float64)
    data = mixture.sample(2000, torch.Generator().manual_seed(5))
    rows, paths = [], {}
    with torch.no_grad():
        for name, field in (("1-rectified (exact)", mixture), ("2-rectified (reflow)", module.denoiser)):
            value, _ = reflow.straightness(field, z, steps=100)
            row = [name, f"{float(value.mean()):.4f}"]
            for steps in (1, 2, 4):
                grid = sampling.schedules.rf_sigmas(steps, t_max=formulation.t_max)
                out = sampling.euler(field, float(grid[0]) * z, grid)
                row += [f"{reflow.empirical_w2(out, data):.3f}", f"{float(mixture.log_prob(out).mean()):.2f}"]
            rows.append(row)
            track = []
            grid = sampling.schedules.rf_sigmas(100, t_max=formulation.t_max)
            sampling.euler(field, float(grid[0]) * z[:200], grid,
                           callback=lambda step, track=track: track.append(step["x"] / (1 + step["sigma"])))
            one_step = sampling.euler(field, formulation.sigma_max * z[:500],
                                      torch.tensor([formulation.sigma_max, 0.0], dtype=torch.float64))
            paths[name] = (torch.stack(track), one_step)
    data_ll = float(mixture.log_prob(data).mean())
    data_w2 = reflow.empirical_w2(mixture.sample(2000, torch.Generator().manual_seed(6)), data)
    figure, axes = plt.subplots(1, 3, figsize=(13, 4.3))
    for axis, (name, (track, _)) in zip(axes[:2], paths.items(), strict=True):
        axis.plot(track[:, :, 0], track[:, :, 1], color="tab:blue", alpha=0.25, linewidth=0.6)
        axis.scatter(track[-1, :, 0], track[-1, :, 1], s=3, color="tab:red")
        axis.set_title(f"{name}: ODE paths (100 Euler steps)")
    axes[2].scatter(data[:500, 0], data[:500, 1], s=3, color="gray", label="data")
    for (name, (_, one_step)), color in zip(paths.items(), ("tab:orange", "tab:green"), strict=True):
        axes[2].scatter(one_step[:, 0], one_step[:, 1], s=3, color=color, label=f"{name}, 1 Euler step")
    axes[2].legend(fontsize=7, loc="lower left")
    axes[2].set_title("one-step samples")
    for axis in axes:
        axis.set_xlim(-3, 3)
        axis.set_ylim(-3, 3)
        axis.set_aspect("equal")
    figure.tight_layout()
    figure.savefig(HERE / "reflow.png", dpi=110)
    header = ("| flow | straightness S | W2, 1 step | log p, 1 step | W2, 2 steps | log p, 2 steps | W2, 4 steps | "
              "log p, 4 steps |\n|---|---|---|---|---|---|---|---|\n")
    table = header + "".join("| " + " | ".join(row) + " |\n" for row in rows)
    note = (f"\nData itself: W2 between two 2000-point data sets {data_w2:.3f}, mean log p {data_ll:.2f} nats. "
            f"2-rectified flow: MLP 128x3, {train_steps} Adam steps (lr 2e-3, batch 512) on 16384 pairs of the exact "
            "1-rectified flow (heun, 32 steps).\n")
    (HERE / "results.md").write_text("# Reflow on the 8-Gaussian ring (`python experiments/reflow/run.py`)\n\n" + table
                                     + note)
    print(table + note)


if __name__ == "__main__":
    main(*(int(a) for a in sys.argv[1:]))
