"""``make bench`` runs: every performance benchmark with ``--quick`` through ``benchmarks/run_all.py``, and each
ratio of the table is found in its output (a benchmark that changed its printout would leave "not run").
Slow: it trains, samples and extracts Inception features (minutes on a shared CPU)."""

import os
import subprocess
import sys

import pytest

from .helpers import ROOT


@pytest.mark.slow
def test_run_all_quick_prints_every_ratio():
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "run_all.py"), "--quick"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=1800)
    assert done.returncode == 0, done.stderr[-2000:]
    table = done.stdout[done.stdout.index("| benchmark | measure"):].splitlines()[2:]
    skipped = ("torch.compile", "DDPM++")  # --compile only; the 56M network is left out of --quick
    missing = [row for row in table if "not run" in row and not any(s in row for s in skipped)]
    assert table and not missing, "\n".join(missing)
