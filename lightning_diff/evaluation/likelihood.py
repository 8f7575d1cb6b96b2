"""Likelihoods of a denoiser: the probability-flow ODE with divergence, bits/dim with uniform
dequantization, and the discrete variational bound of DDPM/iDDPM (docs/likelihood.md).

Never compare the two bits/dim: the ODE one is a density of dequantized data (plus the offset of the
data transform), the VLB one a discrete probability (no offset).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from scipy.integrate import solve_ivp

from ..data.transforms import DataTransform, dequantize
from ..denoiser import Denoiser
from ..formulations.posterior import discretized_gaussian_log_likelihood, normal_kl, posterior_chain
from ..formulations.schedules import SPACINGS, ddpm_timesteps
from ..sampling import analytic_dpm

__all__ = [
    "log_likelihood",
    "bits_per_dim",
    "ode_bits_per_dim",
    "vlb_bits_per_dim",
    "vlb_sigmas",
    "DIVERGENCES",
    "PROBES",
    "VARIANCES",
]

DIVERGENCES = ("hutchinson", "exact")
PROBES = ("rademacher", "gaussian")
VARIANCES = ("fixed_small", "fixed_large", "learned", "analytic")


def _divergence_fn(denoiser, divergence: str, probe_vectors: torch.Tensor | None, cond: dict):
    """``f(x, sigma) -> (dx/dsigma, div)`` with ``dx/dsigma = (x - D(x; sigma)) / sigma`` (EDM eq. 4 in
    the sigma-frame) and its divergence: exact (one VJP per dimension) or Skilling-Hutchinson
    ``mean_k v_k^T (df/dx) v_k`` with the probes fixed along the trajectory (one VJP per probe)."""

    def f(x: torch.Tensor, sigma: float) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.enable_grad():
            x = x.detach().requires_grad_(True)
            sigmas = torch.full((x.shape[0],), sigma, dtype=x.dtype, device=x.device)
            drift = (x - denoiser(x, sigmas, **cond)) / sigma
            flat = drift.flatten(1)
            if divergence == "exact":
                div = torch.zeros(x.shape[0], dtype=x.dtype, device=x.device)
                for i in range(flat.shape[1]):
                    grad = torch.autograd.grad(flat[:, i].sum(), x, retain_graph=True)[0]
                    div = div + grad.flatten(1)[:, i]
            else:
                div = torch.zeros(x.shape[0], dtype=x.dtype, device=x.device)
                for k, v in enumerate(probe_vectors):
                    grad = torch.autograd.grad((drift * v).sum(), x, retain_graph=k + 1 < len(probe_vectors))[
                        0
                    ]
                    div = div + (grad * v).flatten(1).sum(1)
                div = div / len(probe_vectors)
        return drift.detach(), div.detach()

    return f


def _prior_bias_bound(x: torch.Tensor, sigma_max: float, max_prior_bias: float) -> float:
    """``m2 / (2 sigma_max^2)`` nats/dim, ``m2`` the mean square of ``x [B, ...]`` per dimension: the bound on
    the mean bias of the ``N(0, sigma_max^2 I)`` prior; ValueError naming sigma_max when above ``max_prior_bias``."""
    if not isinstance(max_prior_bias, (int, float)) or not max_prior_bias > 0:
        raise ValueError(f"likelihood.max_prior_bias={max_prior_bias!r} is invalid; allowed: a number > 0 "
                         "(nats/dim; math.inf accepts any bias)")
    m2 = float(x.pow(2).mean())
    bound = m2 / (2 * sigma_max**2)
    if bound > max_prior_bias:
        raise ValueError(
            f"likelihood.sigma_max={sigma_max:g} is too small for data of mean square {m2:.3g} per dimension: "
            f"the N(0, sigma_max^2 I) prior ignores the data and can bias log p by up to {bound:.3g} nats/dim "
            f"(m2 / (2 sigma_max^2) > max_prior_bias={max_prior_bias:g}); allowed: sigma_max >= "
            f"{math.sqrt(m2 / (2 * max_prior_bias)):.3g} (a formulation trained up to that noise level), or a "
            "larger max_prior_bias"
        )
    return bound


def log_likelihood(
    denoiser,
    x: torch.Tensor,
    *,
    sigma_min: float,
    sigma_max: float,
    rtol: float = 1e-5,
    atol: float = 1e-5,
    divergence: str = "hutchinson",
    probes: int = 1,
    probe: str = "rademacher",
    generator: torch.Generator | None = None,
    labels: torch.Tensor | None = None,
    max_prior_bias: float = 1e-3,  # nats/dim: the largest accepted bound on the prior's bias (see below)
    **cond,
) -> tuple[torch.Tensor, dict]:
    """Log-density of ``x`` under the probability-flow ODE of ``denoiser`` (Song et al. 2021, App. D.2).

    Integrates ``dx/dsigma = (x - D(x; sigma)) / sigma`` together with ``d logp/dsigma = -div`` from
    ``sigma_min`` (data; the ODE endpoint epsilon) to ``sigma_max`` with scipy's adaptive RK45 on a flat
    float64 state (as yang-song/score_sde), then adds the prior ``N(0, sigma_max^2 I)`` (k-diffusion's
    ``log_likelihood``): ``log p(x; sigma_min) = log N(x(sigma_max); 0, sigma_max^2 I) + int div dsigma``.
    The step sizes are shared by the batch, so results depend on the batch within the tolerances.

    The prior stands in for the true marginal ``p(.; sigma_max) = p_data * N(0, sigma_max^2 I)``, which is
    unknown for a learned model. On average this biases ``log p`` by ``-KL(p(.; sigma_max) || N(0,
    sigma_max^2 I))``, which lies in ``[-m2 / (2 sigma_max^2), 0]`` nats/dim (convexity of KL over the
    mixture of ``N(y, sigma_max^2 I)``), ``m2 = E|x|^2 / d`` the data's mean square per dimension, here
    measured on the batch. When that bound exceeds ``max_prior_bias`` (sigma_max not large against the
    data, e.g. NCSN's sigma_max = 1) the call refuses: raise sigma_max, or the tolerance.

    Args:
        denoiser: ``denoiser(x, sigma [B], labels, **cond) -> D`` (the sampler contract), differentiable.
        x: data in model space ``[B, ...]`` (dequantized for bits/dim).
        sigma_min, sigma_max: the integration range, ``0 < sigma_min < sigma_max``.
        rtol, atol: RK45 tolerances (score_sde: 1e-5).
        divergence: ``"hutchinson"`` (Skilling 1989, Hutchinson 1990) or ``"exact"`` (D VJPs; low dimension).
        probes: Hutchinson probes averaged per evaluation, drawn once per call (``probe`` kind,
            Rademacher or standard normal, from ``generator``).
        max_prior_bias: the largest accepted bound ``m2 / (2 sigma_max^2)`` on the prior's bias, nats/dim
            (1e-3: about 0.0014 bits/dim, below the two decimals bits/dim are reported with).
    Returns:
        ``(log_prob [B] float64 nats, info)`` with ``info["nfe"]`` (denoiser evaluations, each on the
        whole batch), ``info["x_prior"]`` (the ODE end point ``[B, ...]``), ``info["prior_logp"]`` and
        ``info["prior_bias_bound"]`` (nats/dim).
    """
    if not (
        isinstance(sigma_min, (int, float))
        and isinstance(sigma_max, (int, float))
        and 0 < sigma_min < sigma_max
    ):
        raise ValueError(
            f"likelihood: sigma_min={sigma_min!r}, sigma_max={sigma_max!r}; allowed: 0 < sigma_min < "
            "sigma_max"
        )
    if divergence not in DIVERGENCES:
        raise ValueError(f"likelihood.divergence={divergence!r} is not known; allowed: {DIVERGENCES}")
    if probe not in PROBES:
        raise ValueError(f"likelihood.probe={probe!r} is not known; allowed: {PROBES}")
    if not isinstance(probes, int) or probes < 1:
        raise ValueError(f"likelihood.probes={probes!r} is invalid; allowed: an integer >= 1")
    x = x.to(torch.float64)
    bias_bound = _prior_bias_bound(x, sigma_max, max_prior_bias)
    shape, batch, device = x.shape, x.shape[0], x.device
    probe_vectors = None
    if divergence == "hutchinson":
        v = torch.randn(
            (probes, *shape),
            generator=generator,
            dtype=torch.float64,
            device=generator.device if generator is not None else device,
        ).to(device)
        probe_vectors = v.sign() if probe == "rademacher" else v
    cond = cond if labels is None else {**cond, "labels": labels}
    f = _divergence_fn(denoiser, divergence, probe_vectors, cond)
    nfe = 0

    def rhs(sigma: float, state: np.ndarray) -> np.ndarray:
        nonlocal nfe
        nfe += 1
        xs = torch.from_numpy(state[:-batch]).to(device).reshape(shape)
        drift, div = f(xs, float(sigma))
        return np.concatenate([drift.cpu().numpy().ravel(), -div.cpu().numpy()])  # d logp / dsigma = -div

    state0 = np.concatenate([x.cpu().numpy().ravel(), np.zeros(batch)])
    sol = solve_ivp(rhs, (sigma_min, sigma_max), state0, method="RK45", rtol=rtol, atol=atol)
    if not sol.success:
        raise RuntimeError(f"likelihood: RK45 failed ({sol.message})")
    end = sol.y[:, -1]
    x_prior = torch.from_numpy(end[:-batch]).reshape(shape)
    delta_logp = torch.from_numpy(end[-batch:])  # log p(x_max; sigma_max) - log p(x; sigma_min) = -int div
    d = x[0].numel()
    prior_logp = -0.5 * d * math.log(2 * math.pi * sigma_max**2) - x_prior.flatten(1).pow(2).sum(1) / (
        2 * sigma_max**2
    )
    log_prob = prior_logp - delta_logp
    return log_prob.to(device), {
        "nfe": nfe,
        "x_prior": x_prior.to(device),
        "prior_logp": prior_logp.to(device),
        "prior_bias_bound": bias_bound,
    }


def bits_per_dim(log_prob: torch.Tensor, dim: int, *, scale: float) -> torch.Tensor:
    """``-log p(z) / (d ln 2) - log2(scale)`` (docs/likelihood.md#bits-per-dim): the density of ``z = scale * (x + u)
    + b``
    in bits per dimension of the integer data (``-log2(scale)`` = 7 for /256 data mapped to [-1, 1],
    ``log2(127.5)`` = 6.9944 for EDM's ``/127.5 - 1``)."""
    check = isinstance(scale, (int, float)) and scale > 0
    if not check:
        raise ValueError(f"likelihood.scale={scale!r} is invalid; allowed: the transform's scale a > 0")
    return -log_prob / (dim * math.log(2)) - math.log2(scale)


def ode_bits_per_dim(
    denoiser,
    x_int: torch.Tensor,
    *,
    scale: float,
    offset: float,
    sigma_min: float,
    sigma_max: float,
    passes: int = 1,
    generator: torch.Generator | None = None,
    **ode_kwargs,
) -> tuple[torch.Tensor, dict]:
    """ODE bits/dim of integer data ``x_int [B, ...]`` averaged over ``passes`` dequantizations
    (score_sde: 5 passes over the test split). ``scale``/``offset`` are the data transform's ``a``, ``b``
    (``z = a x_int + b``). Returns ``(bpd [B] float64, info)`` with ``info["nfe"]`` (per pass, summed)
    and ``info["nfe_per_image"]`` (denoiser evaluations per image, batch evaluations counted once each).
    Refuses a ``sigma_max`` too small for the data's scale (``log_likelihood``'s ``max_prior_bias``)."""
    if not isinstance(passes, int) or passes < 1:
        raise ValueError(f"likelihood.passes={passes!r} is invalid; allowed: an integer >= 1")
    bpd, nfe = 0.0, 0
    for _ in range(passes):
        z = dequantize(x_int, generator, DataTransform(scale=scale, offset=offset), dtype=torch.float64)
        log_prob, info = log_likelihood(
            denoiser, z, sigma_min=sigma_min, sigma_max=sigma_max, generator=generator, **ode_kwargs
        )
        bpd = bpd + bits_per_dim(log_prob, x_int[0].numel(), scale=scale) / passes
        nfe += info["nfe"]
    return bpd, {"nfe": nfe, "nfe_per_image": nfe, "passes": passes}


# --- discrete VLB (Ho et al. 2020 eq. 5; Nichol & Dhariwal 2021 eqs. 4-7, 15) ------------------------------


def _require_trained_variance(denoiser) -> None:
    """ValueError unless ``denoiser`` is a :class:`Denoiser` whose extra output channels were trained as
    iDDPM's variance (``variance_trained``: objective=hybrid or vlb, or a released learn_sigma model)."""
    if not isinstance(denoiser, Denoiser):
        raise ValueError(
            "likelihood.variance='learned' needs a lightning_diff Denoiser (its backbone's extra "
            "channels hold the variance); allowed: fixed_small, fixed_large"
        )
    if not denoiser.variance_trained:
        raise ValueError(
            "likelihood.variance='learned': this model's extra output channels were never trained (its loss "
            "used the first C channels only; Denoiser.variance_trained=False), so they hold no variance; "
            "allowed: fixed_small, fixed_large (or a model trained with objective=hybrid or vlb)"
        )


def _prediction(denoiser, x_sigma, sigma, labels, learned: bool):
    """``(D(x; sigma), v or None)``: the learned-variance channels ``v`` come from the same backbone call
    (``Denoiser.forward_with_variance``: iDDPM's 2C-channel output)."""
    cond = {} if labels is None else {"labels": labels}
    if not learned:
        return denoiser(x_sigma, sigma, **cond), None
    return denoiser.forward_with_variance(x_sigma, sigma, **cond)


@torch.no_grad()
def vlb_bits_per_dim(
    denoiser,
    x_int: torch.Tensor,
    formulation,
    *,
    scale: float,
    offset: float,
    variance: str = "fixed_small",
    moments: analytic_dpm.ScoreMoments | None = None,
    steps: int | None = None,
    spacing: str = "linspace",  # the strided chain's sub-sequence: Bao et al. 2022's even steps, tau_1 = 0
    clip_denoised: bool = True,
    labels: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, dict]:
    """The discrete variational bound ``L_T + sum_{t>1} L_{t-1} + L_0`` in bits/dim (iDDPM ``calc_bpd_loop``),
    of the full chain or of a strided one tau_1 = 0 < tau_2 < ... < tau_K (iDDPM's respacing: the betas re-derived
    from abar at the visited timesteps, ``beta_k = 1 - abar_{tau_k} / abar_{tau_{k-1}}``; Bao et al. 2022 Sec. 4,
    whose K-step bound decodes x_0 from the chain's first timestep, timestep 0).

    Args:
        denoiser: ``denoiser(x, sigma, labels) -> D`` in the sigma-frame (``x_t = sqrt(abar_t) x``).
        x_int: integer data ``[B, C, ...]``; ``x_0 = scale * x_int + offset`` (no dequantization).
        formulation: a ``ddpm`` formulation (``.betas``, ``.alphas_cumprod``): linear (Ho et al.) or
            cosine (Nichol & Dhariwal) schedule; every term of the chain is evaluated (one network call each).
        variance: ``"fixed_small"`` (posterior variance beta~_t), ``"fixed_large"`` (beta_t) or
            ``"learned"`` (iDDPM eq. 15: ``exp(v log beta + (1 - v) log beta~)``, v = (out + 1) / 2 from
            the backbone's extra C channels; only for a Denoiser with ``variance_trained``, else ValueError) or
            ``"analytic"`` (Bao et al. 2022 Thm 1 clipped to Thm 2, ``analytic_dpm.optimal_variances``, from
            ``moments`` estimated on training data at every level of the chain; the decoder L_0 keeps the
            fixed_small variance, as Bao et al.'s code).
        moments: ``analytic_dpm.ScoreMoments`` of this denoiser (only with ``variance="analytic"``).
        steps: None for all T timesteps, or the strided chain of ``vlb_sigmas(formulation, steps, spacing)``.
        spacing: the strided chain's timesteps (``schedules.ddpm_timesteps``; ignored when ``steps`` is None):
            ``linspace`` (default; ``round(linspace(0, T - 1, K))``, Bao et al.'s even trajectory up to how exact
            halves round) or ``quadratic`` (their ``quad`` one, DDIM's), or any spacing whose chain holds timestep
            0; ValueError for one that does not (``trailing`` unless K > 2T/3: its decoder would score x_0 from
            a noisy level).
        clip_denoised: clip the predicted x_0 to the data range (iDDPM's evaluation default).
    Returns:
        ``(bpd [B] float64, info)`` with ``info["prior_bpd"]``, ``info["terms_bpd"]`` ``[K, B]`` (index k
        0-based: L_0 decoder, then the KL terms), ``info["nfe"]`` (= K) and ``info["timesteps"]`` ``[K]`` (the
        0-based DDPM timesteps of the chain, increasing); K = T for the full chain.
    """
    if not hasattr(formulation, "alphas_cumprod"):
        raise ValueError(
            f"likelihood.vlb: formulation {getattr(formulation, 'name', formulation)!r} has no "
            "betas; allowed: a 'ddpm' formulation (formulations.get('ddpm', beta_schedule=...))"
        )
    if variance not in VARIANCES:
        raise ValueError(f"likelihood.variance={variance!r} is not known; allowed: {VARIANCES}")
    if variance == "learned":
        _require_trained_variance(denoiser)
    if (variance == "analytic") != (moments is not None):
        raise ValueError(f"likelihood.variance={variance!r} with moments={type(moments).__name__}: the score "
                         "moments go with variance='analytic' only; allowed: variance=analytic with "
                         "analytic_dpm.ScoreMoments, or another variance without moments")
    device = x_int.device
    timesteps, betas, abar = _chain(formulation, steps, spacing)
    betas, abar = betas.to(device), abar.to(device)
    T = betas.numel()
    post_logvar, posterior = posterior_chain(abar)
    coef_x0, coef_xt = posterior.coef_x0, posterior.coef_xt
    large_logvar = torch.cat([post_logvar[:1], betas[1:].log()])
    if variance == "analytic":  # the steps t -> t-1, largest t first, as the sampler's grid
        chain_sigmas = torch.cat([((1 - abar) / abar).sqrt().flip(0), abar.new_zeros(1)])
        analytic_logvar = analytic_dpm.optimal_variances(chain_sigmas.cpu(), moments).flip(0).to(device).log()

    x0 = scale * x_int.to(torch.float64) + offset
    low, high, half_width = offset, scale * 255 + offset, scale / 2
    B = x0.shape[0]
    d = x0[0].numel()
    terms = torch.zeros(T, B, dtype=torch.float64, device=device)
    for t in range(T):
        noise = torch.randn(
            x0.shape,
            generator=generator,
            dtype=torch.float64,
            device=generator.device if generator is not None else device,
        ).to(device)
        x_t = abar[t].sqrt() * x0 + (1 - abar[t]).sqrt() * noise
        sigma_t = ((1 - abar[t]) / abar[t]).sqrt().expand(B)
        pred_x0, v = _prediction(denoiser, x_t / abar[t].sqrt(), sigma_t, labels, variance == "learned")
        pred_x0 = pred_x0.to(torch.float64)
        if clip_denoised:
            pred_x0 = pred_x0.clamp(low, high)
        mean = coef_x0[t] * pred_x0 + coef_xt[t] * x_t
        if variance == "learned":
            frac = (v.to(torch.float64) + 1) / 2
            logvar = frac * torch.log(betas[t]) + (1 - frac) * post_logvar[t]
        elif variance == "analytic" and t > 0:
            logvar = analytic_logvar[t].expand_as(mean)
        else:
            logvar = (large_logvar if variance == "fixed_large" else post_logvar)[t].expand_as(mean)
        if t == 0:
            nats = -discretized_gaussian_log_likelihood(
                x0, mean, 0.5 * logvar, half_width=half_width, low=low, high=high
            )
        else:
            true_mean = coef_x0[t] * x0 + coef_xt[t] * x_t
            nats = normal_kl(true_mean, post_logvar[t].expand_as(mean), mean, logvar)
        terms[t] = nats.flatten(1).sum(1) / (d * math.log(2))
    mean_T = abar[-1].sqrt() * x0
    prior = normal_kl(
        mean_T, torch.log(1 - abar[-1]).expand_as(x0), torch.zeros_like(x0), torch.zeros_like(x0)
    )
    prior_bpd = prior.flatten(1).sum(1) / (d * math.log(2))
    return terms.sum(0) + prior_bpd, {"prior_bpd": prior_bpd, "terms_bpd": terms, "nfe": T, "timesteps": timesteps}


def vlb_sigmas(formulation, steps: int | None = None, spacing: str = "linspace") -> torch.Tensor:
    """The noise levels of the chain ``vlb_bits_per_dim`` scores, decreasing, then 0 (the samplers' convention),
    float64 ``[K + 1]``: all T levels of the ``ddpm`` formulation (``steps`` None) or the distinct timesteps of
    ``formulation.sampling_sigmas(steps, spacing=spacing)``. ValueError naming the setting for an unknown spacing
    or a strided chain without timestep 0 (Bao et al. 2022's K-step bound starts at it)."""
    if spacing not in SPACINGS:
        raise ValueError(f"likelihood.spacing={spacing!r} is not known; allowed: {', '.join(SPACINGS)}")
    if steps is None:
        return torch.cat([formulation.grid.to(torch.float64), formulation.grid.new_zeros(1, dtype=torch.float64)])
    sigmas = formulation.sampling_sigmas(steps, spacing=spacing).to(torch.float64)
    first = int(formulation.timestep_index(sigmas[-2:-1]))
    if first != 0:
        raise ValueError(
            f"likelihood.spacing={spacing!r} with steps={steps}: the chain's first timestep is {first}, it has no "
            f"timestep 0, so its decoder L_0 would score x_0 from x_{first} (not the K-step bound of Bao et al. "
            f"2022); allowed: a spacing whose chain holds timestep 0: "
            f"{', '.join(_spacings_from_zero(formulation.num_timesteps, steps))}"
        )
    return sigmas


def _spacings_from_zero(num_timesteps: int, steps: int) -> list[str]:
    """The spacings of ``schedules.SPACINGS`` whose ``steps``-step chain of ``num_timesteps`` holds timestep 0."""
    def starts_at_zero(spacing: str) -> bool:
        try:
            return int(ddpm_timesteps(num_timesteps, steps, spacing).min()) == 0
        except ValueError:  # no chain of that length for this spacing
            return False

    return [spacing for spacing in SPACINGS if starts_at_zero(spacing)]


def _chain(formulation, steps: int | None, spacing: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(timesteps [K] long, betas [K], abar [K])`` float64, increasing t, of the full DDPM chain (``steps``
    None: the formulation's own betas) or of the strided one through the timesteps of
    ``vlb_sigmas(formulation, steps, spacing)``, ``beta_k = 1 - abar_k / abar_{k-1}`` (iDDPM's respacing)."""
    sigmas = vlb_sigmas(formulation, steps, spacing)
    abar = formulation.alphas_cumprod.to(torch.float64)
    if steps is None:
        return torch.arange(abar.numel()), formulation.betas.to(torch.float64), abar
    timesteps = formulation.timestep_index(sigmas[:-1]).flip(0)
    abar = abar[timesteps]
    return timesteps, 1 - abar / torch.cat([abar.new_ones(1), abar[:-1]]), abar
