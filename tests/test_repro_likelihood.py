"""experiments/repro_likelihood/run.py: the table puts each variance and K in place; slow: ``run.py --quick``
writes a well-formed table, record and figure."""

import json
import math

import pytest

from .helpers import load_experiment, run_experiment_quick

run = load_experiment("repro_likelihood")


def test_vlb_table_puts_each_variance_and_k_in_place():
    vlb = {v: {k: float(10 * i + j) for j, k in enumerate((10, 1000))} for i, v in enumerate(run.VARIANCES)}
    lines = run.vlb_table(vlb).splitlines()
    assert lines[0] == "| variance | K=10 | K=1000 |"
    assert lines[2:] == ["| fixed_small | 0 | 1 |", "| fixed_large | 10 | 11 |", "| learned | 20 | 21 |",
                         "| analytic | 30 | 31 |"]


@pytest.mark.slow
def test_quick_run_writes_table_record_and_figure(tmp_path):
    """``run.py --quick``: a 4-step DDPM, chains of 2 and 3 steps, 8 held-out digits (~20 s CPU)."""
    run_experiment_quick("repro_likelihood", "--out", str(tmp_path / "out"), "--models", str(tmp_path / "models"))
    out = tmp_path / "out"
    table = (out / "table.md").read_text()
    for variance in run.VARIANCES:
        assert f"| {variance} |" in table
    assert "| PF-ODE (RK45, Hutchinson) |" in table
    record = json.loads((out / "results.json").read_text())
    assert set(record["vlb_bpd"]) == set(run.VARIANCES)
    for variance, by_steps in record["vlb_bpd"].items():
        # a bound, positive and finite (fixed_small at K = 2 of a 4-step model: ~1e4 bits/dim, tiny variance)
        assert set(by_steps) == {"2", "3"} and all(0 < b < math.inf for b in by_steps.values()), variance
        assert record["vlb_protocols"][variance]["3"]["num_images"] == 8
        assert record["vlb_protocols"][variance]["3"]["spacing"] == run.SPACING == "linspace"
    assert record["ode_protocol"]["split"] == "val" and record["ode_bpd"] > 0
    assert (out / "vlb_vs_steps.png").stat().st_size > 1000
