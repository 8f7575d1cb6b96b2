"""Messages from libraries that a user of lightning_diff cannot act on, silenced by message and origin.

The training entry point (``lightning_diff.cli.train.main``) calls ``silence_unactionable_warnings()`` at start-up;
importing the package changes no filter. Every other warning and message is left alone. Each entry says where
its message comes from and why nothing can be done about it; drop an entry when its library stops sending it.
tests/test_warnings.py checks that a short run shows none of them and no warning from lightning_diff's code.
"""

from __future__ import annotations

import logging
import warnings

from lightning_fabric.utilities.warnings import PossibleUserWarning

__all__ = ["UNACTIONABLE_WARNINGS", "UNACTIONABLE_LOG_PREFIXES", "WANDB_UNACTIONABLE", "silence_unactionable_warnings"]

# (category, message regex, module regex) for warnings.filterwarnings.
UNACTIONABLE_WARNINGS = (
    # torch 2.14 deprecates its pytree LeafSpec, which Lightning 2.6.6 still builds in its own helper (on every
    # training step's outputs).
    (FutureWarning, r"`isinstance\(treespec, LeafSpec\)` is deprecated", r"pytorch_lightning\.utilities\._pytree"),
    # Lightning warns when an epoch has fewer batches than log_every_n_steps; runs here are counted in steps
    # and Lightning logs every n optimizer steps across epoch boundaries, so no log is lost.
    (PossibleUserWarning, r"The number of training batches \(\d+\) is smaller than the logging interval",
     r"pytorch_lightning\.loops\.fit_loop"),
)

# (logger name, message prefix) for Lightning's info lines.
UNACTIONABLE_LOG_PREFIXES = (
    # An advertisement for Lightning's hosted logger, printed by every Trainer without one.
    ("pytorch_lightning.utilities.rank_zero", "💡 Tip: For seamless cloud logging"),
)

# wandb 0.31 deprecates its `anonymous` setting, which Lightning 2.6.6's WandbLogger always passes to wandb.init.
WANDB_UNACTIONABLE = ("The anonymous setting has no effect and will be removed in a future version.",)


class _DropByPrefix(logging.Filter):
    def __init__(self, prefix: str):
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefix)


def silence_unactionable_warnings() -> None:
    """Install the filters above (idempotent)."""
    for category, message, module in UNACTIONABLE_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category, module=module)
    for name, prefix in UNACTIONABLE_LOG_PREFIXES:
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropByPrefix) and f.prefix == prefix for f in logger.filters):
            logger.addFilter(_DropByPrefix(prefix))
    from wandb.errors import term

    # wandb prints each of these once per process (termwarn(repeat=False)): mark them printed, as termwarn words them
    term._printed_messages.update(f"{term.WARN_STRING} {message}" for message in WANDB_UNACTIONABLE)
