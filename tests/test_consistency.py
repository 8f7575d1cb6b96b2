"""Consistency models (Song et al. 2023; Song & Dhariwal 2024; docs/consistency.md): formulation=consistency,
sampler=consistency, methods.consistency and lightning-diff consistency.

Oracles: (1) the boundary condition c_skip(sigma_min) = 1, c_out(sigma_min) = 0 holds exactly, so D(x, sigma_min) = x
bit for bit whatever the network; (2) for Gaussian data N(mu, s^2 I) the exact consistency function is the closed-form
PF-ODE map f(x, sigma) = mu + (x - mu) sqrt(s^2 + eps^2) / sqrt(s^2 + sigma^2) (checked against a fine Heun solve of the
exact denoiser), and Algorithm 1 with it gives exact samples of p_eps = N(mu, s^2 + eps^2) from the exact marginal at
T, and the closed-form moments of its recursion from N(0, T^2); (3) iCT's curriculum N(k), lognormal pair
probabilities and pseudo-Huber metric equal the papers' equations written here independently (the curriculum's table
for CIFAR-10's K = 400k, scipy's lognormal CDF, the norm); (4) with the exact mixture denoiser as teacher on the 2-D
toy, the one-step map of a tiny distilled MLP approaches the PF-ODE endpoint map of a fine Heun solve on held-out
seeds (mean endpoint error 0.22 after 400 CD steps and 0.31 after 400 CT steps, against 1.01 untrained and 1.01 for
the teacher's own one-step Euler).
"""

import functools
import math

import pytest
import torch
from scipy import stats
from torch.utils.data import DataLoader, TensorDataset

from lightning_diff import formulations, sampling
from lightning_diff.analytic import GaussianMixture
from lightning_diff.data.toy2d import ring_of_gaussians
from lightning_diff.denoiser import Denoiser
from lightning_diff.evaluation.leaderboard import _options_text
from lightning_diff.evaluation.records import run_description
from lightning_diff.methods import consistency as cm
from lightning_diff.networks import MLP

from .helpers import compose_config, load_experiment, run_experiment_quick

f64 = torch.float64
EPS, T, SIGMA_DATA = 0.002, 80.0, 0.5  # Song et al. 2023, Appendix C: eps, T and sigma_data of CIFAR-10


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


def _trainer(max_steps):
    import pytorch_lightning as pl

    return pl.Trainer(max_steps=max_steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                      enable_model_summary=False, accelerator="cpu")


def _perturbed_mlp(dim=2):
    """An MLP whose every parameter is non-zero (its output layer starts at zero: a zero F would hide c_out)."""
    net = MLP(dim=dim, hidden=16, depth=1, emb_channels=8)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn_like(p))
    return net


# --- (1) the boundary condition -------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, f64])
def test_boundary_condition_is_exact(dtype):
    fm = formulations.get("consistency")
    at_min = torch.tensor([EPS], dtype=dtype)
    assert fm.c_skip(at_min).item() == 1.0 and fm.c_out(at_min).item() == 0.0
    denoiser = Denoiser(_perturbed_mlp(), fm)
    x = torch.randn(64, 2, dtype=dtype) * 3
    assert torch.equal(denoiser(x, EPS), x)  # f(x, eps) = x whatever the network
    assert not torch.equal(Denoiser(denoiser.backbone, formulations.get("edm"))(x, EPS), x)  # EDM's does not
    # Song et al. 2023, Appendix C, away from the boundary: the paper's c_skip and c_out
    sigma = torch.tensor([0.01, 0.5, 3.0, 80.0], dtype=f64)
    torch.testing.assert_close(fm.c_skip(sigma), 0.25 / ((sigma - 0.002) ** 2 + 0.25), rtol=1e-15, atol=0)
    torch.testing.assert_close(fm.c_out(sigma), 0.5 * (sigma - 0.002) / (0.25 + sigma**2) ** 0.5, rtol=1e-15, atol=0)


def test_sampling_grid_is_edm_time_steps_without_sigma_min():
    fm = formulations.get("consistency")
    assert fm.sampling_sigmas(1).tolist() == [80.0, 0.0]  # one-step generation: f(x_T, T)
    for n in (2, 4):  # EDM eq. 5 with n + 1 levels, the last (sigma_min, f = identity) dropped
        ramp = [(80 ** (1 / 7) + i / n * (0.002 ** (1 / 7) - 80 ** (1 / 7))) ** 7 for i in range(n)]
        torch.testing.assert_close(fm.sampling_sigmas(n), torch.tensor([*ramp, 0.0], dtype=f64), rtol=1e-12, atol=0)


# --- (2) the sampler with the exact consistency function of a Gaussian ----------------------------------------
MU, S, DIM = 0.3, 0.5, 3


def exact_consistency(x, sigma, **cond):
    """f(x, sigma) of data N(MU, S^2 I): the PF-ODE dx/dsigma = (x - D) / sigma keeps (x - mu) / sqrt(s^2 + sigma^2)."""
    scale = ((S**2 + EPS**2) / (S**2 + sigma.to(x.dtype) ** 2)).sqrt().reshape(-1, *[1] * (x.ndim - 1))
    return MU + (x - MU) * scale


def test_the_closed_form_is_the_pf_ode_endpoint_map():
    gaussian = GaussianMixture(torch.full((DIM,), MU), S)
    x = torch.randn(8, DIM, dtype=f64) * 20
    fine = sampling.heun(gaussian, x, formulations.get("edm", sigma_max=20.0).sampling_sigmas(400)[:-1])  # to eps
    torch.testing.assert_close(exact_consistency(x, torch.full((8,), 20.0, dtype=f64)), fine, rtol=0, atol=1e-4)


def _algorithm_1(x, sigmas, generator):
    """Song et al. 2023 Algorithm 1 with the exact f, written out: x = f(x_T, T); x = f(x + sqrt(tau^2 - eps^2) z)."""
    taus = sigmas[:-1].tolist()
    x = exact_consistency(x, torch.full((x.shape[0],), taus[0], dtype=f64))
    for tau in taus[1:]:
        x = x + math.sqrt(tau**2 - EPS**2) * generator.randn(x.shape, dtype=f64)
        x = exact_consistency(x, torch.full((x.shape[0],), tau, dtype=f64))
    return x


@pytest.mark.parametrize("steps", [1, 2, 4])
def test_multistep_sampler_is_algorithm_1(steps):
    sigmas = formulations.get("consistency").sampling_sigmas(steps)
    seeds = list(range(16))
    generator = sampling.PerSampleGenerator(seeds)
    x = sampling.initial_noise(generator, (DIM,), T)
    stats_ = {}
    out = sampling.consistency(exact_consistency, x, sigmas, generator=generator, stats=stats_)
    again = sampling.PerSampleGenerator(seeds)
    expected = _algorithm_1(T * again.randn((16, DIM), dtype=f64), sigmas, again)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-12)
    assert stats_["nfe"] == steps


@pytest.mark.parametrize("steps", [1, 2, 4])
def test_multistep_sampler_gives_exact_samples_of_the_gaussian(steps):
    """From the exact marginal N(mu, s^2 + T^2) every step of Algorithm 1 is exact: the samples are N(mu, s^2 + eps^2)
    (moments within 5 standard errors of 60k values, and a KS test); from Algorithm 1's own start N(0, T^2) they have
    the closed-form moments of its recursion (mean mu (1 - a_T) prod a_tau, ...), within 0.4% of p_eps's std here."""
    fm = formulations.get("consistency")
    sigmas, n = fm.sampling_sigmas(steps), 20_000
    generator = torch.Generator().manual_seed(steps)
    marginal = MU + math.sqrt(S**2 + T**2) * torch.randn(n, DIM, dtype=f64, generator=generator)
    out = sampling.consistency(exact_consistency, marginal, sigmas, generator=generator, formulation=fm).flatten()
    target = math.sqrt(S**2 + EPS**2)
    assert abs(out.mean().item() - MU) < 5 * target / math.sqrt(out.numel())
    assert abs(out.std().item() / target - 1) < 5 * math.sqrt(0.5 / out.numel())
    assert stats.kstest(out.numpy(), stats.norm(MU, target).cdf).pvalue > 1e-3
    # Algorithm 1's start x_T = T n: the moments of its linear-Gaussian recursion
    out = sampling.consistency(exact_consistency, T * torch.randn(n, DIM, dtype=f64, generator=generator), sigmas,
                               generator=generator, formulation=fm).flatten()
    a = lambda sigma: math.sqrt((S**2 + EPS**2) / (S**2 + sigma**2))  # noqa: E731
    taus = sigmas[:-1].tolist()
    mean, var = MU * (1 - a(T)), (T * a(T)) ** 2
    for tau in taus[1:]:
        mean, var = MU + (mean - MU) * a(tau), a(tau) ** 2 * (var + tau**2 - EPS**2)
    assert abs(mean - MU) < 0.004 * target and abs(math.sqrt(var) / target - 1) < 0.004
    assert abs(out.mean().item() - mean) < 5 * math.sqrt(var / out.numel())
    assert abs(out.std().item() / math.sqrt(var) - 1) < 5 * math.sqrt(0.5 / out.numel())


def test_sampler_refuses_levels_below_sigma_min():
    x = torch.randn(2, DIM, dtype=f64)
    with pytest.raises(ValueError, match=r"level 0.001 below sigma_min=0.002.*allowed"):
        sampling.consistency(exact_consistency, x, torch.tensor([1.0, 0.001, 0.0]))  # eps: Song et al.'s 0.002
    with pytest.raises(ValueError, match=r"level 0.01 below sigma_min=0.1.*allowed"):
        sampling.consistency(exact_consistency, x, torch.tensor([1.0, 0.01, 0.0]),
                             formulation=formulations.get("consistency", sigma_min=0.1))


# --- (3) iCT's formulas ----------------------------------------------------------------------------------------
def test_ict_curriculum_is_the_papers():
    """Song & Dhariwal 2024, eq. 7 with s0 = 10, s1 = 1280, K = 400k: K' = floor(400000 / (log2(128) + 1)) = 50000
    steps per stage, N doubling from 11 to 1281."""
    table = {0: 11, 49_999: 11, 50_000: 21, 100_000: 41, 150_000: 81, 200_000: 161, 250_000: 321, 300_000: 641,
             349_999: 641, 350_000: 1281, 399_999: 1281}
    assert {k: cm.ict_num_scales(k, 400_000) for k in table} == table
    for total, s0, s1 in ((1000, 10, 1280), (37, 2, 20), (8, 10, 1280)):  # eq. 7 written out
        stage = total // (math.floor(math.log2(s1 // s0)) + 1)
        assert [cm.ict_num_scales(k, total, s0, s1) for k in range(total)] == [
            min(s0 * 2 ** (k // stage), s1) + 1 for k in range(total)]
    with pytest.raises(ValueError, match="total_steps=7 is fewer than the 8 stages.*allowed"):
        cm.ict_num_scales(0, 7)


def test_karras_levels_are_song_et_al_discretisation():
    """Song et al. 2023, Sec. 5: t_i = (eps^(1/rho) + (i-1)/(N-1) (T^(1/rho) - eps^(1/rho)))^rho, i = 1..N."""
    n = 11
    expected = [(EPS ** (1 / 7) + i / (n - 1) * (T ** (1 / 7) - EPS ** (1 / 7))) ** 7 for i in range(n)]
    torch.testing.assert_close(cm.karras_levels(n, EPS, T, 7.0), torch.tensor(expected, dtype=f64), rtol=1e-12, atol=0)


def test_lognormal_pair_probabilities_are_the_lognormal_mass_between_levels():
    """Song & Dhariwal 2024, eq. 8: p(sigma_i) is the N(P_mean, P_std^2) mass of ln sigma in [ln sigma_i, ln
    sigma_{i+1}), normalised (scipy's lognormal CDF here)."""
    levels = cm.karras_levels(41, EPS, T, 7.0)
    cdf = stats.lognorm(s=2.0, scale=math.exp(-1.1)).cdf(levels.numpy())
    mass = torch.tensor(cdf[1:] - cdf[:-1], dtype=f64)
    torch.testing.assert_close(cm.lognormal_level_probs(levels, -1.1, 2.0), mass / mass.sum(), rtol=1e-9, atol=1e-15)


def test_pseudo_huber_is_the_papers_metric():
    """Song & Dhariwal 2024, Sec. 3.3: d(x, y) = sqrt(||x - y||^2 + c^2) - c, c = 0.00054 sqrt(d) (0.03 on CIFAR-10)."""
    a, b = torch.randn(4, 3, 32, 32, dtype=f64), torch.randn(4, 3, 32, 32, dtype=f64)
    c = 0.00054 * math.sqrt(3 * 32 * 32)
    assert c == pytest.approx(0.0299, abs=1e-4)
    norms = [float(((a[i] - b[i]) ** 2).sum()) for i in range(4)]
    expected = torch.tensor([math.sqrt(n + c * c) - c for n in norms], dtype=f64)
    torch.testing.assert_close(cm.pseudo_huber(a, b), expected, rtol=1e-12, atol=0)
    small = b + 1e-4 * torch.randn_like(b)  # ~ ||x - y||^2 / (2c) near 0, ~ ||x - y|| far away
    torch.testing.assert_close(cm.pseudo_huber(small, b), ((small - b) ** 2).flatten(1).sum(1) / (2 * c), rtol=1e-2,
                               atol=0)
    torch.testing.assert_close(cm.pseudo_huber(a, b, c=0.0), (a - b).flatten(1).norm(dim=1), rtol=1e-12, atol=0)


def test_teacher_step_is_edm_heun_and_euler():
    """CD's teacher step from sigma_{n+1} to sigma_n (per-row levels) is one step of EDM's Heun / Euler samplers
    (``sampling.heun`` / ``euler``, EDM Algorithm 1) on the two-level grid."""
    mix = GaussianMixture([[-1.0, 0.5], [1.0, -0.5]], [0.3, 0.4])
    x = torch.randn(5, 2, dtype=f64) * 3
    for solver, sampler in (("heun", sampling.heun), ("euler", sampling.euler)):
        step = cm.teacher_step(mix, x, torch.full((5,), 3.0, dtype=f64), torch.full((5,), 2.0, dtype=f64), solver)
        torch.testing.assert_close(step, sampler(mix, x, torch.tensor([3.0, 2.0], dtype=f64)), rtol=1e-12, atol=0)


# --- (4) training -------------------------------------------------------------------------------------------------
def _toy_model(hidden=64):
    torch.manual_seed(0)
    return Denoiser(MLP(dim=2, hidden=hidden, depth=2, emb_channels=32), formulations.get("consistency"))


def _toy_data(steps, batch=256):
    data = ring_of_gaussians().sample(steps * batch, generator=torch.Generator().manual_seed(1)).float()
    return DataLoader(TensorDataset(data), batch_size=batch)


def _endpoint_error(model, teacher, seeds=range(1000, 1500)):
    """Mean distance of the one-step map f(x_T, T) to the PF-ODE endpoint at sigma_min of a 256-step Heun solve of
    ``teacher`` from the same x_T, on held-out seeds (training never sees these start points)."""
    x = sampling.initial_noise(list(seeds), (2,), T)
    fine = sampling.heun(teacher, x, formulations.get("edm").sampling_sigmas(256)[:-1])
    one = sampling.consistency(model, x, formulations.get("consistency").sampling_sigmas(1))
    return float((one - fine).norm(dim=1).mean())


def test_distilled_one_step_map_approaches_the_pf_ode_endpoint_map():
    """CD (Algorithm 2: Heun teacher steps on N = 18 levels, EMA target mu = 0.9, pseudo-Huber) with the exact
    mixture denoiser as teacher: after 400 Adam steps of a 2-layer MLP the one-step map lands 0.218 (mean over 500
    held-out seeds) from the PF-ODE's endpoint (ring of radius 1, std 0.1), where the untrained model is 1.010 away and
    the teacher's own one-step Euler (its mean, D(x_T, T)) 1.006."""
    ring = ring_of_gaussians()
    model = _toy_model()
    assert _endpoint_error(model.eval(), ring) > 0.9  # untrained: f(x_T, T) ~ c_skip x_T, near 0
    method = cm.ConsistencyTraining(model, functools.partial(torch.optim.Adam, lr=3e-3), mode="cd", teacher=ring,
                                 total_steps=400, num_scales=18, target_decay=0.9)
    _trainer(400).fit(method, _toy_data(400))
    error = _endpoint_error(method.model.eval(), ring)
    euler = _endpoint_error(ring, ring)  # the teacher's own one-step Euler: D(x_T, T)
    assert error < 0.3 and euler > 0.95, (error, euler)


def test_consistency_training_learns_without_a_teacher():
    """CT (Algorithm 3 with iCT's curriculum, lognormal pairs, 1/(sigma_{n+1} - sigma_n) weights, pseudo-Huber, no
    EMA target) from the ring's samples only: 400 steps bring the one-step map from 1.010 to 0.305 of the PF-ODE
    endpoint (CT converges more slowly than CD: its target is a one-sample estimate of the ODE step)."""
    ring = ring_of_gaussians()
    method = cm.ConsistencyTraining(_toy_model(), functools.partial(torch.optim.Adam, lr=3e-3), mode="ct",
                                 total_steps=400, s0=10, s1=160)
    assert method.target is None and method.curriculum == "ict" and method.sigma_sampling == "lognormal"
    _trainer(400).fit(method, _toy_data(400))
    assert _endpoint_error(method.model.eval(), ring) < 0.45


def test_method_refuses_what_is_not_a_consistency_setup():
    ring = ring_of_gaussians()
    edm = Denoiser(_perturbed_mlp(), formulations.get("edm"))
    with pytest.raises(ValueError, match="formulation=edm does not meet the boundary condition.*allowed"):
        cm.ConsistencyTraining(edm, mode="cd", teacher=ring)
    with pytest.raises(ValueError, match="mode=cd with no teacher.*allowed"):
        cm.ConsistencyTraining(_toy_model(), mode="cd")
    with pytest.raises(ValueError, match="total_steps=5 is fewer than the 8 stages.*allowed"):
        cm.ConsistencyTraining(_toy_model(), mode="ct", total_steps=5)
    with pytest.raises(ValueError, match="metric='lpips' is not known; allowed"):
        cm.ConsistencyTraining(_toy_model(), mode="ct", metric="lpips")


# --- the command ---------------------------------------------------------------------------------------------------
def _command(tmp_path, *overrides):
    from lightning_diff.cli.consistency import consistency

    cfg = compose_config("consistency", [*overrides, "trainer=cpu", "trainer.max_steps=2", "data.batch_size=8",
                                         "++trainer.enable_progress_bar=false"], tmp_path)
    return consistency(cfg)


@pytest.mark.parametrize("mode", ["cd", "ct"])
def test_cli_writes_a_checkpoint_that_samples_in_one_step(digits_ckpt, tmp_path, mode):
    from lightning_diff.cli.main import COMMANDS
    from lightning_diff.training.builders import load_module

    assert COMMANDS["consistency"][0] == "lightning_diff.cli.consistency"
    result = _command(tmp_path, f"mode={mode}", f"ckpt={digits_ckpt}", "curriculum=constant")
    model = load_module(result["model"])
    assert model.formulation.name == "consistency" and model.sampler.name == "consistency"
    teacher = load_module(digits_ckpt)
    for key, value in teacher.denoiser.backbone.state_dict().items():  # init=ckpt, then trained
        assert value.shape == model.denoiser.backbone.state_dict()[key].shape
    stats_ = {}
    images = model.sample(range(3), stats=stats_)  # the stored sampler: one step
    assert images.shape == (3, 1, 8, 8) and torch.isfinite(images).all() and stats_["nfe"] == 1
    # records and the leaderboard's options column say which consistency method made the model
    run = run_description(result["model"], model.run_config)
    assert run["consistency"] == mode
    assert f"consistency={mode}" in _options_text({"name": "consistency", "steps": 1}, None, run)


def test_cli_trains_from_scratch_and_refuses_what_cannot_start(digits_ckpt, tmp_path):
    from lightning_diff.training.builders import load_module

    result = _command(tmp_path, "mode=ct", "curriculum=constant", "network.model_channels=8")
    assert result["init"] == "scratch" and load_module(result["model"]).formulation.name == "consistency"
    assert run_description(result["model"], load_module(result["model"]).run_config)["consistency"] == "ct"
    with pytest.raises(ValueError, match="init=ckpt without a checkpoint.*allowed"):
        _command(tmp_path, "mode=ct", "init=ckpt")
    with pytest.raises(ValueError, match=r"formulation=vp\) feeds its network other inputs.*allowed"):
        from lightning_diff.cli.train import train

        vp = compose_config("train", ["logger=csv", "callbacks.progress=null", "++trainer.enable_progress_bar=false",
                                      "callbacks.sample_grid=null", "formulation=vp", "network.model_channels=8",
                                      "trainer.max_steps=1", "data.batch_size=8"], tmp_path / "vp")
        _command(tmp_path, "mode=cd", f"ckpt={train(vp)['checkpoint']}")


@pytest.mark.parametrize("overrides,message", [
    (["mode=cd"], r"mode=cd with ckpt=null: consistency distillation needs a teacher; allowed"),
    (["mode=ct", "formulation=edm"], r"formulations.EDM does not meet the boundary condition.*allowed"),
    (["mode=ct", "trainer.max_steps=5"], r"trainer.max_steps=5, s0=10, s1=1280: .*fewer than the 8 stages.*allowed"),
    (["mode=cd", "ckpt=x.ckpt", "metric=lpips"], r"metric='lpips' is invalid; allowed: pseudo_huber, l2, l1"),
    (["mode=ct", "target_decay=1.0"], r"target_decay=1.0 is invalid; allowed: null or a number in \[0, 1\)")])
def test_command_refuses_bad_settings_before_any_work(overrides, message):
    from lightning_diff.cli.config_check import check_settings

    with pytest.raises(ValueError, match=message):
        check_settings(compose_config("consistency", overrides), "consistency")


# --- the experiment ------------------------------------------------------------------------------------------------
def test_experiment_table_puts_each_method_at_its_nfe():
    run = load_experiment("consistency")  # here, not at import: matplotlib
    assert [run.heun_steps(n) for n in run.NFES] == [1, 1, 2]  # 2N - 1 evaluations within the budget
    rows = {"CD": {n: {"fd": 10.0 / n, "nfe": n} for n in run.NFES},
            "teacher Heun": {n: {"fd": 100.0, "nfe": 2 * run.heun_steps(n) - 1} for n in run.NFES}}
    lines = run.results_table(rows).splitlines()
    assert lines[0] == "| method | FD at NFE 1 | FD at NFE 2 | FD at NFE 4 |"
    assert lines[2:] == ["| CD | 10 | 5 | 2.5 |", "| teacher Heun | 100 | 100 (1) | 100 (3) |"]


@pytest.mark.slow
def test_experiment_quick_run_writes_table_record_and_figure(tmp_path):
    import json

    run_experiment_quick("consistency", "--out", str(tmp_path), timeout=900)
    record = json.loads((tmp_path / "results.json").read_text())
    teacher = [f"teacher {name}{grid}" for name in ("DDIM", "Heun", "DPM-Solver++(2M)")
               for grid in ("", ", no sigma_min level")]
    assert set(record["rows"]) == {"CD", "CT (from the teacher's weights: ECT)", *teacher, "progressive distillation"}
    assert all(math.isfinite(r["fd"]) for row in record["rows"].values() for r in row.values())
    assert record["rows"]["CD"]["1"]["nfe"] == 1 and record["rows"]["teacher Heun"]["4"]["nfe"] == 3
    assert (tmp_path / "fd_vs_nfe.png").stat().st_size > 10_000


def test_sample_and_evaluate_default_to_the_models_own_sampler():
    """A checkpoint of ``lightning-diff consistency`` records ``own_sampler``: ``sample``/``evaluate`` without a
    sampler run it (before: EDM's Heun, the wrong sampler for a consistency model)."""
    from lightning_diff.sampling.settings import SamplerSettings

    run = {"own_sampler": {"name": "consistency", "steps": 1, "options": {}, "time_steps": None}}
    settings, _ = SamplerSettings.of_run(run, {"name": None, "steps": None})
    assert (settings.name, settings.steps) == ("consistency", 1)
    assert SamplerSettings.of_run(run, {"name": "heun"})[0].name == "heun"  # what the user asks wins
