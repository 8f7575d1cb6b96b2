"""The ``lightning-diff`` console script: ``lightning-diff <command> [hydra overrides]`` with the commands of
``COMMANDS`` (train, sample, evaluate, train-classifier, leaderboard, reflow, distill,
consistency, posthoc-ema, tune-steps, reference).

``lightning-diff --help`` lists the commands; ``lightning-diff <command> --help`` shows the command's main
settings (the ``hydra.help`` template of its config) without importing torch or the command's module, so help
answers in well under a second. Without a command it trains
(``lightning-diff formulation=vp data=toy2d`` = ``lightning-diff train formulation=vp data=toy2d``).
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Sequence
from pathlib import Path

__all__ = ["COMMANDS", "usage", "main", "show_help", "help_text", "config_groups"]

COMMANDS = {  # command -> (entry-point module, one line of help); its config is configs/<config name>.yaml
    "train": ("lightning_diff.cli.train", "train a model (configs/train.yaml); the default command"),
    "sample": ("lightning_diff.cli.sample", "generate samples from a checkpoint with any sampler "
                                            "(configs/sample.yaml)"),
    "evaluate": ("lightning_diff.cli.evaluate", "FID/IS/KID/precision-recall and bits/dim of a checkpoint "
                                                "(configs/evaluate.yaml)"),
    "train-classifier": ("lightning_diff.cli.train_classifier", "train a noise-conditional classifier for classifier "
                                                                "guidance (configs/classifier.yaml)"),
    "leaderboard": ("lightning_diff.cli.leaderboard", "rank result records by protocol group: leaderboard.md, .csv, "
                                                      ".html (configs/leaderboard.yaml)"),
    "reflow": ("lightning_diff.cli.reflow", "draw the noise-sample pairs of an rf model by its ODE "
                                            "(configs/reflow.yaml)"),
    "distill": ("lightning_diff.cli.distill", "progressive distillation of a checkpoint into fewer DDIM steps "
                                              "(configs/distill.yaml)"),
    "consistency": ("lightning_diff.cli.consistency", "consistency distillation (mode=cd) or training (mode=ct): "
                                                      "one-step models (configs/consistency.yaml)"),
    "posthoc-ema": ("lightning_diff.cli.posthoc_ema", "any EMA length of a finished run from its post-hoc EMA "
                                                      "snapshots (configs/posthoc-ema.yaml)"),
    "tune-steps": ("lightning_diff.cli.tune_steps", "the sigma grid of a sampler at an NFE budget, tuned for a model "
                                                    "(configs/tune-steps.yaml)"),
    "reference": ("lightning_diff.cli.reference", "a data split's reference statistics (FID/KID), computed once and "
                                                  "cached for evaluate (configs/reference.yaml)"),
}


def usage() -> str:
    """The text of ``lightning-diff --help``: one line per command."""
    lines = ["usage: lightning-diff [command] [group=option ...] [key=value ...]", "", "commands:"]
    width = max(map(len, COMMANDS)) + 2
    lines += [f"  {name:<{width}}{text}" for name, (_, text) in COMMANDS.items()]
    lines += ["", "lightning-diff <command> --help shows the command's main settings."]
    return "\n".join(lines)


CONFIG_NAMES = {"train-classifier": "classifier"}  # command -> config name where they differ
HELP_FLAGS = ("-h", "--help", "--hydra-help")


def config_name(command: str) -> str:
    """The config a command composes (``configs/<name>.yaml``)."""
    return CONFIG_NAMES.get(command, command)


def show_help(command: str, args: Sequence[str]) -> None:
    """Print the command's help with the overrides ``args`` without importing torch or the command's module.

    ``--help``: the command's ``hydra.help`` template, resolved against one composition of its config (``help_text``);
    ``--hydra-help`` and Hydra's own flags (``--cfg``, ``--config-dir``, ...): Hydra's path, through the same
    ``hydra.main`` as the command but with no task."""
    from hydra.errors import HydraException

    overrides = [arg for arg in args if arg not in ("-h", "--help")]
    try:
        text = None if any(arg.startswith("-") for arg in overrides) else help_text(config_name(command), overrides)
    except HydraException:  # a bad override: Hydra's path reports it in Hydra's words
        text = None
    if text is not None:
        print(text)
        return
    import hydra

    from ..config import CONFIG_DIR

    hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name=config_name(command))(lambda cfg: None)()


def help_text(name: str, overrides: Sequence[str]) -> str | None:
    """The text Hydra's ``--help`` prints for ``configs/<name>.yaml`` with ``overrides``: its ``hydra.help``
    template resolved against the composed config, ``$APP_CONFIG_GROUPS`` listed from the config folder (None for a
    template with Hydra's other variables). Written here because Hydra composes the config once per config group
    to list the groups (about 160 compositions, most of a second); one composition and a directory walk give the
    same text."""
    from string import Template

    from hydra import compose, initialize_config_dir
    from hydra.core.hydra_config import HydraConfig

    from ..config import CONFIG_DIR

    with initialize_config_dir(CONFIG_DIR, version_base="1.3"):
        cfg = compose(name, overrides=list(overrides), return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)  # the template's ${hydra:runtime.choices...}
    template = cfg.hydra.help.template
    if any(f"${key}" in template for key in ("FLAGS_HELP", "HYDRA_CONFIG_GROUPS", "CONFIG\n", "{CONFIG}")):
        return None
    return Template(template).substitute(APP_CONFIG_GROUPS=config_groups(Path(CONFIG_DIR)))


def config_groups(root: Path) -> str:
    """``group: option, option`` lines of every config group under ``root`` (Hydra's ``$APP_CONFIG_GROUPS``)."""
    lines = []
    for group in sorted(folder.relative_to(root).as_posix() for folder in root.rglob("*") if folder.is_dir()):
        options = sorted(path.stem for path in (root / group).glob("*.yaml"))
        if options and group.split("/")[0] != "hydra":
            lines.append(f"{group}: {', '.join(options)}\n")
    return "".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] in ("-h", "--help"):
        print(usage())
        return
    command = args.pop(0) if args and not args[0].startswith("-") and "=" not in args[0] else "train"
    if command not in COMMANDS:
        sys.exit(f"lightning-diff: unknown command {command!r}; allowed: {', '.join(COMMANDS)}\n\n{usage()}")
    from ..config import smoke_alias
    from .renamed import rename_overrides

    sys.argv[1:] = rename_overrides(config_name(command), smoke_alias(args))  # Hydra reads sys.argv; old keys renamed
    if any(flag in args for flag in HELP_FLAGS):
        show_help(command, sys.argv[1:])
        return
    importlib.import_module(COMMANDS[command][0]).main()


if __name__ == "__main__":
    main()
