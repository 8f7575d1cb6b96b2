"""Guidance as denoiser wrappers (docs/guidance.md, docs/samplers.md#guidance): a guided denoiser has the sampler
signature ``denoiser(x, sigma, labels=None, **cond)``, so every sampler runs guided without change. The wrappers pass
the wrapped denoiser's ``round_sigma`` through and report their cost in ``network_passes`` (see ``core``).

Scale convention: gamma, where gamma = 1 means no guidance (EDM2, k-diffusion ``cfg_scale``, diffusers
``guidance_scale``). Papers and code that write ``(1 + w) eps(x, c) - w eps(x)`` (Ho & Salimans 2022, the
flow_matching example; w = 0 is off) use gamma = 1 + w: build with ``CFGDenoiser.from_w(denoiser, w)``.

``Guidance`` is the setting of ``lightning-diff sample`` / ``evaluate`` (``guidance=<gamma>`` or the node
``guidance.kind/scale/ckpt/interval``) and builds the wrapper: ``CFGDenoiser`` (classifier-free) or ``AutoGuidance``
(a weaker model of the same run, Karras et al. 2024), either restricted to a noise interval (Kynkäänniemi et al. 2024).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from .core import network_passes, round_sigma_of

__all__ = ["Guidance", "GUIDANCE_KINDS", "INTERVAL_ALLOWED", "CFGDenoiser", "AutoGuidance", "ClassifierGuidance",
           "CLASSIFIER_FRAMES", "checked_interval", "checked_scale", "classifier_inputs", "split_classifier_guidance"]

CLASSIFIER_FRAMES = ("x_t", "sigma")
GUIDANCE_KINDS = ("cfg", "autoguidance")
INTERVAL_ALLOWED = ("null (guidance at every noise level) or [sigma_lo, sigma_hi] with 0 <= sigma_lo < sigma_hi "
                    "(guided where sigma_lo < sigma <= sigma_hi)")  # the words of a refused guidance interval


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and not math.isnan(value)


def checked_scale(scale, setting: str) -> float:
    """``scale`` as a float; ValueError naming ``setting`` unless it is a finite number >= 0."""
    if not (_is_number(scale) and 0 <= scale < math.inf):
        raise ValueError(f"{setting}={scale!r} is invalid; allowed: a finite number gamma >= 0 (1 = no guidance, "
                         "0 = the reference model alone)")
    return float(scale)


def checked_interval(value, setting: str = "guidance.interval") -> tuple[float, float] | None:
    """``(sigma_lo, sigma_hi)`` of a guidance interval (a pair of numbers, 0 <= sigma_lo < sigma_hi; sigma_hi may be
    inf) or None; ValueError naming ``setting`` otherwise."""
    if value is None:
        return None
    pair = tuple(value) if isinstance(value, (list, tuple)) else ()
    if not (len(pair) == 2 and all(map(_is_number, pair)) and 0 <= pair[0] < pair[1]):
        raise ValueError(f"{setting}={value!r} is invalid; allowed: {INTERVAL_ALLOWED}")
    return float(pair[0]), float(pair[1])


@dataclasses.dataclass(frozen=True)
class Guidance:
    """What guides a sampler (the ``guidance`` setting of ``sample`` / ``evaluate``; docs/guidance.md).

    Args:
        kind: ``"cfg"``: classifier-free guidance, the reference is the same network's null label (Ho & Salimans
            2022); ``"autoguidance"``: the reference is a weaker model of the same run, called with the same labels
            (Karras et al. 2024), loaded from ``ckpt``.
        scale: gamma, ``D_ref + gamma (D - D_ref)``; 1 = no guidance. None: the model's own (``SamplerSettings
            .of_run`` fills it: a released checkpoint's or a training preset's CFG gamma, else 1).
        interval: ``(sigma_lo, sigma_hi)``: guide only where ``sigma_lo < sigma <= sigma_hi`` (Kynkäänniemi et al.
            2024), the main model alone elsewhere; None: at every level.
        ckpt: autoguidance's weaker model, an earlier checkpoint or a smaller network of the same run (recorded).
        weak: that model's denoiser once loaded (``evaluation.generate.load_guidance``); not part of the setting.
    """

    kind: str = "cfg"
    scale: float | None = 1.0
    interval: tuple[float, float] | None = None
    ckpt: str | None = None
    weak: Callable | None = dataclasses.field(default=None, compare=False, repr=False)

    def __post_init__(self):
        if self.kind not in GUIDANCE_KINDS:
            raise ValueError(f"guidance.kind={self.kind!r} is not known; allowed: {', '.join(GUIDANCE_KINDS)}")
        if self.scale is not None:
            object.__setattr__(self, "scale", checked_scale(self.scale, "guidance.scale"))
        object.__setattr__(self, "interval", checked_interval(self.interval))
        if self.kind == "autoguidance" and self.ckpt is None and self.weak is None:
            raise ValueError("guidance.ckpt=None with guidance.kind=autoguidance: autoguidance needs the weaker "
                             "model; allowed: the checkpoint of an earlier step or of a smaller network of the same "
                             "run")
        if self.kind == "cfg" and self.ckpt is not None:
            raise ValueError(f"guidance.ckpt={self.ckpt!r} with guidance.kind=cfg: classifier-free guidance reads "
                             "the same network's null label, so nothing would read it; allowed: guidance.ckpt=null, "
                             "or guidance.kind=autoguidance (guided by that weaker model)")

    @classmethod
    def from_config(cls, value, own=None) -> Guidance:
        """From the ``guidance`` setting: None (the model's own), a number (CFG with that gamma, as before the
        node existed), a node / mapping with keys ``kind, scale, interval, ckpt``, or an instance. ``own`` (the same
        forms: a model's default guidance) fills a null scale, and a null interval with it, when its kind is the
        same; a null scale without ``own`` is kept null. ValueError naming the setting."""
        if isinstance(value, DictConfig):
            value = OmegaConf.to_container(value, resolve=True)
        if isinstance(value, cls):
            guidance = value
        elif value is None:
            guidance = cls(scale=None)
        elif _is_number(value):
            guidance = cls(scale=checked_scale(value, "guidance"))
        elif isinstance(value, Mapping):
            unknown = sorted(set(value) - {"kind", "scale", "interval", "ckpt"})
            if unknown:
                raise ValueError(f"guidance: unknown settings {unknown}; allowed: kind, scale, interval, ckpt")
            guidance = cls(**{k: v for k, v in value.items() if v is not None})
            guidance = dataclasses.replace(guidance, scale=value.get("scale"))
        else:
            raise ValueError(f"guidance={value!r} is invalid; allowed: a number gamma >= 0 (classifier-free, 1 = "
                             "none), null (the model's own), or the node guidance.kind/scale/interval/ckpt")
        return guidance if own is None else guidance._completed(cls.from_config(own))

    def _completed(self, own: Guidance) -> Guidance:
        """This setting with a null scale (and then a null interval) from the model's ``own`` guidance."""
        if self.scale is not None:
            return self
        if own.kind != self.kind or own.scale is None:
            raise ValueError(f"guidance.scale=None with guidance.kind={self.kind}: the model's own guidance is "
                             f"{own.kind} {own.scale}, so it has no default scale for {self.kind}; allowed: "
                             "guidance.scale=<gamma >= 0> (1 = no guidance)")
        return dataclasses.replace(self, scale=own.scale, interval=self.interval or own.interval)

    @property
    def active(self) -> bool:
        """Whether it changes the denoiser (gamma not 1)."""
        return self.scale is not None and self.scale != 1.0

    def wrap(self, denoiser: Callable) -> Callable:
        """``denoiser`` guided by this setting: itself when inactive, else a ``CFGDenoiser`` or ``AutoGuidance``
        (which needs ``weak``: ``evaluation.generate.load_guidance``)."""
        if not self.active:
            return denoiser
        if self.kind == "cfg":
            return CFGDenoiser(denoiser, self.scale, interval=self.interval)
        if self.weak is None:
            raise ValueError(f"guidance.ckpt={self.ckpt}: the weaker model is not loaded; allowed: "
                             "evaluation.generate.load_guidance(guidance, module) first, or Guidance(weak=<denoiser>)")
        return AutoGuidance(denoiser, self.weak, self.scale, interval=self.interval)

    def record(self) -> dict:
        """The sampler record's guidance fields: ``guidance`` (gamma, as records always held it), ``guidance_kind``,
        ``guidance_interval`` (``[sigma_lo, sigma_hi]`` or None) and, for autoguidance, ``guidance_ckpt``."""
        record = {"guidance": self.scale, "guidance_kind": self.kind,
                  "guidance_interval": None if self.interval is None else list(self.interval)}
        return record if self.kind == "cfg" else {**record, "guidance_ckpt": self.ckpt}

    def __str__(self) -> str:
        """``cfg 1.5``, ``autoguidance 2 (weak: <ckpt>) on sigma in (0.28, 5.42]``: for summary lines."""
        scale = "(the model's own scale)" if self.scale is None else f"{self.scale:g}"
        text = f"{self.kind} {scale}" + (f" (weak: {self.ckpt})" if self.kind == "autoguidance" else "")
        return text if self.interval is None else f"{text} on sigma in ({self.interval[0]:g}, {self.interval[1]:g}]"


def _twice(value, batch: int):
    """``[value; value]`` for a tensor with a batch dimension of ``batch`` rows; anything else unchanged."""
    if isinstance(value, torch.Tensor) and value.ndim > 0 and value.shape[0] == batch:
        return torch.cat([value, value])
    return value


def _rows(value, rows: torch.Tensor, batch: int):
    """``value[rows]`` for a tensor with a batch dimension of ``batch`` rows; anything else unchanged."""
    if isinstance(value, torch.Tensor) and value.ndim > 0 and value.shape[0] == batch:
        return value[rows]
    return value


def _run(model: Callable, with_variance: bool, x, sigma, labels, cond: dict):
    """``(D, v or None)`` of one call of ``model``, through ``forward_with_variance`` when ``with_variance``."""
    if with_variance:
        return _forward_with_variance(model)(x, sigma, labels=labels, **cond)
    return model(x, sigma, labels=labels, **cond), None


class _GuidedDenoiser:
    """What CFG and autoguidance share: ``D_ref + gamma (D - D_ref)`` (``torch.lerp(D_ref, D, gamma)``) where the
    call is guided, restricted to the noise interval ``sigma_lo < sigma <= sigma_hi`` (Kynkäänniemi et al. 2024, the
    guidance interval; outside it the main denoiser alone, one pass), rows of one call split by their own sigma.
    Subclasses say when a call is guided (``_guides``), which model answers an unguided one (``_plain_model``), and
    compute ``(D, v, D_ref)`` of the guided rows (``_both``)."""

    def __init__(self, denoiser: Callable, scale: float, interval, name: str):
        self.denoiser, self.scale = denoiser, checked_scale(scale, f"{name}: scale")
        self.interval = checked_interval(interval, f"{name}: interval")
        self.round_sigma = round_sigma_of(denoiser)

    def inside(self, sigma, batch: int, device=None) -> torch.Tensor:
        """``[B]`` bool: the rows whose noise level is in the interval (all of them without one)."""
        sigma = torch.as_tensor(sigma, dtype=torch.float64, device=device).reshape(-1).expand(batch)
        if self.interval is None:
            return torch.ones(batch, dtype=torch.bool, device=sigma.device)
        low, high = self.interval
        return (sigma > low) & (sigma <= high)

    def network_passes(self, cond: dict, sigma: torch.Tensor | None = None) -> int:
        """Network forward passes per sample of one call with ``cond`` at noise levels ``sigma`` ``[B]`` (None:
        unknown, counted as inside the interval): the main model's, plus the reference's when a row is guided."""
        labels = cond.get("labels")
        plain = network_passes(self._plain_model(labels), cond, sigma)
        if not self._guides(labels):
            return plain
        outside = sigma is not None and self.interval is not None  # no interval: no mask, no host sync per call
        if outside and not bool(self.inside(sigma, torch.as_tensor(sigma).numel()).any()):
            return plain
        return plain + self._reference_passes(cond, sigma)

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, labels: torch.Tensor | None = None,
                 **cond) -> torch.Tensor:
        """Guided D ``[B, ...]``."""
        return self._guided(x, sigma, labels, cond, with_variance=False)[0]

    def forward_with_variance(self, x: torch.Tensor, sigma: torch.Tensor, labels: torch.Tensor | None = None,
                              **cond) -> tuple[torch.Tensor, torch.Tensor]:
        """``(guided D, v)`` for ``ddpm variance=learned``: the variance channels of the main model's pass, as
        DiT's ``forward_with_cfg`` keeps them (``Denoiser.forward_with_variance``)."""
        return self._guided(x, sigma, labels, cond, with_variance=True)

    def _guided(self, x, sigma, labels, cond: dict, with_variance: bool):
        """``(D, v or None)``: guided rows inside the interval, the plain model's elsewhere."""
        if not self._guides(labels):
            return _run(self._plain_model(labels), with_variance, x, sigma, labels, cond)
        inside = self.inside(sigma, x.shape[0], x.device)
        if bool(inside.all()):
            return self._combined(x, sigma, labels, cond, with_variance)
        if not bool(inside.any()):
            return self._plain(x, sigma, labels, cond, with_variance)
        parts = [(rows, self._combined if guided else self._plain)
                 for rows, guided in ((inside.nonzero()[:, 0], True), ((~inside).nonzero()[:, 0], False))]
        outputs = [(rows, fn(*self._pick(rows, x, sigma, labels, cond), with_variance)) for rows, fn in parts]
        return tuple(_scatter(x.shape[0], [(rows, out[i]) for rows, out in outputs]) for i in range(2))

    @staticmethod
    def _pick(rows, x, sigma, labels, cond: dict):
        """``(x, sigma, labels, cond)`` of the ``rows`` of one call."""
        batch = x.shape[0]
        return (x[rows], _rows(torch.as_tensor(sigma, device=x.device).reshape(-1).expand(batch), rows, batch),
                None if labels is None else labels[rows], {k: _rows(v, rows, batch) for k, v in cond.items()})

    def _plain(self, x, sigma, labels, cond: dict, with_variance: bool):
        """``(D, v or None)`` of the main model alone (outside the interval), with the call's labels."""
        return _run(self.denoiser, with_variance, x, sigma, labels, cond)

    def _combined(self, x, sigma, labels, cond: dict, with_variance: bool):
        """``(D_ref + gamma (D - D_ref), v of the main pass)`` on every row."""
        main, variance, reference = self._both(x, sigma, labels, cond, with_variance)
        return torch.lerp(reference, main, self.scale), variance

    def _guides(self, labels) -> bool:
        return self.scale != 1.0

    def _plain_model(self, labels) -> Callable:
        return self.denoiser


def _scatter(batch: int, parts: list):
    """One ``[batch, ...]`` tensor from ``(rows, tensor or None)`` parts; None when the parts are None."""
    if any(part is None for _, part in parts):
        return None
    first = parts[0][1]
    out = first.new_empty((batch, *first.shape[1:]))
    for rows, part in parts:
        out[rows] = part
    return out


class CFGDenoiser(_GuidedDenoiser):
    """Classifier-free guidance (Ho & Salimans 2022) in D-space:
    ``D_gamma = D(x; sigma) + gamma (D(x; sigma, c) - D(x; sigma))``.

    D, eps, v and the score are affine in the network output at fixed (x, sigma), so this equals
    ``eps~ = (1 + w) eps(x, c) - w eps(x)`` with gamma = 1 + w (docs/samplers.md#classifier-free-guidance).

    Cost: a guided call runs the conditional and unconditional passes as one batch ``[x; x]`` with labels
    ``[c; null]`` (EDM2, diffusers), or as two calls when ``uncond_denoiser`` is a separate network; either
    way it is 2 network passes per sample (``network_passes``), 1 when ``gamma == 1``, ``labels is None`` or the
    call's noise level is outside ``interval``.

    Args:
        denoiser: ``denoiser(x, sigma, labels=None, **cond)``; ``labels=None`` must mean unconditional.
        scale: gamma >= 0 (1 = the conditional denoiser, 0 = the unconditional one).
        uncond_denoiser: optional separate model for the reference term, called with ``labels=None``; defaults to
            ``denoiser``'s null label. (A weaker model called with the same labels is ``AutoGuidance``.)
        null_label: the label value that makes ``denoiser`` unconditional inside a batch; default
            ``denoiser.null_label`` (``Denoiser``: its backbone's learned null label).
        interval: ``(sigma_lo, sigma_hi)``: guided only where ``sigma_lo < sigma <= sigma_hi`` (Kynkäänniemi et al.
            2024), the conditional denoiser elsewhere; None: at every level.
    """

    def __init__(self, denoiser: Callable, scale: float, uncond_denoiser: Callable | None = None,
                 null_label: int | None = None, *, interval: tuple[float, float] | None = None):
        super().__init__(denoiser, scale, interval, "CFGDenoiser")
        self.uncond_denoiser = uncond_denoiser
        self.null_label = getattr(denoiser, "null_label", None) if null_label is None else null_label
        if uncond_denoiser is None and self.null_label is None:
            raise ValueError(f"CFGDenoiser: denoiser {type(denoiser).__name__} has no null_label (the label that "
                             "means 'unconditional' in a batch); allowed: a conditional Denoiser (its backbone's "
                             "null label), null_label=<int>, or uncond_denoiser=<a separate network>")

    @classmethod
    def from_w(cls, denoiser: Callable, w: float, uncond_denoiser: Callable | None = None) -> CFGDenoiser:
        """From the (1 + w) convention of Ho & Salimans 2022: gamma = 1 + w."""
        return cls(denoiser, 1.0 + w, uncond_denoiser)

    def _guides(self, labels) -> bool:
        return labels is not None and self.scale != 1.0

    def _plain_model(self, labels) -> Callable:
        """The conditional model, or the unconditional one for a call without labels."""
        return self.denoiser if labels is not None else self.uncond_denoiser or self.denoiser

    def _reference_passes(self, cond: dict, sigma) -> int:
        return network_passes(self.uncond_denoiser or self.denoiser, {**cond, "labels": None}, sigma)

    def _both(self, x, sigma, labels, cond: dict, with_variance: bool):
        """``(D(x, c), v, D(x))``: two calls with a separate unconditional network, else one batch ``[x; x]`` with
        labels ``[c; null]`` (rows ``[0, B)`` conditional)."""
        if self.uncond_denoiser is not None:
            conditional, variance = _run(self.denoiser, with_variance, x, sigma, labels, cond)
            return conditional, variance, self.uncond_denoiser(x, sigma, labels=None, **cond)
        batch = x.shape[0]
        both_labels = torch.cat([labels, torch.full_like(labels, self.null_label)])
        both, both_variance = _run(self.denoiser, with_variance, torch.cat([x, x]), _twice(sigma, batch), both_labels,
                                   {key: _twice(value, batch) for key, value in cond.items()})
        return both[:batch], None if both_variance is None else both_variance[:batch], both[batch:]


class AutoGuidance(_GuidedDenoiser):
    """Autoguidance (Karras et al. 2024, "Guiding a diffusion model with a bad version of itself"): the guided
    denoiser ``D_w = w D_1 + (1 - w) D_0`` of their Sec. 2 with ``D_0`` a weaker version of the same model (an earlier
    checkpoint or a smaller network of the run), called with the same conditioning, so
    ``D_gamma = D_weak(x; sigma, c) + gamma (D(x; sigma, c) - D_weak(x; sigma, c))`` (EDM2's generate_images.py:
    ``ref_Dx.lerp(Dx, guidance)``). Works for unconditional models too (``labels=None`` to both).

    Cost: 2 network passes per sample (two calls: the networks differ), 1 when ``gamma == 1`` or the call's noise
    level is outside ``interval``.

    Args:
        denoiser: the main model ``denoiser(x, sigma, labels=None, **cond)``.
        weak: the weaker model, the same signature, the same formulation and data (``evaluation.generate
            .load_guidance`` checks a checkpoint's).
        scale: gamma >= 0 (1 = the main model, 0 = the weak one).
        interval: ``(sigma_lo, sigma_hi)``: guided only where ``sigma_lo < sigma <= sigma_hi`` (Kynkäänniemi et al.
            2024), the main model elsewhere; None: at every level.
    """

    def __init__(self, denoiser: Callable, weak: Callable, scale: float, *,
                 interval: tuple[float, float] | None = None):
        super().__init__(denoiser, scale, interval, "AutoGuidance")
        self.weak = weak

    def _reference_passes(self, cond: dict, sigma) -> int:
        return network_passes(self.weak, cond, sigma)

    def _both(self, x, sigma, labels, cond: dict, with_variance: bool):
        """``(D, v, D_weak)``: the main model's pass (with its variance) and the weak one's, same conditioning."""
        main, variance = _run(self.denoiser, with_variance, x, sigma, labels, cond)
        return main, variance, self.weak(x, sigma, labels=labels, **cond)


def _forward_with_variance(model: Callable) -> Callable:
    """``model.forward_with_variance``; ValueError naming the setting when the wrapped model has none."""
    method = getattr(model, "forward_with_variance", None)
    if not callable(method):
        raise ValueError(f"variance='learned': the guided model {type(model).__name__} has no learned-variance "
                         "head (forward_with_variance); allowed: variance=fixed_small, fixed_large or analytic")
    return method


def classifier_inputs(frame: str, formulation, x: torch.Tensor,
                      sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(inputs [B, ...], time [B])`` a classifier of ``frame`` takes for the sigma-frame ``x`` at ``sigma`` ``[B]``
    (``ClassifierGuidance``; differentiable in x): ``(x, sigma)``, or ``(s(t) x, time)`` in the x_t frame. Training
    a classifier with the same function (``methods.classifier``) keeps training and guidance in one frame."""
    if frame == "sigma":
        return x, sigma
    t = formulation.t_of_sigma(sigma)
    time = formulation.c_noise(sigma) if formulation.discrete else t
    return formulation.s(t).reshape((-1,) + (1,) * (x.ndim - 1)) * x, time


def _floating_dtype(module: Callable, default: torch.dtype) -> torch.dtype:
    """The dtype of a module's first floating parameter or buffer (what it computes in), else ``default``."""
    if isinstance(module, nn.Module):
        for tensor in (*module.parameters(), *module.buffers()):
            if tensor.is_floating_point():
                return tensor.dtype
    return default


class ClassifierGuidance:
    """Classifier guidance (Dhariwal & Nichol 2021) in score form, their Algorithm 2: add
    ``scale * grad_x log p(c | x; sigma)`` to the score, i.e. ``D <- D + sigma^2 scale grad_x log p(c | x; sigma)``
    since score = (D - x) / sigma^2, with x the sigma-frame input. Every sampler calls it so, except the ancestral
    ``ddpm``, which applies their Algorithm 1 (the mean shifted by ``scale Sigma grad``, Sigma the step's variance)
    through ``split_classifier_guidance``, and ``ddim``, which adds the same score term to its clipped x0.

    Input frame of the classifier (``frame``, no default: it must match how the classifier was trained):

    - ``"x_t"``: ``classifier(x_t, t)`` with ``x_t = s(t) x`` in the formulation's own frame and t its network
      time: the timestep index (``c_noise``, 0..T-1) for the discrete families, as guided-diffusion's ADM
      classifiers take it, and ``t_of_sigma(sigma)`` for continuous ones. The gradient is taken through
      ``x_t = s x``, so ``grad_x = s grad_{x_t}``. (``iddpm`` has s = 1, EDM Table 1; guided-diffusion's
      classifiers for its cosine models see ``sqrt(abar) x``: use ``ddpm`` with ``beta_schedule=cosine``.)
    - ``"sigma"``: ``classifier(x, sigma)`` on the sigma-frame input ``x = y + sigma n``.

    The classifier runs in the dtype of its parameters (inputs cast as ``Denoiser`` casts its backbone's;
    time in float32, float64 for a float64 classifier); the logits are read in the sampler's dtype. Its
    passes are not network passes: ``network_passes`` is the denoiser's.

    Args:
        denoiser: ``denoiser(x, sigma, labels=None, **cond)``; called with the same labels, or without them when
            ``denoiser_labels=False`` (an unconditional model guided by the classifier alone).
        classifier: ``classifier(inputs, time) -> logits [B, num_classes]`` in ``frame``.
        scale: guidance scale s >= 0 (1 gives the exact class-conditional score for an exact classifier);
            guided-diffusion's ``--classifier_scale`` (its ``cond_fn`` returns ``s grad_{x_t} log p``).
        frame: ``"x_t"`` or ``"sigma"`` (above).
        formulation: the ``Formulation`` of the ``"x_t"`` frame; default ``denoiser.formulation``.
        denoiser_labels: pass the labels to the denoiser (False: it is unconditional).
    """

    def __init__(self, denoiser: Callable, classifier: Callable, scale: float = 1.0, *, frame: str,
                 formulation=None, denoiser_labels: bool = True):
        if not isinstance(scale, (int, float)) or not scale >= 0:
            raise ValueError(f"ClassifierGuidance: scale={scale!r} is invalid; allowed: a number >= 0")
        if frame not in CLASSIFIER_FRAMES:
            raise ValueError(f"ClassifierGuidance: frame={frame!r} is not known; allowed: "
                             f"{', '.join(CLASSIFIER_FRAMES)}")
        formulation = getattr(denoiser, "formulation", None) if formulation is None else formulation
        if frame == "x_t" and formulation is None:
            raise ValueError("ClassifierGuidance: frame='x_t' needs the formulation (its s(t) and time); "
                             "allowed: formulation=<Formulation> or a Denoiser, which carries one")
        self.denoiser, self.classifier, self.scale = denoiser, classifier, float(scale)
        self.frame, self.formulation, self.denoiser_labels = frame, formulation, denoiser_labels
        self.round_sigma = round_sigma_of(denoiser)

    def network_passes(self, cond: dict, sigma: torch.Tensor | None = None) -> int:
        """Network forward passes per sample of one call: the denoiser's (the classifier is not counted)."""
        return network_passes(self.denoiser, cond if self.denoiser_labels else {**cond, "labels": None}, sigma)

    def log_prob_grad(self, x: torch.Tensor, sigma: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """``grad_x log p(labels | x; sigma)`` w.r.t. the sigma-frame ``x``, ``[B, ...]`` in x's dtype."""
        dtype = _floating_dtype(self.classifier, x.dtype)
        with torch.enable_grad():
            xg = x.detach().requires_grad_(True)
            inputs, time = classifier_inputs(self.frame, self.formulation, xg, sigma)
            logits = self.classifier(inputs.to(dtype), time.to(torch.promote_types(dtype, torch.float32)))
            log_probs = torch.log_softmax(logits.to(x.dtype), dim=-1)
            selected = log_probs.gather(1, labels.reshape(-1, 1).long()).sum()
            (grad,) = torch.autograd.grad(selected, xg)
        return grad

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, labels: torch.Tensor | None = None,
                 **cond) -> torch.Tensor:
        """Guided D ``[B, ...]``; no guidance when ``labels is None``."""
        return self._guide(self.denoiser(x, sigma, labels=labels if self.denoiser_labels else None, **cond),
                           x, sigma, labels)

    def forward_with_variance(self, x: torch.Tensor, sigma: torch.Tensor, labels: torch.Tensor | None = None,
                              **cond) -> tuple[torch.Tensor, torch.Tensor]:
        """``(guided D, v)``: D in score form (Algorithm 2), the variance channels the denoiser's (the classifier
        does not change them). ``sampler=ddpm`` does not call this one: it applies Algorithm 1 itself (class doc)."""
        denoised, variance = _forward_with_variance(self.denoiser)(
            x, sigma, labels=labels if self.denoiser_labels else None, **cond)
        return self._guide(denoised, x, sigma, labels), variance

    def guidance_grad(self, x: torch.Tensor, sigma: torch.Tensor, labels: torch.Tensor | None = None,
                      **cond) -> torch.Tensor | None:
        """``s grad_x log p(labels | x; sigma)`` ``[B, ...]`` w.r.t. the sigma-frame ``x``, in x's dtype (s = ``scale``;
        guided-diffusion's ``cond_fn``, ``s grad_{x_t} log p`` in the DDPM frame ``x_t = sqrt(abar_t) x``, is this over
        ``sqrt(abar_t)``); None when unguided (``labels is None`` or s = 0). ``cond`` (the denoiser's other
        conditioning) is not read."""
        if labels is None or self.scale == 0:
            return None
        sigma = torch.as_tensor(sigma, dtype=x.dtype, device=x.device).reshape(-1).expand(x.shape[0])
        return self.scale * self.log_prob_grad(x, sigma, labels)

    def unguided(self) -> ClassifierGuidance:
        """This wrapper at scale 0: the wrapped denoiser's D (labels passed as ``denoiser_labels`` says), with its
        ``forward_with_variance``, ``round_sigma`` and ``network_passes``; for samplers that add ``guidance_grad``
        themselves (``split_classifier_guidance``)."""
        return ClassifierGuidance(self.denoiser, self.classifier, 0.0, frame=self.frame, formulation=self.formulation,
                                  denoiser_labels=self.denoiser_labels)

    def _guide(self, denoised: torch.Tensor, x: torch.Tensor, sigma, labels) -> torch.Tensor:
        """``denoised + sigma^2 s grad log p(labels | x; sigma)`` (score form); ``denoised`` when unguided."""
        grad = self.guidance_grad(x, sigma, labels)
        if grad is None:
            return denoised
        sigma = torch.as_tensor(sigma, dtype=denoised.dtype, device=x.device).reshape(-1).expand(x.shape[0])
        return denoised + sigma.reshape((-1,) + (1,) * (x.ndim - 1)) ** 2 * grad.to(denoised.dtype)


def split_classifier_guidance(denoiser: Callable) -> tuple[Callable, Callable | None]:
    """``(model, guidance_grad)`` for a sampler that applies classifier guidance itself (``ddpm``: Dhariwal & Nichol
    2021, Algorithm 1; ``ddim``: the score term on the clipped x0, as guided-diffusion's ``condition_score``): a
    ``ClassifierGuidance`` gives its ``unguided()`` self and its ``guidance_grad``; any other denoiser (CFG, a
    classifier guidance inside another wrapper, none) is ``(denoiser, None)`` and keeps its own (score-form) D."""
    if isinstance(denoiser, ClassifierGuidance):
        return denoiser.unguided(), denoiser.guidance_grad
    return denoiser, None
