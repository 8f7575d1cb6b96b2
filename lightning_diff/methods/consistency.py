"""Consistency models (docs/consistency.md): a consistency function ``f(x, sigma)`` that maps every point of a
probability-flow ODE trajectory to the trajectory's end at ``sigma_min``, trained by consistency distillation (CD)
from a diffusion teacher or by consistency training (CT) from data, and sampled in one or a few steps
(``sampling.consistency``).

Song, Dhariwal, Chen & Sutskever 2023, "Consistency Models" (ICML), in the sigma-frame ``x = y + sigma n``: the
noise levels are EDM's time steps ``sigma_1 = sigma_min < ... < sigma_N = sigma_max`` (Sec. 5, Appendix C:
``sigma_i = (sigma_min^(1/rho) + (i-1)/(N-1) (sigma_max^(1/rho) - sigma_min^(1/rho)))^rho``); a training pair is
``x_{n+1} = y + sigma_{n+1} z`` and the point ``x_n`` of the same trajectory one level lower, and the loss is

    lambda(sigma_n) d(f_theta(x_{n+1}, sigma_{n+1}), f_theta-(x_n, sigma_n))                   (Alg. 2 and 3)

with ``theta-`` a stop-gradient target network. CD (Algorithm 2): ``x_n`` is one step of the teacher's PF-ODE
``dx/dsigma = (x - D(x; sigma)) / sigma`` (Heun or Euler, EDM Algorithm 1's step) from ``x_{n+1}``, and ``theta-``
the EMA ``theta- <- mu theta- + (1 - mu) theta`` (``target_decay`` mu). CT (Algorithm 3): ``x_n = y + sigma_n z``
with the same z (the one-sample estimate of the ODE step), with Song & Dhariwal 2024's improved techniques
("Improved Techniques for Training Consistency Models", ICLR): no EMA target (``theta- = sg(theta)``, Sec. 3.2), the
pseudo-Huber metric ``d(a, b) = sqrt(||a - b||^2 + c^2) - c`` with ``c = 0.00054 sqrt(d)`` (Sec. 3.3), the
weighting ``lambda(sigma_i) = 1 / (sigma_{i+1} - sigma_i)`` (Sec. 3.4), the discretisation curriculum
``N(k) = min(s0 2^floor(k / K'), s1) + 1``, ``K' = floor(K / (log2 floor(s1 / s0) + 1))`` (Sec. 3.4, eq. 7), and
lognormal noise levels ``p(sigma_i) ~ erf((ln sigma_{i+1} - P_mean) / (sqrt(2) P_std)) - erf((ln sigma_i - P_mean) /
(sqrt(2) P_std))`` (Sec. 3.5, eq. 8). Starting CT from a trained diffusion model's weights is Geng et al. 2024's
"Consistency Models Made Easy" (ECT): ``lightning-diff consistency mode=ct ckpt=<diffusion checkpoint>``.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import pytorch_lightning as pl
import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from ..denoiser import Denoiser
from ..formulations.schedules import karras_sigmas
from .distillation import _frozen

__all__ = ["MODES", "SOLVERS", "METRICS", "CURRICULA", "SIGMA_SAMPLINGS", "WEIGHTINGS", "MODE_DEFAULTS",
           "karras_levels", "ict_num_scales", "lognormal_level_probs", "pseudo_huber", "distance", "pair_weight",
           "teacher_step", "check_boundary", "ConsistencyTraining"]

MODES = ("cd", "ct")
SOLVERS = ("heun", "euler")
METRICS = ("pseudo_huber", "l2", "l1")
CURRICULA = ("constant", "ict")
SIGMA_SAMPLINGS = ("uniform", "lognormal")
WEIGHTINGS = ("uniform", "ict")
MODE_DEFAULTS = {  # the papers' choices per mode, for the settings left None
    "cd": {"curriculum": "constant", "target_decay": 0.95, "sigma_sampling": "uniform", "weighting": "uniform"},
    "ct": {"curriculum": "ict", "target_decay": 0.0, "sigma_sampling": "lognormal", "weighting": "ict"},
}
HUBER_C_PER_SQRT_DIM = 0.00054  # Song & Dhariwal 2024, Sec. 3.3: c = 0.00054 sqrt(d) (0.03 on CIFAR-10)


def karras_levels(num_scales: int, sigma_min: float, sigma_max: float, rho: float) -> torch.Tensor:
    """The ``N = num_scales`` discretisation levels, increasing: ``sigma_1 = sigma_min < ... < sigma_N = sigma_max``
    (Song et al. 2023, Sec. 5; EDM eq. 5 read from the low end). Float64 ``[N]``."""
    if not isinstance(num_scales, int) or num_scales < 2:
        raise ValueError(f"consistency: num_scales={num_scales!r} is invalid; allowed: an integer >= 2 (levels)")
    return karras_sigmas(num_scales, sigma_min, sigma_max, rho)[:-1].flip(0)


def ict_num_scales(step: int, total_steps: int, s0: int = 10, s1: int = 1280) -> int:
    """iCT's discretisation curriculum (Song & Dhariwal 2024, eq. 7): ``N(k) = min(s0 2^floor(k / K'), s1) + 1``
    with ``K' = floor(K / (log2 floor(s1 / s0) + 1))``, at optimizer step ``k = step`` of ``K = total_steps``.
    Their values: s0 = 10, s1 = 1280 (CIFAR-10, K = 400k)."""
    stage_steps = stage_length(total_steps, s0, s1)
    return min(s0 * 2 ** (step // stage_steps), s1) + 1


def stage_length(total_steps: int, s0: int, s1: int) -> int:
    """``K' = floor(K / (log2 floor(s1 / s0) + 1))``: optimizer steps per doubling of iCT's curriculum. ValueError
    naming the settings when ``K < log2 floor(s1 / s0) + 1`` (no step per stage) or ``s0 > s1``."""
    if not (isinstance(s0, int) and isinstance(s1, int) and 1 <= s0 <= s1):
        raise ValueError(f"consistency: s0={s0!r}, s1={s1!r} are invalid; allowed: integers 1 <= s0 <= s1")
    stages = int(math.log2(s1 // s0)) + 1
    if not isinstance(total_steps, int) or total_steps < stages:
        raise ValueError(f"consistency: total_steps={total_steps!r} is fewer than the {stages} stages of "
                         f"curriculum=ict with s0={s0}, s1={s1}; allowed: at least {stages} optimizer steps, or "
                         "curriculum=constant")
    return total_steps // stages


def lognormal_level_probs(levels: torch.Tensor, p_mean: float = -1.1, p_std: float = 2.0) -> torch.Tensor:
    """iCT's discretised lognormal (Song & Dhariwal 2024, eq. 8): the probability of the pair ``(sigma_i,
    sigma_{i+1})`` is proportional to ``erf((ln sigma_{i+1} - P_mean) / (sqrt(2) P_std)) - erf((ln sigma_i -
    P_mean) / (sqrt(2) P_std))``, the lognormal's mass between the two levels. ``levels`` increasing ``[N]``;
    returns float64 ``[N - 1]`` summing to 1. Their values: P_mean = -1.1, P_std = 2.0."""
    cdf = torch.special.erf((levels.double().log() - p_mean) / (math.sqrt(2) * p_std))
    mass = cdf[1:] - cdf[:-1]
    return mass / mass.sum()


def pseudo_huber(a: torch.Tensor, b: torch.Tensor, c: float | None = None) -> torch.Tensor:
    """Pseudo-Huber metric (Song & Dhariwal 2024, Sec. 3.3): ``sqrt(||a - b||^2 + c^2) - c`` per sample, the norm
    over all of a sample's elements; ``c`` None: ``0.00054 sqrt(d)`` with d the elements per sample. ``[B]``."""
    squared = (a - b).pow(2).flatten(1).sum(1)
    c = HUBER_C_PER_SQRT_DIM * math.sqrt(a[0].numel()) if c is None else c
    return (squared + c**2).sqrt() - c


def distance(a: torch.Tensor, b: torch.Tensor, metric: str, c: float | None = None) -> torch.Tensor:
    """``d(a, b)`` per sample ``[B]``: ``pseudo_huber`` (``c``), ``l2`` the squared distance and ``l1`` the absolute
    one, both averaged over elements (openai/consistency_models' ``mean_flat``, Song et al. 2023's l2 and l1)."""
    if metric == "pseudo_huber":
        return pseudo_huber(a, b, c)
    if metric == "l2":
        return (a - b).pow(2).flatten(1).mean(1)
    if metric == "l1":
        return (a - b).abs().flatten(1).mean(1)
    raise ValueError(f"consistency: metric={metric!r} is not known; allowed: {', '.join(METRICS)}")


def pair_weight(sigma: torch.Tensor, sigma_next: torch.Tensor, weighting: str) -> torch.Tensor:
    """``lambda(sigma_n)``: ``uniform`` 1 (Song et al. 2023), ``ict`` ``1 / (sigma_{n+1} - sigma_n)`` (Song &
    Dhariwal 2024, Sec. 3.4). ``[B]``."""
    if weighting == "uniform":
        return torch.ones_like(sigma)
    if weighting == "ict":
        return 1 / (sigma_next - sigma)
    raise ValueError(f"consistency: weighting={weighting!r} is not known; allowed: {', '.join(WEIGHTINGS)}")


@torch.no_grad()
def teacher_step(teacher: Callable, x: torch.Tensor, sigma: torch.Tensor, sigma_next: torch.Tensor,
                 solver: str = "heun", cond: dict | None = None) -> torch.Tensor:
    """One step of the teacher's PF-ODE ``dx/dsigma = (x - D(x; sigma)) / sigma`` from ``sigma`` to ``sigma_next``
    (both ``[B]`` and > 0): Euler, or Heun's second-order correction (EDM Algorithm 1, lines 7-11; Song et al.
    2023's ``heun_solver``). ``x`` ``[B, ...]``; returns x's shape and dtype."""
    if solver not in SOLVERS:
        raise ValueError(f"consistency: solver={solver!r} is not known; allowed: {', '.join(SOLVERS)}")
    cond = cond or {}
    view = (-1,) + (1,) * (x.ndim - 1)
    s0, s1 = sigma.to(x.dtype).reshape(view), sigma_next.to(x.dtype).reshape(view)
    slope = (x - teacher(x, sigma, **cond).to(x.dtype)) / s0  # d_i = (x - D(x; t_i)) / t_i
    x_next = x + (s1 - s0) * slope  # Euler
    if solver == "euler":
        return x_next
    slope_next = (x_next - teacher(x_next, sigma_next, **cond).to(x.dtype)) / s1
    return x + (s1 - s0) * (slope + slope_next) / 2  # trapezoidal (Heun) correction


def check_boundary(model: Denoiser) -> None:
    """ValueError unless ``model``'s preconditioning meets the boundary condition ``c_skip(sigma_min) = 1``,
    ``c_out(sigma_min) = 0`` (``f(x, sigma_min) = x``; Song et al. 2023, eq. 7): ``formulation=consistency``."""
    formulation = getattr(model, "formulation", None)
    sigma_min = getattr(formulation, "sigma_min", None)
    if sigma_min is not None:
        level = torch.tensor([sigma_min], dtype=torch.float64)
        if formulation.c_skip(level).item() == 1 and formulation.c_out(level).item() == 0:
            return
    name = getattr(formulation, "name", type(model).__name__)
    raise ValueError(f"consistency: the model's formulation={name} does not meet the boundary condition c_skip("
                     "sigma_min) = 1, c_out(sigma_min) = 0; allowed: a Denoiser with formulation=consistency")


class ConsistencyTraining(pl.LightningModule):
    """Consistency distillation (``mode="cd"``, Song et al. 2023, Algorithm 2) or consistency training
    (``mode="ct"``, Algorithm 3 with Song & Dhariwal 2024's improvements) of ``model`` (module docstring).

    Args:
        model: the consistency model, a ``Denoiser`` with ``formulation=consistency`` (its ``sigma_min``,
            ``sigma_max`` and ``rho`` set the levels; ``check_boundary``). Initialise it from a teacher's network
            for CD (Song et al. 2023) or ECT (Geng et al. 2024), or from scratch.
        optimizer: ``functools.partial`` of a ``torch.optim.Optimizer`` (Hydra ``_partial_: true``).
        mode: ``cd`` (needs ``teacher``) or ``ct``.
        teacher: CD's diffusion model, ``teacher(x, sigma [B], **cond) -> D`` (a ``Denoiser`` of any formulation,
            ``analytic.GaussianMixture``, ...); kept frozen in eval mode.
        total_steps: K, the optimizer steps of the run (the trainer's ``max_steps`` is set to it when unset, and
            must equal it otherwise); iCT's curriculum spreads its stages over them.
        num_scales: N, the levels of ``curriculum="constant"`` (Song et al. 2023: 18 for CD on CIFAR-10).
        curriculum: ``constant`` (N = num_scales) or ``ict`` (``ict_num_scales`` with ``s0``, ``s1``).
        solver: CD's teacher step, ``heun`` (the paper's) or ``euler``.
        target_decay: mu of the EMA target ``theta-`` (0: ``theta- = sg(theta)``, iCT).
        sigma_sampling: which pair trains: ``uniform`` n ~ U{1, ..., N-1} (Song et al. 2023) or ``lognormal``
            (``lognormal_level_probs`` with ``p_mean``, ``p_std``).
        weighting: ``uniform`` or ``ict`` (``pair_weight``).
        metric: ``pseudo_huber`` (``huber_c``; None: 0.00054 sqrt(d)), ``l2`` or ``l1`` (``distance``). The papers'
            LPIPS needs downloaded VGG weights and is not offered.
        conditional: pass the batch's labels to model, target and teacher.
    Settings left None take the paper's choice for the mode (``MODE_DEFAULTS``): CD constant N, mu = 0.95, uniform
    pairs and weights; CT the iCT curriculum, mu = 0, lognormal pairs, ``1 / (sigma_{n+1} - sigma_n)`` weights.
    """

    def __init__(self, model: Denoiser, optimizer: Callable[..., torch.optim.Optimizer] | None = None, *,
                 mode: str = "cd", teacher: Callable | None = None, total_steps: int = 1000, num_scales: int = 18,
                 curriculum: str | None = None, s0: int = 10, s1: int = 1280, solver: str = "heun",
                 target_decay: float | None = None, sigma_sampling: str | None = None, p_mean: float = -1.1,
                 p_std: float = 2.0, weighting: str | None = None, metric: str = "pseudo_huber",
                 huber_c: float | None = None, conditional: bool = False):
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"consistency: mode={mode!r} is not known; allowed: {', '.join(MODES)}")
        if (teacher is None) == (mode == "cd"):
            raise ValueError(f"consistency: mode={mode} with {'no' if teacher is None else 'a'} teacher; allowed: "
                             "mode=cd with a teacher (ckpt=), mode=ct without one")
        check_boundary(model)
        defaults = MODE_DEFAULTS[mode]
        self.curriculum = curriculum or defaults["curriculum"]
        self.target_decay = defaults["target_decay"] if target_decay is None else target_decay
        self.sigma_sampling = sigma_sampling or defaults["sigma_sampling"]
        self.weighting = weighting or defaults["weighting"]
        self._check_choices(solver, metric)
        if not isinstance(total_steps, int) or total_steps < 1:
            raise ValueError(f"consistency: total_steps={total_steps!r} is invalid; allowed: an integer >= 1")
        if self.curriculum == "ict":
            stage_length(total_steps, s0, s1)  # raises when the run is shorter than the curriculum's stages
        else:
            karras_levels(num_scales, 1.0, 2.0, 7.0)  # raises on a bad num_scales
        if not 0 <= self.target_decay < 1:
            raise ValueError(f"consistency: target_decay={self.target_decay!r} is invalid; allowed: 0 <= mu < 1")
        self.mode, self.solver, self.metric, self.huber_c = mode, solver, metric, huber_c
        self.total_steps, self.num_scales, self.s0, self.s1 = total_steps, num_scales, s0, s1
        self.p_mean, self.p_std, self.conditional = p_mean, p_std, conditional
        self.optimizer_factory = optimizer
        self.model = model.train()
        self.teacher = None if teacher is None else _frozen(teacher)
        self.target = None
        if self.target_decay > 0:  # the EMA target, starting at the initial weights (theta- = theta)
            self.target = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(self.target_decay))
            self.target.requires_grad_(False)
            self.target.update_parameters(model)  # the first update copies (n_averaged 0 -> 1)
        self._target_step = 0

    def _check_choices(self, solver: str, metric: str) -> None:
        for setting, value, allowed in (("curriculum", self.curriculum, CURRICULA), ("solver", solver, SOLVERS),
                                        ("sigma_sampling", self.sigma_sampling, SIGMA_SAMPLINGS),
                                        ("weighting", self.weighting, WEIGHTINGS), ("metric", metric, METRICS)):
            if value not in allowed:
                raise ValueError(f"consistency: {setting}={value!r} is not known; allowed: {', '.join(allowed)}")

    def train(self, mode: bool = True) -> ConsistencyTraining:
        """Train/eval mode of the model and its target; the teacher stays in eval mode (no dropout in its ODE)."""
        super().train(mode)
        if isinstance(self.teacher, nn.Module):
            self.teacher.eval()
        return self

    # --- the levels ---------------------------------------------------------------------------------------
    def scales_at(self, step: int) -> int:
        """N at optimizer step ``step``: ``num_scales`` or iCT's ``N(k)``."""
        if self.curriculum == "ict":
            return ict_num_scales(step, self.total_steps, self.s0, self.s1)
        return self.num_scales

    def levels_at(self, step: int) -> torch.Tensor:
        """The increasing levels ``[N]`` (float64) at optimizer step ``step``."""
        fm = self.model.formulation
        return karras_levels(self.scales_at(step), fm.sigma_min, fm.sigma_max, fm.rho)

    def draw_pairs(self, levels: torch.Tensor, batch: int, device) -> torch.Tensor:
        """``n`` ``[B]`` long in ``[0, N - 2]``: the pair ``(levels[n], levels[n + 1])`` of each example."""
        if self.sigma_sampling == "uniform":
            return torch.randint(0, levels.numel() - 1, (batch,), device=device)
        probs = lognormal_level_probs(levels, self.p_mean, self.p_std)
        return torch.multinomial(probs, batch, replacement=True).to(device)

    # --- training -----------------------------------------------------------------------------------------
    def on_fit_start(self):
        loop = self.trainer.fit_loop.epoch_loop
        if loop.max_steps == -1:
            loop.max_steps = self.total_steps
        elif loop.max_steps != self.total_steps:
            raise ValueError(f"consistency: trainer.max_steps={loop.max_steps} does not equal total_steps="
                             f"{self.total_steps} (the curriculum's K); allowed: {self.total_steps} or unset")

    def training_step(self, batch, batch_idx):
        y, labels = (*batch, None)[:2] if isinstance(batch, (tuple, list)) else (batch, None)
        cond = {"labels": labels} if self.conditional and labels is not None else {}
        y = y.float()
        levels = self.levels_at(self.global_step).to(y.device)
        n = self.draw_pairs(levels, y.shape[0], y.device)
        sigma, sigma_next = levels[n].float(), levels[n + 1].float()
        view = (-1,) + (1,) * (y.ndim - 1)
        noise = torch.randn_like(y)
        x_next = y + sigma_next.reshape(view) * noise
        with torch.no_grad():
            if self.mode == "cd":  # Algorithm 2: one teacher ODE step from sigma_{n+1} down to sigma_n
                x = teacher_step(self.teacher, x_next, sigma_next, sigma, self.solver, cond)
            else:  # Algorithm 3: the same noise at the lower level
                x = y + sigma.reshape(view) * noise
            devices = [y.device] if y.device.type == "cuda" else []
            with torch.random.fork_rng(devices=devices):  # the online pass below draws the same dropout masks
                target = (self.model if self.target is None else self.target)(x, sigma, **cond)
        prediction = self.model(x_next, sigma_next, **cond)
        loss = pair_weight(sigma, sigma_next, self.weighting) * distance(prediction, target, self.metric, self.huber_c)
        loss = loss.mean()
        self.log("train/loss", loss, prog_bar=True, batch_size=y.shape[0])
        self.log("consistency/num_scales", float(levels.numel()), batch_size=y.shape[0])
        return loss

    def on_train_batch_end(self, outputs, batch, batch_idx):
        if self.target is not None and self.global_step > self._target_step:  # after each optimizer step
            self.target.update_parameters(self.model)  # theta- <- mu theta- + (1 - mu) theta
            self._target_step = self.global_step

    def configure_optimizers(self):
        if self.optimizer_factory is None:
            raise ValueError("consistency: optimizer is not set; pass a partial of a torch.optim optimizer")
        return self.optimizer_factory(self.model.parameters())
