"""DDP on the CPU with 2 gloo processes in a subprocess (``ddp`` inside pytest would relaunch pytest).

With noise drawn per sample (seeded by the sample's index), one optimizer step over a global batch of 8
on 2 ranks x 4 must give the loss and gradients of one process over the same 8; every rank keeps the same
EMA; the epoch is sharded disjointly; ranks draw different noise; only rank 0 logs. Fault drill: when one
rank raises, every rank exits within a bounded time with a non-zero exit code and the rank's message.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from lightning_diff import formulations
from lightning_diff.networks import MLP
from lightning_diff.training.module import DiffusionModule

ROOT = Path(__file__).resolve().parent.parent


def seeded_noise(seeds):
    """``[N, 3]`` standard normal, row i a function of ``seeds[i]`` only (log sigma and the 2-D noise)."""
    return torch.stack([torch.randn(3, generator=torch.Generator().manual_seed(s)) for s in seeds])

SCRIPT = r'''
import json, os, sys
import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import CSVLogger

from lightning_diff import formulations
from lightning_diff.callbacks import EMA, FixedDecay, RunState
from lightning_diff.data.loading import PointDataset, make_loader
from lightning_diff.training.module import DiffusionModule
from lightning_diff.networks import MLP

out = sys.argv[1]


def seeded_noise(seeds):
    return torch.stack([torch.randn(3, generator=torch.Generator().manual_seed(s)) for s in seeds])


class PerSampleNoise(DiffusionModule):
    """Noise level and noise of sample i depend only on its index (carried as its label)."""

    def training_step(self, batch, batch_idx):
        x, index = batch
        self.seen.extend(index.tolist())
        if self.global_step == 0:
            self.draw = torch.rand(()).item()  # the rank's own random stream
            noise = seeded_noise(index.tolist())
            sigma, noise = noise[:, 0].exp(), noise[:, 1:]
            loss = self.denoiser.loss(x, sigma=sigma, noise=noise)[0].mean()
            self.step0_loss = self.all_gather(loss.detach()).mean().item()
            return loss
        return self.denoiser.loss(x)[0].mean()

    def on_before_optimizer_step(self, optimizer):
        super().on_before_optimizer_step(optimizer)
        if self.global_step == 0:
            self.step0_grads = [p.grad.tolist() for p in self.parameters()]


torch.manual_seed(0)
module = PerSampleNoise(MLP(dim=2, hidden=16, depth=1, emb_channels=8), formulations.get("edm"),
                        optimizer=lambda p: torch.optim.SGD(p, lr=0.1))
module.seen = []
data = PointDataset(torch.randn(16, 2), torch.arange(16))
ema = EMA(FixedDecay(0.5))
trainer = pl.Trainer(accelerator="cpu", devices=2, strategy="ddp", max_steps=2, limit_val_batches=0,
                     logger=CSVLogger(out, name="csv"), callbacks=[ema, RunState(seed=3)],
                     enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                     default_root_dir=out)
trainer.fit(module, make_loader(data, batch_size=4, shuffle=True, seed=0))
rank = trainer.global_rank
json.dump({"rank": rank, "world": trainer.world_size, "seen": module.seen, "draw": module.draw,
           "loss": module.step0_loss, "grads": module.step0_grads,
           "ema": [p.tolist() for p in module.parameters()]},
          open(os.path.join(out, f"rank{rank}.json"), "w"))
'''


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    script = out / "ddp_script.py"
    script.write_text(SCRIPT)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(_free_port()), "PL_TORCH_DISTRIBUTED_BACKEND": "gloo"}
    for key in ("LOCAL_RANK", "RANK", "WORLD_SIZE", "NODE_RANK"):
        env.pop(key, None)
    run = subprocess.run([sys.executable, str(script), str(out)], cwd=out, env=env, capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-4000:]
    return out, [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]


def test_global_batch_gives_the_loss_and_gradients_of_one_process(ranks):
    _, (r0, r1) = ranks
    torch.manual_seed(0)
    reference = DiffusionModule(MLP(dim=2, hidden=16, depth=1, emb_channels=8), formulations.get("edm"))
    data = torch.randn(16, 2)  # the script's data (same seed, same draws)
    index = r0["seen"][:4] + r1["seen"][:4]  # the 8 samples of the first global batch
    noise = seeded_noise(index)
    loss = reference.denoiser.loss(data[index], sigma=noise[:, 0].exp(), noise=noise[:, 1:])[0].mean()
    loss.backward()
    assert r0["loss"] == pytest.approx(loss.item(), rel=1e-6) and r1["loss"] == r0["loss"]
    for grads in (r0["grads"], r1["grads"]):
        for got, p in zip(grads, reference.parameters(), strict=True):
            torch.testing.assert_close(torch.tensor(got), p.grad, rtol=1e-5, atol=1e-7)


def test_sharding_seeding_ema_and_logging(ranks):
    out, (r0, r1) = ranks
    assert r0["world"] == 2
    first_epoch = r0["seen"][:8] + r1["seen"][:8]  # 2 steps x 4 per rank = one epoch of 16
    assert sorted(first_epoch) == list(range(16))  # disjoint shards covering the data
    expected = [torch.Generator().manual_seed(3 * 2 + r) for r in (0, 1)]  # RunState: seed * world + rank
    assert r0["draw"] != r1["draw"]
    assert r0["draw"] == torch.rand((), generator=expected[0]).item()
    assert r1["draw"] == torch.rand((), generator=expected[1]).item()
    assert r0["ema"] == r1["ema"]  # identical weights on every rank -> identical averages
    assert [p.name for p in (out / "csv").iterdir()] == ["version_0"]  # one logger wrote, once


FAILING_CALLBACK = """
import pytorch_lightning as pl


class FailOnRank(pl.Callback):
    \"\"\"Raises on rank ``rank`` before the training batch of step ``step``.\"\"\"

    def __init__(self, rank, step):
        self.rank, self.step = rank, step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_rank == self.rank and trainer.global_step == self.step:
            raise RuntimeError(f"rank {self.rank} fails on purpose at step {self.step}")
"""


def _session_alive(session: int) -> bool:
    try:
        os.killpg(session, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.mark.parametrize("rank", [0, 1])
def test_one_rank_raising_ends_every_rank_with_an_error(tmp_path, rank):
    """``trainer=ddp_cpu`` through the training entry point (Lightning starts rank 1); no hang: both ranks
    are gone within the time limit, the exit code is non-zero and the failing rank's message is shown."""
    (tmp_path / "failer.py").write_text(FAILING_CALLBACK)
    overrides = ["trainer=ddp_cpu", "data=toy2d", "data.num_samples=256", "data.num_val_samples=16",
                 "data.batch_size=8", "network=mlp", "network.hidden=16", "network.depth=1",
                 "network.emb_channels=8", "~logger", "callbacks.sample_grid=null", "callbacks.progress=null",
                 "callbacks.lr_monitor=null", "trainer.enable_progress_bar=false", "trainer.max_steps=50",
                 f"hydra.run.dir={tmp_path / 'run'}", "+callbacks.fail._target_=failer.FailOnRank",
                 f"+callbacks.fail.rank={rank}", "+callbacks.fail.step=3"]
    env = {**os.environ, "PYTHONPATH": f"{tmp_path}{os.pathsep}{ROOT}", "OMP_NUM_THREADS": "1",
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port())}
    for key in ("LOCAL_RANK", "RANK", "WORLD_SIZE", "NODE_RANK"):
        env.pop(key, None)
    process = subprocess.Popen([sys.executable, "-m", "lightning_diff.cli.train", *overrides], cwd=ROOT, env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        try:
            _, stderr = process.communicate(timeout=300)
        except subprocess.TimeoutExpired:
            pytest.fail("the DDP job hangs: no exit within 300 s after one rank raised")
        deadline = time.time() + 30  # the other rank notices the closed connection and exits
        while _session_alive(process.pid) and time.time() < deadline:
            time.sleep(0.5)
        leftover = _session_alive(process.pid)
    finally:
        if _session_alive(process.pid):
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    assert process.returncode != 0
    assert f"rank {rank} fails on purpose at step 3" in stderr
    assert not leftover, "a rank was still running after the job ended"


def test_ddp_cpu_trains_a_song_unet_with_edm_augmentation(tmp_path):
    """``network.augment_dim=9 augment=edm`` under ``trainer=ddp_cpu``: the augment-label embedding gets its
    input, so DDP finds no unused parameter and trains. Without the pipe, DDP stopped at the first step
    ("parameters that were not used in producing the loss"); that run now fails at build time
    (tests/test_augment.py)."""
    overrides = ["trainer=ddp_cpu", "data=digits", "data.batch_size=8", "network=ddpmpp_tiny",
                 "network.model_channels=8", "network.augment_dim=9", "augment=edm", "logger=csv",
                 "callbacks.sample_grid=null", "callbacks.progress=null", "trainer.enable_progress_bar=false",
                 "trainer.max_steps=2", "++trainer.limit_val_batches=0", f"hydra.run.dir={tmp_path}"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(_free_port())}
    for key in ("LOCAL_RANK", "RANK", "WORLD_SIZE", "NODE_RANK"):
        env.pop(key, None)
    run = subprocess.run([sys.executable, "-m", "lightning_diff.cli.train", *overrides], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-4000:]
    checkpoint = torch.load(tmp_path / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert checkpoint["global_step"] == 2
    assert checkpoint["state_dict"]["denoiser.backbone.map_augment.weight"].shape[1] == 9
