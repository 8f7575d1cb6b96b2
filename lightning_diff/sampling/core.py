"""What every sampler shares: checking the sigma grid (snapped to the network's noise levels), calling the
denoiser in the solver's dtype, and counting network forward passes (NFE) into ``stats`` and callback payloads.

Sampler contract (k-diffusion convention): ``fn(denoiser, x, sigmas, *, generator=None, callback=None,
stats=None, **options) -> Tensor`` where ``denoiser(x, sigma, **cond)`` takes ``sigma`` as a ``[B]``
tensor and returns the estimate of y in the sigma-frame ``x = y + sigma n``; ``x`` is the start noise
already multiplied by ``sigmas[0]``; ``sigmas`` is a strictly decreasing 1-D tensor of levels >= 0. A grid that
ends in 0 returns samples (the last step lands on D); one that ends at ``sigma_N > 0`` returns the state at
``sigma_N`` with no final denoising jump, as k-diffusion's samplers, so that a run from s0 to s1 followed by one
from s1 to 0 is the run over the joined grid (docs/samplers.md#grids).

Two optional denoiser attributes (looked up with ``getattr``; guidance wrappers pass them through):

- ``round_sigma(sigma: Tensor) -> Tensor``: snap noise levels to those the network knows (``Denoiser``
  delegates to its formulation: the nearest grid level for ddpm/iddpm/ncsn, identity otherwise). Samplers
  snap the grid before the first step and EDM's churned level ``sigma_hat``, as NVlabs/edm's ``edm_sampler``
  (``t_steps = round_sigma(t_steps)``, ``t_hat = round_sigma(t_cur + gamma t_cur)``). Absent: identity.
- ``network_passes(cond: dict, sigma: Tensor | None) -> int``: network forward passes per sample that one call with
  conditioning ``cond`` at noise levels ``sigma`` ``[B]`` costs (``CFGDenoiser``, ``AutoGuidance``: 2 for a guided
  call, 1 at a level outside their guidance interval; ``sigma=None``: the guided count). Absent: 1.

NFE (``stats["nfe"]``, callback ``"nfe"``): network forward passes per sample, the sum of ``network_passes``
over the sampler's denoiser calls; a classifier-free-guided evaluation counts 2.

Every sampler runs under ``@torch.no_grad()`` (k-diffusion's samplers do): sampling a ``Denoiser`` with trainable
parameters builds no graph. A denoiser wrapper that needs a gradient (``ClassifierGuidance``) takes it inside
``torch.enable_grad()``; code that trains through a sampler step must call the solver maths itself.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

__all__ = ["Evaluator", "check_grid", "check_choice", "check_nonnegative", "to_dtype", "round_sigma_of",
           "network_passes"]


def identity(sigma: torch.Tensor) -> torch.Tensor:
    return sigma


def round_sigma_of(denoiser: Callable) -> Callable[[torch.Tensor], torch.Tensor]:
    """The denoiser's ``round_sigma`` (snap to the noise levels its network knows), identity when it has none."""
    return getattr(denoiser, "round_sigma", None) or identity


def network_passes(denoiser: Callable, cond: dict, sigma: torch.Tensor | None = None) -> int:
    """Network forward passes per sample of one call ``denoiser(x, sigma, **cond)`` (``sigma``: its ``[B]`` noise
    levels, None when unknown): the denoiser's own ``network_passes(cond, sigma)`` when it has one (guidance
    wrappers), else 1."""
    count = getattr(denoiser, "network_passes", None)
    return 1 if count is None else count(cond, sigma)


def check_grid(sigmas: torch.Tensor, x: torch.Tensor, sampler: str, denoiser: Callable,
               ends_in_zero: bool = False) -> list[float]:
    """Validate ``sigmas`` (1-D, >= 2 entries, finite, strictly decreasing, every entry >= 0; last entry 0 when
    ``ends_in_zero``, for samplers whose last step must be the denoising one), snap it to the denoiser's noise
    levels (``round_sigma_of(denoiser)``, EDM's ``round_sigma``; 0 stays 0) and return it as a list of Python
    floats (exact float64 values, used for control flow without device syncs).

    Raises ``ValueError`` when snapping puts two entries on one level (a grid finer than the network's)."""
    if not isinstance(sigmas, torch.Tensor) or sigmas.ndim != 1 or sigmas.numel() < 2:
        raise ValueError(f"sampler={sampler}: sigmas must be a 1-D tensor with at least 2 entries, got "
                         f"{getattr(sigmas, 'shape', type(sigmas).__name__)}")
    grid = sigmas.detach().to("cpu", torch.float64).tolist()
    if not all(map(lambda s: s == s and s != float("inf"), grid)):
        raise ValueError(f"sampler={sampler}: sigmas={grid} contains a non-finite value")
    if grid[-1] < 0 or any(a <= b for a, b in zip(grid, grid[1:], strict=False)):
        raise ValueError(f"sampler={sampler}: sigmas={grid[:3]}...{grid[-2:]} is invalid; allowed: strictly "
                         "decreasing noise levels >= 0")
    if ends_in_zero and grid[-1] != 0:
        raise ValueError(f"sampler={sampler}: sigmas ends at {grid[-1]}; allowed: a grid that ends in 0 "
                         "(this sampler's last step is the denoising one)")
    if x.ndim < 1 or x.shape[0] < 1:
        raise ValueError(f"sampler={sampler}: x must have a batch dimension, got shape {tuple(x.shape)}")
    snapped = round_sigma_of(denoiser)(torch.tensor(grid, dtype=torch.float64)).tolist()
    merged = [(a, b) for a, b, c, d in zip(grid, grid[1:], snapped, snapped[1:], strict=False) if c <= d]
    if merged or (snapped[-1] == 0) != (grid[-1] == 0):
        raise ValueError(f"sampler={sampler}: sigmas snapped to the network's noise levels (denoiser.round_sigma) "
                         f"are not strictly decreasing: {merged[:3]} land on one level; allowed: at most one sigma "
                         "per network level (e.g. formulation.sampling_sigmas, or fewer steps)")
    return snapped


def check_choice(sampler: str, setting: str, value, allowed) -> None:
    """Raise ``ValueError`` naming the setting unless ``value in allowed``."""
    if value not in allowed:
        raise ValueError(f"sampler={sampler}: {setting}={value!r} is not known; "
                         f"allowed: {', '.join(map(str, allowed))}")


def check_nonnegative(sampler: str, **values) -> None:
    """Raise ``ValueError`` naming the setting unless every value is a finite number >= 0."""
    for key, value in values.items():
        if not isinstance(value, (int, float)) or value != value or value < 0 or value == float("inf"):
            raise ValueError(f"sampler={sampler}: {key}={value!r} is invalid; allowed: a finite number >= 0")


class Evaluator:
    """Wraps ``denoiser`` for a solver whose state has dtype ``dtype``.

    ``evaluator(x, sigma)`` with ``sigma`` a float or ``[B]`` tensor calls ``denoiser(x, sigma[B], **cond)``
    and returns D in ``dtype``; it adds each call's ``network_passes`` to ``nfe`` and mirrors the count into
    ``stats["nfe"]``. ``snap(sigma)`` rounds a noise level to the network's (``round_sigma_of``).
    ``report(i, x, sigma, denoised)`` sends ``{"i", "x", "sigma", "denoised", "nfe"}`` to the callback, plus
    ``"sigma_hat"`` (the level ``x`` and ``denoised`` are at, after EDM's churn) when given, as k-diffusion's
    ``sample_euler``/``sample_heun``.
    """

    def __init__(self, denoiser: Callable, x: torch.Tensor, dtype: torch.dtype, cond: dict | None,
                 stats: dict | None, callback: Callable | None):
        self.denoiser, self.dtype, self.cond = denoiser, dtype, dict(cond or {})
        self.stats, self.callback = stats, callback
        self.batch, self.device = x.shape[0], x.device
        self.round_sigma = round_sigma_of(denoiser)
        self.nfe = 0
        self._write("nfe", 0)

    def _write(self, key: str, value) -> None:
        if self.stats is not None:
            self.stats[key] = value

    def sigma_batch(self, sigma, batch: int | None = None) -> torch.Tensor:
        """A noise level (float) or ``[B]`` tensor as a ``[B]`` tensor in the solver dtype."""
        if isinstance(sigma, torch.Tensor):
            return sigma.to(self.device, self.dtype).reshape(-1).expand(batch or self.batch)
        return torch.full((batch or self.batch,), float(sigma), dtype=self.dtype, device=self.device)

    def __call__(self, x: torch.Tensor, sigma, cond: dict | None = None) -> torch.Tensor:
        """``D(x; sigma)`` in the solver dtype; ``cond`` replaces the stored conditioning (row subsets)."""
        cond, sigma = self.cond if cond is None else cond, self.sigma_batch(sigma, x.shape[0])
        self.nfe += network_passes(self.denoiser, cond, sigma)
        self._write("nfe", self.nfe)
        return self.denoiser(x, sigma, **cond).to(self.dtype)

    def snap(self, sigma: float) -> float:
        """The network noise level nearest to ``sigma`` (EDM's ``round_sigma``; identity for continuous models)."""
        return float(self.round_sigma(torch.tensor([sigma], dtype=torch.float64))[0])

    def report(self, i: int, x: torch.Tensor, sigma, denoised: torch.Tensor, sigma_hat: float | None = None) -> None:
        if self.callback is None:
            return
        payload = {"i": i, "x": x, "sigma": sigma, "denoised": denoised, "nfe": self.nfe}
        self.callback(payload if sigma_hat is None else {**payload, "sigma_hat": sigma_hat})


def to_dtype(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The solver state: ``x`` converted to ``dtype`` (float64 by default, as NVlabs/edm's sampler)."""
    if not dtype.is_floating_point:
        raise ValueError(f"dtype={dtype} is invalid; allowed: a floating-point dtype (float64 recommended)")
    return x.to(dtype, copy=True)  # a copy: solvers may update their state in place
