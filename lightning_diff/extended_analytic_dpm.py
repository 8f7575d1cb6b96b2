"""Extended-Analytic-DPM (Bao, Li, Cao, Zhu & Zhang, ICML 2022, "Estimating the optimal covariance with imperfect
mean in diffusion probabilistic models"): a per-element reverse variance from a second head of the network
(docs/samplers.md#extended-analytic-dpm).

For the ancestral (DDPM) step ``sigma -> sigma'`` with the model mean ``mu~(x_n, x0_hat)`` (Ho et al. eq. 7) and
``x0_hat = D = x - sigma eps_hat`` in the sigma-frame ``x = y + sigma eps``, the Gaussian kernel whose diagonal
covariance minimises the KL to the forward chain's reverse (their Thm 1, with an imperfect mean) is

    var(x_n) = lambda_n^2 + coef_x0^2 sigma^2 E[(eps - eps_hat(x_n))^2 | x_n]        (elementwise)

with ``lambda_n^2 = beta~_n`` (DDPM's posterior variance) and ``coef_x0 = sqrt(abar_{n-1}) beta_n / (1 - abar_n)`` the
weight of x0_hat in the mean (VP frame of x_{n-1}; ``analytic_dpm.step_coefficients``): the mean's error
``coef_x0 (x0_hat - y) = coef_x0 sigma (eps_hat - eps)`` adds its conditional second moment to beta~. Two heads
estimate the conditional expectation, trained by regression on the network's extra C output channels:

- ``npr`` (NPR-DPM): the head predicts the noise prediction residual ``h(x) ~ E[(eps - eps_hat(x))^2 | x]``
  (target ``(eps - sg(eps_hat))^2``): optimal even for an imperfect mean;
- ``sn`` (SN-DPM): the head predicts the squared noise ``g(x) ~ E[eps^2 | x]`` (target ``eps^2``) and
  ``E[(eps - eps_hat)^2 | x] = g - eps_hat^2`` when ``eps_hat = E[eps | x]`` (a perfect mean).

Averaged over x with a perfect mean, ``E[(eps - eps_hat)^2] = 1 - m`` and the variance is Analytic-DPM's
(``analytic_dpm.optimal_variances``). The residual is clipped at 0 (variance >= beta~, Analytic-DPM's lower bound).
``SecondMoment`` is the training objective (``objective=npr_dpm`` / ``sn_dpm``), ``step_variance`` the formula,
``SecondMomentHead`` what ``sampler=ddpm`` with ``variance=npr`` / ``sn`` evaluates.
"""

from __future__ import annotations

import torch

from .analytic_dpm import step_coefficients
from .denoiser import Denoiser, training_draw
from .objectives import Objective

__all__ = ["KINDS", "SecondMoment", "SecondMomentHead", "step_variance", "denoise_with_head"]

KINDS = ("sn", "npr")  # the head's target: squared noise (SN-DPM) or noise prediction residual (NPR-DPM)


def _check_kind(kind: str, setting: str) -> None:
    if kind not in KINDS:
        raise ValueError(f"{setting}={kind!r} is not known; allowed: {', '.join(KINDS)}")


def denoise_with_head(denoiser, x: torch.Tensor, sigma: torch.Tensor, **cond) -> tuple[torch.Tensor, torch.Tensor]:
    """``(D, head)`` of one network pass: ``denoiser.forward_with_moment(x, sigma, **cond)`` when it has one (an
    oracle), else a ``Denoiser`` whose backbone gives 2C channels, the extra C being the head. ``[B, C, ...]`` each;
    ValueError naming ``network.out_channels`` for a backbone without the extra channels."""
    if callable(getattr(denoiser, "forward_with_moment", None)):
        return denoiser.forward_with_moment(x, sigma, **cond)
    if not isinstance(denoiser, Denoiser):
        raise ValueError(f"variance=sn/npr needs a Denoiser with a second-moment head (extra output channels) or an "
                         f"object with forward_with_moment, got {type(denoiser).__name__}; allowed: a model trained "
                         "with objective=sn_dpm or npr_dpm")
    labels = cond.pop("labels", None)
    D, head = denoiser.forward_with_extra(x, sigma, labels, cond)
    if head.shape[1] != x.shape[1]:
        raise ValueError(f"variance=sn/npr: the backbone gives {x.shape[1] + head.shape[1]} channels for "
                         f"{x.shape[1]}-channel data; allowed: 2 x {x.shape[1]} (prediction and second-moment head, "
                         f"network.out_channels={2 * x.shape[1]})")
    return D, head.to(D.dtype)


def step_variance(kind: str, sigma: float, sigma_next: float, x: torch.Tensor, D: torch.Tensor,
                  head: torch.Tensor) -> torch.Tensor:
    """The per-element variance of ``x_{n-1}`` given ``x_n`` (VP frame of x_{n-1}, module docstring) for the step
    ``sigma -> sigma_next > 0`` from the sigma-frame ``x``, the model's ``D`` and its head (``kind``: ``sn`` the
    squared noise, ``npr`` the noise prediction residual). ``[B, ...]`` in x's dtype."""
    _check_kind(kind, "variance")
    posterior, coef2 = (float(v) for v in step_coefficients(torch.tensor([sigma, sigma_next], dtype=torch.float64)))
    eps_hat = (x - D) / sigma
    residual = head if kind == "npr" else head - eps_hat**2  # E[(eps - eps_hat)^2 | x] (module docstring)
    return posterior + coef2 * sigma**2 * residual.clamp(min=0)


class SecondMomentHead:
    """The ``denoiser`` that ``sampler=ddpm`` with ``variance=sn`` / ``npr`` evaluates: a call returns D and keeps
    the same pass's input, D and head, so that ``variance(sigma, sigma_next)`` gives ``step_variance``;
    ``round_sigma`` passes through."""

    def __init__(self, denoiser, kind: str):
        _check_kind(kind, "sampler=ddpm: variance")
        self.denoiser, self.kind = denoiser, kind
        self.round_sigma = getattr(denoiser, "round_sigma", None)
        self._last = None

    def __call__(self, x, sigma, **cond):
        D, head = denoise_with_head(self.denoiser, x, sigma, **cond)
        self._last = (x, D.to(x.dtype), head.to(x.dtype))
        return D

    def variance(self, sigma: float, sigma_next: float) -> torch.Tensor:
        return step_variance(self.kind, sigma, sigma_next, *self._last)


class SecondMoment(Objective):
    """``sn_dpm`` / ``npr_dpm``: the denoising loss of the first C channels (``Denoiser.loss``) plus the regression of
    the extra C channels on the second moment of Bao et al. (ICML 2022, their SN-DPM and NPR-DPM objectives):

        lambda(sigma) ||D - y||^2 / N  +  head_weight ||head(x) - T||^2 / N,
        T = eps^2 (sn)   or   (eps - sg(eps_hat(x)))^2 (npr),   x = y + sigma eps,

    one network pass, sigma from the formulation's p(sigma). The head's minimiser is ``E[T | x]``, the conditional
    moment ``step_variance`` reads. The network needs ``2 C`` output channels.

    Args:
        kind: ``sn`` or ``npr``.
        head_weight: weight of the head's regression (the two parts share no output channel; it sets their balance
            in the shared layers).
    """

    def __init__(self, kind: str = "npr", head_weight: float = 1.0):  # Bao et al. fit the head alone: any weight > 0
        super().__init__()
        _check_kind(kind, "objective.kind")
        if not isinstance(head_weight, (int, float)) or not head_weight > 0:
            raise ValueError(f"objective.head_weight={head_weight!r} is invalid; allowed: a number > 0")
        self.kind, self.head_weight = kind, float(head_weight)
        self.name = f"{kind}_dpm"

    def forward(self, denoiser: Denoiser, y: torch.Tensor, labels: torch.Tensor | None = None, *,
                sigma: torch.Tensor | None = None, noise: torch.Tensor | None = None,
                generator: torch.Generator | None = None, **cond) -> tuple[torch.Tensor, torch.Tensor]:
        y, sigma, noise = training_draw(denoiser.formulation, y, sigma, noise, generator)
        view = (-1,) + (1,) * (y.ndim - 1)
        x = y + sigma.reshape(view) * noise
        D, head = denoise_with_head(denoiser, x, sigma, **({"labels": labels} if labels is not None else {}), **cond)
        with torch.autocast(y.device.type, enabled=False):
            mean_loss = denoiser.formulation.loss_weight(sigma) * ((D - y) ** 2).flatten(1).mean(1)
            eps_hat = ((x - D) / sigma.reshape(view)).detach()
            target = noise**2 if self.kind == "sn" else (noise - eps_hat) ** 2
            head_loss = ((head.float() - target) ** 2).flatten(1).mean(1)
            return mean_loss + self.head_weight * head_loss, sigma
