"""``EMA``: an exponential moving average of the weights on Lightning's ``WeightAveraging``.

Lightning's callback already stores the average as the checkpoint's ``state_dict`` (raw weights under
``current_model_state``), swaps it in for validation and copies it into the module when training ends.
This subclass adds what diffusion training needs (docs/formulations.md#ema):

- a decay that changes with training: EDM's half-life in images with ramp-up (``EDMHalfLife``), the
  inverse-decay warm-up of k-diffusion/diffusers (``InverseDecayWarmup``), or a fixed one (``FixedDecay``);
- one update per optimizer step (not per micro-batch under gradient accumulation), with the step's
  batch counted over all ranks (DDP ranks hold identical weights after each step, so every rank keeps the
  same average without communication);
- the average starts at the initial weights (NVlabs/edm ``ema = deepcopy(net)``), not at the weights after
  the first step as ``torch.optim.swa_utils.AveragedModel`` would;
- buffers are copied, not averaged (k-diffusion ``ema_update``): with ``use_buffers=False`` torch's
  ``AveragedModel.update_parameters`` copies every buffer (BatchNorm running statistics included) at each
  update, so the average's buffers are the raw model's current ones, checkpointed and resumed with it;
- ``evaluate_with``: which weights validation, sampling and the final module use, recorded in the run config;
- a fused update: the parameter lists are paired once per fit and each optimizer step is one
  ``torch._foreach_lerp_`` per (device, dtype) group plus one ``_foreach_copy_`` of the buffers, bit-identical
  to ``AveragedModel.update_parameters`` (tests/test_ema_fused.py) at ~1/30 of its cost on small networks
  (benchmarks/training.py), with no host sync on accelerators.

Put it before ``sample_grid`` in the callbacks config: on_train_end hooks run in list order, and the
final samples must see the average.
"""

from __future__ import annotations

import torch
from pytorch_lightning.callbacks import WeightAveraging

__all__ = ["EMA", "EDMHalfLife", "InverseDecayWarmup", "FixedDecay"]


class EDMHalfLife:
    """EDM's decay (Karras et al. 2022, NVlabs/edm ``training_loop.py``; docs/formulations.md#ema):
    ``beta = 0.5 ** (B / h)``, ``h = min(half_life, rampup_ratio * n_img)``, with ``B`` the images of this
    optimizer step over all ranks and ``n_img`` the images trained on before it."""

    def __init__(self, half_life_kimg: float = 500.0,  # EDM CIFAR-10: 0.5 Mimg (train.py --ema=0.5)
                 rampup_ratio: float | None = 0.05):  # EDM: half-life <= 5% of the images seen; None = off
        if half_life_kimg <= 0:
            raise ValueError(f"ema.decay.half_life_kimg={half_life_kimg} is invalid; allowed: a number > 0")
        if rampup_ratio is not None and rampup_ratio <= 0:
            raise ValueError(f"ema.decay.rampup_ratio={rampup_ratio} is invalid; allowed: a number > 0, null")
        self.half_life_kimg, self.rampup_ratio = half_life_kimg, rampup_ratio

    def __call__(self, step: int, num_images: int, batch_images: int) -> float:
        half_life = self.half_life_kimg * 1000
        if self.rampup_ratio is not None:
            half_life = min(half_life, self.rampup_ratio * num_images)
        return 0.5 ** (batch_images / max(half_life, 1e-8))

    def __repr__(self) -> str:
        return f"EDMHalfLife(half_life_kimg={self.half_life_kimg}, rampup_ratio={self.rampup_ratio})"


class InverseDecayWarmup:
    """k-diffusion ``EMAWarmup`` / diffusers ``EMAModel`` (docs/formulations.md#ema):
    ``beta_k = min(beta_max, 1 - (1 + k / gamma) ** -power)`` at optimizer step ``k = 0, 1, ...``.
    ``power=2/3`` reaches 0.999 at 31.6K steps and 0.9999 at 1M; ``power=3/4`` reaches 0.999 at 10K."""

    def __init__(self, gamma: float = 1.0,  # k-diffusion inv_gamma
                 power: float = 2 / 3,  # diffusers default; 3/4 for short runs
                 beta_max: float = 0.9999):  # k-diffusion max_value
        if gamma <= 0 or power <= 0:
            raise ValueError(f"ema.decay: gamma={gamma}, power={power} are invalid; allowed: numbers > 0")
        if not 0 <= beta_max < 1:
            raise ValueError(f"ema.decay.beta_max={beta_max} is invalid; allowed: 0 <= beta_max < 1")
        self.gamma, self.power, self.beta_max = gamma, power, beta_max

    def __call__(self, step: int, num_images: int, batch_images: int) -> float:
        return min(self.beta_max, 1 - (1 + step / self.gamma) ** -self.power)

    def __repr__(self) -> str:
        return f"InverseDecayWarmup(gamma={self.gamma}, power={self.power}, beta_max={self.beta_max})"


class FixedDecay:
    """A constant decay: DDPM/iDDPM 0.9999 (Ho et al. 2020, Appendix B), score_sde VE 0.999."""

    def __init__(self, beta: float = 0.9999):
        if not 0 <= beta < 1:
            raise ValueError(f"ema.decay.beta={beta} is invalid; allowed: 0 <= beta < 1")
        self.beta = beta

    def __call__(self, step: int, num_images: int, batch_images: int) -> float:
        return self.beta

    def __repr__(self) -> str:
        return f"FixedDecay(beta={self.beta})"


class EMA(WeightAveraging):
    """Exponential moving average ``theta_ema <- beta theta_ema + (1 - beta) theta`` per optimizer step.

    Args:
        decay: ``decay(step, num_images, batch_images) -> beta``; ``step`` is the 0-based optimizer step,
            ``num_images`` the images trained on before it and ``batch_images`` those of this step, both
            counted over all ranks and accumulated micro-batches. Default ``EDMHalfLife()``.
        evaluate_with: ``"ema"`` (validation runs on the average, which is copied into the module when
            training ends, so the final samples and metrics use it) or ``"raw"`` (the average is only kept
            and checkpointed).
        device: where the average lives; default the training device.
    Attributes ``beta`` (last decay) and ``num_images`` are logged as ``ema/beta`` and checkpointed.
    """

    def __init__(self, decay=None, evaluate_with: str = "ema", device: str | None = None):
        if evaluate_with not in ("ema", "raw"):
            raise ValueError(f"ema.evaluate_with={evaluate_with!r} is invalid; allowed: 'ema', 'raw'")
        super().__init__(device=device, use_buffers=False, multi_avg_fn=self._lerp)
        self.decay = decay if decay is not None else EDMHalfLife()
        self.evaluate_with = evaluate_with
        self.beta = 0.0
        self.num_images = 0  # images trained on so far, all ranks (EDM's cur_nimg)
        self._step_images = 0  # images of the micro-batches since the last optimizer step, all ranks
        self._raw_state: dict | None = None  # the raw weights once the average was copied in at the end
        self._groups: list[tuple[list, list]] | None = None  # cached (average, model) parameter lists
        self._buffers: tuple[list, list] | None = None  # cached (average, model) buffer lists

    def _lerp(self, averages: list[torch.Tensor], params: list[torch.Tensor], num_averaged) -> None:
        torch._foreach_lerp_(averages, params, 1.0 - self.beta)  # as swa_utils.get_ema_multi_avg_fn does

    def _cache_tensors(self, pl_module) -> None:
        """Pair the average's parameters with the module's once per fit, grouped by (device, dtype) so each
        group is one fused ``_foreach`` call. The ``Parameter`` objects themselves are kept: ``Module.to`` and
        the swaps for validation replace their ``.data`` in place, never the objects."""
        groups: dict[tuple, tuple[list, list]] = {}
        for average, param in zip(self._average_model.module.parameters(), pl_module.parameters(), strict=True):
            group = groups.setdefault((average.device, average.dtype, param.device, param.dtype), ([], []))
            group[0].append(average)
            group[1].append(param)
        self._groups = list(groups.values())
        self._buffers = (list(self._average_model.module.buffers()), list(pl_module.buffers()))

    @torch.no_grad()
    def _update(self, pl_module) -> None:
        """``AveragedModel.update_parameters`` after its first call, bit for bit, without its per-step cost
        (module walks, ``detach``, regrouping, and a host sync on ``n_averaged == 0`` on accelerators)."""
        if self._groups is None:
            self._cache_tensors(pl_module)
        for averages, params in self._groups:
            if averages[0].device != params[0].device or averages[0].dtype != params[0].dtype:
                params = [p.to(averages[0].device, averages[0].dtype, non_blocking=True) for p in params]
            self._lerp(averages, params, None)
        if self._buffers[0]:  # copied, not averaged (use_buffers=False)
            torch._foreach_copy_(*self._buffers)
        self._average_model.n_averaged += 1

    def setup(self, trainer, pl_module, stage: str) -> None:
        if self._device is None:  # Lightning's default is the module's device *before* it is moved
            self._device = trainer.strategy.root_device
        super().setup(trainer, pl_module, stage)
        self._groups = self._buffers = None  # a new average: pair its tensors again at the first update

    def on_fit_start(self, trainer, pl_module) -> None:
        for logger in trainer.loggers:
            logger.log_hyperparams({"evaluation_weights": self.evaluate_with, "ema_decay": repr(self.decay)})

    def on_train_start(self, trainer, pl_module) -> None:
        if self._average_model.n_averaged == 0:  # fresh run (a resumed one loaded its average)
            self._average_model.update_parameters(pl_module)  # copies the initial weights

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        x = batch[0] if isinstance(batch, (tuple, list)) else batch
        self._step_images += len(x) * trainer.world_size
        if trainer.global_step > self._latest_update_step:  # an optimizer step ended this micro-batch
            self.beta = float(self.decay(trainer.global_step - 1, self.num_images, self._step_images))
            if self.should_update(step_idx=trainer.global_step - 1):  # as WeightAveraging, fused update
                self._update(pl_module)
                self._latest_update_step = trainer.global_step
            self.num_images += self._step_images
            self._step_images = 0
            if trainer.global_step % trainer.log_every_n_steps == 0:  # self.log costs more than the update
                pl_module.log("ema/beta", self.beta)

    def on_validation_epoch_start(self, trainer, pl_module) -> None:
        if self.evaluate_with == "ema":
            super().on_validation_epoch_start(trainer, pl_module)

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        pass  # swapped back in on_validation_end, after every epoch-end hook (SampleGrid) saw the average

    def on_validation_end(self, trainer, pl_module) -> None:
        if self.evaluate_with == "ema" and self._average_model is not None:
            self._swap_models(pl_module)

    def on_train_end(self, trainer, pl_module) -> None:
        if self.evaluate_with == "ema":
            self._raw_state = {k: v.detach().clone() for k, v in pl_module.state_dict().items()}
            super().on_train_end(trainer, pl_module)

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        super().on_save_checkpoint(trainer, pl_module, checkpoint)
        if self._raw_state is not None and "current_model_state" in checkpoint:  # saved after on_train_end
            checkpoint["current_model_state"] = self._raw_state

    def state_dict(self) -> dict:
        return {**super().state_dict(), "beta": self.beta, "num_images": self.num_images,
                "step_images": self._step_images}

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)
        self.beta, self.num_images = state_dict["beta"], state_dict["num_images"]
        self._step_images = state_dict["step_images"]
