"""EMA's fused update (cached parameter lists, one ``_foreach_lerp_`` per (device, dtype) group) against
the update it replaces, torch's ``AveragedModel.update_parameters``, fed the same sequence of weights:
the two averages must be bit-identical (``torch.equal``) after every optimizer step, through gradient
accumulation, validation swaps, BatchNorm buffers and parameters of two dtypes."""

import pytest
import pytorch_lightning as pl
import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from torch.utils.data import DataLoader, TensorDataset

from lightning_diff.callbacks import EMA, EDMHalfLife, FixedDecay

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny networks: one intra-op thread


class MixedNet(pl.LightningModule):
    """Float32 conv + BatchNorm (running statistics are buffers) and a float64 scale: two dtype groups."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(3)
        self.conv, self.bn = nn.Conv2d(2, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.scale = nn.Parameter(torch.randn(4, dtype=torch.float64))
        self.frozen = nn.Parameter(torch.randn(2), requires_grad=False)  # averaged too, as AveragedModel does

    def training_step(self, batch, batch_idx):
        h = self.bn(self.conv(batch[0])).mean((2, 3)).double()
        return (h * self.scale).pow(2).mean()

    def validation_step(self, batch, batch_idx):
        pass

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=0.05)


class OldUpdate(pl.Callback):
    """The update before the fused one: ``AveragedModel.update_parameters`` after each optimizer step with the
    EMA's beta of that step; compares the two averages after each step."""

    def __init__(self, ema: EMA, fixed_beta: float | None):
        self.ema, self.fixed_beta, self.compared = ema, fixed_beta, 0

    def on_train_start(self, trainer, module):
        fn = (get_ema_multi_avg_fn(self.fixed_beta) if self.fixed_beta is not None  # torch's own EMA
              else lambda a, p, n: torch._foreach_lerp_(a, p, 1.0 - self.ema.beta))
        self.reference = AveragedModel(module, use_buffers=False, multi_avg_fn=fn)
        self.reference.update_parameters(module)  # n_averaged == 0: copies the initial weights, as EMA does
        self.step = 0

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        if trainer.global_step > self.step:  # an optimizer step ended
            self.step = trainer.global_step
            self.reference.update_parameters(module)
            ours = self.ema._average_model.module.state_dict()
            for name, value in self.reference.module.state_dict().items():
                assert torch.equal(ours[name], value), (self.step, name)
            self.compared += 1


@pytest.mark.parametrize("decay,fixed_beta", [(FixedDecay(0.9), 0.9),
                                              (EDMHalfLife(half_life_kimg=0.02, rampup_ratio=0.5), None)])
def test_fused_update_is_bit_identical_to_averaged_model(tmp_path, decay, fixed_beta):
    data = TensorDataset(torch.randn(40, 2, 5, 5, generator=torch.Generator().manual_seed(4)), torch.zeros(40))
    ema = EMA(decay, evaluate_with="ema")
    old = OldUpdate(ema, fixed_beta)
    trainer = pl.Trainer(max_steps=9, accumulate_grad_batches=2, logger=False, callbacks=[ema, old],
                         enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
                         enable_checkpointing=False, limit_val_batches=1, val_check_interval=6)
    module = MixedNet()
    trainer.fit(module, DataLoader(data, batch_size=4), DataLoader(data, batch_size=4))
    assert old.compared == 9
    assert len(ema._groups) == 2  # float32 and float64: one fused call each
    assert ema._average_model.n_averaged.item() == 10  # the initial copy + one update per optimizer step
    final = old.reference.module.state_dict()  # evaluate_with="ema": the module ends holding the average
    for name, value in module.state_dict().items():
        assert torch.equal(value, final[name]), name
