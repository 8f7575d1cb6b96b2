"""``python -m lightning_diff <command> [overrides]``: the ``lightning-diff`` console script."""

from .cli import main

main()
