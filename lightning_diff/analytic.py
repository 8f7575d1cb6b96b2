"""Closed-form oracles: isotropic Gaussian mixtures and their exact denoiser, score and likelihood.

For data ``y ~ sum_k w_k N(mu_k, s_k^2 I)`` the noisy marginal at noise level sigma is
``p(x; sigma) = sum_k w_k N(x; mu_k, (s_k^2 + sigma^2) I)`` and the ideal denoiser
(docs/formulations.md#the-ideal-denoiser) is

    D*(x; sigma) = sum_k r_k(x) [mu_k + s_k^2 / (s_k^2 + sigma^2) (x - mu_k)],

with responsibilities ``r_k`` under ``p(x; sigma)``; the score is ``(D* - x) / sigma^2``. These are the
oracles the tests of formulations, samplers and likelihoods are checked against.
"""

from __future__ import annotations

import math

import torch

__all__ = ["GaussianMixture"]


class GaussianMixture:
    """An isotropic Gaussian mixture in ``D`` dimensions (computations in float64).

    Args:
        means: ``[K, D]`` component means (a ``[D]`` tensor is one Gaussian).
        stds: ``[K]`` per-component standard deviations, or one number for all.
        weights: ``[K]`` mixture weights (normalised here); uniform when None.
        shape: the data shape of one sample (``(D,)`` by default, e.g. ``(1, 8, 8)`` for images).
    """

    def __init__(self, means, stds=1.0, weights=None, shape: tuple[int, ...] | None = None):
        means = torch.as_tensor(means, dtype=torch.float64)
        self.means = means.reshape(1, -1) if means.ndim == 1 else means
        K, D = self.means.shape
        self.stds = torch.as_tensor(stds, dtype=torch.float64).expand(K).clone()
        weights = torch.ones(K) if weights is None else torch.as_tensor(weights)
        weights = weights.to(torch.float64)
        if (self.stds < 0).any() or (weights < 0).any():
            raise ValueError("GaussianMixture: stds and weights must be >= 0")
        self.weights = weights / weights.sum()
        self.shape = tuple(shape) if shape is not None else (D,)
        if math.prod(self.shape) != D:
            raise ValueError(f"GaussianMixture: shape {self.shape} does not hold {D} dimensions")

    @property
    def dim(self) -> int:
        return self.means.shape[1]

    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """``[n, *shape]`` float64 samples."""
        k = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        eps = torch.randn(n, self.dim, generator=generator, dtype=torch.float64)
        return (self.means[k] + self.stds[k, None] * eps).reshape(n, *self.shape)

    def _component_log_probs(self, x: torch.Tensor, sigma) -> tuple[torch.Tensor, torch.Tensor]:
        x = x.reshape(x.shape[0], -1).to(torch.float64)
        sigma = torch.as_tensor(sigma, dtype=torch.float64, device=x.device).reshape(-1, 1)  # [B or 1, 1]
        var = self.stds.to(x.device) ** 2 + sigma**2  # [B, K]
        sq = torch.cdist(x, self.means.to(x.device)) ** 2  # [B, K]
        log_n = -0.5 * sq / var - 0.5 * self.dim * torch.log(2 * math.pi * var)
        return log_n + self.weights.to(x.device).log(), var

    def log_prob(self, x: torch.Tensor, sigma=0.0) -> torch.Tensor:
        """``log p(x; sigma)`` in nats, ``[B]``, for ``x`` ``[B, *shape]`` and sigma a number or ``[B]``."""
        log_joint, _ = self._component_log_probs(x, sigma)
        return torch.logsumexp(log_joint, dim=1)

    def class_posterior(self, x: torch.Tensor, sigma) -> torch.Tensor:
        """The exact noisy-class posterior ``p(k | x; sigma)`` ``[B, K]`` (float64): the responsibilities of the
        components under ``p(x; sigma)``, the ideal classifier of classifier guidance (Dhariwal & Nichol 2021)."""
        log_joint, _ = self._component_log_probs(x, sigma)
        return torch.softmax(log_joint, dim=1)

    def denoise(self, x: torch.Tensor, sigma, **cond) -> torch.Tensor:
        """The ideal denoiser ``E[y | y + sigma n = x]``; ``[B, *shape]`` in x's dtype. Usable as a
        sampler's ``denoiser(x, sigma)``."""
        log_joint, var = self._component_log_probs(x, sigma)
        r = torch.softmax(log_joint, dim=1)  # [B, K]
        xf = x.reshape(x.shape[0], -1).to(torch.float64)
        gain = self.stds.to(x.device) ** 2 / var  # [B, K]
        means = self.means.to(x.device)
        post = means[None] + gain[..., None] * (xf[:, None] - means[None])  # [B, K, D]
        return (r[..., None] * post).sum(1).reshape(x.shape).to(x.dtype)

    __call__ = denoise

    def score(self, x: torch.Tensor, sigma) -> torch.Tensor:
        """``grad_x log p(x; sigma) = (D*(x; sigma) - x) / sigma^2``."""
        sigma = torch.as_tensor(sigma, dtype=x.dtype, device=x.device).reshape(-1, *([1] * (x.ndim - 1)))
        return (self.denoise(x, sigma.flatten()) - x) / sigma**2

    def mean(self) -> torch.Tensor:
        """Mixture mean ``[D]``."""
        return self.weights @ self.means

    def covariance(self, sigma: float = 0.0) -> torch.Tensor:
        """Mixture covariance ``[D, D]`` of ``p(.; sigma)``."""
        mu = self.mean()
        centred = self.means - mu
        within = (self.weights * (self.stds**2 + sigma**2)).sum() * torch.eye(self.dim, dtype=torch.float64)
        return within + centred.T @ (self.weights[:, None] * centred)
