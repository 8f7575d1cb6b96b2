"""Every command's thin entry point: parse the Hydra config, check it (``config_check``), build, run, print.

``lightning-diff <command>`` (``main``) dispatches to ``train``, ``sample``, ``evaluate``, ``train_classifier``,
``leaderboard``, ``reflow`` and ``distill``; each is also ``python -m lightning_diff.cli.<module>``.
``reproduction`` holds what the ``experiments/repro_*/run.py`` scripts share.
"""

from .main import main

__all__ = ["main"]
