"""experiments/repro_edm_samplers/run.py: every curve of a sweep point spends the same network evaluations (the
samplers' own counters), EDM's time steps on VP are EDM's grid and are recorded, the table reads the
right rows; slow: ``run.py --quick`` writes a well-formed table, record and figure."""

import json

import pytest
import torch

from lightning_diff import sampling
from lightning_diff.formulations import EDM, VP
from lightning_diff.sampling.settings import SamplerSettings

from .helpers import load_experiment, run_experiment_quick

run = load_experiment("repro_edm_samplers")


def gaussian_denoiser(x, sigma, **_):
    """The exact denoiser of data N(0, 0.5^2)."""
    return x * (0.25 / (0.25 + sigma.view(-1, *[1] * (x.dim() - 1)) ** 2))


@pytest.mark.parametrize("heun_steps", [2, 5])
def test_every_curve_spends_heuns_nfe(heun_steps):
    formulation = VP()
    for curve, (name, options, _) in run.CURVES.items():
        steps = run.curve_steps(curve, heun_steps)
        sigmas = formulation.sampling_sigmas(steps)
        extra = {"formulation": formulation} if name == "ablation" else {}
        stats = {}
        sampling.sample(name, gaussian_denoiser, sigmas[0] * torch.randn(3, 1), sigmas, stats=stats, **options,
                        **extra)
        assert stats["nfe"] == 2 * heun_steps - 1, curve


def test_edm_time_steps_on_vp_are_the_edm_formulations_grid_and_are_recorded():
    """``sampler.time_steps`` (the "heun, EDM time steps" curve) puts VP on the very grid EDM's own formulation
    samples on, says so in the protocol record, and refuses a setting it does not know."""
    settings = SamplerSettings(name="heun", steps=7, time_steps=run.EDM_STEPS)
    i, rho = torch.arange(7, dtype=torch.float64), 7.0  # Karras et al. 2022 eq. 5, then sigma_N = 0
    eq5 = (80.0 ** (1 / rho) + i / 6 * (0.002 ** (1 / rho) - 80.0 ** (1 / rho))) ** rho
    torch.testing.assert_close(settings.sigmas(VP()), torch.cat([eq5, torch.zeros(1, dtype=torch.float64)]),
                               rtol=1e-12, atol=0)
    assert torch.equal(settings.sigmas(VP()), EDM().sampling_sigmas(7))
    assert not torch.equal(SamplerSettings(name="heun", steps=7).sigmas(VP()), EDM().sampling_sigmas(7))
    assert settings.record(VP())["time_steps"] == run.EDM_STEPS
    assert "time_steps" not in SamplerSettings(name="heun", steps=7).record(VP())
    with pytest.raises(ValueError, match=r"sampler.time_steps: \['sigma_max_'\] .*allowed: sigma_min, sigma_max, rho"):
        SamplerSettings(name="heun", time_steps={"sigma_max_": 80.0})
    with pytest.raises(ValueError, match=r"sampler.time_steps=\{'sigma_min': 80.0\}: .*sigma_min < sigma_max"):
        SamplerSettings(name="heun", steps=7, time_steps={"sigma_min": 80.0}).sigmas(VP())


def test_sampler_table_puts_each_curve_in_its_row():
    results = {model: [{"curve": c, "nfe": n, "fd": float(10 * i + j)} for i, c in enumerate(run.MODEL_CURVES[model])
                       for j, n in enumerate((5, 9))] for model in ("edm", "vp")}
    lines = run.sampler_table(results).splitlines()
    assert lines[0] == "| model | sampler | FD @ NFE 5 | FD @ NFE 9 |"
    assert lines[4] == "| edm | ddim | 20 | 21 |"
    assert lines[2 + len(run.MODEL_CURVES["edm"]) + 6] == "| vp | heun, EDM time steps | 60 | 61 |"


@pytest.mark.slow
def test_quick_run_writes_table_record_and_figure(tmp_path):
    run_experiment_quick("repro_edm_samplers", "--out", str(tmp_path), timeout=900)
    record = json.loads((tmp_path / "results.json").read_text())
    assert {m: len(rows) for m, rows in record["samplers"].items()} == {"edm": 4, "vp": 7}
    assert [r["S_churn"] for r in record["churn"]] == run.CHURN
    assert all(r["nfe"] == 3 for rows in record["samplers"].values() for r in rows)
    table = (tmp_path / "table.md").read_text()
    assert "| vp | heun, own s(t), sigma(t) |" in table and "Inception FID" in table
    assert (tmp_path / "fd_vs_nfe.png").stat().st_size > 10_000
