"""experiments/samplers/run.py: the FD-vs-NFE table of the sampler set users know (k-diffusion's and diffusers'
names) on one digits model."""

import json

import pytest

from lightning_diff.sampling.registry import SAMPLERS

from .helpers import load_experiment, run_experiment_quick

# the samplers issue 23 part 4 added, and the baselines they are compared with
KNOWN_SET = {"euler_ancestral", "dpm_2", "dpm_2_ancestral", "lms", "dpmpp_2s_ancestral", "dpmpp_sde", "dpmpp_2m_sde",
             "dpmpp_3m_sde", "unipc", "deis", "euler", "heun", "dpmpp_2m"}


def test_the_table_covers_the_known_set_with_registered_samplers():
    experiment = load_experiment("samplers")
    names = {name for name, _, _ in experiment.SAMPLERS.values()}
    assert names == KNOWN_SET and names <= set(SAMPLERS)
    assert experiment.STOCHASTIC <= names
    assert {options.get("solver_type", "bh2") for name, options, _ in experiment.SAMPLERS.values()
            if name == "unipc"} == {"bh1", "bh2"}


@pytest.mark.slow
def test_the_quick_run_spends_each_budget_exactly_and_writes_table_record_and_figure(tmp_path):
    """--quick: a 4-step model, every sampler at NFE 3 (the script refuses a step count that misses the budget)."""
    run_experiment_quick("samplers", "--out", str(tmp_path))
    rows = json.loads((tmp_path / "results.json").read_text())["rows"]
    assert [r["label"] for r in rows] == list(load_experiment("samplers").SAMPLERS)
    assert all(r["scores"]["3"]["nfe"] == 3 and r["scores"]["3"]["fd"] > 0 for r in rows)
    assert (tmp_path / "samplers.png").is_file() and "| euler_ancestral | yes |" in (tmp_path / "table.md").read_text()
