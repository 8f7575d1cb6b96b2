"""Training objectives: how a ``Denoiser`` is fitted to data (``configs/objective``, ``objective=<name>``), one file
per family, one registry (``OBJECTIVES``: the name an objective reports -> its class).

Every objective is a callable ``objective(denoiser, y, labels=None, **cond) -> (loss [B], sigma [B])`` that
``DiffusionModule.training_step`` averages over the batch (``base.Objective``); docs/objectives.md derives each.

- ``denoising``: ``dsm``, the one loss (``Denoiser.loss``);
- ``score_matching``: ``ssm`` and ``ism`` (sliced and implicit score matching);
- ``variational``: iDDPM's ``hybrid`` and ``vlb`` with a learned variance, and their timestep importance sampling;
- ``second_moment``: ``sn_dpm`` / ``npr_dpm``, Extended-Analytic-DPM's second-moment heads;
- ``reflow``: the k-rectified flow objective on fixed couplings.
"""

from .base import Objective
from .denoising import DenoisingScoreMatching
from .reflow import Reflow
from .score_matching import PROJECTIONS, ImplicitScoreMatching, SlicedScoreMatching, jacobian_trace, projected_jacobian
from .second_moment import SecondMoment
from .variational import HybridLoss, LossSecondMomentSampler, VariationalBound

__all__ = ["Objective", "OBJECTIVES", "DenoisingScoreMatching", "SlicedScoreMatching", "ImplicitScoreMatching",
           "HybridLoss", "VariationalBound", "SecondMoment", "Reflow", "LossSecondMomentSampler", "PROJECTIONS",
           "jacobian_trace", "projected_jacobian"]

OBJECTIVES = {"dsm": DenoisingScoreMatching, "ssm": SlicedScoreMatching, "ism": ImplicitScoreMatching,
              "hybrid": HybridLoss, "vlb": VariationalBound, "sn_dpm": SecondMoment, "npr_dpm": SecondMoment,
              "reflow": Reflow}
