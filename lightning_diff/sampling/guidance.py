"""Guidance as denoiser wrappers (docs/samplers.md#guidance): a guided denoiser has the sampler signature
``denoiser(x, sigma, labels=None, **cond)``, so every sampler runs guided without change. The wrappers pass
the wrapped denoiser's ``round_sigma`` through and report their cost in ``network_passes`` (see ``core``).

Scale convention: gamma, where gamma = 1 means no guidance (EDM2, k-diffusion ``cfg_scale``, diffusers
``guidance_scale``). Papers and code that write ``(1 + w) eps(x, c) - w eps(x)`` (Ho & Salimans 2022, the
flow_matching example; w = 0 is off) use gamma = 1 + w: build with ``CFGDenoiser.from_w(denoiser, w)``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from .core import network_passes, round_sigma_of

__all__ = ["CFGDenoiser", "ClassifierGuidance", "CLASSIFIER_FRAMES", "classifier_inputs", "split_classifier_guidance"]

CLASSIFIER_FRAMES = ("x_t", "sigma")


def _twice(value, batch: int):
    """``[value; value]`` for a tensor with a batch dimension of ``batch`` rows; anything else unchanged."""
    if isinstance(value, torch.Tensor) and value.ndim > 0 and value.shape[0] == batch:
        return torch.cat([value, value])
    return value


class CFGDenoiser:
    """Classifier-free guidance (Ho & Salimans 2022) in D-space:
    ``D_gamma = D(x; sigma) + gamma (D(x; sigma, c) - D(x; sigma))``.

    D, eps, v and the score are affine in the network output at fixed (x, sigma), so this equals
    ``eps~ = (1 + w) eps(x, c) - w eps(x)`` with gamma = 1 + w (docs/samplers.md#classifier-free-guidance).

    Cost: a guided call runs the conditional and unconditional passes as one batch ``[x; x]`` with labels
    ``[c; null]`` (EDM2, diffusers), or as two calls when ``uncond_denoiser`` is a separate network; either
    way it is 2 network passes per sample (``network_passes``), 1 when ``gamma == 1`` or ``labels is None``.

    Args:
        denoiser: ``denoiser(x, sigma, labels=None, **cond)``; ``labels=None`` must mean unconditional.
        scale: gamma >= 0 (1 = the conditional denoiser, 0 = the unconditional one).
        uncond_denoiser: optional separate model for the reference term, called with ``labels=None`` (EDM2
            autoguidance, Karras et al. 2024, uses a weaker network); defaults to ``denoiser``'s null label.
        null_label: the label value that makes ``denoiser`` unconditional inside a batch; default
            ``denoiser.null_label`` (``Denoiser``: its backbone's learned null label).
    """

    def __init__(self, denoiser: Callable, scale: float, uncond_denoiser: Callable | None = None,
                 null_label: int | None = None):
        if not isinstance(scale, (int, float)) or not scale >= 0:
            raise ValueError(f"CFGDenoiser: scale={scale!r} is invalid; "
                             "allowed: gamma >= 0 (1 = no guidance)")
        self.denoiser, self.scale = denoiser, float(scale)
        self.uncond_denoiser = uncond_denoiser
        self.null_label = getattr(denoiser, "null_label", None) if null_label is None else null_label
        if uncond_denoiser is None and self.null_label is None:
            raise ValueError(f"CFGDenoiser: denoiser {type(denoiser).__name__} has no null_label (the label that "
                             "means 'unconditional' in a batch); allowed: a conditional Denoiser (its backbone's "
                             "null label), null_label=<int>, or uncond_denoiser=<a separate network>")
        self.round_sigma = round_sigma_of(denoiser)

    @classmethod
    def from_w(cls, denoiser: Callable, w: float, uncond_denoiser: Callable | None = None) -> CFGDenoiser:
        """From the (1 + w) convention of Ho & Salimans 2022: gamma = 1 + w."""
        return cls(denoiser, 1.0 + w, uncond_denoiser)

    def network_passes(self, cond: dict) -> int:
        """Network forward passes per sample of one call with ``cond`` (2 for a guided call)."""
        reference = self.uncond_denoiser or self.denoiser
        if cond.get("labels") is None:
            return network_passes(reference, cond)
        if self.scale == 1.0:
            return network_passes(self.denoiser, cond)
        return network_passes(self.denoiser, cond) + network_passes(reference, {**cond, "labels": None})

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, labels: torch.Tensor | None = None,
                 **cond) -> torch.Tensor:
        """Guided D ``[B, ...]``; unconditional when ``labels is None``."""
        return self._guided(x, sigma, labels, cond, with_variance=False)[0]

    def forward_with_variance(self, x: torch.Tensor, sigma: torch.Tensor, labels: torch.Tensor | None = None,
                              **cond) -> tuple[torch.Tensor, torch.Tensor]:
        """``(guided D, v)`` for ``ddpm variance=learned``: the variance channels of the conditional pass, as
        DiT's ``forward_with_cfg`` keeps them (``Denoiser.forward_with_variance``)."""
        return self._guided(x, sigma, labels, cond, with_variance=True)

    def _guided(self, x, sigma, labels, cond: dict, with_variance: bool):
        """``(D, v or None)``: the guidance of ``__call__``, each pass through ``forward_with_variance`` when
        ``with_variance``."""
        def run(model, x, sigma, labels, **kw):
            if with_variance:
                return _forward_with_variance(model)(x, sigma, labels=labels, **kw)
            return model(x, sigma, labels=labels, **kw), None

        if labels is None:
            return run(self.uncond_denoiser or self.denoiser, x, sigma, None, **cond)
        if self.scale == 1.0:
            return run(self.denoiser, x, sigma, labels, **cond)
        if self.uncond_denoiser is not None:  # a different network: two calls
            conditional, variance = run(self.denoiser, x, sigma, labels, **cond)
            unconditional, _ = run(self.uncond_denoiser, x, sigma, None, **cond)
        else:  # one batch: rows [0, B) conditional, [B, 2B) with the null label
            batch = x.shape[0]
            both_labels = torch.cat([labels, torch.full_like(labels, self.null_label)])
            both, both_variance = run(self.denoiser, torch.cat([x, x]), _twice(sigma, batch), both_labels,
                                      **{key: _twice(value, batch) for key, value in cond.items()})
            conditional, unconditional = both[:batch], both[batch:]
            variance = None if both_variance is None else both_variance[:batch]
        return torch.lerp(unconditional, conditional, self.scale), variance


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
    a classifier with the same function (``lightning_diff.classifier``) keeps training and guidance in one frame."""
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

    def network_passes(self, cond: dict) -> int:
        """Network forward passes per sample of one call: the denoiser's (the classifier is not counted)."""
        return network_passes(self.denoiser, cond if self.denoiser_labels else {**cond, "labels": None})

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
