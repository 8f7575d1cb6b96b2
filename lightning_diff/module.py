"""``DiffusionModule``: the LightningModule that trains any formulation with the one loss.

Nothing here branches on the formulation: the training step is ``Denoiser.loss``; validation reports
the same loss per noise-level bucket on a fixed draw of noise; ``sample`` runs a sampler of
``lightning_diff.sampling`` on the formulation's grid with per-sample seeds.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
from collections.abc import Callable, Sequence

import pytorch_lightning as pl
import torch
from torch import nn
from torchmetrics import MeanMetric

from .denoiser import Denoiser
from .formulations import Formulation

__all__ = ["DiffusionModule"]


class DiffusionModule(pl.LightningModule):
    """Trains ``Denoiser(network, formulation)``.

    Args:
        network: backbone ``F(x, c_noise, labels)``.
        formulation: any ``Formulation``.
        optimizer: ``functools.partial`` of a ``torch.optim.Optimizer`` (Hydra ``_partial_: true``).
        lr_scheduler: optional partial taking the optimizer and returning a scheduler stepped every
            optimizer step.
        conditional: pass class labels to the network (needs a network built with ``num_classes``).
        val_buckets: number of log-spaced noise-level buckets for the validation loss.
        sampler, sample_steps, sampler_options: what ``sample()`` uses by default (EDM's deterministic
            Heun, 18 steps = 35 network evaluations); ``sample_steps=None`` takes the formulation's
            ``default_sampling_steps`` (18, or NCSN's L levels).
        channels_last: store image backbones in channels_last memory format (faster convolutions).
        max_nonfinite_steps: optimizer steps in a row with non-finite gradients after which training
            stops with an error (each one is skipped, counted in ``nonfinite_steps`` and logged).
    """

    def __init__(
        self,
        network: nn.Module,
        formulation: Formulation,
        optimizer: Callable[..., torch.optim.Optimizer] | None = None,
        lr_scheduler: Callable | None = None,
        conditional: bool = False,
        val_buckets: int = 6,
        sampler: str = "heun",
        sample_steps: int | None = 18,
        sampler_options: dict | None = None,
        channels_last: bool = False,
        max_nonfinite_steps: int = 20,  # fp16 loss scaling recovers from an overflow in a few steps
    ):
        super().__init__()
        if val_buckets < 1:
            raise ValueError(f"val_buckets={val_buckets} is invalid; allowed: an integer >= 1")
        self.denoiser = Denoiser(network, formulation)
        self.optimizer_factory, self.lr_scheduler_factory = optimizer, lr_scheduler
        self.conditional = conditional
        self.sampler, self.sample_steps = sampler, sample_steps
        self.sampler_options = dict(sampler_options or {})
        self.channels_last = channels_last
        if channels_last:
            self.denoiser.backbone.to(memory_format=torch.channels_last)
        edges = torch.logspace(math.log10(formulation.sigma_min), math.log10(formulation.sigma_max), val_buckets + 1)
        self.register_buffer("bucket_edges", edges, persistent=False)
        self.val_loss = MeanMetric()
        self.val_bucket_loss = nn.ModuleList(MeanMetric() for _ in range(val_buckets))
        self.run_config: dict | None = None  # the resolved Hydra config, stored in checkpoints
        if max_nonfinite_steps < 1:
            raise ValueError(f"max_nonfinite_steps={max_nonfinite_steps} is invalid; allowed: an integer > 0")
        self.max_nonfinite_steps = max_nonfinite_steps
        self.nonfinite_steps = 0  # optimizer steps skipped for non-finite gradients, whole run
        self._nonfinite_in_a_row = 0

    @property
    def formulation(self) -> Formulation:
        return self.denoiser.formulation

    # --- training ---------------------------------------------------------------------------------------
    def _split(self, batch):
        x, labels = batch if isinstance(batch, (tuple, list)) else (batch, None)
        if self.channels_last and x.ndim == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        return x, (labels if self.conditional else None)

    def training_step(self, batch, batch_idx):
        x, labels = self._split(batch)
        loss, _ = self.denoiser.loss(x, labels)
        loss = loss.mean()
        self.log("train/loss", loss, prog_bar=True, batch_size=x.shape[0])
        return loss

    # --- validation: the same loss on a fixed draw of sigma and noise, per sigma bucket -------------------
    def validation_step(self, batch, batch_idx):
        x, labels = self._split(batch)
        gen = torch.Generator(device=x.device).manual_seed(10_000 + batch_idx)
        sigma = self.formulation.sample_training_sigma((x.shape[0],), generator=gen, device=x.device)
        noise = torch.randn(x.shape, generator=gen, device=x.device)
        loss, sigma = self.denoiser.loss(x, labels, sigma=sigma, noise=noise)
        self.val_loss.update(loss)
        bucket = (torch.bucketize(sigma, self.bucket_edges) - 1).clamp(0, len(self.val_bucket_loss) - 1)
        for k, metric in enumerate(self.val_bucket_loss):
            selected = bucket == k
            metric.update(loss[selected], weight=selected.float()[selected])

    def on_validation_epoch_end(self):
        self.log("val/loss", self.val_loss.compute(), prog_bar=True)
        self.val_loss.reset()
        edges = self.bucket_edges.tolist()
        for k, metric in enumerate(self.val_bucket_loss):
            # compute() is a collective under DDP: every rank calls it, then skips buckets empty on all ranks.
            value = metric.compute()
            if torch.isfinite(value):
                self.log(f"val/loss_sigma_{edges[k]:.3g}-{edges[k + 1]:.3g}", value)
            metric.reset()

    # --- optimisation -----------------------------------------------------------------------------------
    def on_before_optimizer_step(self, optimizer):
        """Skip an update whose gradients are not finite (MATH.md §4.7): drop them (the optimizer then
        leaves every parameter and its state alone), count, log ``train/nonfinite_steps``, and stop after
        ``max_nonfinite_steps`` in a row. Runs after DDP's all-reduce and AMP's unscale: all ranks agree."""
        grads = [p.grad for p in self.parameters() if p.grad is not None]
        if not grads or torch.nn.utils.get_total_norm(grads).isfinite():
            self._nonfinite_in_a_row = 0
            return
        optimizer.zero_grad(set_to_none=True)
        self.nonfinite_steps += 1
        self._nonfinite_in_a_row += 1
        self.log("train/nonfinite_steps", float(self.nonfinite_steps))
        if self._nonfinite_in_a_row >= self.max_nonfinite_steps:
            raise FloatingPointError(
                f"{self._nonfinite_in_a_row} optimizer steps in a row had non-finite gradients (step "
                f"{self.global_step}, {self.nonfinite_steps} in all); training stopped. Lower optimizer.lr, "
                f"clip gradients (trainer.gradient_clip_val) or use precision=bf16-mixed/32-true; the limit "
                f"is module.max_nonfinite_steps={self.max_nonfinite_steps}")

    def configure_optimizers(self):
        if self.optimizer_factory is None:
            raise ValueError("DiffusionModule: optimizer is not set; pass a partial of a torch.optim optimizer")
        optimizer = self.optimizer_factory(self.denoiser.parameters())
        if self.lr_scheduler_factory is None:
            return optimizer
        scheduler = self.lr_scheduler_factory(optimizer)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # --- sampling ---------------------------------------------------------------------------------------
    @torch.no_grad()
    def sample(self, seeds: Sequence[int], *, labels: torch.Tensor | None = None, sampler: str | None = None,
               steps: int | None = None, sigmas: torch.Tensor | None = None, data_shape: Sequence[int] | None = None,
               guidance: float = 1.0, stats: dict | None = None, **options) -> torch.Tensor:
        """Generate one sample per seed with a sampler of ``lightning_diff.sampling``.

        Args:
            seeds: one integer per sample; sample i depends only on ``seeds[i]`` (EDM's per-sample
                generators: the same images whatever the batch size or number of processes).
            labels: ``[N]`` class labels for a conditional model, else None.
            sampler, steps, options: override the module's defaults (``heun``, 18 steps).
            sigmas: an explicit grid (decreasing, ending in 0); default ``formulation.sampling_sigmas(steps)``.
            data_shape: shape of one sample; default the shape the data module recorded.
            guidance: classifier-free guidance scale gamma (1 = none; ``sampling.CFGDenoiser``).
            stats: dict that receives the sampler's counters (``nfe``).
        Returns:
            ``[N, *data_shape]`` float32 in model space.
        """
        from . import sampling

        data_shape = data_shape or getattr(self, "data_shape", None)
        if data_shape is None:
            raise ValueError("DiffusionModule.sample: data_shape is unknown; pass data_shape=(C, H, W)")
        shape = tuple(data_shape)
        if sigmas is None:
            steps = steps or self.sample_steps or self.formulation.default_sampling_steps
            sigmas = self.formulation.sampling_sigmas(steps)
        sigmas = sigmas.to(self.device, torch.float64)
        generator = sampling.PerSampleGenerator([int(s) for s in seeds])
        x = sampling.initial_noise(generator, shape, float(sigmas[0]), device=self.device)
        cond = None if labels is None else {"labels": labels.to(self.device)}
        denoiser = self.denoiser if guidance == 1 else sampling.CFGDenoiser(self.denoiser, guidance)
        name = sampler or self.sampler
        options = {**self.sampler_options, **options}
        if "formulation" in inspect.signature(sampling.SAMPLERS.get(name, sampling.sample)).parameters:
            options.setdefault("formulation", self.formulation)  # SDE samplers and EDM's ablation sampler
        was_training = self.training
        self.eval()
        try:
            out = sampling.sample(name, denoiser, x, sigmas, generator=generator, stats=stats, cond=cond, **options)
        finally:
            self.train(was_training)
        return out.float()

    # --- checkpoints carry the config that rebuilds the run -----------------------------------------------
    def on_save_checkpoint(self, checkpoint):
        checkpoint["run_config"] = self.run_config
        checkpoint["data_shape"] = getattr(self, "data_shape", None)
        checkpoint["num_classes"] = getattr(self, "num_classes", 0)
        transform = getattr(self, "data_transform", None)
        checkpoint["data_transform"] = dataclasses.asdict(transform) if transform is not None else None
        checkpoint["nonfinite_steps"] = self.nonfinite_steps

    def on_load_checkpoint(self, checkpoint):
        self.run_config = checkpoint.get("run_config")
        self.nonfinite_steps = checkpoint.get("nonfinite_steps", 0)
        if checkpoint.get("data_shape") is not None:
            self.data_shape = tuple(checkpoint["data_shape"])
        self.num_classes = checkpoint.get("num_classes", 0)
        if checkpoint.get("data_transform") is not None:
            from .data.transforms import DataTransform

            self.data_transform = DataTransform(**checkpoint["data_transform"])
