"""The ``lightning-diff`` console script: ``lightning-diff {train,sample,evaluate,train-classifier} [hydra overrides]``.

``lightning-diff --help`` lists the commands; ``lightning-diff <command> --help`` shows the command's main
settings (the ``hydra.help`` template of its config). Without a command it trains
(``lightning-diff formulation=vp data=toy2d`` = ``lightning-diff train formulation=vp data=toy2d``).
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Sequence

__all__ = ["COMMANDS", "usage", "main"]

COMMANDS = {  # command -> (entry-point module, one line of help)
    "train": ("lightning_diff.train", "train a model (configs/train.yaml); the default command"),
    "sample": ("lightning_diff.sample", "generate samples from a checkpoint with any sampler (configs/sample.yaml)"),
    "evaluate": ("lightning_diff.evaluate", "FID/IS/KID/precision-recall and bits/dim of a checkpoint "
                                            "(configs/evaluate.yaml)"),
    "train-classifier": ("lightning_diff.classifier", "train a noise-conditional classifier for classifier guidance "
                                                      "(configs/classifier.yaml)"),
    "leaderboard": ("lightning_diff.leaderboard", "rank result records by protocol group: leaderboard.md, .csv, .html "
                                                  "(configs/leaderboard.yaml)"),
    "reflow": ("lightning_diff.reflow", "draw the noise-sample pairs of an rf model by its ODE (configs/reflow.yaml)"),
    "distill": ("lightning_diff.distillation", "progressive distillation of a checkpoint into fewer DDIM steps "
                                               "(configs/distill.yaml)"),
}


def usage() -> str:
    """The text of ``lightning-diff --help``: one line per command."""
    lines = ["usage: lightning-diff [command] [group=option ...] [key=value ...]", "", "commands:"]
    width = max(map(len, COMMANDS)) + 2
    lines += [f"  {name:<{width}}{text}" for name, (_, text) in COMMANDS.items()]
    lines += ["", "lightning-diff <command> --help shows the command's main settings."]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] in ("-h", "--help"):
        print(usage())
        return
    command = args.pop(0) if args and not args[0].startswith("-") and "=" not in args[0] else "train"
    if command not in COMMANDS:
        sys.exit(f"lightning-diff: unknown command {command!r}; allowed: {', '.join(COMMANDS)}\n\n{usage()}")
    from .config import smoke_alias

    sys.argv[1:] = smoke_alias(args)  # Hydra reads the overrides from sys.argv
    importlib.import_module(COMMANDS[command][0]).main()


if __name__ == "__main__":
    main()
