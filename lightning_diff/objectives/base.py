"""``Objective``: the contract every training objective follows (docs/objectives.md).

Every objective is a callable ``objective(denoiser, y, labels=None, **cond) -> (loss [B], sigma [B])`` that
``DiffusionModule.training_step`` averages over the batch.
"""

from __future__ import annotations

from torch import nn

from ..data.transforms import DataTransform

__all__ = ["Objective"]


class Objective(nn.Module):
    """Base of the training objectives. A module, so that an objective with state (e.g. a loss history for
    importance sampling, a teacher) keeps it in checkpoints; the objectives here hold none.

    ``__call__(denoiser, y, labels=None, *, sigma=None, noise=None, generator=None, **cond) -> (loss, sigma)``:
    ``y`` clean data ``[B, C, ...]``; ``sigma`` ``[B]`` and ``noise`` ``[B, C, ...]`` optional fixed draws (else
    from p(sigma) and N(0, I) with ``generator``); ``cond`` extra backbone inputs (``augment_labels``). Returns the
    per-sample loss ``[B]`` and the noise levels ``[B]``, float32.
    """

    name = "objective"
    trains_variance = False  # True: fits the extra output channels as iDDPM's variance (Denoiser.variance_trained)

    def prepare(self, formulation, data_transform: DataTransform | None = None) -> None:
        """Called once by ``DiffusionModule`` before training or loading weights: raise a ValueError naming
        ``objective=`` and ``formulation=`` when they do not go together, and size any state (buffers) to the
        formulation, so that a checkpoint's state loads into it. Nothing to do by default."""

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_") and k != "training")
