"""``SamplerSettings``: one sampler setting (``configs/sampler/<name>.yaml``): which sampler, on which grid, with which
options; the same object for the sample grid and the metric callbacks of training, ``lightning-diff sample`` and
``lightning-diff evaluate``. Checked against a formulation before any work (``SamplerSettings.check``)."""

from __future__ import annotations

import dataclasses
import inspect
import math
from collections.abc import Callable, Mapping, Sequence

import torch
from omegaconf import DictConfig, OmegaConf

from ..formulations import Formulation
from ..formulations.schedules import karras_sigmas
from . import registry
from .grid_file import ALLOWED_FORMS, explicit_grid, warn_if_tuned_for_another_model
from .guidance import Guidance
from .noise import PerSampleGenerator, initial_labels, initial_noise

__all__ = ["SamplerSettings", "generate"]

_NOT_OPTIONS = ("denoiser", "x", "sigmas", "generator", "callback", "stats", "cond", "formulation")  # set by sample()


@dataclasses.dataclass
class SamplerSettings:
    """One sampler setting (``configs/sampler/<name>.yaml``), the same for the sample grid and the metric
    callbacks of training, ``lightning-diff sample`` and ``lightning-diff evaluate``.

    Attributes:
        name: a sampler of ``lightning_diff.registry.SAMPLERS``.
        steps: steps on the formulation's own grid (``formulation.sampling_sigmas(steps)``); None takes the
            formulation's ``default_sampling_steps`` (18, EDM's Heun with 35 NFE; NCSN: its L levels).
        options: keyword options of the sampler (``S_churn``, ``eta``, ...).
        time_steps: None samples on the formulation's own grid; ``{"sigma_min", "sigma_max", "rho"}`` (any subset:
            the rest take EDM's defaults) on EDM's time steps with these constants (Karras et al. 2022, eq. 5)
            instead, as EDM's Figure 2 varies the discretization alone; ``{"sigmas": [...]}`` on that grid
            (decreasing, ending in 0) and ``{"file": path}`` on a ``lightning-diff tune-steps`` file's
            (``grid_file``): the step count is the grid's, and ``steps`` must be null or equal it.
        batch_size: samples per sampler call; the samples do not depend on it (per-sample seeds).
    """

    name: str = "heun"
    steps: int | None = None
    options: dict = dataclasses.field(default_factory=dict)
    time_steps: dict | None = None
    batch_size: int = 64
    _explicit: tuple | None = dataclasses.field(default=None, init=False, repr=False, compare=False)  # (grid, record)

    def __post_init__(self):
        if self.name not in registry.SAMPLERS:
            raise ValueError(f"sampler.name={self.name!r} is not known; allowed: {', '.join(registry.SAMPLERS)}")
        if self.steps is not None and (type(self.steps) is not int or self.steps < 1):
            raise ValueError(f"sampler.steps={self.steps!r} is invalid; allowed: null (the formulation's default) "
                             "or an integer >= 1")
        if type(self.batch_size) is not int or self.batch_size < 1:
            raise ValueError(f"sampler.batch_size={self.batch_size!r} is invalid; allowed: an integer >= 1")
        self.options = dict(self.options or {})
        if self.time_steps is not None:
            self.time_steps = dict(self.time_steps)
            unknown = sorted(set(self.time_steps) - {"sigma_min", "sigma_max", "rho", "sigmas", "file"})
            if unknown:
                raise ValueError(f"sampler.time_steps: {unknown} are not settings of the time steps; allowed: "
                                 f"{ALLOWED_FORMS} (or sampler.time_steps=null: the formulation's grid)")
            self._explicit = explicit_grid(self.time_steps, self.name)
            if self._explicit is not None and self.steps not in (None, len(self._explicit[0]) - 1):
                count = len(self._explicit[0]) - 1
                raise ValueError(f"sampler.steps={self.steps} and sampler.time_steps={self.time_steps} ({count} "
                                 f"steps) disagree; allowed: sampler.steps=null (the grid's count) or {count}")
        allowed = _option_defaults(self.name)
        unknown = sorted(set(self.options) - set(allowed))
        if unknown:
            raise ValueError(f"sampler.options: {unknown} are not options of sampler={self.name}; allowed: "
                             f"{', '.join(allowed)}")
        self.options = {k: allowed[k] if v is None else v for k, v in self.options.items()}  # null: the default

    @classmethod
    def of_run(cls, run_config: Mapping | None, sampler=None, guidance=None) -> tuple[SamplerSettings, Guidance]:
        """``(sampler settings, guidance)`` a command runs on a model (``lightning-diff sample`` / ``evaluate``): what
        ``sampler`` (a ``configs/sampler`` node) and ``guidance`` (a number: CFG's gamma, or the ``guidance`` node,
        ``Guidance.from_config``) set, and for what they leave null the model's own, from its ``run_config``: a
        released checkpoint's source sampler and guidance (``Pretrained.sampler`` and ``guidance``, recorded in
        ``run_config["pretrained"]``: ADM and DiT 250 DDPM steps on guided-diffusion's respacing with their variance
        and clipping, DiT gamma 1.5), the sampler a method made the model for (``run_config["own_sampler"]``: a
        consistency model's, a distilled student's DDIM), a training run's ``guidance`` (a preset's headline, e.g.
        dit_xl2_imagenet256), else EDM's Heun and gamma 1."""
        run = run_config or {}
        released = run.get("pretrained") or {}
        settings = cls.from_config(sampler, defaults=released.get("sampler") or run.get("own_sampler"))
        return settings, Guidance.from_config(guidance, own=(released or run).get("guidance", 1.0))

    @classmethod
    def from_config(cls, value, defaults: Mapping | None = None) -> SamplerSettings:
        """From a ``sampler`` config node (keys ``name``, ``steps``, ``options``, ``time_steps``, ``batch_size``;
        missing keys take the defaults above), an instance (returned as is) or None (the defaults).

        ``defaults`` (the same keys: a released checkpoint's source sampler, ``of_run``)
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
        keys = [f.name for f in dataclasses.fields(cls) if f.init]
        unknown = sorted(set(value) - set(keys))
        if unknown:
            raise ValueError(f"sampler: unknown settings {unknown}; allowed: {', '.join(keys)}")
        return cls(**_completed(value, dict(defaults or {})))

    def steps_for(self, formulation: Formulation) -> int:
        """The step count on ``formulation``'s grid: ``steps`` or the formulation's default (an explicit grid's:
        its own). Raises ValueError naming ``sampler.steps``, the value and the formulation's allowed range when it has
        no such grid."""
        if self._explicit is not None:
            return len(self._explicit[0]) - 1
        steps = formulation.default_sampling_steps if self.steps is None else self.steps
        low, high = formulation.min_sampling_steps, formulation.max_sampling_steps
        if steps < low or (high is not None and steps > high):
            value = steps if self.steps is not None else f"null (formulation={formulation.name}'s default {steps})"
            allowed = f"an integer >= {low}" if high is None else f"an integer in [{low}, {high}]"
            raise ValueError(f"sampler.steps={value} is invalid for formulation={formulation.name}; allowed: "
                             f"{allowed}")
        return steps

    def sigmas(self, formulation: Formulation, grid: torch.Tensor | None = None) -> torch.Tensor:
        """The grid this setting samples ``formulation`` on: decreasing float64 ``[steps + 1]`` ending in 0.
        ``grid``: a model's own levels (a distilled student's, ``DiffusionModule.grid``), used unless ``steps`` asks
        for the formulation's grid or ``time_steps`` gives a grid (``sigmas``, ``file``), which is used as it is."""
        if self._explicit is not None:
            return self._explicit[0].clone()
        if grid is not None and self.steps is None:
            return grid
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
        if "formulation" in inspect.signature(registry.SAMPLERS[self.name]).parameters:
            options["formulation"] = formulation
        return options

    def check(self, formulation: Formulation, max_growth: float = 10.0, *,
              denoiser: torch.nn.Module | None = None) -> SamplerSettings:
        """This setting, after checking that it runs on ``formulation``, so that a bad setting fails at config
        time and not when training ends: its grid exists, the sampler accepts its options, and it does not diverge
        on the exact denoiser of data ``N(0, sigma_data^2)``: one 1-D sample starting at ``x = sigmas[0]`` (seed 0)
        must end finite and within ``max_growth`` times the largest noise envelope ``sqrt(sigma_data^2 +
        sigmas[0]^2)`` (few steps may land far from the data, but not beyond where they started). E.g. annealed
        Langevin's ``step_size`` 2e-5 diverges on EDM's grid, whose sigma_min = 0.002 makes its steps
        ``2e-5 sigma_i^2 / sigma_min^2`` too long. Raises ValueError naming the setting. With the model's
        ``denoiser``: a UserWarning when a tune-steps file was tuned for another model (``grid_file``)."""
        if denoiser is not None:
            warn_if_tuned_for_another_model(self.time_steps, denoiser, formulation.name)
        sigmas = self.sigmas(formulation)
        denoiser = _GaussianDataDenoiser(formulation)
        x = torch.full((1, 1), float(sigmas[0]))
        setting = (f"sampler={self.name} with sampler.steps={self.steps_for(formulation)} and sampler.options="
                   f"{self.options} on formulation={formulation.name}")
        try:
            out = registry.sample(self.name, denoiser, x, sigmas, generator=PerSampleGenerator([0]),
                                  **self.call_options(formulation))
        except ValueError as err:
            raise ValueError(f"{setting}: {err}") from None
        bound = max_growth * math.hypot(denoiser.sigma_data, float(sigmas[0]))
        if not out.abs().max() <= bound:  # also refuses nan
            raise ValueError(f"{setting} diverges on the exact denoiser of data N(0, {denoiser.sigma_data}^2): from "
                             f"x = {float(sigmas[0]):.4g} it ends at {out.flatten().tolist()}; allowed: settings that "
                             f"stay within {bound:.4g} there (a smaller step size, another sampler or formulation)")
        return self

    def record(self, formulation: Formulation, grid: torch.Tensor | None = None) -> dict:
        """``{"name", "steps", "options"}`` with the step count actually used on ``formulation`` (protocols), and
        ``"time_steps"`` when they are not the formulation's own, else its ``"spacing"`` when it has one (DDPM's
        sub-sequence of timesteps, ``schedules.ddpm_timesteps``). With a model's own ``grid`` (as ``sigmas``): its
        step count and ``time_steps: {"sigmas": [...]}``; with an explicit grid, the same, plus the ``file`` and its
        ``key`` for a tune-steps file."""
        record = {"name": self.name, "options": dict(self.options)}
        if self._explicit is not None:
            return {**record, "steps": len(self._explicit[0]) - 1, "time_steps": dict(self._explicit[1])}
        if grid is not None and self.steps is None:
            return {**record, "steps": len(grid) - 1, "time_steps": {"sigmas": grid.tolist()}}
        record["steps"] = self.steps_for(formulation)
        if self.time_steps is not None:
            return {**record, "time_steps": dict(self.time_steps)}
        spacing = getattr(formulation, "spacing", None)
        return record if spacing is None else {**record, "spacing": spacing}


def _option_defaults(name: str) -> dict:
    """``{option: keyword default}`` of sampler ``name`` (the keywords ``DiffusionModule.sample`` does not set)."""
    parameters = inspect.signature(registry.SAMPLERS[name]).parameters
    return {k: p.default for k, p in parameters.items() if k not in _NOT_OPTIONS}


def _completed(value: dict, defaults: dict) -> dict:
    """The sampler config ``value`` with what it leaves null from ``defaults`` (``SamplerSettings.from_config``)."""
    own_grid = bool(set(value.get("time_steps") or {}) & {"sigmas", "file"})  # its step count is the grid's
    value = {**value, **{k: defaults.get(k) for k in ("name", "steps", "time_steps")
                         if value.get(k) is None and not (own_grid and k == "steps")}}
    if value.get("name") is None:  # no one named a sampler: EDM's Heun, its options at their (scalar) defaults
        value["name"] = "heun"
        defaults = {"options": {k: v for k, v in _option_defaults("heun").items()
                                if isinstance(v, (bool, int, float, str))}}
    accepted = _option_defaults(value["name"]) if value["name"] in registry.SAMPLERS else {}
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


@torch.no_grad()
def generate(denoiser: Callable, seeds: Sequence[int], settings: SamplerSettings, *, data_shape: Sequence[int],
             grid: torch.Tensor | None = None, sigmas: torch.Tensor | None = None, num_classes: int = 0,
             conditional: bool = False, labels: torch.Tensor | None = None, guidance: float | Guidance = 1.0,
             classifier: Callable | None = None, classifier_scale: float = 1.0, stats: dict | None = None,
             seed_protocol: str = "default", device: torch.device | str = "cpu") -> torch.Tensor:
    """One sample per seed of ``denoiser`` (a ``Denoiser``: its ``formulation`` and ``round_sigma``) with
    ``settings``, all seeds in one sampler call (``evaluation.generate`` batches by ``settings.batch_size``).

    Args:
        seeds: one integer per sample; sample i depends only on ``seeds[i]`` (EDM's per-sample generators: the
            same images whatever the batch size or number of processes).
        data_shape: shape of one sample, e.g. ``(C, H, W)``.
        grid: the model's own levels (``SamplerSettings.sigmas``); ``sigmas``: an explicit grid instead
            (decreasing, ending in 0).
        num_classes, conditional: the model's classes and whether it takes labels; ``labels``: ``[N]`` class
            labels (None: none for an unconditional model; drawn from each seed under ``seed_protocol=edm``).
        guidance: a ``Guidance`` (classifier-free or autoguidance with its weaker model loaded, an interval), or
            a number: classifier-free guidance gamma (1 = none; ``CFGDenoiser``).
        classifier, classifier_scale: classifier guidance with scale s (``methods.classifier.NoisyClassifier
            .guide``); an unconditional model then needs ``labels`` (the classes to guide to).
        stats: dict that receives the sampler's counters (``nfe``).
        seed_protocol: ``default`` or ``edm`` (NVlabs/edm generate.py's draws: ``sampling.noise``).
        device: where the samples are drawn (the per-sample generators live there under ``edm``, else on CPU).
    Returns:
        ``[N, *data_shape]`` float32.
    """
    formulation = denoiser.formulation
    if sigmas is None:
        sigmas = settings.sigmas(formulation, grid)
    # snapped before the start noise is scaled by sigmas[0], as NVlabs/edm's sampler does
    sigmas = denoiser.round_sigma(sigmas.to(device, torch.float64))
    generator = PerSampleGenerator([int(s) for s in seeds], protocol=seed_protocol,
                                   device=device if seed_protocol == "edm" else torch.device("cpu"))
    x = initial_noise(generator, tuple(data_shape), float(sigmas[0]), device=device)
    drawn = initial_labels(generator, num_classes)
    labels = drawn if labels is None else labels
    cond = None if labels is None else {"labels": labels.to(device)}
    guided = Guidance.from_config(guidance, own=1.0).wrap(denoiser)
    if classifier is not None:
        guided = classifier.guide(guided, classifier_scale, denoiser_labels=conditional)
    out = registry.sample(settings.name, guided, x, sigmas, generator=generator, stats=stats, cond=cond,
                          **settings.call_options(formulation))
    return out.float()
