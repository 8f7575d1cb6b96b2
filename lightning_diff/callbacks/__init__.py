"""Lightning callbacks: sample grids (and, beside it, EMA, generative metrics, bits/dim)."""

from .checkpoint import RunState
from .ema import EMA, EDMHalfLife, FixedDecay, InverseDecayWarmup
from .metrics import BitsPerDim, GenerativeMetrics
from .posthoc_ema import PostHocEMA
from .sample_grid import SampleGrid

__all__ = ["SampleGrid", "EMA", "EDMHalfLife", "InverseDecayWarmup", "FixedDecay", "RunState", "GenerativeMetrics",
           "BitsPerDim", "PostHocEMA"]
