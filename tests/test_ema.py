"""EMA callback: the decays against their papers' formulas and constants, the average after k optimizer
steps (with gradient accumulation) against the closed-form weighted sum of the recorded weights, and BatchNorm
running statistics copied, checkpointed and resumed."""

import math

import pytest
import pytorch_lightning as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_diff.callbacks import EMA, EDMHalfLife, FixedDecay, InverseDecayWarmup


def test_edm_half_life_paper_constants():
    decay = EDMHalfLife(half_life_kimg=500, rampup_ratio=0.05)
    # past the ramp-up (n_img >= 10 Mimg): beta = 0.5^(512 / 500k) = 0.999290...
    assert decay(0, 20_000_000, 512) == pytest.approx(0.5 ** (512 / 500_000), rel=1e-12)
    assert decay(0, 20_000_000, 512) == pytest.approx(0.99929047, abs=1e-8)
    # during the ramp-up the half-life is 5% of the images seen: n_img = 1M -> h = 50k
    assert decay(0, 1_000_000, 512) == pytest.approx(0.5 ** (512 / 50_000), rel=1e-12)
    assert decay(0, 0, 512) == 0.0  # first step: the average becomes the weights after it
    assert EDMHalfLife(500, None)(0, 0, 512) == pytest.approx(0.5 ** (512 / 500_000))


def test_inverse_decay_paper_constants():
    two_thirds = InverseDecayWarmup(gamma=1, power=2 / 3, beta_max=1 - 1e-12)
    assert two_thirds(0, 0, 1) == 0.0
    assert two_thirds(31622, 0, 1) == pytest.approx(0.999, abs=1e-7)  # 1000^1.5 = 31.6K steps
    assert two_thirds(10**6 - 1, 0, 1) == pytest.approx(0.9999, abs=1e-9)  # 1M steps
    three_quarters = InverseDecayWarmup(gamma=1, power=3 / 4, beta_max=1 - 1e-12)
    assert three_quarters(10**4 - 1, 0, 1) == pytest.approx(0.999, abs=1e-9)  # 10K steps
    assert InverseDecayWarmup(beta_max=0.9999)(10**9, 0, 1) == 0.9999
    assert FixedDecay(0.9999)(123, 456, 789) == 0.9999


@pytest.mark.parametrize("bad", [lambda: EDMHalfLife(half_life_kimg=0), lambda: EDMHalfLife(rampup_ratio=-1),
                                 lambda: InverseDecayWarmup(power=0), lambda: InverseDecayWarmup(beta_max=1),
                                 lambda: FixedDecay(1.5), lambda: EMA(evaluate_with="best")])
def test_bad_settings_raise(bad):
    with pytest.raises(ValueError):
        bad()


class Recorder(pl.LightningModule):
    """One weight vector, SGD; records the weights at the start and after every optimizer step."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(3))
        self.register_buffer("counter", torch.zeros(()))  # buffers are copied, not averaged
        self.history, self.validated = [], []

    def training_step(self, batch, batch_idx):
        x, _ = batch
        self.counter += 1
        return ((x @ self.w) ** 2).mean()

    def validation_step(self, batch, batch_idx):
        self.validated.append(self.w.detach().clone())

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def on_train_start(self):
        self.history.append(self.w.detach().clone().double())

    def on_train_batch_end(self, outputs, batch, batch_idx):
        if self.trainer.global_step > len(self.history) - 1:
            self.history.append(self.w.detach().clone().double())


def _fit(tmp_path, decay, accumulate=2, batch_size=3, steps=6, evaluate_with="ema"):
    torch.manual_seed(0)
    data = TensorDataset(torch.randn(60, 3), torch.zeros(60))
    loader = DataLoader(data, batch_size=batch_size)
    module, ema = Recorder(), EMA(decay, evaluate_with=evaluate_with)
    trainer = pl.Trainer(max_steps=steps, accumulate_grad_batches=accumulate, logger=False, callbacks=[ema],
                         enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
                         enable_checkpointing=False, limit_val_batches=1, val_check_interval=2 * accumulate)
    trainer.fit(module, loader, loader)
    trainer.save_checkpoint(tmp_path / "final.ckpt")
    return module, ema, torch.load(tmp_path / "final.ckpt", weights_only=False)


def _closed_form(history, betas):
    """theta_ema_K = prod(beta) theta_0 + sum_k (1 - beta_k) prod_{j>k} beta_j theta_k."""
    K = len(betas)
    total = math.prod(betas) * history[0]
    for k in range(1, K + 1):
        total = total + (1 - betas[k - 1]) * math.prod(betas[k:]) * history[k]
    return total


@pytest.mark.parametrize("name", ["edm", "inverse", "fixed"])
def test_average_equals_closed_form_under_accumulation(tmp_path, name):
    batch, accumulate, steps = 3, 2, 6
    B = batch * accumulate  # images per optimizer step (one process)
    if name == "edm":  # half-life 12 images, ramp-up 0.5: both branches of min() are taken
        decay = EDMHalfLife(half_life_kimg=0.012, rampup_ratio=0.5)
        betas = [0.5 ** (B / max(min(12, 0.5 * k * B), 1e-8)) for k in range(steps)]
    elif name == "inverse":
        decay = InverseDecayWarmup(gamma=2.0, power=0.75, beta_max=0.6)
        betas = [min(0.6, 1 - (1 + k / 2.0) ** -0.75) for k in range(steps)]
    else:
        decay, betas = FixedDecay(0.8), [0.8] * steps
    module, ema, ckpt = _fit(tmp_path, decay, accumulate, batch, steps, evaluate_with="raw")
    history = module.history
    assert len(history) == steps + 1  # one update per optimizer step, not per micro-batch
    expected = _closed_form(history, betas)
    average = ckpt["state_dict"]["w"].double()
    torch.testing.assert_close(average, expected, rtol=1e-6, atol=1e-7)
    assert not torch.allclose(average, history[-1], atol=1e-4)  # the test can tell EMA from raw
    torch.testing.assert_close(ckpt["current_model_state"]["w"].double(), history[-1])
    assert ema.num_images == steps * B and ema.beta == pytest.approx(betas[-1])
    assert ckpt["state_dict"]["counter"] == module.counter  # buffer copied
    torch.testing.assert_close(module.w.detach().double(), history[-1])  # evaluate_with=raw: module keeps raw


def test_validation_and_final_module_use_the_average(tmp_path):
    module, ema, ckpt = _fit(tmp_path, FixedDecay(0.8), accumulate=1, steps=4, evaluate_with="ema")
    betas = [0.8] * 4
    torch.testing.assert_close(module.w.detach().double(), _closed_form(module.history, betas))
    # the sanity check saw the initial weights; validation after step 2 the average of steps 0..2; training
    # continued from the raw weights
    torch.testing.assert_close(module.validated[0].double(), module.history[0])
    torch.testing.assert_close(module.validated[1].double(), _closed_form(module.history[:3], betas[:2]))
    torch.testing.assert_close(ckpt["current_model_state"]["w"].double(), module.history[-1])


class BatchNormNet(pl.LightningModule):
    """A linear layer and a BatchNorm whose running statistics change every training step."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(1)
        self.lin, self.bn = nn.Linear(3, 4), nn.BatchNorm1d(4, momentum=0.3)

    def training_step(self, batch, batch_idx):
        return self.bn(self.lin(batch[0])).pow(2).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _fit_bn(tmp_path, steps: int, ckpt_path=None) -> dict:
    """Fit ``steps`` optimizer steps (4 per epoch, fixed batch order) with EMA and a checkpoint every 4 steps
    (``tmp_path/step=4.ckpt``, ...); returns the last checkpoint."""
    data = TensorDataset(torch.randn(24, 3, generator=torch.Generator().manual_seed(2)) * 2 + 1, torch.zeros(24))
    every_4 = pl.callbacks.ModelCheckpoint(dirpath=tmp_path, filename="{step}", every_n_train_steps=4, save_top_k=-1)
    trainer = pl.Trainer(max_steps=steps, logger=False, callbacks=[EMA(FixedDecay(0.8), evaluate_with="raw"), every_4],
                         enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
                         limit_val_batches=0)
    trainer.fit(BatchNormNet(), DataLoader(data, batch_size=6), ckpt_path=ckpt_path)
    return torch.load(tmp_path / f"step={steps}.ckpt", weights_only=False)


def test_running_statistics_are_copied_checkpointed_and_resumed(tmp_path):
    """k-diffusion's ema_update: parameters averaged, buffers copied. After training the average's BatchNorm
    running_mean / running_var / num_batches_tracked equal the raw model's current ones; they are in the
    checkpoint, and a run resumed from one matches an uninterrupted run bit for bit."""
    straight = _fit_bn(tmp_path / "straight", 8)
    average, raw = straight["state_dict"], straight["current_model_state"]
    for name in ("bn.running_mean", "bn.running_var", "bn.num_batches_tracked"):
        assert torch.equal(average[name], raw[name]), name
    assert not torch.allclose(raw["bn.running_mean"], torch.zeros(4))  # the statistics did move
    assert raw["bn.num_batches_tracked"] == 8
    assert not torch.allclose(average["lin.weight"], raw["lin.weight"])  # parameters are averaged, not copied
    resumed = _fit_bn(tmp_path / "resumed", 8, ckpt_path=tmp_path / "straight" / "step=4.ckpt")
    for key in ("state_dict", "current_model_state"):
        for name, value in straight[key].items():
            assert torch.equal(resumed[key][name], value), (key, name)
