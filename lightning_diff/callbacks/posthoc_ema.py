"""Post-hoc EMA (Karras et al. 2024, "Analyzing and Improving the Training Dynamics of Diffusion Models", Sec. 3 and
Appendix C; docs/posthoc_ema.md): track two EMA profiles during training, choose any EMA length afterwards.

- A power-function profile averages the weights ``theta(tau)`` seen up to training time ``t`` with density
  ``(gamma + 1) tau^gamma / t^(gamma + 1)`` on ``[0, t]`` (Sec. 3.1); its length is its relative standard deviation
  ``sigma_rel`` (eq. 3), ``gamma_to_sigma_rel`` / ``sigma_rel_to_gamma`` (Algorithm 2) convert.
- ``PowerFunctionEMA`` tracks profiles of a module's weights with the per-step decay ``power_beta``; after each
  optimizer step the average equals the profile's integral over the weights held piecewise constant between steps.
- ``PostHocEMA`` (callback, ``callbacks/posthoc_ema=edm2``) tracks two profiles and writes both, atomically, every
  ``every_n_steps`` optimizer steps and at the end of training: ``<dirpath>/snapshot-<step>.pt``.
- ``reconstruct`` (``lightning-diff posthoc-ema``) builds any ``sigma_rel`` at the newest snapshot's time as the
  least-squares combination of the stored snapshots' profiles (Appendix C.3).

Training time ``t`` counts the images trained on over all ranks (NVlabs/edm2's ``nimg``); with a constant batch it is
``step x batch`` and the reconstruction does not depend on the unit.
"""

from __future__ import annotations

import math
import re
from collections.abc import Collection, Mapping, Sequence
from pathlib import Path

import numpy as np
import pytorch_lightning as pl
import torch

from ..checkpoint_io import CHECKPOINT_FORMAT, FORMAT_KEY, atomic_write, load_checkpoint

__all__ = ["SIGMA_REL_MAX", "PostHocEMA", "PowerFunctionEMA", "check_sigma_rel", "gamma_to_sigma_rel",
           "power_beta", "profile_inner_products", "read_snapshots", "reconstruct", "sigma_rel_to_gamma",
           "snapshot_name", "solve_coefficients"]

# The largest sigma_rel of a power-function profile: d sigma_rel / d gamma = 0 at gamma + 1 = 1/phi (phi the golden
# ratio), where sigma_rel^2 = (1/phi) / (phi^2 phi^2) = phi^-5; larger gammas give every sigma_rel in (0, phi^-5/2).
SIGMA_REL_MAX = ((1 + math.sqrt(5)) / 2) ** -2.5  # 0.30028
SNAPSHOT_KEY = "posthoc_ema_snapshot"  # a snapshot file's key holding its step, images and profiles
_SNAPSHOT = re.compile(r"snapshot-(\d+)\.pt")


# ------------------------------------------------------------------------------------------------ profiles

def check_sigma_rel(value, setting: str = "sigma_rel") -> float:
    """``value`` as a float when it is a number in ``(0, SIGMA_REL_MAX)``, else ValueError naming ``setting``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < SIGMA_REL_MAX:
        raise ValueError(f"{setting}={value!r} is invalid; allowed: a number in (0, {SIGMA_REL_MAX:.4f}) (the relative "
                         "standard deviation of a power-function EMA profile; EDM2 tracks 0.05 and 0.10)")
    return float(value)


def gamma_to_sigma_rel(gamma: float) -> float:
    """Relative standard deviation of the profile ``tau^gamma`` (Karras et al. 2024, eq. 3):
    ``sigma_rel = sqrt((gamma + 1) / ((gamma + 2)^2 (gamma + 3)))``, for ``gamma > -1``."""
    return math.sqrt((gamma + 1) / ((gamma + 2) ** 2 * (gamma + 3)))


def sigma_rel_to_gamma(sigma_rel: float) -> float:
    """The exponent of the profile of length ``sigma_rel`` (Karras et al. 2024, Algorithm 2): eq. 3 squared is the
    cubic ``gamma^3 + 7 gamma^2 + (16 - s) gamma + 12 - s = 0`` with ``s = sigma_rel^-2``, whose largest real root is
    the one on the branch ``gamma > (sqrt(5) - 3) / 2`` where ``sigma_rel`` falls as ``gamma`` grows."""
    s = check_sigma_rel(sigma_rel) ** -2
    return float(np.roots([1.0, 7.0, 16.0 - s, 12.0 - s]).real.max())


def power_beta(gamma: float, images: float, batch_images: float) -> float:
    """Decay of the optimizer step that ends at ``images`` and trained on ``batch_images`` of them:
    ``beta = (1 - batch_images / images)^(gamma + 1)`` (Karras et al. 2024, Sec. 3.1: ``(1 - 1/t)^(gamma + 1)`` per
    step; NVlabs/edm2 in images). With ``t0 = images - batch_images``, ``beta = (t0 / images)^(gamma + 1)``, so
    ``beta * avg(t0) + (1 - beta) * theta`` is the profile's integral up to ``images`` of weights equal to ``theta``
    on ``(t0, images]``; the first step (``t0 = 0``) gives ``beta = 0``."""
    return (1.0 - batch_images / images) ** (gamma + 1.0)


def profile_inner_products(times_a, gammas_a, times_b, gammas_b) -> np.ndarray:
    """``<p_a, p_b> = integral_0^inf p_a(tau) p_b(tau) dtau`` of profiles ``p(tau) = (gamma + 1) tau^gamma /
    t^(gamma + 1)`` on ``[0, t]`` (Karras et al. 2024, Appendix C.3), broadcast over the arguments (float64):
    ``(gamma_a + 1)(gamma_b + 1) / (gamma_a + gamma_b + 1) * (t_lo / t_hi)^gamma_hi / t_hi``, where ``t_hi`` is the
    later end and ``gamma_hi`` its exponent (written with the ratio so that large exponents do not overflow)."""
    times_a, gammas_a, times_b, gammas_b = np.broadcast_arrays(*(np.asarray(v, dtype=np.float64)
                                                                 for v in (times_a, gammas_a, times_b, gammas_b)))
    a_first = times_a <= times_b
    t_lo, t_hi = np.where(a_first, times_a, times_b), np.where(a_first, times_b, times_a)
    gamma_hi = np.where(a_first, gammas_b, gammas_a)
    return (gammas_a + 1) * (gammas_b + 1) / (gammas_a + gammas_b + 1) * (t_lo / t_hi) ** gamma_hi / t_hi


def solve_coefficients(times: Sequence[float], gammas: Sequence[float], time: float,
                       gamma: float) -> tuple[np.ndarray, float]:
    """Weights ``x`` of the stored profiles ``(times[i], gammas[i])`` whose sum best approximates the profile
    ``(time, gamma)`` in L2 (Karras et al. 2024, Appendix C.3: ``A x = b`` by least squares, ``A`` the stored
    profiles' inner products, ``b`` theirs with the target). Returns ``x`` [N] and the fit's relative L2 error
    ``||sum_i x_i p_i - p|| / ||p||`` (0: exact; it bounds the error of every reconstructed weight, Cauchy-Schwarz)."""
    times, gammas = np.asarray(times, dtype=np.float64) / time, np.asarray(gammas, dtype=np.float64)  # t in [0, 1]
    gram = profile_inner_products(times[:, None], gammas[:, None], times[None, :], gammas[None, :])
    target = profile_inner_products(times, gammas, 1.0, gamma)
    x = np.linalg.lstsq(gram, target, rcond=None)[0]
    norm = float(profile_inner_products(1.0, gamma, 1.0, gamma))
    error = x @ gram @ x - 2 * x @ target + norm
    return x, math.sqrt(max(float(error), 0.0) / norm)


class PowerFunctionEMA:
    """Power-function averages of a set of weights, one per ``sigma_rel``.

    ``track(weights, averaged)`` binds the live tensors (a module's ``state_dict(keep_vars=True)``): the names in
    ``averaged`` (the parameters) are averaged, the others (buffers) copied. ``update(images, batch_images)`` after
    each optimizer step: ``avg <- beta avg + (1 - beta) theta`` with ``beta = power_beta(gamma, images,
    batch_images)``. ``averages[i]``: name -> tensor of profile ``i``, on the weights' devices and dtypes.
    """

    def __init__(self, sigma_rels: Sequence[float], setting: str = "sigma_rels"):
        self.sigma_rels = tuple(check_sigma_rel(s, setting) for s in sigma_rels)
        if not self.sigma_rels or len(set(self.sigma_rels)) != len(self.sigma_rels):
            raise ValueError(f"{setting}={list(sigma_rels)} is invalid; allowed: a non-empty list of distinct numbers "
                             f"in (0, {SIGMA_REL_MAX:.4f})")
        self.gammas = tuple(map(sigma_rel_to_gamma, self.sigma_rels))
        self.averaged: list[str] = []
        self.averages: list[dict[str, torch.Tensor]] = []  # empty until the first track (or a loaded state)
        self._pairs: list[tuple[list, list, list, list]] = []  # per profile: averages, live (lerped; copied)

    def track(self, weights: Mapping[str, torch.Tensor], averaged: Collection[str]) -> None:
        """Bind to ``weights`` (names kept from a loaded state, moved to their devices); a fresh average starts
        as a copy, which the first update (``beta = 0``) replaces."""
        self.averaged = [k for k in weights if k in averaged]
        if self.averages and set(self.averages[0]) != set(weights):
            raise ValueError(f"PostHocEMA: the loaded averages hold {sorted(self.averages[0])[:3]}..., the module "
                             f"{sorted(weights)[:3]}...: another network (allowed: the run's own checkpoint)")
        if not self.averages:
            self.averages = [{k: v.detach().clone() for k, v in weights.items()} for _ in self.gammas]
        self.averages = [{k: a.to(weights[k].device, weights[k].dtype) for k, a in avg.items()}
                         for avg in self.averages]
        copied = [k for k in weights if k not in averaged]
        self._pairs = [([avg[k] for k in self.averaged], [weights[k] for k in self.averaged],
                        [avg[k] for k in copied], [weights[k] for k in copied]) for avg in self.averages]

    @torch.no_grad()
    def update(self, images: int, batch_images: int) -> None:
        """After the optimizer step that ends at ``images`` (trained on so far, this step's ``batch_images``
        included): one fused lerp per profile and a copy of the rest."""
        for gamma, (averages, live, copies, sources) in zip(self.gammas, self._pairs, strict=True):
            torch._foreach_lerp_(averages, live, 1.0 - power_beta(gamma, images, batch_images))
            if copies:
                torch._foreach_copy_(copies, sources)

    def state_dict(self) -> dict:
        return {"sigma_rels": list(self.sigma_rels), "averaged": list(self.averaged), "averages": self.averages}

    def load_state_dict(self, state: Mapping) -> None:
        if list(state["sigma_rels"]) != list(self.sigma_rels):
            raise ValueError(f"PostHocEMA: the checkpoint tracked sigma_rels={list(state['sigma_rels'])}, this run "
                             f"{list(self.sigma_rels)}; allowed: the same profiles when resuming")
        self.averaged, self.averages, self._pairs = list(state["averaged"]), list(state["averages"]), []


# ------------------------------------------------------------------------------------------------ the callback

def snapshot_name(step: int) -> str:
    """``snapshot-0001000.pt`` for optimizer step 1000."""
    return f"snapshot-{step:07d}.pt"


class PostHocEMA(pl.Callback):
    """Tracks power-function EMA profiles during training and saves them as snapshots (Karras et al. 2024, Sec. 3.2).

    Args:
        sigma_rels: the tracked profiles' relative standard deviations (EDM2: 0.05 and 0.10), each in
            ``(0, SIGMA_REL_MAX)``.
        every_n_steps: a snapshot every this many optimizer steps; one more at the end of training. Each costs one copy
            of the weights per profile on disk (two: 2 x 4 bytes per float32 parameter), the tracked profiles the same
            in the training device's memory.
        dirpath: the snapshots' folder (``<run dir>/posthoc_ema`` in ``configs/callbacks/posthoc_ema``).

    A snapshot ``<dirpath>/snapshot-<step>.pt`` (``load_checkpoint`` reads it) holds ``posthoc_ema_snapshot``:
    ``{"step", "images", "sigma_rels", "gammas", "averaged"}``, ``profiles``: one state dict per profile, and what the
    module stores in its checkpoints (``run_config``, ``data_shape``...), so ``lightning-diff posthoc-ema`` writes
    checkpoints that ``sample`` and ``evaluate`` load. Written by global rank 0, atomically; the averages and the
    image count are checkpointed with the run (exact resume).
    """

    def __init__(self, sigma_rels: Sequence[float] = (0.05, 0.10),  # EDM2's two profiles (train_edm2.py)
                 every_n_steps: int = 500, dirpath: str = "posthoc_ema"):
        if isinstance(every_n_steps, bool) or not isinstance(every_n_steps, int) or every_n_steps < 1:
            raise ValueError(f"callbacks.posthoc_ema.every_n_steps={every_n_steps!r} is invalid; allowed: an integer "
                             ">= 1 (optimizer steps between snapshots)")
        self.ema = PowerFunctionEMA(list(sigma_rels), setting="callbacks.posthoc_ema.sigma_rels")
        self.every_n_steps, self.dirpath = every_n_steps, Path(dirpath)
        self.images = 0  # images trained on so far, all ranks (EDM2's cur_nimg)
        self.snapshot_step = 0  # optimizer step of the newest snapshot
        self._step_images = 0  # images of the micro-batches since the last optimizer step, all ranks
        self._updated_step = 0  # optimizer step of the last update
        self._bound = False

    @property
    def state_key(self) -> str:
        return self._generate_state_key(sigma_rels=list(self.ema.sigma_rels), dirpath=str(self.dirpath))

    def setup(self, trainer, pl_module, stage: str) -> None:
        self._bound = False  # the module's tensors are bound at the first update, once on their device

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        x = batch[0] if isinstance(batch, (tuple, list)) else batch
        self._step_images += len(x) * trainer.world_size
        if trainer.global_step <= self._updated_step:
            return  # a micro-batch of gradient accumulation: no optimizer step yet
        if not self._bound:
            self.ema.track(pl_module.state_dict(keep_vars=True), {n for n, _ in pl_module.named_parameters()})
            self._bound = True
        self.images += self._step_images
        self.ema.update(self.images, self._step_images)
        self._step_images, self._updated_step = 0, trainer.global_step
        if trainer.global_step % self.every_n_steps == 0:
            self.save_snapshot(trainer, pl_module)

    def on_train_end(self, trainer, pl_module) -> None:
        if self._updated_step > self.snapshot_step:
            self.save_snapshot(trainer, pl_module)

    def save_snapshot(self, trainer, pl_module) -> None:
        """Write both profiles at this optimizer step (global rank 0; every rank records the step)."""
        self.snapshot_step = self._updated_step
        if not trainer.is_global_zero:
            return
        snapshot = {FORMAT_KEY: CHECKPOINT_FORMAT}
        pl_module.on_save_checkpoint(snapshot)  # DiffusionModule: run_config, data shape, classes, transform
        snapshot[SNAPSHOT_KEY] = {"step": self.snapshot_step, "images": self.images,
                                  "sigma_rels": list(self.ema.sigma_rels), "gammas": list(self.ema.gammas),
                                  "averaged": list(self.ema.averaged)}
        snapshot["profiles"] = [{k: v.detach().cpu() for k, v in avg.items()} for avg in self.ema.averages]
        atomic_write(self.dirpath / snapshot_name(self.snapshot_step), lambda file: torch.save(snapshot, file))

    def state_dict(self) -> dict:
        return {**self.ema.state_dict(), "images": self.images, "step_images": self._step_images,
                "updated_step": self._updated_step, "snapshot_step": self.snapshot_step}

    def load_state_dict(self, state_dict: dict) -> None:
        self.ema.load_state_dict(state_dict)
        self.images, self._step_images = state_dict["images"], state_dict["step_images"]
        self._updated_step, self.snapshot_step = state_dict["updated_step"], state_dict["snapshot_step"]
        self._bound = False


# ------------------------------------------------------------------------------------------------ reconstruction

def read_snapshots(folder: str | Path, setting: str = "ckpt_dir") -> list[dict]:
    """The ``posthoc_ema_snapshot`` entries of the snapshots in ``folder``, each with its ``path``, oldest first
    (read without their weights). ValueError naming ``setting`` when there are none, or when they come from
    differently tracked runs (other weights or ``averaged`` names)."""
    folder = Path(folder)
    paths = sorted(p for p in folder.glob("snapshot-*.pt") if _SNAPSHOT.fullmatch(p.name)) if folder.is_dir() else []
    if not paths:
        why = "holds no snapshot-<step>.pt files" if folder.is_dir() else "is not a folder"
        raise ValueError(f"{setting}={folder} {why}; allowed: the snapshot folder of a run trained with "
                         "callbacks/posthoc_ema=edm2 (<run dir>/posthoc_ema)")
    entries = []
    for path in paths:
        checkpoint = load_checkpoint(path, mmap=True)
        if SNAPSHOT_KEY not in checkpoint:
            raise ValueError(f"{setting}={folder}: {path.name} is not a post-hoc EMA snapshot (no {SNAPSHOT_KEY}); "
                             "allowed: a folder of PostHocEMA snapshots only")
        shapes = {k: tuple(v.shape) for k, v in checkpoint["profiles"][0].items()}
        entries.append({**checkpoint[SNAPSHOT_KEY], "path": path, "shapes": shapes})
    for entry in entries[1:]:
        if entry["shapes"] != entries[0]["shapes"] or entry["averaged"] != entries[0]["averaged"]:
            raise ValueError(f"{setting}={folder}: {entry['path'].name} holds other weights than "
                             f"{entries[0]['path'].name} (the folder mixes runs); allowed: one run's snapshots")
    return sorted(entries, key=lambda e: e["images"])


def reconstruct(folder: str | Path, sigma_rels: Sequence[float]) -> tuple[list[dict[str, torch.Tensor]], list[dict],
                                                                         dict]:
    """The EMA of each ``sigma_rel`` at the newest snapshot's time, from every snapshot in ``folder`` (Appendix C.3).

    Returns ``(state_dicts, records, newest)``: per ``sigma_rel`` the weights (averaged entries summed in float64 with
    ``solve_coefficients``' weights, then cast back; copied ones, buffers, from the newest snapshot) and a record
    ``{"sigma_rel", "gamma", "step", "images", "snapshots", "tracked", "fit_error", "coefficient_sum"}``; ``newest``
    is the newest snapshot's checkpoint (its ``run_config``...). One snapshot is in memory at a time."""
    sigma_rels = [check_sigma_rel(s) for s in sigma_rels]
    entries = read_snapshots(folder)
    times = [e["images"] for e in entries for _ in e["gammas"]]
    gammas = [g for e in entries for g in e["gammas"]]
    end, records, weights = entries[-1], [], []
    for sigma_rel in sigma_rels:
        gamma = sigma_rel_to_gamma(sigma_rel)
        x, fit_error = solve_coefficients(times, gammas, end["images"], gamma)
        weights.append(x)
        records.append({"sigma_rel": sigma_rel, "gamma": gamma, "step": end["step"], "images": end["images"],
                        "snapshots": len(entries), "tracked": sorted({s for e in entries for s in e["sigma_rels"]}),
                        "fit_error": fit_error, "coefficient_sum": float(x.sum()), "ckpt_dir": str(folder)})
    sums: list[dict[str, torch.Tensor]] = [{} for _ in sigma_rels]
    index = 0
    for entry in entries:
        checkpoint = load_checkpoint(entry["path"])
        for profile in checkpoint["profiles"]:
            for total, x in zip(sums, weights, strict=True):
                for name in entry["averaged"]:
                    term = float(x[index]) * profile[name].double()
                    total[name] = term if name not in total else total[name].add_(term)
            index += 1
    newest = checkpoint
    copied = newest["profiles"][0]
    state_dicts = [{k: total[k].to(v.dtype) if k in total else v.clone() for k, v in copied.items()} for total in sums]
    return state_dicts, records, newest
