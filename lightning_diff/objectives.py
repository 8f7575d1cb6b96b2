"""Training objectives: how a ``Denoiser`` is fitted to data (``configs/objective``, ``objective=<name>``).

Every objective is a callable ``objective(denoiser, y, labels=None, **cond) -> (loss [B], sigma [B])`` that
``DiffusionModule.training_step`` averages over the batch. All three here fit the model score

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

``hybrid`` and ``vlb`` (Nichol & Dhariwal 2021, iDDPM) train a learned variance as well: the network's extra C
channels ``v`` give ``log Sigma = v' log beta_t + (1 - v') log beta~_t``, ``v' = (v + 1) / 2`` (eq. 15), fitted
through the variational bound's term ``L_t`` (eq. 4 - 6) of the discrete chain of the formulation's grid; a model
trained with them has ``Denoiser.variance_trained`` (``DiffusionModule`` sets it from ``trains_variance``).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .data.transforms import EDM_PIXELS, DataTransform
from .denoiser import Denoiser, as_batch_sigma, training_draw
from .likelihood import discretized_gaussian_log_likelihood, normal_kl, posterior_chain

__all__ = ["Objective", "DenoisingScoreMatching", "SlicedScoreMatching", "ImplicitScoreMatching", "PROJECTIONS",
           "jacobian_trace", "projected_jacobian", "HybridLoss", "VariationalBound", "LossSecondMomentSampler"]

PROJECTIONS = ("gaussian", "rademacher")


class Objective(nn.Module):
    """Base of the training objectives. A module, so that an objective with state (e.g. a loss history for
    importance sampling, a teacher) keeps it in checkpoints; the objectives here hold none.

    ``__call__(denoiser, y, labels=None, *, sigma=None, noise=None, generator=None, **cond) -> (loss, sigma)``:
    ``y`` clean data ``[B, C, ...]``; ``sigma`` ``[B]`` and ``noise`` ``[B, C, ...]`` optional fixed draws (else
    from p(sigma) and N(0, I) with ``generator``); ``cond`` extra backbone inputs (``augment_labels``). Returns the
    per-sample loss ``[B]`` and the noise levels ``[B]``, float32.
    """

    name = "objective"
    trains_variance = False  # True: fits the extra output channels as iDDPM's variance (Denoiser.variance_trained)

    def prepare(self, formulation, data_transform: DataTransform | None = None) -> None:
        """Called once by ``DiffusionModule`` before training or loading weights: raise a ValueError naming
        ``objective=`` and ``formulation=`` when they do not go together, and size any state (buffers) to the
        formulation, so that a checkpoint's state loads into it. Nothing to do by default."""

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_") and k != "training")


class DenoisingScoreMatching(Objective):
    """``dsm``: ``lambda(sigma) ||D(y + sigma n; sigma) - y||^2 / N`` (Vincent 2011, eq. 4 - 5; Song & Ermon 2019,
    eq. 2 with NCSN's annealing eq. 6; EDM eq. 2 and 8 for lambda and p(sigma)): ``Denoiser.loss`` itself, the
    framework's one loss before objectives existed (bit-identical)."""

    name = "dsm"

    def forward(self, denoiser: Denoiser, y: torch.Tensor, labels: torch.Tensor | None = None, **kwargs):
        return denoiser.loss(y, labels, **kwargs)


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


# --- iDDPM's variational bound: hybrid and vlb (Nichol & Dhariwal 2021) -------------------------------------------


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
        pairs = _all_gather_rows(torch.stack([t.to(torch.float64), losses.detach().to(torch.float64)], dim=1))
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


def _all_gather_rows(rows: torch.Tensor) -> torch.Tensor:
    """``rows [n, k]`` of every process of the default torch.distributed group, concatenated in rank order
    (each process may have its own n); ``rows`` itself without torch.distributed."""
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return rows
    sizes = [torch.zeros(1, dtype=torch.long, device=rows.device) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, torch.tensor([rows.shape[0]], device=rows.device))
    largest = int(max(sizes))
    padded = torch.cat([rows, rows.new_zeros(largest - rows.shape[0], rows.shape[1])])
    gathered = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(gathered, padded)
    return torch.cat([g[: int(n)] for g, n in zip(gathered, sizes, strict=True)])


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
