"""Per-sample randomness: sample ``i`` of a batch depends only on its own seed, whatever the batch size.

A single ``torch.Generator`` draws one stream for the whole batch, so changing the batch size (or
splitting seeds across GPUs) changes every sample. NVlabs/edm solves this with one generator per
sample (``StackedRandomGenerator``); ``PerSampleGenerator`` is that idea, and every sampler accepts
one (or a plain list of generators) wherever it draws noise.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = ["PerSampleGenerator", "randn_like", "initial_noise"]


class PerSampleGenerator:
    """One ``torch.Generator`` per batch row.

    Args:
        seeds: one integer seed per sample (``[B]``), or ready-made generators.
        device: where the generators live (noise is drawn there, then moved to the target tensor's device).
    """

    def __init__(self, seeds: Sequence[int] | Sequence[torch.Generator], device: str | torch.device = "cpu"):
        seeds = list(seeds)
        if not seeds:
            raise ValueError("PerSampleGenerator: seeds is empty; allowed: one seed per sample")
        if all(isinstance(s, torch.Generator) for s in seeds):
            self.generators = seeds
        elif all(isinstance(s, int) for s in seeds):
            self.generators = [torch.Generator(device).manual_seed(s % (1 << 63)) for s in seeds]
        else:
            raise ValueError(f"PerSampleGenerator: seeds={seeds[:4]!r}... is invalid; allowed: ints or "
                             "torch.Generator objects, one per sample")

    def __len__(self) -> int:
        return len(self.generators)

    def randn(self, shape: Sequence[int], dtype: torch.dtype = torch.float32, device=None) -> torch.Tensor:
        """Standard normal ``[B, *rest]``, row ``i`` from generator ``i``; ``shape[0]`` must be B."""
        shape = tuple(shape)
        if shape[0] != len(self.generators):
            raise ValueError(f"PerSampleGenerator: batch size {shape[0]} does not match its "
                             f"{len(self.generators)} generators (one per sample)")
        rows = [torch.randn(shape[1:], generator=g, dtype=dtype, device=g.device) for g in self.generators]
        return torch.stack(rows).to(device or rows[0].device)


def randn_like(x: torch.Tensor, generator=None) -> torch.Tensor:
    """Standard normal noise shaped like ``x`` (same dtype and device).

    ``generator`` is None (global RNG), a ``torch.Generator`` (one stream for the batch), a
    ``PerSampleGenerator`` or a list of generators (one per row, so each row depends only on its seed).
    """
    if generator is None:
        return torch.randn_like(x)
    if isinstance(generator, torch.Generator):
        return torch.randn(x.shape, generator=generator, dtype=x.dtype, device=generator.device).to(x.device)
    if not isinstance(generator, PerSampleGenerator):
        generator = PerSampleGenerator(generator)
    return generator.randn(x.shape, dtype=x.dtype, device=x.device)


def initial_noise(seeds, shape: Sequence[int], sigma_max: float, dtype: torch.dtype = torch.float64,
                  device=None) -> torch.Tensor:
    """The sampler's start ``x = sigma_max * n``, ``[B, *shape]``, with row ``i`` drawn from seed ``i``.

    ``seeds`` is a list of ints or a ``PerSampleGenerator``; pass the same ``PerSampleGenerator`` as the
    sampler's ``generator`` so that the sampler's noise continues each sample's own stream (as EDM does).
    """
    generator = seeds if isinstance(seeds, PerSampleGenerator) else PerSampleGenerator(seeds)
    return sigma_max * generator.randn((len(generator), *shape), dtype=dtype, device=device)
