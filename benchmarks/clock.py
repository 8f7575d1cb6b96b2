"""The benchmarks' clock (``--clock``), shared by the scripts that time variants against each other.

``cpu`` (the default on CPU): this process's CPU time (``time.process_time``). Other processes on a shared machine
do not inflate it, so ratios stay meaningful under load; it is valid for single-threaded runs
(``OMP_NUM_THREADS=1``) that do all their work in this process (no loader workers: every benchmark here).
``wall``: ``time.perf_counter``, for an idle machine, multi-threaded runs and GPUs (asynchronous work that CPU time
does not see; ``--device cuda`` picks it).
"""

from __future__ import annotations

import argparse
import time

CLOCKS = {"cpu": time.process_time, "wall": time.perf_counter}
_chosen = ["cpu"]


def add_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--clock", choices=sorted(CLOCKS), default=None,
                        help="cpu: process CPU time (default on CPU; robust to other load); wall: perf_counter")


def use(name: str | None, device: str = "cpu") -> str:
    """Select the clock ``name`` (None: ``cpu`` on a CPU device, ``wall`` otherwise); returns the name."""
    _chosen[0] = name or ("cpu" if device == "cpu" else "wall")
    return _chosen[0]


def now() -> float:
    """Seconds on the selected clock (differences only)."""
    return CLOCKS[_chosen[0]]()
