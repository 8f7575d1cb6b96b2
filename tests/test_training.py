"""Training path: LR schedules, non-finite steps, precision, clipping and accumulation through configs."""

import math
import pickle

import hydra
import pytest
import pytorch_lightning as pl
import torch

from lightning_diff import formulations
from lightning_diff.cli.train import compose, finish_logging, train
from lightning_diff.data import Toy2DDataModule
from lightning_diff.networks import MLP
from lightning_diff.training.module import DiffusionModule
from lightning_diff.training.optim import Constant, Cosine, InverseSqrt, constant, cosine, inverse_sqrt


def _optimizer():
    return torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=2.0)


def test_schedules_match_their_formulas():
    edm = Constant(warmup_steps=100)  # EDM: lr * min(n_img / rampup, 1); the first step has lr 0
    assert [edm(s) for s in (0, 50, 100, 1000)] == [0.0, 0.5, 1.0, 1.0]
    cos = Cosine(total_steps=110, warmup_steps=10, final_factor=0.1)
    assert cos(5) == pytest.approx(0.5 * 1.0)
    assert cos(10) == pytest.approx(1.0)
    assert cos(60) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi / 2)))
    assert cos(110) == pytest.approx(0.1) and cos(10_000) == pytest.approx(0.1)
    isq = InverseSqrt(ref_steps=100)
    assert [isq(s) for s in (0, 100, 400, 10_000)] == pytest.approx([1.0, 1.0, 0.5, 0.1])


def test_schedulers_step_and_store_their_state():
    scheduler = cosine(_optimizer(), total_steps=10)
    for _ in range(5):
        scheduler.optimizer.step()
        scheduler.step()
    assert scheduler.get_last_lr()[0] == pytest.approx(2.0 * 0.5)
    state = pickle.loads(pickle.dumps(scheduler.state_dict()))  # the multiplier is stored, not a lambda
    assert state["lr_lambdas"][0] == {"total_steps": 10, "warmup_steps": 0, "final_factor": 0.0}
    assert inverse_sqrt(_optimizer(), ref_steps=1).get_last_lr()[0] == 2.0
    assert constant(_optimizer(), warmup_steps=4).get_last_lr()[0] == 0.0


@pytest.mark.parametrize("name", ["constant", "edm_rampup", "cosine", "inverse_sqrt"])
def test_scheduler_configs_instantiate(name):
    cfg = compose([f"lr_scheduler={name}", "paths.output_dir=."])
    factory = hydra.utils.instantiate(cfg.lr_scheduler)
    assert isinstance(factory(_optimizer()), torch.optim.lr_scheduler.LambdaLR)


@pytest.mark.parametrize("bad", [lambda: Constant(-1), lambda: Cosine(10, warmup_steps=10),
                                 lambda: Cosine(10, final_factor=2), lambda: InverseSqrt(0)])
def test_bad_schedule_settings_raise(bad):
    with pytest.raises(ValueError, match="lr_scheduler"):
        bad()


class PoisonedGradients(DiffusionModule):
    """Makes the gradients non-finite at the optimizer steps listed in ``poisoned``."""

    def __init__(self, poisoned, **kwargs):
        super().__init__(MLP(dim=2, hidden=16, depth=1, emb_channels=8), formulations.get("edm"),
                         optimizer=lambda p: torch.optim.Adam(p, lr=1e-2), **kwargs)
        self.poisoned, self.snapshots = set(poisoned), []

    def on_after_backward(self):
        if self.global_step in self.poisoned:
            next(self.parameters()).grad[0] = float("nan")

    def on_train_batch_start(self, batch, batch_idx):
        self.snapshots.append([p.detach().clone() for p in self.parameters()])


def _fit(module, steps, **trainer_kwargs):
    trainer = pl.Trainer(max_steps=steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, limit_val_batches=0, **trainer_kwargs)
    trainer.fit(module, Toy2DDataModule(num_samples=256, num_val_samples=8, batch_size=32))
    return trainer


def test_nonfinite_steps_are_skipped_counted_and_logged():
    module = PoisonedGradients(poisoned=[2, 3])
    trainer = _fit(module, 6)
    assert module.nonfinite_steps == 2
    assert float(trainer.callback_metrics["train/nonfinite_steps"]) == 2.0
    before, after = module.snapshots[2], module.snapshots[4]  # steps 2 and 3 left every weight alone
    assert all(torch.equal(a, b) for a, b in zip(before, after, strict=True))
    assert not all(torch.equal(a, b) for a, b in zip(module.snapshots[4], module.snapshots[5], strict=True))
    adam_steps = {float(s["step"]) for s in trainer.optimizers[0].state.values()}
    assert adam_steps == {4.0}  # the optimizer's state skipped them too
    assert all(p.isfinite().all() for p in module.parameters())


def test_a_run_that_keeps_failing_stops_with_a_clear_error():
    module = PoisonedGradients(poisoned=range(100), max_nonfinite_steps=3)
    with pytest.raises(FloatingPointError, match="3 optimizer steps in a row had non-finite gradients"):
        _fit(module, 10)


def test_bf16_mixed_keeps_the_loss_in_float32():
    dtypes = []

    class Probe(pl.Callback):
        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            dtypes.append(outputs["loss"].dtype)

    module = PoisonedGradients(poisoned=[])
    _fit(module, 3, precision="bf16-mixed", callbacks=[Probe()])
    assert dtypes == [torch.float32] * 3
    assert all(p.dtype == torch.float32 and p.isfinite().all() for p in module.parameters())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="16-mixed (fp16 + loss scaling) needs a GPU")
def test_fp16_mixed_with_loss_scaling_on_gpu():
    module = PoisonedGradients(poisoned=[])
    trainer = _fit(module, 5, accelerator="gpu", devices=1, precision="16-mixed")
    assert trainer.precision_plugin.scaler is not None
    assert all(p.isfinite().all() for p in module.parameters())


class ClipProbe(pl.Callback):
    """Gradient norms at every optimizer step: ``before`` clipping (Lightning clips right after the
    ``on_before_optimizer_step`` hooks) and ``used`` by the optimizer (still in ``.grad`` when the batch ends)."""

    before: list[float] = []
    used: list[float] = []

    @staticmethod
    def _norm(module) -> float:
        return float(torch.nn.utils.get_total_norm([p.grad for p in module.parameters() if p.grad is not None]))

    def on_before_optimizer_step(self, trainer, module, optimizer):
        ClipProbe.before.append(self._norm(module))

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        if trainer.global_step > len(ClipProbe.used):  # this micro-batch ended an optimizer step
            ClipProbe.used.append(self._norm(module))


def test_train_entry_with_accumulation_clipping_and_schedule(tmp_path):
    ClipProbe.before, ClipProbe.used = [], []
    cfg = compose(["data=toy2d", "data.num_samples=512", "data.batch_size=32", "network=mlp",
                   "network.hidden=16", "network.depth=1", "~logger", "callbacks.lr_monitor=null",
                   "callbacks.sample_grid=null",
                   "callbacks.progress=null", "trainer.max_steps=4", "trainer.accumulate_grad_batches=2",
                   "trainer.gradient_clip_val=0.2", "+callbacks.clip_probe._target_=tests.test_training.ClipProbe",
                   "lr_scheduler=edm_rampup", "lr_scheduler.warmup_steps=8", "optimizer=adamw",
                   "trainer.enable_progress_bar=false", f"paths.output_dir={tmp_path}"])
    try:
        result = train(cfg)
    finally:
        finish_logging()
    ckpt = torch.load(result["checkpoint"], weights_only=False)
    assert ckpt["global_step"] == 4 and ckpt["loops"]["fit_loop"]["epoch_loop.batch_progress"]["total"][
        "processed"] == 8  # 2 batches a step; saved before counted "completed"
    assert ckpt["lr_schedulers"][0]["_last_lr"] == [pytest.approx(1e-3 * 4 / 8)]
    assert result["weights"] == "ema" and "current_model_state" in ckpt
    # Every accumulated gradient exceeded gradient_clip_val, and the optimizer stepped with norm exactly 0.2.
    assert len(ClipProbe.before) == len(ClipProbe.used) == 4
    assert min(ClipProbe.before) > 0.2, ClipProbe.before
    assert ClipProbe.used == pytest.approx([0.2] * 4, rel=1e-5)
