"""Per-sample randomness: sample ``i`` of a batch depends only on its own seed, whatever the batch size.

A single ``torch.Generator`` draws one stream for the whole batch, so changing the batch size (or
splitting seeds across GPUs) changes every sample. NVlabs/edm solves this with one generator per
sample (``StackedRandomGenerator``); ``PerSampleGenerator`` is that idea, and every sampler accepts
one (or a plain list of generators) wherever it draws noise.

Seed protocols (``SEED_PROTOCOLS``): ``default`` seeds generator i with ``seed_i`` and draws the start noise in
float64. ``edm`` reproduces NVlabs/edm ``generate.py`` draw for draw: ``manual_seed(seed % 2**32)`` on the
sampling device, the latents ``randn([C, H, W])`` in float32 (then cast to the float64 solver state), then, for
a conditional network, one class label ``randint(num_classes)`` from the same generator (drawn even when a fixed
class replaces it, so that the sampler's later noise continues where EDM's does). With ``heun`` on an EDM pickle
it gives EDM's own images for the same seeds (on the same device type: CPU and CUDA generators differ).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = ["SEED_PROTOCOLS", "PerSampleGenerator", "randn_like", "initial_noise", "initial_labels"]

SEED_PROTOCOLS = {"default": 1 << 63, "edm": 1 << 32}  # protocol -> seed modulus (EDM: seed % (1 << 32))


class PerSampleGenerator:
    """One ``torch.Generator`` per batch row.

    Args:
        seeds: one integer seed per sample (``[B]``), or ready-made generators.
        device: where the generators live (noise is drawn there, then moved to the target tensor's device).
        protocol: ``default`` or ``edm`` (module docstring).
    """

    def __init__(self, seeds: Sequence[int] | Sequence[torch.Generator], device: str | torch.device = "cpu",
                 protocol: str = "default"):
        if protocol not in SEED_PROTOCOLS:
            raise ValueError(f"seed_protocol={protocol!r} is not known; allowed: {', '.join(SEED_PROTOCOLS)}")
        self.protocol = protocol
        seeds = list(seeds)
        if not seeds:
            raise ValueError("PerSampleGenerator: seeds is empty; allowed: one seed per sample")
        if all(isinstance(s, torch.Generator) for s in seeds):
            self.generators = seeds
        elif all(isinstance(s, int) for s in seeds):
            self.generators = [torch.Generator(device).manual_seed(s % SEED_PROTOCOLS[protocol]) for s in seeds]
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

    def randint(self, high: int, device=None) -> torch.Tensor:
        """One integer in ``[0, high)`` per sample, ``[B]`` long, row ``i`` from generator ``i``."""
        rows = [torch.randint(high, (), generator=g, device=g.device) for g in self.generators]
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
    Protocol ``edm`` draws float32 and casts to ``dtype`` (generate.py: ``latents.to(torch.float64) * t_0``).
    """
    generator = seeds if isinstance(seeds, PerSampleGenerator) else PerSampleGenerator(seeds)
    draw_dtype = torch.float32 if generator.protocol == "edm" else dtype
    return sigma_max * generator.randn((len(generator), *shape), dtype=draw_dtype, device=device).to(dtype)


def initial_labels(generator: PerSampleGenerator, num_classes: int, device=None) -> torch.Tensor | None:
    """Protocol ``edm``: each sample's class label ``randint(num_classes)`` from its own generator, drawn right
    after its start noise (NVlabs/edm generate.py); ``[B]`` long. None for other protocols or unconditional
    models (``num_classes == 0``), which draw nothing here."""
    if generator.protocol != "edm" or not num_classes:
        return None
    return generator.randint(num_classes, device=device)
