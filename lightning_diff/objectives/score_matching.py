"""``ssm`` and ``ism``: sliced and implicit score matching of the model score, per noise level.

``dsm`` (``objectives.denoising``), ``ssm`` and ``ism`` fit the model score

    s(x; sigma) = (D(x; sigma) - x) / sigma^2        (EDM eq. 3 in the sigma-frame)

at noisy data ``x = y + sigma n`` with sigma drawn from the formulation's p(sigma), per noise level and annealed as
NCSN trains (Song & Ermon 2019, eq. 6), under the formulation's weighting lambda(sigma) of the denoising loss. In
score units lambda(sigma) ||D - y||^2 = lambda(sigma) sigma^4 ||s - grad log p(x | y)||^2, so each objective is
``lambda(sigma) sigma^4 / N`` times a score-matching loss of the score (N: elements per sample, the mean reduction
of ``Denoiser.loss``). With the Fisher divergence ``F = E ||s - grad log p_sigma||^2`` (explicit score matching),

    E[dsm] = F + const,    E[ism] = E[ssm] = F - E ||grad log p_sigma||^2,

so the three differ by constants independent of the model, share its minimiser, and
``E[dsm] - E[ism] = E_sigma[lambda(sigma) sigma^2]`` exactly (Stein's lemma; docs/objectives.md). SSM and ISM need
the derivative of the score in x: ``torch.autograd.grad`` with ``create_graph=True`` when gradients are on
(training differentiates through it). They assume the network treats samples independently (no BatchNorm).
"""

from __future__ import annotations

import torch

from ..denoiser import Denoiser, training_draw
from .base import Objective

__all__ = ["SlicedScoreMatching", "ImplicitScoreMatching", "PROJECTIONS", "jacobian_trace", "projected_jacobian"]

PROJECTIONS = ("gaussian", "rademacher")


def jacobian_trace(out: torch.Tensor, x: torch.Tensor, create_graph: bool) -> torch.Tensor:
    """``tr(d out_b / d x_b)`` per sample ``[B]``, exact: one vector-Jacobian product per dimension.

    ``out`` and ``x`` have the same shape ``[B, ...]``; ``out`` must be computed from ``x`` sample by sample."""
    flat = out.flatten(1)
    trace = torch.zeros(out.shape[0], dtype=out.dtype, device=out.device)
    for i in range(flat.shape[1]):
        grad = torch.autograd.grad(flat[:, i].sum(), x, create_graph=create_graph, retain_graph=True)[0]
        trace = trace + grad.flatten(1)[:, i]
    return trace


def projected_jacobian(out: torch.Tensor, x: torch.Tensor, v: torch.Tensor, create_graph: bool) -> torch.Tensor:
    """``v_b^T (d out_b / d x_b) v_b`` per sample ``[B]`` (one vector-Jacobian product; Hutchinson 1990's
    estimator of the trace when ``E[v v^T] = I``). ``out``, ``x``, ``v``: ``[B, ...]``."""
    grad = torch.autograd.grad((out * v).sum(), x, create_graph=create_graph, retain_graph=True)[0]
    return (grad * v).flatten(1).sum(1)


class _ScoreMatching(Objective):
    """Shared by ``ssm`` and ``ism``: draws sigma and noise as ``Denoiser.loss`` does, evaluates
    ``r = D(x; sigma) - x = sigma^2 s(x; sigma)`` at ``x = y + sigma n`` with x requiring grad, and weights
    ``_score_terms`` (which returns ``sigma^4 x`` the score-matching loss of one sample) by ``lambda(sigma) / N``."""

    def forward(self, denoiser: Denoiser, y: torch.Tensor, labels: torch.Tensor | None = None, *,
                sigma: torch.Tensor | None = None, noise: torch.Tensor | None = None,
                generator: torch.Generator | None = None, **cond) -> tuple[torch.Tensor, torch.Tensor]:
        self._check_data(y)
        create_graph = torch.is_grad_enabled()  # training differentiates through the score's derivative
        y, sigma, noise = training_draw(denoiser.formulation, y, sigma, noise, generator)
        view = (-1,) + (1,) * (y.ndim - 1)
        with torch.enable_grad():
            x = (y + sigma.reshape(view) * noise).detach().requires_grad_(True)
            residual = denoiser(x, sigma, labels, **cond) - x
            with torch.autocast(y.device.type, enabled=False):
                terms = self._score_terms(residual, x, sigma.reshape(view) ** 2, generator, create_graph)
                weight = denoiser.formulation.loss_weight(sigma)
                loss = weight * terms / y[0].numel()
        return (loss if create_graph else loss.detach()), sigma

    def _check_data(self, y: torch.Tensor) -> None:
        """Raise for data this objective cannot handle (``ism``: too many dimensions)."""

    def _score_terms(self, residual, x, sigma2, generator, create_graph) -> torch.Tensor:
        raise NotImplementedError


class SlicedScoreMatching(_ScoreMatching):
    """``ssm``: sliced score matching (Song, Garg, Shi & Ermon 2019) on the model score, per noise level.

    Per sample, with M projections ``v_m`` (``E[v v^T] = I``), twice the paper's objective (so that it is the
    Fisher divergence up to a constant, on the scale of ``dsm``):

        plain (eq. 7):               (1/M) sum_m [ (v_m^T s)^2 + 2 v_m^T (ds/dx) v_m ]
        variance-reduced (eq. 8):    ||s||^2 + (2/M) sum_m v_m^T (ds/dx) v_m         (SSM-VR)

    both weighted by ``lambda(sigma) sigma^4 / N`` (NCSN's annealed SSM weights sigma^2 on the score, which is
    lambda = 1 / sigma^2 here: the ``ncsn`` formulation). Computed as ``sigma^4 ||s||^2 = ||D - x||^2`` and
    ``sigma^4 v^T (ds/dx) v = sigma^2 v^T (dD/dx - I) v`` (no division by small sigma^2).

    Args:
        num_projections: M, projection vectors per sample (one vector-Jacobian product each).
        projection: ``gaussian`` (N(0, I), the paper's code) or ``rademacher`` (+-1; lower variance of the
            trace term, Hutchinson 1990).
        variance_reduction: use eq. 8's closed-form ``||s||^2`` instead of its estimate ``(v^T s)^2``.
    """

    name = "ssm"

    def __init__(self, num_projections: int = 1, projection: str = "gaussian", variance_reduction: bool = True):
        super().__init__()
        if type(num_projections) is not int or num_projections < 1:
            raise ValueError(f"objective.num_projections={num_projections!r} is invalid; allowed: an integer >= 1")
        if projection not in PROJECTIONS:
            raise ValueError(f"objective.projection={projection!r} is not known; allowed: {', '.join(PROJECTIONS)}")
        if not isinstance(variance_reduction, bool):
            raise ValueError(f"objective.variance_reduction={variance_reduction!r} is invalid; allowed: true, false")
        self.num_projections, self.projection = num_projections, projection
        self.variance_reduction = variance_reduction

    def _draw(self, like: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        v = torch.randn(like.shape, generator=generator, device=like.device, dtype=like.dtype)
        return v.sign() if self.projection == "rademacher" else v

    def _score_terms(self, residual, x, sigma2, generator, create_graph):
        sigma2 = sigma2.flatten()
        square = residual.flatten(1).pow(2).sum(1)  # sigma^4 ||s||^2
        total = torch.zeros_like(square)
        for _ in range(self.num_projections):
            v = self._draw(x, generator)
            vjv = projected_jacobian(residual, x, v, create_graph)  # v^T (dD/dx - I) v
            sliced_square = 0.0 if self.variance_reduction else (residual * v).flatten(1).sum(1) ** 2
            total = total + sliced_square + 2 * sigma2 * vjv
        total = total / self.num_projections
        return total + square if self.variance_reduction else total


class ImplicitScoreMatching(_ScoreMatching):
    """``ism``: implicit score matching (Hyvarinen 2005, eq. 3 - 4) with the exact trace of the score's Jacobian,
    per noise level: ``lambda(sigma) sigma^4 / N [ ||s||^2 + 2 tr(ds/dx) ]`` (twice Hyvarinen's J, on the scale of
    ``dsm``), computed as ``||D - x||^2 + 2 sigma^2 (tr(dD/dx) - N)``. One vector-Jacobian product per dimension,
    hence low-dimensional data only.

    Args:
        max_dim: the most dimensions per sample accepted (each costs one backward pass per step).
    """

    name = "ism"

    def __init__(self, max_dim: int = 64):  # 64 backward passes per step: already ~64x the cost of dsm
        super().__init__()
        if type(max_dim) is not int or max_dim < 1:
            raise ValueError(f"objective.max_dim={max_dim!r} is invalid; allowed: an integer >= 1")
        self.max_dim = max_dim

    def _check_data(self, y):
        if y[0].numel() > self.max_dim:
            raise ValueError(f"objective=ism computes the exact trace with one backward pass per dimension; the data "
                             f"have {y[0].numel()} dimensions per sample (shape {tuple(y.shape[1:])}) but "
                             f"objective.max_dim={self.max_dim}; allowed: data of at most objective.max_dim "
                             f"dimensions (raise it knowingly, or use objective=ssm)")

    def _score_terms(self, residual, x, sigma2, generator, create_graph):
        trace = jacobian_trace(residual, x, create_graph)  # tr(dD/dx - I)
        return residual.flatten(1).pow(2).sum(1) + 2 * sigma2.flatten() * trace
