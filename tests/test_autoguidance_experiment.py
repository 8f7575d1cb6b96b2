"""experiments/autoguidance/run.py: every row spends the network passes the grid says (2 per Heun evaluation inside the
guidance interval, 1 outside), the matched step count is the largest within the budget; slow: ``run.py --quick``
writes a well-formed table, record and figure, and its records carry each row's guidance."""

import json

import pytest

from lightning_diff import formulations
from lightning_diff.sampling import Guidance

from .helpers import load_experiment, run_experiment_quick

run = load_experiment("autoguidance")
EDM = formulations.get("edm")


def heun_nfe_from_the_grid(steps: int, interval, guided: bool) -> int:
    """Heun evaluates D at every sigma_i of the grid but the final 0, and again at sigma_{i+1} when it is not 0 (EDM
    Algorithm 1); a guided evaluation inside the interval costs 2 passes."""
    grid = EDM.sampling_sigmas(steps).tolist()
    levels = grid[:-1] + grid[1:-1]
    low, high = interval or (-1.0, float("inf"))
    return sum(1 + (guided and low < s <= high) for s in levels)


@pytest.mark.parametrize("kind", ["cfg", "autoguidance"])
@pytest.mark.parametrize("interval", [None, run.INTERVAL])
@pytest.mark.parametrize("steps", [2, 7, 10, 18])
def test_nfe_is_what_the_grid_and_the_interval_say(kind, interval, steps):
    guidance = Guidance(kind=kind, scale=2.0, interval=interval, ckpt="weak" if kind == "autoguidance" else None)
    assert run.nfe(steps, guidance, EDM) == heun_nfe_from_the_grid(steps, interval, True)
    assert run.nfe(steps, Guidance(scale=1.0), EDM) == 2 * steps - 1


def test_matched_steps_is_the_largest_count_within_the_budget():
    budget = run.nfe(run.BUDGET_STEPS, Guidance(scale=2.0), EDM)
    assert budget == 2 * (2 * run.BUDGET_STEPS - 1) == 38
    assert run.matched_steps(Guidance(scale=1.0), EDM, budget) == 19  # 37 passes; 20 steps would be 39
    with_interval = Guidance(scale=2.0, interval=run.INTERVAL)
    steps = run.matched_steps(with_interval, EDM, budget)
    assert heun_nfe_from_the_grid(steps, run.INTERVAL, True) <= budget < heun_nfe_from_the_grid(
        steps + 1, run.INTERVAL, True)


@pytest.mark.slow
def test_quick_run_writes_table_record_and_figure(tmp_path):
    run_experiment_quick("autoguidance", "--out", str(tmp_path), timeout=900)
    record = json.loads((tmp_path / "results.json").read_text())
    assert [r["name"] for r in record["rows"]] == [name for name, *_ in run.ROWS]
    assert all(0 <= r["accuracy"] <= 1 and r["fd"] > 0 and r["nfe"] <= r["budget"] for r in record["rows"])
    assert "| autoguidance, interval | 2 | (0.28, 5.42] |" in (tmp_path / "table.md").read_text()
    assert (tmp_path / "guidance.png").stat().st_size > 10_000
    samplers = [json.loads(p.read_text())["protocol"]["samples"]["sampler"]
                for p in (tmp_path / "runs" / "cond_digits_snapshots" / "checkpoints").glob("eval-repro-*.json")]
    kinds = sorted((s["guidance_kind"], s["guidance"], s["guidance_interval"] is not None) for s in samplers)
    assert kinds == sorted((kind, gamma, interval is not None) for _, kind, gamma, interval in run.ROWS)
    assert all(s["guidance_ckpt"].endswith("0000002.ckpt") for s in samplers if s["guidance_kind"] == "autoguidance")
