"""Progressive distillation (Salimans & Ho 2022, "Progressive distillation for fast sampling of diffusion models",
ICLR; docs/distillation.md): a student learns to do in one deterministic DDIM step what its teacher does in two,
then becomes the teacher of the next round, halving the step count each round (64 -> 32 -> ... -> 4).

In the sigma-frame ``x = y + sigma n`` (``x = z_t / alpha_t``) a DDIM step (eta = 0) is
``x' = D + (sigma' / sigma) (x - D)`` (``sampling.ddim``). Algorithm 2 of the paper, written there in the VP frame
``z_t = alpha_t y + sigma_t n``, is in the sigma-frame: from ``x`` at ``sigma`` the teacher takes two DDIM steps
``sigma -> sigma' -> sigma''`` to ``x''``; the target is the denoised value that makes ONE DDIM step from ``x`` land
on ``x''``:

    x~ = (x'' - (sigma'' / sigma) x) / (1 - sigma'' / sigma)                                            (Alg. 2)

(their ``x~ = (z_t'' - (sigma_t''/sigma_t) z_t) / (alpha_t'' - (sigma_t''/sigma_t) alpha_t)`` divided through by
``alpha_t''``; at ``sigma'' = 0`` it is the teacher's sample ``x''``). The student's loss is
``w(sigma) ||D_student(x; sigma) - x~||^2`` with the paper's weightings (Sec. 4): ``truncated_snr``
``w = max(SNR, 1)`` (x-parameterisation, = max(||x - x^||^2, ||eps - eps^||^2)) and ``snr_plus_one``
``w = SNR + 1`` (= ||v - v^||^2 for a VP model), ``SNR = alpha_t^2 / sigma_t^2 = 1 / sigma^2``. The student's
output parameterisation is its formulation's (``formulation=vp formulation.prediction=v`` or ``x0``).

Grids: round r (0-based) of a run on the base grid ``G`` (``steps`` = N0 steps, default the teacher formulation's
``sampling_sigmas(N0)``) distils the teacher on ``G[::2^r]`` into a student on ``G[::2^(r+1)]``: the paper's
``t = i / N`` on a fixed time grid, for any formulation's grid. The student draws ``i`` uniformly among its steps.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence

import pytorch_lightning as pl
import torch
from torch import nn

from .. import sampling
from ..aliases import renamed_keywords

__all__ = ["WEIGHTINGS", "distillation_target", "loss_weight", "round_grids", "ProgressiveDistillation"]

WEIGHTINGS = ("truncated_snr", "snr_plus_one")


@torch.no_grad()
def distillation_target(teacher: Callable, x: torch.Tensor, sigma: torch.Tensor, sigma_mid: torch.Tensor,
                        sigma_next: torch.Tensor, cond: dict | None = None) -> torch.Tensor:
    """Algorithm 2's target ``x~`` (module docstring): two teacher DDIM steps ``sigma -> sigma_mid -> sigma_next``
    from ``x``, solved for the denoised value of one step ``sigma -> sigma_next``.

    Args:
        teacher: ``teacher(x, sigma [B], **cond) -> D`` (a ``Denoiser``, ``analytic.GaussianMixture``, ...).
        x: ``[B, ...]`` sigma-frame states at ``sigma``.
        sigma, sigma_mid, sigma_next: ``[B]`` levels with ``sigma > sigma_mid > sigma_next >= 0``.
    Returns:
        ``[B, ...]`` in x's dtype (the targets are in data units, like D).
    """
    view = (-1,) + (1,) * (x.ndim - 1)
    cond = cond or {}
    s0, s1, s2 = (s.to(x.dtype).reshape(view) for s in (sigma, sigma_mid, sigma_next))
    denoised = teacher(x, sigma, **cond).to(x.dtype)
    x_mid = denoised + s1 / s0 * (x - denoised)  # DDIM (Song et al. 2021 eq. 12, eta = 0) in the sigma-frame
    denoised = teacher(x_mid, sigma_mid, **cond).to(x.dtype)
    x_next = denoised + s2 / s1 * (x_mid - denoised)
    ratio = s2 / s0
    return (x_next - ratio * x) / (1 - ratio)


def loss_weight(sigma: torch.Tensor, weighting: str) -> torch.Tensor:
    """The paper's weight of ``||D - x~||^2`` at noise level sigma (SNR = 1 / sigma^2): ``truncated_snr``
    ``max(SNR, 1)``, ``snr_plus_one`` ``SNR + 1`` (Salimans & Ho 2022, Sec. 4)."""
    snr = sigma**-2
    if weighting == "truncated_snr":
        return snr.clamp(min=1)
    if weighting == "snr_plus_one":
        return snr + 1
    raise ValueError(f"distill: weighting={weighting!r} is not known; allowed: {', '.join(WEIGHTINGS)}")


def round_grids(sigmas: torch.Tensor, rounds: int) -> list[torch.Tensor]:
    """``[G, G[::2], G[::4], ...]`` (``rounds + 1`` grids): the teacher grid of round r is entry r, its student's
    entry r + 1. ValueError unless ``G`` has ``N0 + 1`` levels with N0 divisible by ``2^rounds``."""
    steps = sigmas.numel() - 1
    if not isinstance(rounds, int) or rounds < 1 or steps % 2**rounds:
        raise ValueError(f"distill: rounds={rounds!r} with a base grid of {steps} steps is invalid; allowed: an "
                         f"integer >= 1 with steps divisible by 2^rounds (e.g. steps=64, rounds <= 6)")
    return [sigmas[:: 2**r] for r in range(rounds + 1)]


class ProgressiveDistillation(pl.LightningModule):
    """Distils ``teacher`` in ``rounds`` rounds of ``steps_per_round`` optimizer steps (Algorithm 2).

    Args:
        teacher: the model of round 0: a ``Denoiser`` (from ``lightning_diff.pretrained.load`` or
            ``builders.load_module(ckpt).denoiser``) or any ``teacher(x, sigma [B], **cond) -> D`` callable.
        optimizer: ``functools.partial`` of a ``torch.optim.Optimizer`` (Hydra ``_partial_: true``); its state is
            reset at the start of every round (a new student, as in the paper).
        student: the network trained; default a copy of ``teacher`` (which must then be an ``nn.Module``).
        steps: N0, the teacher's step count in round 0 (paper: 1024 on CIFAR-10; here 64 on digits).
        rounds: rounds; the final student takes ``steps / 2^rounds`` DDIM steps.
        steps_per_round: optimizer steps per round (the trainer's ``max_steps`` is set to
            ``rounds * steps_per_round`` when it is unset, and must equal it otherwise).
        weighting: ``truncated_snr`` or ``snr_plus_one`` (``loss_weight``).
        sigmas: the base grid (decreasing, ``steps + 1`` levels); default ``formulation.sampling_sigmas(steps)``
            of the teacher's (or student's) formulation.
        data_shape: one sample's shape, for the quality samples.
        quality_samples: how many samples (seeds ``0 .. quality_samples - 1`` of the fixed start noise) measure each
            round's quality (0: none; old keyword ``quality_seeds``).
        quality: optional ``quality(samples [N, *data_shape]) -> {name: float}`` (e.g. a classifier's accuracy or
            a distance to data), applied to the student's samples and to the round-0 teacher's DDIM samples at the
            same step count. Always logged: ``rms_to_base``, the RMS distance of those samples to the round-0
            teacher's ``steps``-step DDIM samples from the same noise.
        conditional: pass the batch's labels to teacher and student.

    After each round ``history`` holds ``{"round", "steps", "student_<q>", "teacher_<q>"}`` and the same numbers
    are logged as ``distill/<key>``.
    """

    @renamed_keywords(quality_seeds="quality_samples")
    def __init__(self, teacher: Callable, optimizer: Callable[..., torch.optim.Optimizer] | None = None, *,
                 student: nn.Module | None = None, steps: int = 64, rounds: int = 4, steps_per_round: int = 1000,
                 weighting: str = "truncated_snr", sigmas: torch.Tensor | None = None,
                 data_shape: Sequence[int] | None = None, quality_samples: int = 256,
                 quality: Callable[[torch.Tensor], dict] | None = None, conditional: bool = False):
        super().__init__()
        loss_weight(torch.ones(1), weighting)  # raises on an unknown weighting
        if student is None:
            if not isinstance(teacher, nn.Module):
                raise ValueError(f"distill: teacher of type {type(teacher).__name__} is not an nn.Module, so the "
                                 "student cannot be initialised from it; allowed: pass student=a Denoiser")
            student = copy.deepcopy(teacher)
        if not isinstance(steps_per_round, int) or steps_per_round < 1:
            raise ValueError(f"distill: steps_per_round={steps_per_round!r} is invalid; allowed: an integer >= 1")
        if not isinstance(quality_samples, int) or quality_samples < 0:
            raise ValueError(f"distill: quality_samples={quality_samples!r} is invalid; allowed: an integer >= 0")
        if sigmas is None:
            formulation = getattr(teacher, "formulation", None) or getattr(student, "formulation", None)
            if formulation is None or not isinstance(steps, int) or steps < 2:
                raise ValueError(f"distill: no base grid: steps={steps!r} and a teacher or student without a "
                                 "formulation; allowed: steps an integer >= 2 and a Denoiser, or sigmas=")
            sigmas = formulation.sampling_sigmas(steps)
        sigmas = sampling.core.round_sigma_of(student)(torch.as_tensor(sigmas, dtype=torch.float64).cpu())
        sampling.core.check_grid(sigmas, torch.zeros(1), "distill", student)
        self.grids = round_grids(sigmas, rounds)
        self.student = student.train()
        self.reference = _frozen(teacher)  # the round-0 teacher (quality baseline)
        self.teacher = self.reference  # this round's teacher
        self.optimizer_factory, self.weighting = optimizer, weighting
        self.rounds, self.steps_per_round = rounds, steps_per_round
        self.data_shape = None if data_shape is None else tuple(data_shape)
        self.quality_samples, self.quality, self.conditional = quality_samples, quality, conditional
        self.round = 0
        self.history: list[dict] = []
        self._base_samples: torch.Tensor | None = None

    def train(self, mode: bool = True) -> ProgressiveDistillation:
        """Train/eval mode of the student only: the teachers stay in eval mode (no dropout in the targets)."""
        super().train(mode)
        for model in (self.teacher, self.reference):
            if isinstance(model, nn.Module):
                model.eval()
        return self

    @property
    def student_grid(self) -> torch.Tensor:
        """The current student's grid (float64 ``[N + 1]``, ``N = steps / 2^(round + 1)``)."""
        return self.grids[self.round + 1]

    # --- rounds -------------------------------------------------------------------------------------------
    def on_fit_start(self):
        total = self.rounds * self.steps_per_round
        loop = self.trainer.fit_loop.epoch_loop
        if loop.max_steps == -1:
            loop.max_steps = total
        elif loop.max_steps != total:
            raise ValueError(f"distill: trainer.max_steps={loop.max_steps} does not equal rounds * steps_per_round "
                             f"= {total}; allowed: {total} or unset")

    def on_train_batch_start(self, batch, batch_idx):
        r = self.global_step // self.steps_per_round
        if r != self.round and r < self.rounds:
            self._finish_round()
            self.teacher = _frozen(self.student)  # the student of the last round teaches the next one
            self.round = r
            for optimizer in self.trainer.optimizers:
                optimizer.state.clear()  # a fresh student run (Algorithm 2 re-initialises per round)

    def on_train_end(self):
        self._finish_round()

    def _finish_round(self) -> None:
        """Measure this round's student against the round-0 teacher at the same step count and log it."""
        record = {"round": self.round, "steps": self.student_grid.numel() - 1}
        if self.quality_samples and self.data_shape is not None:
            record.update(self.round_quality())
        self.history.append(record)
        logger = self.trainer.logger if self._trainer is not None else None
        if logger:
            logger.log_metrics({f"distill/{k}": float(v) for k, v in record.items()}, step=self.global_step)

    @torch.no_grad()
    def round_quality(self) -> dict:
        """``student_<q>`` and ``teacher_<q>`` (round-0 teacher, DDIM at the student's step count) for ``rms_to_base``
        and every entry of ``quality``, on ``quality_samples`` fixed seeds."""
        seeds = list(range(self.quality_samples))
        base = self.base_samples()
        record = {}
        for who, model in (("student", self.student), ("teacher", self.reference)):
            samples = self.ddim_samples(model, self.student_grid, seeds)
            record[f"{who}_rms_to_base"] = float((samples - base).pow(2).mean().sqrt())
            for key, value in (self.quality(samples) if self.quality else {}).items():
                record[f"{who}_{key}"] = float(value)
        return record

    def base_samples(self) -> torch.Tensor:
        """The round-0 teacher's ``steps``-step DDIM samples on the ``quality_samples`` seeds (the baseline of
        ``rms_to_base``), float32 ``[quality_samples, *data_shape]``; sampled once (the reference never changes)."""
        if self._base_samples is None:
            self._base_samples = self.ddim_samples(self.reference, self.grids[0], range(self.quality_samples))
        return self._base_samples

    @torch.no_grad()
    def ddim_samples(self, model: Callable, grid: torch.Tensor, seeds: Sequence[int],
                     batch_size: int = 256) -> torch.Tensor:
        """Deterministic DDIM samples of ``model`` on ``grid`` from the per-sample noise of ``seeds``; float32
        ``[N, *data_shape]`` on the CPU."""
        was_training = self.student.training
        self.student.eval()
        out = []
        try:
            for start in range(0, len(seeds), batch_size):
                generator = sampling.PerSampleGenerator(list(seeds[start:start + batch_size]))
                x = sampling.initial_noise(generator, self.data_shape, float(grid[0]), device=self.device)
                out.append(sampling.ddim(model, x, grid.to(self.device)).float().cpu())
        finally:
            self.student.train(was_training)
        return torch.cat(out)

    # --- training -----------------------------------------------------------------------------------------
    def training_step(self, batch, batch_idx):
        y, labels = (*batch, None)[:2] if isinstance(batch, (tuple, list)) else (batch, None)
        cond = {"labels": labels} if self.conditional and labels is not None else {}
        y = y.float()
        teacher_grid, grid = self.grids[self.round].to(y.device), self.student_grid.to(y.device)
        i = torch.randint(0, grid.numel() - 1, (y.shape[0],), device=y.device)  # t = i / N, uniform
        sigma, sigma_mid, sigma_next = grid[i], teacher_grid[2 * i + 1], grid[i + 1]
        view = (-1,) + (1,) * (y.ndim - 1)
        x = y + sigma.float().reshape(view) * torch.randn_like(y)
        target = distillation_target(self.teacher, x, sigma.float(), sigma_mid.float(), sigma_next.float(), cond)
        denoised = self.student(x, sigma.float(), **cond)
        loss = (loss_weight(sigma.float(), self.weighting) * (denoised - target).pow(2).flatten(1).mean(1)).mean()
        self.log("train/loss", loss, prog_bar=True, batch_size=y.shape[0])
        self.log("distill/round", float(self.round), batch_size=y.shape[0])
        return loss

    def configure_optimizers(self):
        if self.optimizer_factory is None:
            raise ValueError("distill: optimizer is not set; pass a partial of a torch.optim optimizer")
        return self.optimizer_factory(self.student.parameters())


def _frozen(model: Callable) -> Callable:
    """A frozen eval-mode copy of an ``nn.Module`` (a plain callable is returned as is)."""
    if not isinstance(model, nn.Module):
        return model
    return copy.deepcopy(model).requires_grad_(False).eval()
