"""``lightning-diff <command> --help``: wall time of the help path (``lightning_diff.cli``: Hydra only, no torch)
against the command module's own ``hydra.main`` (``python -m lightning_diff.<module> --help``, which imports
torch and Lightning first), each in a fresh process, per command; prints a ratio per command and their geometric mean.

    .venv/bin/python benchmarks/cli_help.py [--repeats 3] [--quick]

Wall clock (``time.perf_counter`` around a subprocess): a child process's import time is what a user waits for.
"""

from __future__ import annotations

import argparse
import math
import subprocess
import sys
import time

from lightning_diff.cli.main import COMMANDS


def seconds(args: list[str], repeats: int) -> float:
    """Best-of-``repeats`` wall seconds of ``python args`` (help text to /dev/null)."""
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        subprocess.run([sys.executable, *args], check=True, stdout=subprocess.DEVNULL)
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="one repeat, two commands")
    args = parser.parse_args()
    repeats = 1 if args.quick else args.repeats
    commands = list(COMMANDS)[:2] if args.quick else list(COMMANDS)
    ratios, fasts = [], []
    print("| command | lightning-diff <command> --help (s) | python -m <module> --help (s) | speed-up |")
    print("|---|---|---|---|")
    for command in commands:
        fast = seconds(["-m", "lightning_diff", command, "--help"], repeats)
        full = seconds(["-m", COMMANDS[command][0], "--help"], repeats)
        ratios.append(full / fast)
        fasts.append(fast)
        print(f"| {command} | {fast:.2f} | {full:.2f} | {full / fast:.2f}x |", flush=True)
    print(f"help speed-up, geometric mean over {len(ratios)} commands: "
          f"{math.exp(sum(map(math.log, ratios)) / len(ratios)):.2f}x; slowest help {max(fasts):.2f} s (target < 1 s)")


if __name__ == "__main__":
    main()
