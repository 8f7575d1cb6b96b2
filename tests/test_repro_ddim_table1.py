"""experiments/repro_ddim_table1/run.py: each row's sampler adds the noise DDIM's Table 1 defines (eq. 16's
sigma_t(eta) and Sec. 5.1's sigma-hat, from the paper's formulas), the tables put each row where it belongs; slow:
``run.py --quick`` writes a well-formed table, record and figure."""

import json

import pytest
import torch

from lightning_diff import sampling
from lightning_diff.formulations import DDPM

from .helpers import load_experiment, run_experiment_quick

run = load_experiment("repro_ddim_table1")


def _zero(x, sigma, **_):
    """D = 0: the predicted x_0 vanishes, so a step from x = 0 moves by its noise only."""
    return torch.zeros_like(x)


@pytest.mark.parametrize("row", ["eta=0", "eta=0.5", "eta=1", "sigma-hat"])
def test_each_row_adds_the_papers_variance_on_a_strided_step(row):
    """One step t -> t' of the 10-step strided grid of the linear T = 1000 DDPM, from x_t = 0 with D = 0: the
    variance of x_{t'} = sqrt(a_t') x (a = alpha-bar) is DDIM's sigma_t^2 (eq. 16: eta^2 (1 - a_t') / (1 - a_t)
    (1 - a_t / a_t'); sigma-hat: 1 - a_t / a_t', Sec. 5.1)."""
    sigmas = DDPM().sampling_sigmas(10)
    step = sigmas[3:5].tolist()
    a_t, a_next = (1 / (1 + s**2) for s in step)
    if row == "sigma-hat":
        expected = 1 - a_t / a_next
    else:
        eta = float(row.removeprefix("eta="))
        expected = eta**2 * (1 - a_next) / (1 - a_t) * (1 - a_t / a_next)
    setting = run.sampler(row, 10)
    states = {}
    sampling.sample(setting["name"], _zero, torch.zeros(40000, 1), torch.tensor([*step, 0.0], dtype=torch.float64),
                    generator=torch.Generator().manual_seed(0),
                    callback=lambda info: states.setdefault(info["i"], info["x"]), **setting["options"])
    variance = float((a_next * states[1].to(torch.float64) ** 2).mean())
    assert variance == pytest.approx(expected, rel=0.03, abs=1e-12), (row, variance, expected)


def test_sigma_hat_is_larger_than_eta_1_on_a_strided_step():
    """Sec. 5.1: sigma-hat has a larger standard deviation than sigma(1), the more so the longer the step."""
    a = [1 / (1 + s**2) for s in DDPM().sampling_sigmas(10)[:-1].tolist()]
    for a_t, a_next in zip(a[:-1], a[1:], strict=True):
        assert 1 - a_t / a_next > (1 - a_next) / (1 - a_t) * (1 - a_t / a_next)


def test_tables_put_each_row_and_column_in_place():
    scores = {row: {s: {"fd": float(10 * i + j), "kid": float(100 * i + j)} for j, s in enumerate((10, 20))}
              for i, row in enumerate(run.ROWS)}
    text = run.tables(scores, {10: {"fid": 1.5, "fd": 3.0}, 20: {"fid": 2.5, "fd": 4.0}}, 250)
    assert "| sampler | S=10 | S=20 |" in text
    assert "| eta=0.2 | 10 | 11 |" in text and "| sigma-hat | 40 | 41 |" in text
    assert "| sigma-hat | 400 | 401 |" in text and "| sigma-hat, Inception FID | 1.5 | 2.5 |" in text
    assert "| sigma-hat, FD | 3 | 4 |" in text and "same 250 samples" in text


@pytest.mark.slow
def test_quick_run_writes_table_record_and_figure(tmp_path):
    """``run.py --quick``: a 4-step DDPM, 2 and 3 sampling steps, 16 samples (~1 min CPU)."""
    run_experiment_quick("repro_ddim_table1", "--out", str(tmp_path / "out"), "--models", str(tmp_path / "models"))
    out = tmp_path / "out"
    table = (out / "table.md").read_text()
    for row in run.ROWS:
        assert f"| {row} |" in table
    record = json.loads((out / "results.json").read_text())
    assert set(record["scores"]) == set(run.ROWS)
    assert all(set(by_steps) == {"2", "3"} for by_steps in record["scores"].values())
    assert record["num_images"] == 16 and set(record["inception"]) == {"2", "3"}
    assert all(value["fid"] > 0 for value in record["inception"].values())
    assert (out / "fd_vs_steps.png").stat().st_size > 1000
