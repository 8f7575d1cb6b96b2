"""experiments/repro_formulations/run.py: every formulation of configs/formulation has its paper's sampler and that
sampler runs on it, Heun takes 18 steps where the grid allows, the table reads the right rows; slow: ``run.py
--quick`` writes a well-formed table, record and figure."""

import json
from pathlib import Path

import pytest
from hydra.utils import instantiate
from omegaconf import OmegaConf

from lightning_diff.config import CONFIG_DIR
from lightning_diff.sampling.settings import SamplerSettings

from .helpers import load_experiment, run_experiment_quick

ROOT = Path(__file__).resolve().parents[1]
run = load_experiment("repro_formulations")
FORMULATION_CONFIGS = {p.stem: p for p in (Path(CONFIG_DIR) / "formulation").glob("*.yaml")}


def formulation(name: str):
    return instantiate(OmegaConf.load(FORMULATION_CONFIGS[name]))


def test_every_formulation_has_its_own_sampler():
    # every formulation of the source texts; `consistency` is a distillation target (lightning-diff consistency,
    # experiments/consistency), not a formulation trained from scratch by this reproduction
    assert sorted(run.FORMULATIONS) == sorted(set(FORMULATION_CONFIGS) - {"consistency"}) == sorted(run.OWN_SAMPLERS)


@pytest.mark.parametrize("name", run.FORMULATIONS)
def test_own_sampler_and_heun_run_on_the_formulation(name):
    fm = formulation(name)
    SamplerSettings.from_config(run.OWN_SAMPLERS[name]).check(fm)  # its grid exists, it does not diverge
    heun = SamplerSettings.from_config(run.heun(fm)).check(fm)
    assert heun.steps == (10 if name == "ncsn" else 18)  # NCSN's grid is its L = 10 levels


def test_results_table_reads_each_formulation_row():
    rows = [{"formulation": name, "own_sampler": run.OWN_SAMPLERS[name], "own": {"nfe": i, "fd": 1.0 + i, "kid": 0.5},
             "heun35": {"nfe": 35, "fd": 2.0 + i, "kid": 0.25}, "bpd": None if name == "ncsn" else 3.0 + i}
            for i, name in enumerate(run.FORMULATIONS)]
    lines = run.results_table(rows).splitlines()
    assert len(lines) == 2 + len(rows)
    assert lines[2] == "| ddpm | ddpm variance=fixed_small | 0 | 1 | 0.5 | 35 | 2 | 0.25 | 3 |"
    assert lines[2 + run.FORMULATIONS.index("ncsn")].endswith("| refused |")


@pytest.mark.slow
def test_quick_run_writes_table_record_and_figure(tmp_path):
    run_experiment_quick("repro_formulations", "--out", str(tmp_path), timeout=1200)
    record = json.loads((tmp_path / "results.json").read_text())
    assert [r["formulation"] for r in record["rows"]] == list(run.FORMULATIONS)
    assert all(r["own"]["fd"] > 0 and r["heun35"]["nfe"] in (19, 35) for r in record["rows"])
    table = (tmp_path / "table.md").read_text()
    assert table.count("\n| ") == 1 + len(run.FORMULATIONS) and "Inception FID" in table
    assert (tmp_path / "fd_by_formulation.png").stat().st_size > 10_000
