"""Reflow (Liu, Gong & Liu 2023, "Flow straight and fast", ICLR; docs/reflow.md): straighten a rectified flow by
retraining it on the noise-sample couplings its own ODE draws.

A rectified flow ``Z`` (the ``rf`` formulation, ``x_t = (1 - t) y + t z``, t = 0 data, t = 1 noise) trained on
independent pairs ``(z, y)`` defines a deterministic coupling ``(z, ODE(z))``. The k-th rectified flow is the rf
loss on the coupling of the (k-1)-th (their Algorithm 1, "Reflow"):

    min_v  E_{(z, y) ~ coupling, t} || (z - y) - v((1 - t) y + t z, t) ||^2,

which is ``Denoiser.loss`` with the coupled ``z`` as its noise (``x = y + sigma z`` in the sigma-frame is
``x_t = (1 - t) y + t z`` with ``t = sigma / (1 + sigma)``, docs/formulations.md#rf): the objective ``reflow``.
Each reflow keeps the marginals and does not raise any convex transport cost (their Sec. 3); its flow is
straighter, by their straightness measure (Sec. 3, ``S(Z)``; here in the t = 1 noise convention)

    S(Z) = int_0^1 E || (Z_noise - Z_data) - v(Z_t, t) ||^2 dt                                          (1)

is 0 exactly for straight trajectories, which one Euler step integrates without error.

Pieces: ``draw_couplings`` (the coupling of any denoiser by a deterministic sampler, per-sample seeds),
``save_couplings`` / ``load_couplings`` (a pairs file written atomically with the model's key and the sampler
setting), ``ReflowPairsDataModule`` (``configs/data/reflow_pairs.yaml``: batches ``(y, labels, {"noise": z})``),
``Reflow`` (``configs/objective/reflow.yaml``), ``straightness`` (eq. 1 along the Euler ODE path),
``empirical_w2`` (1-step quality against data) and ``main``, the command ``lightning-diff reflow``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from pathlib import Path

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset

from .. import sampling
from ..checkpoint_io import atomic_write
from ..data.loading import make_loader
from ..data.transforms import DataTransform
from ..formulations.schedules import rf_sigmas
from ..sampling.analytic_dpm import fingerprint
from ..sampling.core import round_sigma_of
from ..sampling.settings import SamplerSettings

__all__ = ["PAIRS_FORMAT", "ODE_SAMPLERS", "Couplings", "draw_couplings", "save_couplings", "load_couplings",
           "PairDataset", "ReflowPairsDataModule", "straightness", "empirical_w2"]

PAIRS_FORMAT = "lightning_diff.reflow_pairs/1"  # the "format" entry of a pairs file; raise when its content changes
ODE_SAMPLERS = ("euler", "heun", "ablation", "ddim", "dpmpp_2m", "rk45")  # deterministic given the start noise
_STOCHASTIC_OPTIONS = {"S_churn": 0.0, "eta": 0.0}  # options that add fresh noise unless at these values


@dataclasses.dataclass
class Couplings:
    """Noise-sample pairs ``(z_i, x_i = ODE(z_i))`` of one model, one per seed.

    Attributes:
        noise: ``[N, *data_shape]`` float32, the standard normal ``z`` of seed i (``x = sigma_max z`` starts the ODE).
        samples: ``[N, *data_shape]`` float32, where the ODE takes it (model space).
        seeds: ``[N]`` long.
        record: what made them: ``key`` (sha256 of the weights, the grid and the sampler setting), ``sampler``,
            ``sigmas``, ``formulation``, ``data_shape``, ``data_transform``, ``source`` (checkpoint or None).
    """

    noise: torch.Tensor
    samples: torch.Tensor
    seeds: torch.Tensor
    record: dict


def _check_ode(sampler: SamplerSettings) -> None:
    """ValueError naming the setting unless ``sampler`` is deterministic given its start noise."""
    if sampler.name not in ODE_SAMPLERS:
        raise ValueError(f"reflow: sampler={sampler.name} adds noise while it samples, so its samples are no function "
                         f"of the start noise; allowed: an ODE sampler ({', '.join(ODE_SAMPLERS)})")
    for key, value in _STOCHASTIC_OPTIONS.items():
        if key in sampler.options and sampler.options[key] != value:
            raise ValueError(f"reflow: sampler.options.{key}={sampler.options[key]} adds fresh noise; allowed: "
                             f"{key}={value} (the deterministic ODE)")


@torch.no_grad()
def draw_couplings(denoiser: Callable, seeds: Sequence[int], data_shape: Sequence[int], sampler: SamplerSettings,
                   formulation, *, device=None, source: str | None = None,
                   data_transform: DataTransform | None = None) -> Couplings:
    """The coupling ``(z, ODE(z))`` of ``denoiser`` (``denoiser(x, sigma [B]) -> D`` in the sigma-frame, e.g. a
    ``Denoiser`` or ``analytic.GaussianMixture``) on ``sampler``'s grid of ``formulation``, one pair per seed.

    Seed i draws ``z_i`` exactly as ``DiffusionModule.sample`` does (``sampling.initial_noise`` of a
    ``PerSampleGenerator``), so pair i depends only on seed i, whatever ``sampler.batch_size``; the sampler must be
    deterministic (``ODE_SAMPLERS``, no churn or eta). The rf ODE starts at ``t_max`` (``x_t = t_max z``), not at
    t = 1: the pair misses the ``(1 - t_max) y`` of the start point, 1e-3 of the data by default.
    Conditional models are not supported (the pairs carry no labels)."""
    _check_ode(sampler)
    seeds = [int(s) for s in seeds]
    if not seeds:
        raise ValueError("reflow: seeds is empty; allowed: at least one seed (num_samples >= 1)")
    shape = tuple(data_shape)
    sigmas = round_sigma_of(denoiser)(sampler.sigmas(formulation).to(torch.float64))
    noise, samples = [], []
    for start in range(0, len(seeds), sampler.batch_size):
        generator = sampling.PerSampleGenerator(seeds[start:start + sampler.batch_size])
        z = sampling.initial_noise(generator, shape, 1.0, device=device)
        x = sampling.sample(sampler.name, denoiser, float(sigmas[0]) * z, sigmas.to(z.device), generator=generator,
                            **sampler.call_options(formulation))
        noise.append(z.float().cpu())
        samples.append(x.float().cpu())
    record = {"sampler": sampler.record(formulation), "sigmas": sigmas.tolist(),
              "formulation": formulation.config(), "data_shape": list(shape), "source": source,
              "data_transform": dataclasses.asdict(data_transform or DataTransform(1.0, 0.0, None))}
    if isinstance(denoiser, torch.nn.Module):
        record["key"] = fingerprint(denoiser, sigmas, record["sampler"])
    else:
        record["key"] = None
    return Couplings(torch.cat(noise), torch.cat(samples), torch.tensor(seeds, dtype=torch.long), record)


def save_couplings(couplings: Couplings, path: str | Path) -> Path:
    """Write ``couplings`` to ``path`` atomically (``checkpoint_io.atomic_write``: the old file or the complete new
    one, never a torn write); a dict of tensors and plain values that ``load_couplings`` reads without pickle code."""
    content = {"format": PAIRS_FORMAT, "noise": couplings.noise, "samples": couplings.samples,
               "seeds": couplings.seeds, "record": couplings.record}
    return atomic_write(path, lambda file: torch.save(content, file))


def load_couplings(path: str | Path) -> Couplings:
    """Read a pairs file of ``save_couplings`` (``torch.load(weights_only=True)``); ValueError naming the file when
    it is not one."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"reflow pairs: path={path} is not a file; allowed: a file written by lightning-diff reflow")
    try:
        content = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # a truncated file, another format: the message names the file
        raise ValueError(f"reflow pairs: {path} cannot be read ({error}); allowed: a file written by "
                         "lightning-diff reflow") from None
    if not isinstance(content, dict) or content.get("format") != PAIRS_FORMAT:
        found = content.get("format") if isinstance(content, dict) else type(content).__name__
        raise ValueError(f"reflow pairs: {path} has format {found!r}; allowed: {PAIRS_FORMAT!r}")
    return Couplings(content["noise"], content["samples"], content["seeds"], content["record"])


class PairDataset(Dataset):
    """Fixed pairs; items ``(y [*shape], label [] = 0, {"noise": z [*shape]})`` and batched ``__getitems__``
    ``(y [B, ...], labels [B], {"noise": z [B, ...]})``, the batch ``DiffusionModule`` passes on to its objective."""

    def __init__(self, samples: torch.Tensor, noise: torch.Tensor):
        if samples.shape != noise.shape:
            raise ValueError(f"reflow pairs: samples {tuple(samples.shape)} and noise {tuple(noise.shape)} differ")
        self.samples, self.noise = samples.float(), noise.float()

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int):
        return self.samples[index], torch.zeros((), dtype=torch.long), {"noise": self.noise[index]}

    def __getitems__(self, indices: list[int]):
        index = torch.as_tensor(indices, dtype=torch.long)
        return self.samples[index], torch.zeros(len(index), dtype=torch.long), {"noise": self.noise[index]}


class ReflowPairsDataModule(pl.LightningDataModule):
    """The pairs of a ``lightning-diff reflow`` file as training data (``data=reflow_pairs data.path=FILE``), to be
    trained with ``objective=reflow``; ``data_shape`` and ``transform`` are those of the model that drew them.

    Args:
        path: the pairs file (``save_couplings``).
        batch_size: pairs per batch and process.
        val_fraction: fraction of the pairs held out (a seeded random subset) for the validation loss, which then
            uses their coupled noise too.
        num_workers: DataLoader workers.
        seed: the held-out subset and the shuffling order.
    """

    name = "reflow_pairs"
    num_classes = 0

    def __init__(self, path: str, batch_size: int = 512, val_fraction: float = 0.1, num_workers: int = 0,
                 seed: int = 0):
        super().__init__()
        if not 0 < val_fraction < 1:
            raise ValueError(f"reflow_pairs: val_fraction={val_fraction} is not allowed; allowed: 0 < val_fraction < 1")
        self.path, self.batch_size, self.val_fraction = path, batch_size, val_fraction
        self.num_workers, self.seed = num_workers, seed
        self.couplings = load_couplings(path)
        self.data_shape = tuple(self.couplings.record["data_shape"])
        self.transform = DataTransform(**self.couplings.record["data_transform"])
        self.train_set: PairDataset | None = None
        self.val_set: PairDataset | None = None

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        pairs = self.couplings
        order = torch.randperm(len(pairs.samples), generator=torch.Generator().manual_seed(self.seed))
        num_val = max(1, round(self.val_fraction * len(order)))
        if num_val >= len(order):
            raise ValueError(f"reflow_pairs: {len(order)} pairs leave none for training with val_fraction="
                             f"{self.val_fraction}; allowed: more pairs (lightning-diff reflow num_samples) or a "
                             "smaller val_fraction")
        val, train = order[:num_val].sort().values, order[num_val:].sort().values
        self.train_set = PairDataset(pairs.samples[train], pairs.noise[train])
        self.val_set = PairDataset(pairs.samples[val], pairs.noise[val])

    def train_dataloader(self) -> DataLoader:
        self.setup()
        return make_loader(self.train_set, self.batch_size, True, self.seed, self.num_workers)

    def val_dataloader(self) -> DataLoader:
        self.setup()
        return make_loader(self.val_set, self.batch_size, False, self.seed, self.num_workers)


@torch.no_grad()
def straightness(denoiser: Callable, noise: torch.Tensor, *, steps: int = 100, t_max: float = 1 - 1e-3,
                 batch_size: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """Eq. 1, ``S = int E ||(z - x_0) - v(x_t, t)||^2 dt``, per trajectory, along the Euler path of the flow from
    ``noise`` (the ``euler`` sampler on ``rf_sigmas(steps, t_max)``, uniform in ``t = sigma / (1 + sigma)``,
    where Euler in the sigma-frame is Euler in t: DDIM's equivalence, docs/samplers.md#equivalences).

    The velocity at each step is ``v = eps_hat - D`` with ``eps_hat = (x - D) / sigma`` (``x_t = (1 - t) D + t eps_hat``
    in the sigma-frame ``x``); the integral is the mean over the uniform grid's left points (it covers ``[0, t_max]``,
    divided by ``t_max``), accumulated as ``||Delta||^2 - 2 <Delta, mean v> + mean ||v||^2`` with ``Delta = z - x_0``
    so that memory does not grow with ``steps``. Squared norms are sums over all dimensions (Liu et al.'s
    ``||.||^2``), float64.

    Args:
        denoiser: ``denoiser(x, sigma [B]) -> D`` in the sigma-frame (an ``rf`` model: ``Denoiser`` or an oracle).
        noise: ``[N, ...]`` standard normal start points z (t = 1).
        steps: Euler steps (the integral's resolution).
    Returns:
        ``(S [N] float64, x_0 [N, ...] float64)``: the straightness of each trajectory and where it ends.
    """
    if type(steps) is not int or steps < 1:
        raise ValueError(f"reflow: straightness steps={steps!r} is invalid; allowed: an integer >= 1")
    sigmas = rf_sigmas(steps, t_max=t_max)
    values, ends = [], []
    for start in range(0, len(noise), batch_size):
        z = noise[start:start + batch_size].to(torch.float64)
        sum_v, sum_v2 = torch.zeros_like(z), torch.zeros(len(z), dtype=torch.float64, device=z.device)

        def record(step):
            nonlocal sum_v, sum_v2
            x, sigma, denoised = step["x"], step["sigma"], step["denoised"]
            v = (x - denoised) / sigma - denoised
            sum_v = sum_v + v
            sum_v2 = sum_v2 + v.flatten(1).pow(2).sum(1)

        end = sampling.euler(denoiser, float(sigmas[0]) * z, sigmas.to(z.device), callback=record)
        delta = (z - end).flatten(1)
        mean_v = (sum_v / steps).flatten(1)
        values.append(delta.pow(2).sum(1) - 2 * (delta * mean_v).sum(1) + sum_v2 / steps)
        ends.append(end)
    return torch.cat(values).clamp(min=0), torch.cat(ends)


def empirical_w2(a: torch.Tensor, b: torch.Tensor) -> float:
    """The 2-Wasserstein distance between two equal-size point sets ``[N, ...]`` (each point weight 1/N): the
    optimal assignment (scipy's ``linear_sum_assignment``, exact) of the squared Euclidean costs, square-rooted."""
    from scipy.optimize import linear_sum_assignment

    if a.shape != b.shape:
        raise ValueError(f"empirical_w2: the sets have shapes {tuple(a.shape)} and {tuple(b.shape)}; allowed: equal")
    cost = torch.cdist(a.detach().flatten(1).double().cpu(), b.detach().flatten(1).double().cpu()).pow(2).numpy()
    rows, cols = linear_sum_assignment(cost)
    return float(cost[rows, cols].mean() ** 0.5)
