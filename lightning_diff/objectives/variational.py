"""``hybrid`` and ``vlb`` (Nichol & Dhariwal 2021, iDDPM) train a learned variance as well: the network's extra C
channels ``v`` give ``log Sigma = v' log beta_t + (1 - v') log beta~_t``, ``v' = (v + 1) / 2`` (eq. 15), fitted
through the variational bound's term ``L_t`` (eq. 4 - 6) of the discrete chain of the formulation's grid; a model
trained with them has ``Denoiser.variance_trained`` (``DiffusionModule`` sets it from ``trains_variance``).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..data.transforms import EDM_PIXELS, DataTransform
from ..denoiser import Denoiser, as_batch_sigma
from ..distributed import all_gather_rows
from ..formulations.posterior import discretized_gaussian_log_likelihood, normal_kl, posterior_chain
from .base import Objective

__all__ = ["HybridLoss", "VariationalBound", "LossSecondMomentSampler"]


class LossSecondMomentSampler(nn.Module):
    """Importance sampling of the timesteps of L_vlb (Nichol & Dhariwal 2021, Sec. 3.3, eq. 18):
    ``p_t ~ sqrt(E[L_t^2])``, the second moment estimated from the last ``history`` values of each term; uniform
    until every term has that many, and mixed with the uniform distribution (weight ``uniform_prob``), as
    openai/guided-diffusion's ``LossSecondMomentResampler``. Each loss is weighted ``1 / (T p_t)`` so that the
    objective stays an unbiased estimate of the bound.

    State in buffers, so that checkpoints hold it and a resumed run draws as the uninterrupted one:
    ``losses [T, history]`` float64 (newest last) and ``counts [T]`` long, sized by ``resize(T)``. Under
    ``torch.distributed`` every process records the losses of all processes, in rank order (all-gather), so
    that their states stay equal.

    Args:
        history: losses kept per timestep (the paper's 10).
        uniform_prob: probability mass spread uniformly over the timesteps once warmed up (guided-diffusion's).
    """

    def __init__(self, history: int = 10, uniform_prob: float = 0.001):
        super().__init__()
        if type(history) is not int or history < 1:
            raise ValueError(f"objective.history={history!r} is invalid; allowed: an integer >= 1")
        if not isinstance(uniform_prob, (int, float)) or not 0 <= uniform_prob <= 1:
            raise ValueError(f"objective.uniform_prob={uniform_prob!r} is invalid; allowed: a number in [0, 1]")
        self.history, self.uniform_prob = history, float(uniform_prob)
        self.register_buffer("losses", torch.zeros(0, history, dtype=torch.float64))
        self.register_buffer("counts", torch.zeros(0, dtype=torch.long))

    def extra_repr(self) -> str:
        return f"history={self.history}, uniform_prob={self.uniform_prob}, timesteps={self.counts.numel()}"

    def resize(self, num_timesteps: int) -> None:
        """Empty state for ``num_timesteps`` terms (kept when it already has that size)."""
        if self.counts.numel() != num_timesteps:
            self.losses = torch.zeros(num_timesteps, self.history, dtype=torch.float64, device=self.losses.device)
            self.counts = torch.zeros(num_timesteps, dtype=torch.long, device=self.counts.device)

    def warmed_up(self) -> bool:
        return bool((self.counts == self.history).all())

    def probabilities(self) -> torch.Tensor:
        """``p_t`` ``[T]`` float64 (uniform until warmed up)."""
        T = self.counts.numel()
        if not self.warmed_up():
            return torch.full((T,), 1 / T, dtype=torch.float64, device=self.losses.device)
        weights = self.losses.pow(2).mean(dim=1).sqrt()
        return weights / weights.sum() * (1 - self.uniform_prob) + self.uniform_prob / T

    def sample(self, batch: int, generator: torch.Generator | None = None,
               device=None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(t [B] long, weight [B] float64)``: timesteps drawn from ``p`` and their weights ``1 / (T p_t)``."""
        p = self.probabilities()
        t = torch.multinomial(p.to(generator.device if generator is not None else p.device), batch,
                              replacement=True, generator=generator).to(p.device)
        return t.to(device), self.weights(t).to(device)

    def weights(self, t: torch.Tensor) -> torch.Tensor:
        """``1 / (T p_t)`` for timesteps ``t`` (float64, t's shape and device)."""
        p = self.probabilities()
        return (1 / (p.numel() * p[t.to(p.device)])).to(t.device)

    @torch.no_grad()
    def update(self, t: torch.Tensor, losses: torch.Tensor) -> None:
        """Record ``losses [B]`` of timesteps ``t [B]`` (of every process under torch.distributed), in order;
        a full history drops its oldest value."""
        pairs = all_gather_rows(torch.stack([t.to(torch.float64), losses.detach().to(torch.float64)], dim=1))
        history, counts = self.losses.cpu().numpy().copy(), self.counts.cpu().numpy().copy()
        for step, loss in pairs.cpu().tolist():
            step = int(step)
            if counts[step] == self.history:
                history[step, :-1] = history[step, 1:]
                history[step, -1] = loss
            else:
                history[step, counts[step]] = loss
                counts[step] += 1
        self.losses.copy_(torch.from_numpy(history))
        self.counts.copy_(torch.from_numpy(counts))


class _BoundObjective(Objective):
    """Shared by ``hybrid`` and ``vlb``: the chain of the formulation's K grid levels (index t = 0 the smallest
    noise), ``abar_t = 1 / (1 + sigma_t^2)`` and the betas re-derived from it (for ``ddpm`` its own betas, to
    rounding), and the term ``L_t`` of the bound at given timesteps (``_terms``).

    In the VP frame ``x_t = sqrt(abar_t) x`` of the sigma-frame ``x = y + sigma_t n``:

        L_0     = -log p(y | x_1)  over the data's bins (Ho et al. 2020 eq. 13; Nichol & Dhariwal eq. 6),
        L_{t>0} = KL(q(x_{t-1} | x_t, y) || N(mu_theta, Sigma_theta))      (eq. 5; q: Ho et al. eq. 6 - 7)

    with ``mu_theta`` the posterior mean at ``y = D(x; sigma_t)`` and ``Sigma_theta`` eq. 15 from the extra
    channels. Units: bits per dimension (mean over the elements of a sample, / ln 2), as guided-diffusion's
    ``_vb_terms_bpd``; its ``mean_flat`` is our mean over elements, so the constant between the two is 1.
    """

    trains_variance = True

    def __init__(self, decoder_bits: int | None = None):
        super().__init__()
        if decoder_bits is not None and (type(decoder_bits) is not int or decoder_bits < 1):
            raise ValueError(f"objective.decoder_bits={decoder_bits!r} is invalid; allowed: null or an integer >= 1")
        self.decoder_bits = decoder_bits
        for key in ("sigmas", "logvar_min", "log_beta", "coef_x0", "coef_xt"):
            self.register_buffer(key, torch.zeros(0, dtype=torch.float64), persistent=False)
        self.bins = (0.0, 0.0, 0.0)  # (low, high, half width) of the data's integer levels in model space

    def prepare(self, formulation, data_transform: DataTransform | None = None) -> None:
        if not getattr(formulation, "discrete", False):
            raise ValueError(f"objective={self.name} trains on the terms L_t of a discrete chain of noise levels "
                             f"(Nichol & Dhariwal 2021); formulation={formulation.name} is continuous; allowed: a "
                             "discrete formulation (formulation=ddpm, iddpm or ncsn)")
        transform = EDM_PIXELS if data_transform is None else data_transform
        if transform.levels is None and self.decoder_bits is None:
            raise ValueError(f"objective={self.name}: its term L_0 is the probability of the data's integer "
                             f"levels, but the data are continuous (data transform {transform}); allowed: "
                             "integer data such as images, objective.decoder_bits=8 (L_0 over 256 bins of [-1, 1], "
                             "as DiT trains on latents), or objective=dsm")
        if transform.levels is not None and self.decoder_bits not in (None, transform.bits):
            raise ValueError(f"objective.decoder_bits={self.decoder_bits} is for continuous data; these data have "
                             f"{transform.bits}-bit integer levels of their own (data transform {transform}); "
                             f"allowed: null or {transform.bits}")
        if transform.levels is None:  # DiT's train.py: guided-diffusion's discretized Gaussian over [-1, 1]
            levels = 2**self.decoder_bits
            transform = DataTransform(scale=2 / (levels - 1), offset=-1.0, bits=self.decoder_bits)
        device = self.sigmas.device
        sigmas = formulation.grid.to(torch.float64).flip(0)
        abar = 1 / (1 + sigmas**2)
        logvar_min, posterior = posterior_chain(abar)
        self.sigmas, self.logvar_min = sigmas.to(device), logvar_min.to(device)
        self.log_beta = posterior.beta.log().to(device)
        self.coef_x0, self.coef_xt = posterior.coef_x0.to(device), posterior.coef_xt.to(device)
        low = transform.offset
        self.bins = (low, low + transform.scale * (transform.levels - 1), transform.scale / 2)

    @property
    def num_timesteps(self) -> int:
        """K, the levels of the chain; ValueError before ``prepare``."""
        if self.sigmas.numel() == 0:
            raise ValueError(f"objective={self.name} was not prepared for a formulation; call "
                             "objective.prepare(formulation, data_transform) first (DiffusionModule does)")
        return self.sigmas.numel()

    def _timesteps(self, denoiser: Denoiser, sigma: torch.Tensor) -> torch.Tensor:
        """Chain index t of noise levels ``sigma`` (the nearest grid level), long."""
        return self.num_timesteps - 1 - denoiser.formulation.nearest_index(sigma)

    def _terms(self, denoiser: Denoiser, y: torch.Tensor, t: torch.Tensor, noise: torch.Tensor | None,
               generator, labels, cond: dict, detach_mean: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(L_t [B] bits/dim float64, L_simple [B] float32, sigma [B] float32)`` at chain indices ``t``:
        ``L_simple = lambda(sigma) ||D - y||^2 / N`` (``Denoiser.loss``; for eps-prediction the mean square error
        of eps) and ``L_t`` with the mean of ``p`` detached when ``detach_mean`` (the hybrid's stop-gradient)."""
        y = y.float()
        if noise is None:
            noise = torch.randn(y.shape, generator=generator, device=y.device, dtype=y.dtype)
        t = t.to(self.sigmas.device)
        sigma = self.sigmas[t].to(y)
        view = (-1,) + (1,) * (y.ndim - 1)
        x = y + sigma.reshape(view) * noise
        D, v = denoiser.forward_with_variance(x, sigma, labels, **cond)
        with torch.autocast(y.device.type, enabled=False):
            simple = denoiser.formulation.loss_weight(sigma) * ((D.float() - y) ** 2).flatten(1).mean(dim=1)
            y64, x64 = y.double(), x.double()
            abar = (1 + self.sigmas[t] ** 2).reciprocal().reshape(view)
            x_t = abar.sqrt() * x64
            coef_x0, coef_xt = self.coef_x0[t].reshape(view), self.coef_xt[t].reshape(view)
            D64 = (D.detach() if detach_mean else D).double()
            mean = coef_x0 * D64 + coef_xt * x_t
            frac = (v.double() + 1) / 2  # eq. 15
            logvar_min = self.logvar_min[t].reshape(view)
            logvar = frac * self.log_beta[t].reshape(view) + (1 - frac) * logvar_min
            kl = normal_kl(coef_x0 * y64 + coef_xt * x_t, logvar_min.expand_as(mean), mean, logvar)
            low, high, half_width = self.bins
            decoder = -discretized_gaussian_log_likelihood(y64, mean, 0.5 * logvar, half_width=half_width,
                                                            low=low, high=high)
            nats = torch.where((t == 0).reshape(view), decoder, kl).flatten(1).mean(dim=1)
        return nats / math.log(2), simple, sigma


class HybridLoss(_BoundObjective):
    """``hybrid``: ``L_simple + lambda L_vlb`` (Nichol & Dhariwal 2021, Sec. 3.1, eq. 16) with the stop-gradient
    on the mean in ``L_vlb``, which trains the variance only; t uniform over the K levels, ``L_vlb`` estimated
    by ``K L_t`` (bits/dim). Per sample: ``lambda(sigma) ||D - y||^2 / N + vlb_weight K L_t``, equal to
    guided-diffusion's ``training_losses`` with ``LossType.RESCALED_MSE`` and a learned range
    (``mse + vb K / 1000``; their mean_flat = our mean over elements).

    Args:
        vlb_weight: lambda (the paper's 0.001).
        decoder_bits: continuous data only (latents): L_0 over ``2**decoder_bits`` bins of [-1, 1], as DiT's
            ``train.py`` applies guided-diffusion's discretized Gaussian to its latents; null refuses continuous data.
    """

    name = "hybrid"

    def __init__(self, vlb_weight: float = 0.001,  # lambda, Nichol & Dhariwal 2021 Sec. 3.1
                 decoder_bits: int | None = None):  # continuous data: L_0 over 2**bits bins of [-1, 1] (DiT)
        super().__init__(decoder_bits)
        if not isinstance(vlb_weight, (int, float)) or not vlb_weight >= 0 or vlb_weight == math.inf:
            raise ValueError(f"objective.vlb_weight={vlb_weight!r} is invalid; allowed: a finite number >= 0")
        self.vlb_weight = float(vlb_weight)

    def forward(self, denoiser: Denoiser, y: torch.Tensor, labels: torch.Tensor | None = None, *,
                sigma: torch.Tensor | None = None, noise: torch.Tensor | None = None,
                generator: torch.Generator | None = None, **cond) -> tuple[torch.Tensor, torch.Tensor]:
        if sigma is None:
            t = torch.randint(0, self.num_timesteps, (y.shape[0],), generator=generator, device=y.device)
        else:
            t = self._timesteps(denoiser, as_batch_sigma(sigma, y.shape[0], torch.float64, y.device))
        vlb, simple, sigma = self._terms(denoiser, y, t, noise, generator, labels, cond, detach_mean=True)
        return simple + (self.vlb_weight * self.num_timesteps * vlb).float(), sigma


class VariationalBound(_BoundObjective):
    """``vlb``: ``L_vlb`` alone (Nichol & Dhariwal 2021, eq. 4 - 6), the mean and the variance both trained
    through it, with the timesteps importance-sampled (Sec. 3.3; ``LossSecondMomentSampler``). Per sample
    ``K L_t / (K p_t)`` bits/dim: an unbiased estimate of ``L_vlb`` without its prior term ``L_K``, which has no
    parameters; guided-diffusion's ``training_losses`` with ``LossType.RESCALED_KL`` (``K L_t``) times its
    sampler's weights. In training mode each call records ``K L_t`` in the sampler's history.

    Args:
        importance_sampling: draw t from the loss-aware sampler (False: uniform, weights 1).
        history, uniform_prob: the sampler's (``LossSecondMomentSampler``).
        decoder_bits: continuous data only: L_0 over ``2**decoder_bits`` bins of [-1, 1] (as ``hybrid``).
    """

    name = "vlb"

    def __init__(self, importance_sampling: bool = True, history: int = 10, uniform_prob: float = 0.001,
                 decoder_bits: int | None = None):  # continuous data: L_0 over 2**bits bins of [-1, 1] (DiT)
        super().__init__(decoder_bits)
        if not isinstance(importance_sampling, bool):
            raise ValueError(f"objective.importance_sampling={importance_sampling!r} is invalid; allowed: true, "
                             "false")
        self.importance_sampling = importance_sampling
        self.timestep_sampler = LossSecondMomentSampler(history, uniform_prob)

    def prepare(self, formulation, data_transform: DataTransform | None = None) -> None:
        super().prepare(formulation, data_transform)
        self.timestep_sampler.resize(self.num_timesteps)

    def forward(self, denoiser: Denoiser, y: torch.Tensor, labels: torch.Tensor | None = None, *,
                sigma: torch.Tensor | None = None, noise: torch.Tensor | None = None,
                generator: torch.Generator | None = None, **cond) -> tuple[torch.Tensor, torch.Tensor]:
        K = self.num_timesteps
        if sigma is not None:
            t = self._timesteps(denoiser, as_batch_sigma(sigma, y.shape[0], torch.float64, y.device))
            weight = self.timestep_sampler.weights(t) if self.importance_sampling else torch.ones_like(t).double()
        elif self.importance_sampling:
            t, weight = self.timestep_sampler.sample(y.shape[0], generator, y.device)
        else:
            t = torch.randint(0, K, (y.shape[0],), generator=generator, device=y.device)
            weight = torch.ones(y.shape[0], dtype=torch.float64, device=y.device)
        vlb, _, sigma = self._terms(denoiser, y, t, noise, generator, labels, cond, detach_mean=False)
        rescaled = K * vlb  # guided-diffusion's RESCALED_KL
        if self.training and self.importance_sampling:
            self.timestep_sampler.update(t, rescaled)
        return (rescaled * weight.to(rescaled)).float(), sigma
