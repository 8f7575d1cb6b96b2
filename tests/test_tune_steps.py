"""Optimised step schedules (``lightning-diff tune-steps``: sampling/tuned_grid.py, sampling/grid_file.py, the
``sampler.time_steps`` forms ``{sigmas}`` and ``{file}`` of SamplerSettings; docs/tune_steps.md):

1. on the 2-D ring of 8 Gaussians with its exact denoiser, the grid tuned on 64 seeds has a lower endpoint error
   than EDM's time steps (rho 7) on 256 held-out seeds at every NFE 4..10 for Euler, DPM-Solver++(2M) and UniPC,
   measured against the exact PF-ODE endpoint of an independent solver (scipy DOP853, rtol 1e-10), with 100
   evaluations of the objective; measured tuned / Karras ratios of the mean squared error 0.12-0.37 (Euler),
   0.007-0.059 (DPM-Solver++(2M)), 0.0017-0.078 (UniPC);
2. on one Gaussian, where every sampler is an affine map of its start noise, the exact KL divergence of the samples'
   distribution to the data is lower on the tuned grid at every NFE 4..10 (Euler: 0.051-0.28 nats against
   0.16-0.74; DPM-Solver++(2M) and UniPC 2.81e-5 against 4.6e-4-0.070, where the exact PF-ODE endpoint's KL is
   2.66e-5: what is left is the reference solve's error);
3. parametrisation (2) is a bijection onto decreasing grids; the file tune-steps writes gives exactly its sigmas
   back through ``sampler.time_steps.file`` and records carry them with the file's key; the command runs end to end;
4. bad input is refused naming the setting.
"""

import json
import math
import warnings

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from scipy.integrate import solve_ivp

from lightning_diff.analytic import GaussianMixture
from lightning_diff.cli.config_check import check_settings
from lightning_diff.cli.renamed import rename_overrides
from lightning_diff.cli.sample import sample as sample_command
from lightning_diff.cli.tune_steps import summary, tune_steps
from lightning_diff.config import compose
from lightning_diff.data.toy2d import ring_of_gaussians
from lightning_diff.formulations import EDM
from lightning_diff.formulations.schedules import karras_sigmas
from lightning_diff.sampling import registry
from lightning_diff.sampling.grid_file import GRID_FORMAT, grid_key, read_grid_file, write_grid_file
from lightning_diff.sampling.noise import initial_noise
from lightning_diff.sampling.settings import SamplerSettings, generate
from lightning_diff.sampling.tuned_grid import grid_of, parameters_of, tune_grid

from .helpers import compose_config, run_experiment_quick

pytestmark = pytest.mark.usefixtures("one_thread")

FORMULATION = EDM()  # sigma_min 0.002, sigma_max 80
SAMPLERS = ("euler", "dpmpp_2m", "unipc")
NFES = range(4, 11)
TUNING, HELDOUT = range(64), range(1000, 1256)
MAX_EVALS = 100  # evaluations of the objective per tuning (the command's default: 200)


class ExactDenoiser:
    """``data``'s exact denoiser with the interface ``settings.generate`` samples (a formulation, ``round_sigma``)."""

    formulation = FORMULATION

    def __init__(self, data: GaussianMixture):
        self.data = data

    def round_sigma(self, sigma):
        return sigma

    def __call__(self, x, sigma, **cond):
        return self.data.denoise(x, sigma)


def sampler_of(data: GaussianMixture):
    """``tuned_grid.Sample`` on ``data``'s exact denoiser."""
    denoiser = ExactDenoiser(data)

    def sample(settings, seeds):
        stats = {}
        return generate(denoiser, list(seeds), settings, data_shape=(data.dim,), stats=stats).double(), stats["nfe"]

    return sample


def exact_endpoints(data: GaussianMixture, seeds, sigma_end: float = 1e-6) -> torch.Tensor:
    """The PF-ODE's endpoints from the start noise of ``seeds``: dx/dln(sigma) = x - D(x; sigma) (Karras et al. 2022,
    eq. 4 with sigma(t) = t) from sigma_max to ``sigma_end`` by scipy's DOP853 at rtol 1e-10, then D there."""
    x = initial_noise(list(seeds), (data.dim,), FORMULATION.sigma_max)

    def slope(log_sigma, y):
        state = torch.from_numpy(y.reshape(x.shape))
        return (state - data.denoise(state, torch.tensor(math.exp(log_sigma)))).numpy().ravel()

    solution = solve_ivp(slope, (math.log(FORMULATION.sigma_max), math.log(sigma_end)), x.numpy().ravel(),
                         method="DOP853", rtol=1e-10, atol=1e-10)
    assert solution.success
    return data.denoise(torch.from_numpy(solution.y[:, -1].reshape(x.shape)), torch.tensor(sigma_end))


@pytest.fixture(scope="module")
def ring():
    data = ring_of_gaussians()
    return data, exact_endpoints(data, HELDOUT)


# ------------------------------------------------------------------------------------------------ oracles

@pytest.mark.parametrize("nfe", NFES)
@pytest.mark.parametrize("name", SAMPLERS)
def test_tuned_grid_beats_edm_time_steps_on_heldout_seeds_of_the_mixture(ring, name, nfe):
    data, exact = ring
    sample = sampler_of(data)
    content = tune_grid(sample, SamplerSettings(name=name), nfe, formulation=FORMULATION, seeds=TUNING,
                        max_evals=MAX_EVALS)
    assert content["steps"] == nfe  # one evaluation per step
    errors = {grid: float(((sample(SamplerSettings(name=name, time_steps={"sigmas": sigmas}), HELDOUT)[0] - exact)
                           ** 2).mean()) for grid, sigmas in (("tuned", content["sigmas"]),
                                                              ("karras", content["initial"]["sigmas"]))}
    assert errors["tuned"] < errors["karras"], errors
    assert content["initial"]["sigmas"] == karras_sigmas(nfe).tolist()  # EDM's time steps, rho 7


def gaussian_kl(name: str, sigmas, mean: torch.Tensor, std: float) -> float:
    """KL(samples || data) in nats for data N(mean, std^2 I): the sampler on the exact denoiser is affine in its start,
    out = a x + b (a scalar: the denoiser is isotropic), and the start is sigma_max n, so the samples are
    N(b, (a sigma_max)^2 I); a, b from the starts 0 and e_1."""
    starts = torch.cat([torch.zeros(1, mean.numel()), torch.eye(mean.numel())[:1]]).double()
    out = registry.sample(name, ExactDenoiser(GaussianMixture(mean, std)), starts, torch.tensor(sigmas))
    b, a = out[0], float(out[1, 0] - out[0, 0])
    ratio = (a * sigmas[0] / std) ** 2
    return 0.5 * mean.numel() * (ratio - 1 - math.log(ratio)) + float(((b - mean) ** 2).sum()) / (2 * std**2)


def test_the_kl_oracle_gives_the_closed_form_on_the_exact_endpoint_map():
    """The PF-ODE of data N(mean, std^2 I) maps x(sigma_max) to mean + (x - mean) std / sqrt(std^2 + sigma_max^2), so
    from sigma_max n the samples are N(mean (1 - c), (c sigma_max)^2 I), c = std / sqrt(std^2 + sigma_max^2): a
    fine Heun solve's KL equals that Gaussian's closed-form KL to the data."""
    mean, std, sigma_max = torch.tensor([0.5, -0.3], dtype=torch.float64), 0.5, FORMULATION.sigma_max
    c = std / math.hypot(std, sigma_max)
    ratio = (c * sigma_max / std) ** 2
    exact = (ratio - 1 - math.log(ratio)) + float(((mean * c) ** 2).sum()) / (2 * std**2)  # D / 2 = 1
    assert gaussian_kl("heun", karras_sigmas(512).tolist(), mean, std) == pytest.approx(exact, rel=1e-3)
    assert exact == pytest.approx(2.656e-5, rel=1e-3)


@pytest.mark.parametrize("nfe", NFES)
@pytest.mark.parametrize("name", SAMPLERS)
def test_tuned_grid_lowers_the_exact_kl_on_one_gaussian(name, nfe):
    mean, std = torch.tensor([0.5, -0.3], dtype=torch.float64), 0.5
    content = tune_grid(sampler_of(GaussianMixture(mean, std)), SamplerSettings(name=name), nfe,
                        formulation=FORMULATION, seeds=TUNING, max_evals=MAX_EVALS)
    tuned, karras = (gaussian_kl(name, content[k]["sigmas"] if k else content["sigmas"], mean, std)
                     for k in (None, "initial"))
    assert tuned < karras, (tuned, karras)


def test_parametrisation_is_a_bijection_onto_decreasing_grids():
    floor = 0.1 * FORMULATION.sigma_min
    for steps in (2, 5, 10):
        karras = karras_sigmas(steps)
        torch.testing.assert_close(grid_of(parameters_of(karras, floor), 80.0, floor), karras, rtol=1e-12, atol=0)
    for v in (np.random.default_rng(0).normal(size=6) * 3, np.full(6, 1e3), np.array([-1e3, 1e3] * 3)):
        grid = grid_of(v, 80.0, floor)
        assert grid[0] == 80.0 and grid[-1] == 0 and grid[-2] > floor and (grid[1:] < grid[:-1]).all()


# ------------------------------------------------------------------------------------------------ the file

def tuned_file(tmp_path, name="euler", nfe=5):
    content = tune_grid(sampler_of(ring_of_gaussians()), SamplerSettings(name=name), nfe, formulation=FORMULATION,
                        seeds=range(16), reference_steps=32, max_evals=20)
    return tmp_path / "grid.json", write_grid_file(tmp_path / "grid.json", {**content, "model": {"ckpt": "x"}})


def test_the_file_gives_back_exactly_its_sigmas_and_records_carry_them(tmp_path):
    path, written = tuned_file(tmp_path)
    settings = SamplerSettings.from_config({"name": "euler", "time_steps": {"file": str(path)}})
    assert torch.equal(settings.sigmas(FORMULATION), torch.tensor(written["sigmas"], dtype=torch.float64))
    assert settings.steps_for(FORMULATION) == 5 and read_grid_file(path) == written
    assert written["key"] == grid_key(written) and written["format"] == GRID_FORMAT
    record = settings.record(FORMULATION, grid=karras_sigmas(3))  # a model's own levels do not override the file
    assert record["steps"] == 5 and record["time_steps"] == {"sigmas": written["sigmas"], "file": str(path),
                                                             "key": written["key"]}
    explicit = SamplerSettings(name="euler", time_steps={"sigmas": written["sigmas"]})
    assert explicit.record(FORMULATION)["time_steps"] == {"sigmas": written["sigmas"]}
    denoiser = ExactDenoiser(ring_of_gaussians())
    assert torch.equal(generate(denoiser, range(4), settings, data_shape=(2,)),
                       generate(denoiser, range(4), explicit, data_shape=(2,)))
    # a released checkpoint's source step count does not override the grid's
    filled = SamplerSettings.from_config({"time_steps": {"file": str(path)}},
                                         defaults={"name": "euler", "steps": 18, "time_steps": {"rho": 7}})
    assert filled.steps_for(FORMULATION) == 5


def test_the_command_tunes_a_checkpoint_and_sample_runs_on_its_file(digits_ckpt, tmp_path):
    out = tmp_path / "grid.json"
    cfg = compose_config("tune-steps", [f"ckpt={digits_ckpt}", "sampler=euler", "nfe=3", "num_seeds=4",
                                        "heldout_seeds=4", "reference_steps=8", "max_evals=8", f"out={out}"])
    check_settings(cfg, "tune-steps")
    content = tune_steps(cfg)
    assert json.loads(out.read_text()) == content and content["steps"] == 3 and content["nfe"] == 3
    assert len(content["model"]["fingerprint"]) == 64 and content["model"]["ckpt"] == digits_ckpt
    assert content["loss"]["tuning"]["tuned"] <= content["loss"]["tuning"]["initial"]
    assert "sample on it: lightning-diff sample" in summary(content, str(out))
    # the plain form on the command line (before, Hydra's struct mode refused it: the node is null by default)
    overrides = rename_overrides("sample", [f"ckpt={digits_ckpt}", "sampler=euler", f"sampler.time_steps.file={out}",
                                            "num_samples=2", f"out={tmp_path / 'samples'}"])
    cfg = compose_config("sample", overrides)
    assert OmegaConf.to_container(cfg.sampler.time_steps) == {"file": str(out)}
    check_settings(cfg, "sample")
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # the model it was tuned for: no warning
        line = sample_command(cfg)
    assert "3 steps" in line and "NFE: 3" in line
    # another model's weights (here the raw ones, not the EMA the grid was tuned on): used, with a warning
    cfg = compose_config("sample", [*overrides, "weights=raw"])
    with pytest.warns(UserWarning, match=r"grid.json was tuned for another model \(ckpt=.*weights=ema, formulation="
                                         r"edm, fingerprint [0-9a-f]{12}\); sampling this one"):
        sample_command(cfg)


# ------------------------------------------------------------------------------------------------ bad input

@pytest.mark.parametrize("time_steps,match", [
    ({"sigmas": [80.0, 1.0, 0.5]}, r"sampler.time_steps.sigmas=\[80.0, 1.0, 0.5\] is not a grid; allowed"),
    ({"sigmas": [1.0, 80.0, 0.0]}, "sampler.time_steps.sigmas=.* is not a grid"),
    ({"sigmas": [80.0, -1.0, 0.0]}, "sampler.time_steps.sigmas=.* is not a grid"),
    ({"sigmas": "abc"}, "sampler.time_steps.sigmas='abc' is invalid; allowed: a list"),
    ({"sigmas": [80.0, math.nan, 0.0]}, "sampler.time_steps.sigmas=.* is invalid"),
    ({"sigmas": [0.0]}, "sampler.time_steps.sigmas=.* is invalid"),
    ({"sigmas": [80.0, 0.0], "rho": 7}, r"mixes forms \['rho', 'sigmas'\]; allowed: sigma_min"),
    ({"file": "missing.json"}, "sampler.time_steps.file=missing.json: cannot read it"),
    ({"file": 3}, "sampler.time_steps.file=3 is invalid"),
    ({"sigma": [80.0, 0.0]}, r"sampler.time_steps: \['sigma'\] are not settings of the time steps; allowed")])
def test_bad_time_steps_name_the_setting(time_steps, match):
    with pytest.raises(ValueError, match=match):
        SamplerSettings(name="euler", time_steps=time_steps)


def test_a_grid_file_edited_or_foreign_or_for_another_sampler(tmp_path):
    path, written = tuned_file(tmp_path)
    edited = tmp_path / "edited.json"
    edited.write_text(json.dumps({**written, "sigmas": [80.0, 1.0, 0.0]}))
    with pytest.raises(ValueError, match="edited.json: its content does not match its key"):
        SamplerSettings(name="euler", time_steps={"file": str(edited)})
    foreign = tmp_path / "foreign.json"
    foreign.write_text(json.dumps({"sigmas": [80.0, 1.0, 0.0]}))
    with pytest.raises(ValueError, match="foreign.json has format None"):
        SamplerSettings(name="euler", time_steps={"file": str(foreign)})
    (tmp_path / "cut.json").write_text(path.read_text()[:50])
    with pytest.raises(ValueError, match="cut.json is not JSON"):
        SamplerSettings(name="euler", time_steps={"file": str(tmp_path / "cut.json")})
    with pytest.warns(UserWarning, match="was tuned for sampler=euler; sampling with sampler=heun"):
        SamplerSettings(name="heun", time_steps={"file": str(path)})
    with pytest.raises(ValueError, match=r"sampler.steps=4 and sampler.time_steps=.* \(5 steps\) disagree; allowed: "
                                         "sampler.steps=null .* or 5"):
        SamplerSettings(name="euler", steps=4, time_steps={"file": str(path)})


@pytest.mark.parametrize("name,options,nfe,match", [
    ("euler_ancestral", {}, 5, "sampler=euler_ancestral .* draws noise .*allowed: a deterministic sampler \\(euler, "),
    ("euler", {"S_churn": 10.0}, 5, "sampler=euler with sampler.options=.*S_churn.* draws noise"),
    ("heun", {}, 10, "nfe=10 is not a budget of sampler=heun: 6 steps take 11 .*; allowed: nfe=9 or 11"),
    ("euler", {}, 1, "nfe=1 gives sampler=euler one step, whose grid \\[sigma_max, 0\\] has no level to tune")])
def test_tuning_refuses_what_it_cannot_tune(name, options, nfe, match):
    settings = SamplerSettings(name=name, options=options)
    with pytest.raises(ValueError, match=match):
        tune_grid(sampler_of(ring_of_gaussians()), settings, nfe, formulation=FORMULATION, seeds=range(4))


@pytest.mark.parametrize("override,match", [
    ("sampler.steps=5", "sampler.steps=5 is invalid for lightning-diff tune-steps, which makes the grid .*nfe=10"),
    ("sampler.time_steps={rho:5}", "sampler.time_steps=.* is invalid for lightning-diff tune-steps"),
    ("nfe=1", "nfe=1 is invalid; allowed: an integer in \\[2, 100\\]"), ("nfe=101", "nfe=101 is invalid"),
    ("num_seeds=0", "num_seeds=0 is invalid"), ("heldout_seeds=-1", "heldout_seeds=-1 is invalid"),
    ("reference_steps=1", "reference_steps=1 is invalid"), ("rho=0", "rho=0 is invalid"),
    ("max_evals=0", "max_evals=0 is invalid")])
def test_the_command_refuses_bad_settings_naming_them(override, match):
    cfg = compose(["ckpt=model.ckpt", "sampler=euler", override], "tune-steps")
    with pytest.raises(ValueError, match=match):
        check_settings(cfg, "tune-steps")


def test_sample_refuses_a_bad_time_steps_file_at_config_time(tmp_path):
    cfg = compose(["ckpt=model.ckpt", f"sampler.time_steps={{file:{tmp_path / 'missing.json'}}}"], "sample")
    with pytest.raises(ValueError, match="sampler.time_steps.file=.*missing.json' is invalid; allowed: a readable file "
                                         "written by lightning-diff tune-steps"):
        check_settings(cfg, "sample")
    cfg = compose(["ckpt=model.ckpt", "sampler.time_steps={sigmas:[1,2,0]}"], "sample")
    with pytest.raises(ValueError, match="sampler.time_steps.sigmas=\\[1, 2, 0\\] is invalid; allowed: a list"):
        check_settings(cfg, "sample")



@pytest.mark.slow
def test_the_experiment_quick_run_writes_its_table_record_figure_and_grids(tmp_path):
    """experiments/tune_steps/run.py --quick: a 4-step model, each sampler tuned at NFE 3 and scored."""
    run_experiment_quick("tune_steps", "--out", str(tmp_path))
    rows = json.loads((tmp_path / "results.json").read_text())["rows"]
    assert [(r["sampler"], r["nfe"]) for r in rows] == [("euler", 3), ("dpmpp_2m", 3), ("unipc", 3)]
    assert all(math.isfinite(r[grid]["fd"]) for r in rows for grid in ("tuned", "karras"))
    assert (tmp_path / "tune_steps.png").is_file()
    for r in rows:
        assert read_grid_file(tmp_path / "grids" / f"{r['sampler']}-nfe3.json")["key"] == r["key"]
