"""Analytic-DPM (Bao, Li, Zhu & Zhang 2022): the optimal reverse variance of an ancestral (DDPM) sampler from the
second moment of the model's score, estimated once by Monte Carlo over training data (docs/samplers.md#analytic-dpm).

For a DDPM chain ``x_n = sqrt(abar_n) x_0 + sqrt(1 - abar_n) eps`` (any grid: full, or a strided sub-sequence
tau_1 < ... < tau_K with ``alpha = abar_n / abar_{n-1}`` between consecutive levels, their Sec. 4), the reverse
kernel ``N(mu~_n(x_n, x0_hat), sigma_n^2 I)`` with the posterior mean of Ho et al. eq. 7 is KL-optimal for

    sigma*_n^2 = lambda_n^2 + (sqrt(betabar_n / alpha_n) - sqrt(betabar_{n-1} - lambda_n^2))^2
                 (1 - betabar_n Gamma_n),     Gamma_n = E_{q(x_n)} ||grad log q_n(x_n)||^2 / d      (Thm 1)

with ``lambda_n^2 = beta~_n`` (DDPM's posterior variance) and ``betabar = 1 - abar``. In the sigma-frame
``x = x_n / sqrt(abar_n) = y + sigma eps`` of this project, ``betabar_n Gamma_n = E ||eps_hat(x; sigma)||^2 / d``
with ``eps_hat = (x - D(x; sigma)) / sigma`` (the "eps moment" ``m`` stored here), and the bracket is
``coef_x0^2 sigma^2 (1 - m)``: ``coef_x0 = sqrt(abar_{n-1}) beta_n / betabar_n`` is the weight of x0_hat in the mean
and ``sigma^2 (1 - m)`` the average posterior variance ``E Var[y | x] / d`` of the data given the noisy point.
Theorem 2 bounds it: ``lambda_n^2 <= sigma*_n^2 <= lambda_n^2 + coef_x0^2 sigma^2`` (0 <= m <= 1), and for data
in ``[a, b]^d`` also ``sigma*_n^2 <= lambda_n^2 + coef_x0^2 ((b - a) / 2)^2``; the estimate is clipped to them.

Extended-Analytic-DPM: see below (``step_variance``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import warnings
from collections.abc import Callable
from pathlib import Path

import torch

from ..checkpoint_io import default_cache_dir as cache_root
from ..checkpoint_io import update_digest
from ..denoiser import Denoiser
from ..formulations.posterior import ddpm_posterior
from .noise import PerSampleGenerator

__all__ = ["ScoreMoments", "estimate_moments", "optimal_variances", "variance_bounds", "cached_moments",
           "default_cache_dir", "step_coefficients", "fingerprint", "KINDS", "SecondMomentHead", "step_variance",
           "denoise_with_head", "check_kind"]

_MATCH_RTOL = 1e-9  # relative tolerance when a grid level is looked up among the estimated levels


@dataclasses.dataclass(frozen=True)
class ScoreMoments:
    """The estimated second moment of the model's noise prediction at a set of noise levels.

    Attributes:
        sigmas: ``[K]`` float64 noise levels (sigma-frame, > 0, decreasing).
        eps_moments: ``[K]`` float64 ``m = E ||eps_hat(y + sigma eps; sigma)||^2 / d`` over data y and noise eps
            (``= betabar_n Gamma_n`` of Bao et al. Thm 1); in [0, 1] for an exact model.
        num_samples: Monte Carlo draws (data item, noise) per level, M.
        data_range: ``(a, b)`` when the data lie in ``[a, b]^d`` (Thm 2's second bound), else None.
    """

    sigmas: torch.Tensor
    eps_moments: torch.Tensor
    num_samples: int
    data_range: tuple[float, float] | None = None

    def gamma(self) -> torch.Tensor:
        """``Gamma_n = E ||grad_{x_n} log q_n(x_n)||^2 / d`` in the paper's frame ``x_n = sqrt(abar_n) x``
        (``abar = 1 / (1 + sigma^2)``): ``m / betabar_n`` with ``betabar_n = sigma^2 / (1 + sigma^2)``. ``[K]``."""
        return self.eps_moments * (1 + self.sigmas**2) / self.sigmas**2

    def at(self, levels: torch.Tensor) -> torch.Tensor:
        """The eps moments at ``levels`` ``[N]`` (each must be one of ``self.sigmas``); ValueError naming the
        missing levels otherwise (moments of another grid are never reused)."""
        levels = levels.to(torch.float64).reshape(-1, 1)
        close = (levels - self.sigmas.reshape(1, -1)).abs() <= _MATCH_RTOL * levels
        missing = ~close.any(dim=1)
        if missing.any():
            raise ValueError(f"variance='analytic': the moments were estimated at {self.sigmas.numel()} levels "
                             f"({float(self.sigmas[0]):.4g} .. {float(self.sigmas[-1]):.4g}) that miss the grid's "
                             f"levels {levels[missing].flatten()[:4].tolist()}; allowed: moments estimated on this "
                             "grid or a grid that contains it (analytic_dpm.estimate_moments)")
        return self.eps_moments[close.to(torch.int64).argmax(dim=1)]


def step_coefficients(sigmas: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For each step ``sigmas[i] -> sigmas[i + 1]`` of a grid ending in 0: DDPM's posterior variance
    ``lambda^2 = beta~ = betabar_{n-1} / betabar_n beta_n`` and the squared weight ``coef_x0^2`` of x0_hat in the
    posterior mean (Ho et al. eq. 7), with ``abar = 1 / (1 + sigma^2)`` and ``beta_n = 1 - abar_n / abar_{n-1}``
    (the strided chain's re-derived betas). Both ``[N]`` float64, VP frame of x_{n-1}."""
    sigmas = sigmas.to(torch.float64)
    posterior = ddpm_posterior(1 / (1 + sigmas[:-1] ** 2), 1 / (1 + sigmas[1:] ** 2))  # Ho et al. eq. 7
    return posterior.variance, posterior.coef_x0**2


def variance_bounds(sigmas: torch.Tensor, data_range: tuple[float, float] | None = None):
    """Bao et al. Thm 2: ``(lower [N], upper [N])`` on the optimal variance of each step of ``sigmas`` (decreasing,
    ending in 0): ``lambda^2`` and ``lambda^2 + coef_x0^2 min(sigma^2, ((b - a) / 2)^2)`` (the second term only
    for data in ``[a, b]^d``). VP frame of x_{n-1}, float64."""
    posterior, coef2 = step_coefficients(sigmas)
    spread = sigmas[:-1].to(torch.float64) ** 2
    if data_range is not None:
        spread = spread.clamp(max=((data_range[1] - data_range[0]) / 2) ** 2)
    return posterior, posterior + coef2 * spread


def optimal_variances(sigmas: torch.Tensor, moments: ScoreMoments) -> torch.Tensor:
    """Bao et al. Thm 1 on the (full or strided) grid ``sigmas`` (decreasing, ending in 0), clipped to Thm 2's
    bounds: ``sigma*^2 = lambda^2 + coef_x0^2 sigma^2 (1 - m)``. ``[N]`` float64, the variance of x_{n-1} given
    x_n in the VP frame (the ancestral sampler's; the last entry is that of x_0 given x_1, which the sampler does
    not draw). ``moments`` must hold every level of ``sigmas[:-1]``."""
    sigmas = sigmas.to(torch.float64)
    posterior, coef2 = step_coefficients(sigmas)
    m = moments.at(sigmas[:-1])
    estimate = posterior + coef2 * sigmas[:-1] ** 2 * (1 - m)  # Bao et al. 2022 Thm 1 (sigma-frame form)
    lower, upper = variance_bounds(sigmas, moments.data_range)
    return torch.minimum(torch.maximum(estimate, lower), upper)  # Thm 2


def _items(data) -> tuple[int, Callable]:
    """``(N, take(indices) -> (x [n, ...], labels [n] or None))`` for a tensor ``[N, ...]``, a pair
    ``(x, labels)`` or a dataset with ``__getitems__`` (the project's ``ImageDataset``/``PointDataset``)."""
    if isinstance(data, torch.Tensor):
        return len(data), lambda idx: (data[idx], None)
    if isinstance(data, (tuple, list)) and len(data) == 2 and isinstance(data[0], torch.Tensor):
        x, labels = data
        return len(x), lambda idx: (x[idx], None if labels is None else labels[idx])
    if hasattr(data, "__getitems__"):
        return len(data), lambda idx: tuple(data.__getitems__(idx.tolist()))
    raise ValueError(f"analytic_dpm: data of type {type(data).__name__} is not supported; allowed: a tensor "
                     "[N, ...], a pair (x, labels) or a dataset with __getitems__")


@torch.no_grad()
def estimate_moments(denoiser, data, sigmas: torch.Tensor, *, num_samples: int = 1000, seed: int = 0,
                     batch_size: int = 250, data_range: tuple[float, float] | None = None,
                     conditional: bool = False, device: torch.device | str | None = None) -> ScoreMoments:
    """Monte Carlo estimate of ``m(sigma) = E ||eps_hat(y + sigma eps; sigma)||^2 / d`` at every positive level of
    ``sigmas``: Bao et al. 2022's Monte Carlo estimate of Gamma_n (Thm 1), written for the noise prediction.

    ``num_samples`` items are drawn without replacement from ``data`` (a random subset chosen by ``seed``); item
    j gets its own noise generator (seed ``seed + j``), drawing one ``eps`` per level in grid order, so the result
    does not depend on ``batch_size``. Computations in float64.

    Args:
        denoiser: ``denoiser(x, sigma [B], **cond) -> D`` in the sigma-frame.
        data: training data in model space: a tensor ``[N, ...]``, ``(x, labels)`` or a dataset with
            ``__getitems__`` (labels are passed as ``labels=`` when ``conditional``).
        sigmas: the grid (decreasing; a trailing 0 is skipped).
        data_range: ``(a, b)`` when the data lie in ``[a, b]^d`` (kept for Thm 2's bound).
        device: where the denoiser runs (None: where the data are).
    Returns:
        ``ScoreMoments`` at the positive levels of ``sigmas``.
    """
    count, take = _items(data)
    if not isinstance(num_samples, int) or not 1 <= num_samples <= count:
        raise ValueError(f"analytic_dpm.num_samples={num_samples!r} is invalid; allowed: an integer in "
                         f"[1, {count}] (the training items available)")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"analytic_dpm.batch_size={batch_size!r} is invalid; allowed: an integer >= 1")
    levels = sigmas.detach().to("cpu", torch.float64)
    levels = levels[levels > 0]
    chosen = torch.randperm(count, generator=torch.Generator().manual_seed(seed))[:num_samples]
    total = torch.zeros(levels.numel(), dtype=torch.float64)
    for start in range(0, num_samples, batch_size):
        index = chosen[start:start + batch_size]
        y, labels = take(index)
        y = y.to(device or y.device, torch.float64)
        cond = {"labels": labels.to(y.device)} if conditional and labels is not None else {}
        noise = PerSampleGenerator([seed + start + j for j in range(len(index))])
        for k, sigma in enumerate(levels.tolist()):
            x = y + sigma * noise.randn(y.shape, dtype=torch.float64, device=y.device)
            sigma_batch = torch.full((len(y),), sigma, dtype=torch.float64, device=y.device)
            eps_hat = (x - denoiser(x, sigma_batch, **cond).to(torch.float64)) / sigma
            total[k] += float(eps_hat.flatten(1).pow(2).mean(1).sum())
    return ScoreMoments(levels, total / num_samples, num_samples, data_range)


def fingerprint(denoiser: torch.nn.Module, sigmas: torch.Tensor, settings: dict) -> str:
    """sha256 of the denoiser's weights and buffers (names, dtypes, shapes, bytes), the grid and ``settings``."""
    digest = hashlib.sha256()
    update_digest(digest, denoiser.state_dict())
    digest.update(sigmas.detach().to("cpu", torch.float64).numpy().tobytes())
    digest.update(json.dumps(settings, sort_keys=True).encode())
    return digest.hexdigest()


def default_cache_dir() -> Path:
    """``$LIGHTNING_DIFF_CACHE/analytic_dpm`` (default ``~/.cache/lightning_diff/analytic_dpm``)."""
    return cache_root() / "analytic_dpm"


def cached_moments(denoiser: torch.nn.Module, data, sigmas: torch.Tensor, *, cache_dir: str | os.PathLike | None,
                   data_tag: str = "", **settings) -> ScoreMoments:
    """``estimate_moments(denoiser, data, sigmas, **settings)`` stored in ``cache_dir`` (None: the default cache,
    ``default_cache_dir()``) as ``<key>.json``, the key a sha256 of the weights, the grid, ``data_tag`` (what
    identifies the data) and the settings (M, seed, data range). A file whose recorded key differs from its name's
    (a stale or foreign file) is never reused: it is recomputed and overwritten, with a warning."""
    settings = {"num_samples": 1000, "seed": 0, "data_range": None, **settings}
    record = {k: (list(v) if isinstance(v, tuple) else v) for k, v in settings.items()
              if k not in ("batch_size", "device")}
    key = fingerprint(denoiser, sigmas, {**record, "data": data_tag})
    path = Path(cache_dir if cache_dir is not None else default_cache_dir()) / f"{key}.json"
    if path.is_file():
        stored = json.loads(path.read_text())
        if stored.get("key") == key:
            data_range = stored["data_range"]
            return ScoreMoments(torch.tensor(stored["sigmas"], dtype=torch.float64),
                                torch.tensor(stored["eps_moments"], dtype=torch.float64), stored["num_samples"],
                                None if data_range is None else tuple(data_range))
        warnings.warn(f"analytic_dpm: {path} does not hold the moments of this model and grid (recorded key "
                      f"{str(stored.get('key'))[:12]}...); recomputing it", UserWarning, stacklevel=2)
    moments = estimate_moments(denoiser, data, sigmas, **settings)
    path.parent.mkdir(parents=True, exist_ok=True)
    scratch = path.with_suffix(f".{os.getpid()}.tmp")
    scratch.write_text(json.dumps({"key": key, "sigmas": moments.sigmas.tolist(),
                                   "eps_moments": moments.eps_moments.tolist(), "num_samples": moments.num_samples,
                                   "data_range": moments.data_range, "data": data_tag}))
    os.replace(scratch, path)  # atomic: concurrent ranks write the same content
    return moments


# --- Extended-Analytic-DPM ----------------------------------------------------------------------------------------
# Extended-Analytic-DPM (Bao, Li, Cao, Zhu & Zhang, ICML 2022, "Estimating the optimal covariance with imperfect
# mean in diffusion probabilistic models"): a per-element reverse variance from a second head of the network
# (docs/samplers.md#extended-analytic-dpm).
#
# For the ancestral (DDPM) step ``sigma -> sigma'`` with the model mean ``mu~(x_n, x0_hat)`` (Ho et al. eq. 7) and
# ``x0_hat = D = x - sigma eps_hat`` in the sigma-frame ``x = y + sigma eps``, the Gaussian kernel whose diagonal
# covariance minimises the KL to the forward chain's reverse (their Thm 1, with an imperfect mean) is
#
#     var(x_n) = lambda_n^2 + coef_x0^2 sigma^2 E[(eps - eps_hat(x_n))^2 | x_n]        (elementwise)
#
# with ``lambda_n^2 = beta~_n`` (DDPM's posterior variance) and ``coef_x0 = sqrt(abar_{n-1}) beta_n / (1 - abar_n)`` the
# weight of x0_hat in the mean (VP frame of x_{n-1}; ``step_coefficients``): the mean's error
# ``coef_x0 (x0_hat - y) = coef_x0 sigma (eps_hat - eps)`` adds its conditional second moment to beta~. Two heads
# estimate the conditional expectation, trained by regression on the network's extra C output channels:
#
# - ``npr`` (NPR-DPM): the head predicts the noise prediction residual ``h(x) ~ E[(eps - eps_hat(x))^2 | x]``
#   (target ``(eps - sg(eps_hat))^2``): optimal even for an imperfect mean;
# - ``sn`` (SN-DPM): the head predicts the squared noise ``g(x) ~ E[eps^2 | x]`` (target ``eps^2``) and
#   ``E[(eps - eps_hat)^2 | x] = g - eps_hat^2`` when ``eps_hat = E[eps | x]`` (a perfect mean).
#
# Averaged over x with a perfect mean, ``E[(eps - eps_hat)^2] = 1 - m`` and the variance is Analytic-DPM's
# (``optimal_variances``). The residual is clipped at 0 (variance >= beta~, Analytic-DPM's lower bound).
# ``objectives.second_moment.SecondMoment`` is the training objective (``objective=npr_dpm`` / ``sn_dpm``),
# ``step_variance`` the formula, ``SecondMomentHead`` what ``sampler=ddpm`` with ``variance=npr`` / ``sn`` evaluates.

KINDS = ("sn", "npr")  # the head's target: squared noise (SN-DPM) or noise prediction residual (NPR-DPM)


def check_kind(kind: str, setting: str) -> None:
    """Raise a ValueError naming ``setting`` unless ``kind`` is one of ``KINDS``."""
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
    check_kind(kind, "variance")
    posterior, coef2 = (float(v) for v in step_coefficients(torch.tensor([sigma, sigma_next], dtype=torch.float64)))
    eps_hat = (x - D) / sigma
    residual = head if kind == "npr" else head - eps_hat**2  # E[(eps - eps_hat)^2 | x] (module docstring)
    return posterior + coef2 * sigma**2 * residual.clamp(min=0)


class SecondMomentHead:
    """The ``denoiser`` that ``sampler=ddpm`` with ``variance=sn`` / ``npr`` evaluates: a call returns D and keeps
    the same pass's input, D and head, so that ``variance(sigma, sigma_next)`` gives ``step_variance``;
    ``round_sigma`` passes through."""

    def __init__(self, denoiser, kind: str):
        check_kind(kind, "sampler=ddpm: variance")
        self.denoiser, self.kind = denoiser, kind
        self.round_sigma = getattr(denoiser, "round_sigma", None)
        self._last = None

    def __call__(self, x, sigma, **cond):
        D, head = denoise_with_head(self.denoiser, x, sigma, **cond)
        self._last = (x, D.to(x.dtype), head.to(x.dtype))
        return D

    def variance(self, sigma: float, sigma_next: float) -> torch.Tensor:
        return step_variance(self.kind, sigma, sigma_next, *self._last)
