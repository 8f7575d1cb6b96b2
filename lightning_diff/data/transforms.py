"""The affine map between integer pixels and model space, and what bits/dim needs from it.

Images enter the model as ``x = scale * x_int + offset``; with EDM's convention (``x_int / 127.5 - 1``)
pixels 0..255 land exactly on [-1, 1]. The map is recorded on every DataModule as ``.transform``
because the bits/dim offset depends on it (docs/likelihood.md#bits-per-dim): for uniform dequantisation
``z = scale * (x_int + u) + offset``, ``u ~ U[0, 1)^d``, the log-determinant adds ``-log2(scale)``
bits per dimension (7 for ``/128`` into [-1, 1), 8 for ``/256`` into [0, 1), ``log2 127.5 = 6.9944`` for
EDM's ``/127.5``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

__all__ = ["DataTransform", "EDM_PIXELS", "CONTINUOUS", "from_uint8", "to_uint8", "dequantize", "bpd_offset"]


@dataclass(frozen=True)
class DataTransform:
    """``x = scale * x_int + offset`` for integer data with ``bits`` bits per value; ``bits=None`` marks
    continuous data (2-D toys), which has no integer pixels and no dequantisation."""

    scale: float = 1 / 127.5  # EDM: x_int / 127.5 - 1 maps 0..255 onto [-1, 1].
    offset: float = -1.0
    bits: int | None = 8  # Bits per stored value; None for continuous data.

    @property
    def levels(self) -> int | None:
        """Number of integer levels ``2**bits`` (256 for 8-bit images), None for continuous data."""
        return None if self.bits is None else 2**self.bits


EDM_PIXELS = DataTransform()  # 8-bit images, x_int / 127.5 - 1 (Karras et al. 2022, training/dataset.py).
CONTINUOUS = DataTransform(scale=1.0, offset=0.0, bits=None)  # 2-D toys: data already in model space.


def _require_integer(transform: DataTransform, what: str) -> int:
    if transform.levels is None:
        raise ValueError(f"{what}: transform={transform} describes continuous data (bits=None); "
                         "allowed: a transform with integer bits, e.g. EDM_PIXELS")
    return transform.levels


def from_uint8(x_int: torch.Tensor, transform: DataTransform = EDM_PIXELS) -> torch.Tensor:
    """Integer pixels (any shape, any integer dtype) -> float32 model space ``scale * x_int + offset``."""
    _require_integer(transform, "from_uint8")
    # Divide by 1/scale (127.5, exact) rather than multiply by scale (inexact) so that pixel 255 maps to 1.0.
    return x_int.to(torch.float32) / (1 / transform.scale) + transform.offset


def to_uint8(x: torch.Tensor, transform: DataTransform = EDM_PIXELS) -> torch.Tensor:
    """Model space (any shape) -> uint8 pixels by rounding to the nearest level, as EDM writes PNGs:
    ``(x * 127.5 + 128).clip(0, 255)`` then truncation (NVlabs/edm generate.py), i.e. round half up."""
    levels = _require_integer(transform, "to_uint8")
    if levels > 256:
        raise ValueError(f"to_uint8: transform.bits={transform.bits} does not fit uint8; allowed: bits <= 8")
    inv = 1 / transform.scale  # 127.5 for EDM.
    # x * inv + (0.5 - offset * inv) is EDM's exact expression x * 127.5 + 128 for the default transform.
    return (x.float() * inv + (0.5 - transform.offset * inv)).clip(0, levels - 1).to(torch.uint8)


def dequantize(x_int: torch.Tensor, generator: torch.Generator | None = None,
               transform: DataTransform = EDM_PIXELS, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Uniform dequantisation ``z = scale * (x_int + u) + offset``, ``u ~ U[0, 1)`` per element (``dtype``,
    x_int's shape; ``u`` is drawn on the generator's device). The density of ``z`` and of ``x_int`` differ by
    ``bpd_offset(transform)`` bits/dim."""
    _require_integer(transform, "dequantize")
    device = generator.device if generator is not None else x_int.device
    u = torch.rand(x_int.shape, generator=generator, dtype=dtype, device=device).to(x_int.device)
    return (x_int.to(dtype) + u) * transform.scale + transform.offset


def bpd_offset(transform: DataTransform = EDM_PIXELS) -> float:
    """``-log2(scale)``: the bits per dimension added to ``-log2 p(z) / d`` when the model density is on
    ``z = scale * (x_int + u) + offset`` (docs/likelihood.md#bits-per-dim; 7 for score_sde's ``/128``, 6.9944 for
    EDM's)."""
    _require_integer(transform, "bpd_offset")
    return -math.log2(transform.scale)
