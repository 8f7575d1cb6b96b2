"""The ``lightning-diff`` console script: ``lightning-diff {train,sample,evaluate} [hydra overrides]``.

Without a sub-command it trains (``lightning-diff formulation=vp data=toy2d`` = ``lightning-diff train ...``).
"""

from __future__ import annotations

import importlib
import sys

COMMANDS = {"train": "lightning_diff.train", "sample": "lightning_diff.sample", "evaluate": "lightning_diff.evaluate"}


def main() -> None:
    command = "train"
    if len(sys.argv) > 1 and not sys.argv[1].startswith("-") and "=" not in sys.argv[1]:
        command = sys.argv.pop(1)
    if command not in COMMANDS:
        sys.exit(f"lightning-diff: unknown command {command!r}; allowed: {', '.join(COMMANDS)}")
    importlib.import_module(COMMANDS[command]).main()


if __name__ == "__main__":
    main()
