"""``DiffusionModule``: the LightningModule that trains any formulation with the one loss.

Nothing here branches on the formulation: the training step is the objective (default ``Denoiser.loss``,
``lightning_diff.objectives``); validation reports
the same loss per noise-level bucket on a fixed draw of noise; ``sample`` runs a sampler of
``lightning_diff.sampling`` on the formulation's grid with per-sample seeds. ``SamplerSettings`` is the one
sampler setting (``configs/sampler``) of training, ``sample``, ``evaluate`` and the callbacks.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
from collections.abc import Callable, Mapping, Sequence

import pytorch_lightning as pl
import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn
from torchmetrics import MeanMetric

from . import sampling
from .checkpoint_io import CHECKPOINT_FORMAT, FORMAT_KEY
from .data.transforms import DataTransform
from .denoiser import Denoiser
from .formulations import Formulation
from .objectives import DenoisingScoreMatching
from .sampling.schedules import karras_sigmas

__all__ = ["DiffusionModule", "SamplerSettings"]

_NOT_OPTIONS = ("denoiser", "x", "sigmas", "generator", "callback", "stats", "cond", "formulation")  # set by sample()


@dataclasses.dataclass
class SamplerSettings:
    """One sampler setting (``configs/sampler/<name>.yaml``), the same for the sample grid and the metric
    callbacks of training, ``lightning-diff sample`` and ``lightning-diff evaluate``.

    Attributes:
        name: a sampler of ``lightning_diff.sampling.SAMPLERS``.
        steps: steps on the formulation's own grid (``formulation.sampling_sigmas(steps)``); None takes the
            formulation's ``default_sampling_steps`` (18, EDM's Heun with 35 NFE; NCSN: its L levels).
        options: keyword options of the sampler (``S_churn``, ``eta``, ...).
        time_steps: None samples on the formulation's own grid; ``{"sigma_min", "sigma_max", "rho"}`` (any subset:
            the rest take EDM's defaults) on EDM's time steps with these constants (Karras et al. 2022, eq. 5)
            instead, as EDM's Figure 2 varies the discretization alone.
        batch_size: samples per sampler call; the samples do not depend on it (per-sample seeds).
    """

    name: str = "heun"
    steps: int | None = None
    options: dict = dataclasses.field(default_factory=dict)
    time_steps: dict | None = None
    batch_size: int = 64

    def __post_init__(self):
        if self.name not in sampling.SAMPLERS:
            raise ValueError(f"sampler.name={self.name!r} is not known; allowed: {', '.join(sampling.SAMPLERS)}")
        if self.steps is not None and (type(self.steps) is not int or self.steps < 1):
            raise ValueError(f"sampler.steps={self.steps!r} is invalid; allowed: null (the formulation's default) "
                             "or an integer >= 1")
        if type(self.batch_size) is not int or self.batch_size < 1:
            raise ValueError(f"sampler.batch_size={self.batch_size!r} is invalid; allowed: an integer >= 1")
        self.options = dict(self.options or {})
        if self.time_steps is not None:
            self.time_steps = dict(self.time_steps)
            unknown = sorted(set(self.time_steps) - {"sigma_min", "sigma_max", "rho"})
            if unknown:
                raise ValueError(f"sampler.time_steps: {unknown} are not settings of EDM's time steps; allowed: "
                                 "sigma_min, sigma_max, rho (or sampler.time_steps=null: the formulation's grid)")
        allowed = _option_defaults(self.name)
        unknown = sorted(set(self.options) - set(allowed))
        if unknown:
            raise ValueError(f"sampler.options: {unknown} are not options of sampler={self.name}; allowed: "
                             f"{', '.join(allowed)}")
        self.options = {k: allowed[k] if v is None else v for k, v in self.options.items()}  # null: the default

    @classmethod
    def from_config(cls, value, defaults: Mapping | None = None) -> SamplerSettings:
        """From a ``sampler`` config node (keys ``name``, ``steps``, ``options``, ``time_steps``, ``batch_size``;
        missing keys take the defaults above), an instance (returned as is) or None (the defaults).

        ``defaults`` (the same keys: a released checkpoint's source sampler, ``DiffusionModule.sampler_from_config``)
        fill what ``value`` leaves null: ``name``, ``steps``, ``time_steps`` and each option set to null or absent
        that the named sampler takes. Without them a null ``name`` is ``heun`` with its options' keyword defaults
        (``configs/sampler/heun.yaml``'s), and a null option the sampler's keyword default."""
        if isinstance(value, cls):
            return value
        if isinstance(value, DictConfig):
            value = OmegaConf.to_container(value, resolve=True)
        if value is None and defaults is None:
            return cls()
        value = dict(value or {})
        keys = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(value) - set(keys))
        if unknown:
            raise ValueError(f"sampler: unknown settings {unknown}; allowed: {', '.join(keys)}")
        return cls(**_completed(value, dict(defaults or {})))

    def steps_for(self, formulation: Formulation) -> int:
        """The step count on ``formulation``'s grid: ``steps`` or the formulation's default. Raises ValueError
        naming ``sampler.steps``, the value and the formulation's allowed range when it has no such grid."""
        steps = formulation.default_sampling_steps if self.steps is None else self.steps
        low, high = formulation.min_sampling_steps, formulation.max_sampling_steps
        if steps < low or (high is not None and steps > high):
            value = steps if self.steps is not None else f"null (formulation={formulation.name}'s default {steps})"
            allowed = f"an integer >= {low}" if high is None else f"an integer in [{low}, {high}]"
            raise ValueError(f"sampler.steps={value} is invalid for formulation={formulation.name}; allowed: "
                             f"{allowed}")
        return steps

    def sigmas(self, formulation: Formulation) -> torch.Tensor:
        """The grid this setting samples ``formulation`` on: decreasing float64 ``[steps + 1]`` ending in 0."""
        steps = self.steps_for(formulation)
        if self.time_steps is not None:
            try:
                return karras_sigmas(steps, **self.time_steps)
            except ValueError as err:
                raise ValueError(f"sampler.time_steps={self.time_steps}: {err}") from None
        try:
            return formulation.sampling_sigmas(steps)
        except ValueError as err:
            raise ValueError(f"sampler.steps={steps} on formulation={formulation.name}: {err}") from None

    def call_options(self, formulation: Formulation) -> dict:
        """``options`` plus ``formulation`` for the samplers that take it (SDE samplers, EDM's ablation)."""
        options = dict(self.options)
        if "formulation" in inspect.signature(sampling.SAMPLERS[self.name]).parameters:
            options["formulation"] = formulation
        return options

    def check(self, formulation: Formulation, max_growth: float = 10.0) -> SamplerSettings:
        """This setting, after checking that it runs on ``formulation``, so that a bad setting fails at config
        time and not when training ends: its grid exists, the sampler accepts its options, and it does not diverge
        on the exact denoiser of data ``N(0, sigma_data^2)``: one 1-D sample starting at ``x = sigmas[0]`` (seed 0)
        must end finite and within ``max_growth`` times the largest noise envelope ``sqrt(sigma_data^2 +
        sigmas[0]^2)`` (few steps may land far from the data, but not beyond where they started). E.g. annealed
        Langevin's ``step_size`` 2e-5 diverges on EDM's grid, whose sigma_min = 0.002 makes its steps
        ``2e-5 sigma_i^2 / sigma_min^2`` too long. Raises ValueError naming the setting."""
        sigmas = self.sigmas(formulation)
        denoiser = _GaussianDataDenoiser(formulation)
        x = torch.full((1, 1), float(sigmas[0]))
        setting = (f"sampler={self.name} with sampler.steps={self.steps_for(formulation)} and sampler.options="
                   f"{self.options} on formulation={formulation.name}")
        try:
            out = sampling.sample(self.name, denoiser, x, sigmas, generator=sampling.PerSampleGenerator([0]),
                                  **self.call_options(formulation))
        except ValueError as err:
            raise ValueError(f"{setting}: {err}") from None
        bound = max_growth * math.hypot(denoiser.sigma_data, float(sigmas[0]))
        if not out.abs().max() <= bound:  # also refuses nan
            raise ValueError(f"{setting} diverges on the exact denoiser of data N(0, {denoiser.sigma_data}^2): from "
                             f"x = {float(sigmas[0]):.4g} it ends at {out.flatten().tolist()}; allowed: settings that "
                             f"stay within {bound:.4g} there (a smaller step size, another sampler or formulation)")
        return self

    def record(self, formulation: Formulation) -> dict:
        """``{"name", "steps", "options"}`` with the step count actually used on ``formulation`` (protocols), and
        ``"time_steps"`` when they are not the formulation's own, else its ``"spacing"`` when it has one (DDPM's
        sub-sequence of timesteps, ``schedules.ddpm_timesteps``)."""
        record = {"name": self.name, "steps": self.steps_for(formulation), "options": dict(self.options)}
        if self.time_steps is not None:
            return {**record, "time_steps": dict(self.time_steps)}
        spacing = getattr(formulation, "spacing", None)
        return record if spacing is None else {**record, "spacing": spacing}


def _option_defaults(name: str) -> dict:
    """``{option: keyword default}`` of sampler ``name`` (the keywords ``DiffusionModule.sample`` does not set)."""
    parameters = inspect.signature(sampling.SAMPLERS[name]).parameters
    return {k: p.default for k, p in parameters.items() if k not in _NOT_OPTIONS}


def _completed(value: dict, defaults: dict) -> dict:
    """The sampler config ``value`` with what it leaves null from ``defaults`` (``SamplerSettings.from_config``)."""
    value = {**value, **{k: defaults.get(k) for k in ("name", "steps", "time_steps") if value.get(k) is None}}
    if value.get("name") is None:  # no one named a sampler: EDM's Heun, its options at their (scalar) defaults
        value["name"] = "heun"
        defaults = {"options": {k: v for k, v in _option_defaults("heun").items()
                                if isinstance(v, (bool, int, float, str))}}
    accepted = _option_defaults(value["name"]) if value["name"] in sampling.SAMPLERS else {}
    options = {k: v for k, v in (defaults.get("options") or {}).items() if k in accepted}
    options.update({k: v for k, v in (value.get("options") or {}).items() if v is not None or k not in options})
    return {**value, "options": options}


class _GaussianDataDenoiser:
    """The exact denoiser of data ``N(0, sigma_data^2)``, ``D(x; sigma) = x sigma_data^2 / (sigma_data^2 +
    sigma^2)`` (the posterior mean), snapped to ``formulation``'s noise levels: what ``SamplerSettings.check``
    runs a sampler on. ``x``: ``[B, 1]``, ``sigma``: ``[B]``."""

    def __init__(self, formulation: Formulation, sigma_data: float = 0.5):  # EDM's sigma_data (Karras et al. 2022)
        self.round_sigma, self.sigma_data = formulation.round_sigma, sigma_data

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, **cond) -> torch.Tensor:
        return x * (self.sigma_data**2 / (self.sigma_data**2 + sigma**2)).reshape(-1, 1)

    def forward_with_variance(self, x: torch.Tensor, sigma: torch.Tensor, **cond):
        """``(D, v = 0)`` for ``ddpm variance=learned``: v = 0 is the midpoint of iDDPM's range (eq. 15)."""
        return self(x, sigma), torch.zeros_like(x)

    def forward_with_moment(self, x: torch.Tensor, sigma: torch.Tensor, **cond):
        """``(D, 0)`` for ``ddpm variance=sn/npr``: a zero second-moment head gives beta~ (extended_analytic_dpm)."""
        return self(x, sigma), torch.zeros_like(x)


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
        per-sample tensors the objective takes as keywords (reflow's coupled ``noise``, ``lightning_diff.reflow``)."""
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

    # --- sampling ---------------------------------------------------------------------------------------
    def sampling_sigmas(self, settings: SamplerSettings) -> torch.Tensor:
        """The grid ``sample`` uses with ``settings``: a distilled student's own levels (``grid``) unless steps are
        asked, else ``settings.sigmas(formulation)``; float64 ``[steps + 1]``."""
        return self.grid if self._own_grid(settings) else settings.sigmas(self.formulation)

    def _own_grid(self, settings: SamplerSettings) -> bool:
        return self.grid is not None and settings.steps is None

    def sampler_record(self, settings: SamplerSettings) -> dict:
        """``settings.record`` for this module (protocols): with a distilled student's own levels, their step count
        and ``time_steps: {"sigmas": [...]}``."""
        record = settings.record(self.formulation)
        if self._own_grid(settings):
            record.pop("spacing", None)
            record |= {"steps": len(self.grid) - 1, "time_steps": {"sigmas": self.grid.tolist()}}
        return record

    def sampler_from_config(self, sampler=None, guidance: float | None = None) -> tuple[SamplerSettings, float]:
        """``(sampler settings, classifier-free guidance gamma)`` a command runs (``lightning-diff sample`` /
        ``evaluate``): what ``sampler`` (a ``configs/sampler`` node) and ``guidance`` set, and for what they leave
        null this model's own: a released checkpoint's source sampler and guidance (``Pretrained.sampler`` and
        ``guidance``, recorded in ``run_config["pretrained"]``: ADM and DiT 250 DDPM steps on guided-diffusion's
        respacing with their variance and clipping, DiT gamma 1.5), a training run's ``guidance`` (a preset's
        headline, e.g. dit_xl2_imagenet256), else EDM's Heun and gamma 1 (``SamplerSettings.from_config``)."""
        run = self.run_config or {}
        released = run.get("pretrained") or {}
        settings = SamplerSettings.from_config(sampler, defaults=released.get("sampler"))
        return settings, float((released or run).get("guidance", 1.0) if guidance is None else guidance)

    @torch.no_grad()
    def sample(self, seeds: Sequence[int], *, labels: torch.Tensor | None = None,
               sampler: SamplerSettings | Mapping | None = None, sigmas: torch.Tensor | None = None,
               data_shape: Sequence[int] | None = None, guidance: float = 1.0,
               stats: dict | None = None, seed_protocol: str = "default",
               classifier: Callable | None = None, classifier_scale: float = 1.0) -> torch.Tensor:
        """Generate one sample per seed with a sampler of ``lightning_diff.sampling``.

        Args:
            seeds: one integer per sample; sample i depends only on ``seeds[i]`` (EDM's per-sample
                generators: the same images whatever the batch size or number of processes).
            labels: ``[N]`` class labels for a conditional model, else None.
            sampler: a ``SamplerSettings`` (or its config node) instead of the module's ``self.sampler``;
                all seeds go in one sampler call (``evaluation.generate`` batches by ``sampler.batch_size``).
            sigmas: an explicit grid (decreasing, ending in 0); default ``sampler.sigmas(formulation)``.
            data_shape: shape of one sample; default ``self.data_shape``.
            guidance: classifier-free guidance scale gamma (1 = none; ``sampling.CFGDenoiser``).
            classifier, classifier_scale: classifier guidance with scale s (``classifier.NoisyClassifier.guide``);
                an unconditional model then needs ``labels`` (the classes to guide to).
            stats: dict that receives the sampler's counters (``nfe``).
            seed_protocol: ``default`` or ``edm`` (NVlabs/edm generate.py's draws: ``sampling.noise``); under
                ``edm`` a conditional model with ``labels=None`` takes the labels drawn from each seed.
        Returns:
            ``[N, *data_shape]`` float32 in model space.
        """
        settings = self.sampler if sampler is None else SamplerSettings.from_config(sampler)
        data_shape = data_shape or self.data_shape
        if data_shape is None:
            raise ValueError("DiffusionModule.sample: data_shape is unknown; pass data_shape=(C, H, W)")
        shape = tuple(data_shape)
        if sigmas is None:
            sigmas = self.sampling_sigmas(settings)
        # snapped before the start noise is scaled by sigmas[0], as NVlabs/edm's sampler does
        sigmas = self.denoiser.round_sigma(sigmas.to(self.device, torch.float64))
        generator = sampling.PerSampleGenerator([int(s) for s in seeds], device=self._generator_device(seed_protocol),
                                                protocol=seed_protocol)
        x = sampling.initial_noise(generator, shape, float(sigmas[0]), device=self.device)
        drawn = sampling.initial_labels(generator, self.num_classes if self.conditional else 0)
        labels = drawn if labels is None else labels
        cond = None if labels is None else {"labels": labels.to(self.device)}
        denoiser = self.denoiser if guidance == 1 else sampling.CFGDenoiser(self.denoiser, guidance)
        if classifier is not None:
            denoiser = classifier.guide(denoiser, classifier_scale, denoiser_labels=self.conditional)
        was_training = self.training
        self.eval()
        try:
            out = sampling.sample(settings.name, denoiser, x, sigmas, generator=generator, stats=stats, cond=cond,
                                  **settings.call_options(self.formulation))
        finally:
            self.train(was_training)
        return out.float()

    def _generator_device(self, seed_protocol: str) -> torch.device:
        """Where the per-sample generators live: the sampling device under ``edm`` (as generate.py), else CPU."""
        return self.device if seed_protocol == "edm" else torch.device("cpu")

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
        one, ``"raw"`` the trained weights; ``self.weights`` records which were loaded."""
        if weights not in ("ema", "raw"):
            raise ValueError(f"weights={weights!r} is not known; allowed: ema, raw")
        has_ema = "current_model_state" in checkpoint
        self.load_state_dict(checkpoint["current_model_state" if weights == "raw" and has_ema else "state_dict"])
        self.on_load_checkpoint(checkpoint)
        self.weights = "ema" if has_ema and weights == "ema" else "raw"
        return self
