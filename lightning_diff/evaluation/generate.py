"""Generate samples of a module in batches, one seed per sample."""

from __future__ import annotations

import time
from collections.abc import Mapping

import torch
from rich.progress import Progress

from ..module import SamplerSettings

__all__ = ["generate"]


def generate(module, seeds, *, sampler: SamplerSettings | Mapping | None = None, guidance: float = 1.0,
             class_label: int | None = None, progress: bool = True) -> tuple[torch.Tensor, torch.Tensor | None, dict]:
    """Sample ``len(seeds)`` items with ``sampler`` (None: the module's own), ``sampler.batch_size`` per call.

    Sample i depends only on ``seeds[i]``, whatever the batch size. A conditional module gets label
    ``class_label`` for every sample, or ``seed % num_classes`` when it is None.

    Returns:
        ``(samples float [N, *data_shape] in model space, labels long [N] or None, stats)`` with
        ``stats = {"nfe": network evaluations per sample, "seconds": wall time}``.
    """
    sampler = module.sampler if sampler is None else SamplerSettings.from_config(sampler)
    seeds = list(seeds)
    num_classes = module.num_classes if module.conditional else 0
    labels = None
    if num_classes:
        labels = torch.tensor([class_label if class_label is not None else s % num_classes for s in seeds])
    out, stats, start, size = [], {}, time.perf_counter(), sampler.batch_size
    with Progress(disable=not progress, transient=True) as bar:
        task = bar.add_task(f"sampling ({sampler.name}, {sampler.steps_for(module.formulation)} steps)",
                            total=len(seeds))
        for i in range(0, len(seeds), size):
            batch_labels = None if labels is None else labels[i:i + size]
            out.append(module.sample(seeds[i:i + size], labels=batch_labels, sampler=sampler, guidance=guidance,
                                     stats=stats).cpu())
            bar.advance(task, len(out[-1]))
    return torch.cat(out), labels, {"nfe": stats.get("nfe"), "seconds": time.perf_counter() - start}
