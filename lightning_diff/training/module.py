"""``DiffusionModule``: the LightningModule that trains any formulation with the one loss.

Nothing here branches on the formulation: the training step is the objective (default ``Denoiser.loss``,
``lightning_diff.objectives``); validation reports
the same loss per noise-level bucket on a fixed draw of noise; ``sample`` runs a sampler of
``lightning_diff.sampling`` on the formulation's grid with per-sample seeds, with ``sampling.SamplerSettings`` (the one
sampler setting of training, ``sample``, ``evaluate`` and the callbacks).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence

import pytorch_lightning as pl
import torch
from torch import nn
from torchmetrics import MeanMetric

from ..checkpoint_io import CHECKPOINT_FORMAT, FORMAT_KEY
from ..data.transforms import DataTransform
from ..denoiser import Denoiser
from ..formulations import Formulation
from ..objectives import DenoisingScoreMatching
from ..sampling.settings import SamplerSettings, generate

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
        sampler: what ``sample()`` uses by default: a ``SamplerSettings`` or its config node (default: EDM's
            deterministic Heun on the formulation's default grid, 18 steps = 35 network evaluations). Checked
            against the formulation here, so that a step count it cannot do fails before training.
        channels_last: store image backbones in channels_last memory format (faster convolutions).
        compile: ``torch.compile`` the backbone in place (state-dict keys unchanged): False (default), True
            (graph breaks allowed) or ``"fullgraph"``; speed-up and compile time in benchmarks/README.md.
        max_nonfinite_steps: optimizer steps in a row with non-finite gradients after which training
            stops with an error (each one is skipped, counted in ``nonfinite_steps`` and logged).
        data_shape: shape of one sample, e.g. ``(C, H, W)`` or ``(D,)`` (stored in checkpoints; ``sample()``
            needs it unless given a shape).
        num_classes: class labels of the data (0: none).
        data_transform: how the data were scaled into model space (bits/dim and uint8 images need it).
        run_config: the resolved config of the run, stored in checkpoints so that ``load_module`` can
            rebuild the module.
        augment_pipe: ``images -> (images, augment_labels)`` applied to training batches only, its labels
            passed to the network (EDM's non-leaky augmentation, ``data.augment.AugmentPipe``); validation
            and ``sample()`` see no augmentation and pass no labels (EDM's generate.py).
        denoiser: a ready ``Denoiser`` (a released model, ``lightning_diff.pretrained``) used instead of
            ``Denoiser(network, formulation)``; ``network`` and ``formulation`` are then None.
        decoder: latent models only: maps ``[B, *data_shape]`` latents to images in model space
            (``Pretrained.decoder``); ``evaluation.generate`` decodes its samples through it.
        objective: the training loss, ``objective(denoiser, y, labels, **cond) -> (loss [B], sigma [B])``
            (``lightning_diff.objectives``, ``configs/objective``); None: ``dsm``, ``Denoiser.loss``. Its
            ``prepare(formulation, data_transform)`` runs here; ``hybrid``/``vlb`` (``trains_variance``) make the
            Denoiser ``variance_trained`` (load_module rebuilds it with the same objective). Validation
            reports the denoising loss whatever the objective (it runs without gradients, which ssm/ism need;
            dsm = explicit score matching + a constant).
        grid: a fixed sampling grid (decreasing sigmas): a distilled student's levels (``lightning-diff distill``),
            used by ``sample()`` whenever the sampler setting asks for no step count.

    Attribute ``weights``: which weights the module holds, ``"raw"`` or ``"ema"`` (``load_weights``), or
    ``"released"`` (a ready ``denoiser``: the weights its authors published).
    """

    def __init__(
        self,
        network: nn.Module | None,
        formulation: Formulation | None,
        optimizer: Callable[..., torch.optim.Optimizer] | None = None,
        lr_scheduler: Callable | None = None,
        conditional: bool = False,
        val_buckets: int = 6,
        sampler: SamplerSettings | Mapping | None = None,
        channels_last: bool = False,
        compile: bool | str = False,
        max_nonfinite_steps: int = 20,  # fp16 loss scaling recovers from an overflow in a few steps
        data_shape: Sequence[int] | None = None,
        num_classes: int = 0,
        data_transform: DataTransform | None = None,
        run_config: dict | None = None,
        augment_pipe: Callable | None = None,
        denoiser: Denoiser | None = None,
        decoder: nn.Module | None = None,
        objective: Callable | None = None,
        grid: Sequence[float] | None = None,
    ):
        super().__init__()
        if val_buckets < 1:
            raise ValueError(f"val_buckets={val_buckets} is invalid; allowed: an integer >= 1")
        if denoiser is not None and (network is not None or formulation is not None):
            raise ValueError("DiffusionModule: pass either denoiser= or network= and formulation=, not both")
        objective = DenoisingScoreMatching() if objective is None else objective
        trains_variance = getattr(objective, "trains_variance", False)  # hybrid, vlb: iDDPM's variance head
        self.denoiser = denoiser if denoiser is not None else Denoiser(network, formulation, trains_variance)
        self.decoder = decoder
        formulation = self.formulation
        self.optimizer_factory, self.lr_scheduler_factory = optimizer, lr_scheduler
        self.conditional = conditional
        self.sampler = SamplerSettings.from_config(sampler).check(formulation)
        self.data_shape = None if data_shape is None else tuple(data_shape)
        self.num_classes, self.data_transform, self.run_config = num_classes, data_transform, run_config
        self.weights = "raw" if denoiser is None else "released"
        self.grid = None if grid is None else torch.as_tensor(grid, dtype=torch.float64)
        self.augment_pipe = augment_pipe
        self.objective = objective
        if hasattr(objective, "prepare"):  # checks it against the formulation, sizes its state (checkpoints)
            objective.prepare(formulation, data_transform)
        self.channels_last = channels_last
        if channels_last:
            self.denoiser.backbone.to(memory_format=torch.channels_last)
        if compile not in (False, True, "fullgraph"):
            raise ValueError(f"module.compile={compile!r} is invalid; allowed: false, true, 'fullgraph'")
        if compile:  # compiled at the first forward pass (tens of seconds on CPU)
            self.denoiser.backbone.compile(fullgraph=compile == "fullgraph")
        edges = torch.logspace(math.log10(formulation.sigma_min), math.log10(formulation.sigma_max), val_buckets + 1)
        self.register_buffer("bucket_edges", edges, persistent=False)
        self.val_loss = MeanMetric()
        self.val_bucket_loss = nn.ModuleList(MeanMetric() for _ in range(val_buckets))
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
        """``(x, labels, pairs)`` of a batch ``x``, ``(x, labels)`` or ``(x, labels, pairs)``; ``pairs`` is a dict of
        per-sample tensors the objective takes as keywords (reflow's coupled ``noise``, ``methods.reflow``)."""
        x, labels, pairs = (*batch, {})[:3] if isinstance(batch, (tuple, list)) else (batch, None, {})
        if self.channels_last and x.ndim == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        return x, (labels if self.conditional else None), pairs

    def training_step(self, batch, batch_idx):
        x, labels, pairs = self._split(batch)
        cond = {}
        if self.augment_pipe is not None:
            x, cond["augment_labels"] = self.augment_pipe(x)
        loss, _ = self.objective(self.denoiser, x, labels, **pairs, **cond)
        loss = loss.mean()
        self.log("train/loss", loss, prog_bar=True, batch_size=x.shape[0])
        return loss

    # --- validation: the same loss on a fixed draw of sigma and noise, per sigma bucket -------------------
    def validation_step(self, batch, batch_idx):
        x, labels, pairs = self._split(batch)
        gen = torch.Generator(device=x.device).manual_seed(10_000 + batch_idx)
        sigma = self.formulation.sample_training_sigma((x.shape[0],), generator=gen, device=x.device)
        noise = pairs["noise"] if "noise" in pairs else torch.randn(x.shape, generator=gen, device=x.device)
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
        """Skip an update whose gradients are not finite
        (docs/distributed.md#optimiser-schedule-clipping-accumulation-precision): drop them (the optimizer then
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

    # --- sampling: the pipeline is sampling.generate; the module passes what it knows ----------------------
    @torch.no_grad()
    def sample(self, seeds: Sequence[int], *, sampler: SamplerSettings | Mapping | None = None,
               data_shape: Sequence[int] | None = None, labels: torch.Tensor | None = None,
               sigmas: torch.Tensor | None = None, guidance: float = 1.0, classifier: Callable | None = None,
               classifier_scale: float = 1.0, stats: dict | None = None, seed_protocol: str = "default"
               ) -> torch.Tensor:
        """Generate one sample per seed from this model: ``sampling.generate`` with its denoiser, its formulation's
        grid (a distilled student's own levels, ``grid``), its data shape and classes, in eval mode.

        Args:
            seeds: one integer per sample; sample i depends only on ``seeds[i]``.
            sampler: a ``SamplerSettings`` (or its config node) instead of the module's ``self.sampler``.
            data_shape: shape of one sample; default ``self.data_shape``.
            labels, sigmas, guidance, classifier, classifier_scale, stats, seed_protocol: as in
                ``sampling.generate`` (``labels=None`` under ``seed_protocol=edm`` draws a conditional model's labels
                from each seed).
        Returns:
            ``[N, *data_shape]`` float32 in model space.
        """
        settings = self.sampler if sampler is None else SamplerSettings.from_config(sampler)
        data_shape = data_shape or self.data_shape
        if data_shape is None:
            raise ValueError("DiffusionModule.sample: data_shape is unknown; pass data_shape=(C, H, W)")
        was_training = self.training
        self.eval()
        try:
            return generate(self.denoiser, seeds, settings, data_shape=data_shape, grid=self.grid, sigmas=sigmas,
                            num_classes=self.num_classes if self.conditional else 0, conditional=self.conditional,
                            labels=labels, guidance=guidance, classifier=classifier,
                            classifier_scale=classifier_scale, stats=stats, seed_protocol=seed_protocol,
                            device=self.device)
        finally:
            self.train(was_training)

    # --- checkpoints carry the config that rebuilds the run -----------------------------------------------
    def on_save_checkpoint(self, checkpoint):
        """Store what ``builders.load_module`` passes back to the constructor: the run's config, the data's
        shape, classes and transform."""
        checkpoint["run_config"] = self.run_config
        checkpoint["data_shape"] = self.data_shape
        checkpoint["num_classes"] = self.num_classes
        transform = self.data_transform
        checkpoint["data_transform"] = dataclasses.asdict(transform) if transform is not None else None
        checkpoint["nonfinite_steps"] = self.nonfinite_steps
        checkpoint[FORMAT_KEY] = CHECKPOINT_FORMAT  # checked by checkpoint_io.load_checkpoint

    def on_load_checkpoint(self, checkpoint):
        self.nonfinite_steps = checkpoint.get("nonfinite_steps", 0)

    def load_weights(self, checkpoint: dict, weights: str = "ema") -> DiffusionModule:
        """Load the weights of a checkpoint written by training; returns the module.

        Its ``state_dict`` holds the EMA average when training used EMA (Lightning's ``WeightAveraging`` keeps
        the trained weights under ``current_model_state``). ``weights="ema"`` loads the average when there is
        one, ``"raw"`` the trained weights; ``self.weights`` records which were loaded. A checkpoint of
        ``lightning-diff posthoc-ema`` (``run_config["posthoc_ema"]``) holds only its reconstructed average."""
        if weights not in ("ema", "raw"):
            raise ValueError(f"weights={weights!r} is not known; allowed: ema, raw")
        posthoc = (checkpoint.get("run_config") or {}).get("posthoc_ema")
        if posthoc is not None and weights == "raw":
            raise ValueError(f"weights=raw: this checkpoint holds only the post-hoc EMA of sigma_rel="
                             f"{posthoc['sigma_rel']:g} (lightning-diff posthoc-ema); allowed: weights=ema, or the "
                             "run's own checkpoints/last.ckpt for its raw weights")
        has_ema = "current_model_state" in checkpoint or posthoc is not None
        self.load_state_dict(checkpoint["current_model_state" if weights == "raw" and has_ema else "state_dict"])
        self.on_load_checkpoint(checkpoint)
        self.weights = "ema" if has_ema and weights == "ema" else "raw"
        return self
