"""Guidance as denoiser wrappers (MATH.md §6.10): a guided denoiser has the sampler signature
``denoiser(x, sigma, labels=None, **cond)``, so every sampler runs guided without change.

Scale convention: gamma, where gamma = 1 means no guidance (EDM2, k-diffusion ``cfg_scale``, diffusers
``guidance_scale``). Papers and code that write ``(1 + w) eps(x, c) - w eps(x)`` (Ho & Salimans 2022, the
flow_matching example; w = 0 is off) use gamma = 1 + w: build with ``CFGDenoiser.from_w(denoiser, w)``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

__all__ = ["CFGDenoiser", "ClassifierGuidance"]


class CFGDenoiser:
    """Classifier-free guidance (Ho & Salimans 2022) in D-space:
    ``D_gamma = D(x; sigma) + gamma (D(x; sigma, c) - D(x; sigma))``.

    D, eps, v and the score are affine in the network output at fixed (x, sigma), so this equals
    ``eps~ = (1 + w) eps(x, c) - w eps(x)`` with gamma = 1 + w (MATH.md §6.10). A guided call costs two
    denoiser evaluations (one when ``gamma == 1`` or ``labels is None``); samplers count one NFE per call.

    Args:
        denoiser: ``denoiser(x, sigma, labels=None, **cond)``; ``labels=None`` must mean unconditional
            (``Denoiser`` maps it to the null label).
        scale: gamma >= 0 (1 = the conditional denoiser, 0 = the unconditional one).
        uncond_denoiser: optional separate model for the reference term (EDM2 autoguidance, Karras et al.
            2024, uses a weaker network); defaults to ``denoiser`` with ``labels=None``.
    """

    def __init__(self, denoiser: Callable, scale: float, uncond_denoiser: Callable | None = None):
        if not isinstance(scale, (int, float)) or not scale >= 0:
            raise ValueError(f"CFGDenoiser: scale={scale!r} is invalid; "
                             "allowed: gamma >= 0 (1 = no guidance)")
        self.denoiser, self.scale = denoiser, float(scale)
        self.uncond_denoiser = uncond_denoiser

    @classmethod
    def from_w(cls, denoiser: Callable, w: float, uncond_denoiser: Callable | None = None) -> CFGDenoiser:
        """From the (1 + w) convention of Ho & Salimans 2022: gamma = 1 + w."""
        return cls(denoiser, 1.0 + w, uncond_denoiser)

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, labels: torch.Tensor | None = None,
                 **cond) -> torch.Tensor:
        """Guided D ``[B, ...]``; unconditional when ``labels is None``."""
        if labels is None:
            return (self.uncond_denoiser or self.denoiser)(x, sigma, labels=None, **cond)
        conditional = self.denoiser(x, sigma, labels=labels, **cond)
        if self.scale == 1.0 and self.uncond_denoiser is None:
            return conditional
        unconditional = (self.uncond_denoiser or self.denoiser)(x, sigma, labels=None, **cond)
        return torch.lerp(unconditional, conditional, self.scale)


class ClassifierGuidance:
    """Classifier guidance (Dhariwal & Nichol 2021, Algorithm 1): add ``scale * grad_x log p(c | x; sigma)``
    to the score, i.e. ``D <- D + sigma^2 scale grad_x log p(c | x; sigma)`` since score = (D - x) / sigma^2.

    Args:
        denoiser: ``denoiser(x, sigma, labels=None, **cond)``; called with the same labels (pass a
            conditional model, or an unconditional one that ignores labels).
        classifier: ``classifier(x, sigma) -> logits [B, num_classes]`` on noisy sigma-frame inputs.
        scale: guidance scale s >= 0 (1 gives the exact class-conditional score for an exact classifier).
    """

    def __init__(self, denoiser: Callable, classifier: Callable, scale: float = 1.0):
        if not isinstance(scale, (int, float)) or not scale >= 0:
            raise ValueError(f"ClassifierGuidance: scale={scale!r} is invalid; allowed: a number >= 0")
        self.denoiser, self.classifier, self.scale = denoiser, classifier, float(scale)

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, labels: torch.Tensor | None = None,
                 **cond) -> torch.Tensor:
        """Guided D ``[B, ...]``; no guidance when ``labels is None``."""
        denoised = self.denoiser(x, sigma, labels=labels, **cond)
        if labels is None or self.scale == 0:
            return denoised
        with torch.enable_grad():
            xg = x.detach().requires_grad_(True)
            log_probs = torch.log_softmax(self.classifier(xg, sigma), dim=-1)
            selected = log_probs.gather(1, labels.reshape(-1, 1).long()).sum()
            (grad,) = torch.autograd.grad(selected, xg)
        view = (-1,) + (1,) * (x.ndim - 1)
        sigma = torch.as_tensor(sigma, dtype=denoised.dtype, device=x.device).reshape(view)
        return denoised + sigma**2 * self.scale * grad.to(denoised.dtype)
