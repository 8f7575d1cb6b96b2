"""Post-hoc EMA (Karras et al. 2024, Sec. 3 and Appendix C; callbacks/posthoc_ema.py, cli/posthoc_ema.py):

1. the power-function EMA update equals the profile's closed-form average of a synthetic trajectory (float64, 1e-10);
2. a third profile tracked directly during a tiny training run equals its reconstruction from the two stored
   profiles' snapshots (measured: 3.4e-5 of the weights' norm, asserted < 1e-4), through the command's checkpoint as
   ``sample``/``evaluate`` load it;
3. the reconstruction of a synthetic continuous trajectory equals the profile's closed form, within the bound the fit
   error gives (Cauchy-Schwarz), and the closed-form inner products equal numerical quadrature;
4. bad input names the setting.
"""

import copy
import json
import math

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from omegaconf import OmegaConf
from scipy import integrate, optimize, special
from torch import nn
from torch.utils.data import TensorDataset

from lightning_diff.callbacks.posthoc_ema import (
    SIGMA_REL_MAX,
    SNAPSHOT_KEY,
    PostHocEMA,
    PowerFunctionEMA,
    check_sigma_rel,
    gamma_to_sigma_rel,
    profile_inner_products,
    reconstruct,
    sigma_rel_to_gamma,
    snapshot_name,
    solve_coefficients,
)
from lightning_diff.checkpoint_io import CHECKPOINT_FORMAT, FORMAT_KEY, ResumableDataLoader, load_checkpoint
from lightning_diff.cli.config_check import check_settings
from lightning_diff.cli.posthoc_ema import checkpoint_name, posthoc_ema
from lightning_diff.cli.train import train
from lightning_diff.config import compose
from lightning_diff.evaluation.leaderboard import _options_text
from lightning_diff.evaluation.records import run_description
from lightning_diff.training.builders import load_module

from .helpers import compose_config, run_experiment_quick

torch.set_num_threads(1)


# ------------------------------------------------------------------------------------------------ sigma_rel <-> gamma

def test_sigma_rel_and_gamma_convert_both_ways():
    # EDM2 tracks sigma_rel 0.05 and 0.10 (Karras et al. 2024, Sec. 3.2): gamma 16.97 and 6.94
    assert sigma_rel_to_gamma(0.05) == pytest.approx(16.97, abs=0.005)
    assert sigma_rel_to_gamma(0.10) == pytest.approx(6.94, abs=0.005)
    for sigma_rel in (0.001, 0.01, 0.05, 0.1, 0.2, 0.29, 0.3):
        gamma = sigma_rel_to_gamma(sigma_rel)
        # an independent root finder on eq. 3 over the branch where sigma_rel falls with gamma
        root = optimize.brentq(lambda g, s=sigma_rel: gamma_to_sigma_rel(g) - s, (math.sqrt(5) - 3) / 2, 1e7,
                               xtol=1e-13, rtol=1e-14)
        assert gamma == pytest.approx(root, rel=1e-9)
        assert gamma_to_sigma_rel(gamma) == pytest.approx(sigma_rel, rel=1e-12)
    # the profile's relative std as a distribution on [0, t] (mean and variance of tau ~ (gamma + 1) tau^gamma)
    gamma = 3.0
    mean = integrate.quad(lambda tau: tau * (gamma + 1) * tau**gamma, 0, 1)[0]
    second = integrate.quad(lambda tau: tau**2 * (gamma + 1) * tau**gamma, 0, 1)[0]
    assert gamma_to_sigma_rel(gamma) == pytest.approx(math.sqrt(second - mean**2), rel=1e-10)
    # the largest sigma_rel, at gamma + 1 = 1 / golden ratio
    assert SIGMA_REL_MAX == pytest.approx(gamma_to_sigma_rel((math.sqrt(5) - 3) / 2), rel=1e-12)
    assert SIGMA_REL_MAX == pytest.approx(optimize.minimize_scalar(lambda g: -gamma_to_sigma_rel(g),
                                                                   bounds=(-0.9, 5), method="bounded").fun * -1,
                                          rel=1e-8)


# ------------------------------------------------------------------------------------------------ proof 1

def test_power_ema_update_equals_the_closed_form_average_of_a_synthetic_trajectory():
    """After each step the tracked average is (gamma + 1) / T^(gamma + 1) int_0^T tau^gamma theta(tau) dtau of the
    weights held constant between steps, theta = theta_k on (t_{k-1}, t_k]: sum_k theta_k (t_k^(g+1) - t_{k-1}^(g+1))
    / T^(g+1), with t_k the images seen (batches of varying size); float64, to 1e-10."""
    sigma_rels = (0.05, 0.1, 0.25)
    ema = PowerFunctionEMA(sigma_rels)
    weights = {"w": torch.zeros(3, dtype=torch.float64), "count": torch.zeros((), dtype=torch.int64)}
    ema.track(weights, averaged={"w"})
    batches = [7 + (k * 5) % 11 for k in range(300)]  # images per optimizer step
    theta = lambda k: torch.tensor([math.cos(k / 7), (k / 100) ** 2, 1.0 + k / 300], dtype=torch.float64)
    ends = np.cumsum(batches).astype(np.float64)
    for k, batch in enumerate(batches):
        weights["w"].copy_(theta(k))
        weights["count"].fill_(k)
        ema.update(int(ends[k]), batch)
        if k in (0, 1, 10, 299):
            starts, end = np.concatenate([[0.0], ends[:k]]), ends[k]
            for gamma, average in zip(ema.gammas, ema.averages, strict=True):
                mass = (ends[:k + 1] / end) ** (gamma + 1) - (starts / end) ** (gamma + 1)
                closed = sum(float(m) * theta(j) for j, m in enumerate(mass))
                torch.testing.assert_close(average["w"], closed, rtol=1e-10, atol=1e-12)
                assert int(average["count"]) == k  # buffers are copied, not averaged


# ------------------------------------------------------------------------------------------------ proof 3

def test_inner_products_equal_numerical_quadrature():
    """Appendix C.3's closed form <p_a, p_b> against scipy's quadrature of the profiles' product."""
    def profile(t, gamma):
        return lambda tau: (gamma + 1) * tau**gamma / t ** (gamma + 1) if tau <= t else 0.0

    for (ta, ga), (tb, gb) in [((1.0, 6.94), (0.6, 16.97)), ((0.3, 2.0), (1.0, 0.5)), ((0.7, 3.3), (0.7, 3.3))]:
        pa, pb = profile(ta, ga), profile(tb, gb)
        quad = integrate.quad(lambda tau, pa=pa, pb=pb: pa(tau) * pb(tau), 0, min(ta, tb), epsabs=0, epsrel=1e-12,
                              limit=200)[0]
        assert profile_inner_products(ta, ga, tb, gb) == pytest.approx(quad, rel=1e-9)
        assert profile_inner_products(tb, gb, ta, ga) == pytest.approx(quad, rel=1e-9)
    # large exponents and times do not overflow (the ratio form)
    assert np.isfinite(profile_inner_products(2e9, 400.0, 1e9, 300.0))


def write_snapshots(folder, times, sigma_rels, values):
    """Snapshot files as PostHocEMA writes them, holding ``values(t, gamma) -> tensor`` per profile."""
    folder.mkdir(parents=True, exist_ok=True)
    gammas = [sigma_rel_to_gamma(s) for s in sigma_rels]
    for step, t in enumerate(map(float, times), start=1):
        snapshot = {FORMAT_KEY: CHECKPOINT_FORMAT, "run_config": {"seed": 0},
                    SNAPSHOT_KEY: {"step": step, "images": t, "sigma_rels": list(sigma_rels), "gammas": gammas,
                                   "averaged": ["w"]},
                    "profiles": [{"w": values(t, g), "count": torch.tensor(step)} for g in gammas]}
        torch.save(snapshot, folder / snapshot_name(step))


def test_reconstruction_equals_the_closed_form_on_a_synthetic_trajectory(tmp_path):
    """theta(tau) = (1, tau/T, (tau/T)^2, exp(-tau/c), sqrt(tau/T)) has closed-form profile averages
    (gamma+1)/t^(gamma+1) int_0^t tau^gamma theta(tau) dtau (the exponential's: the regularised incomplete gamma
    function). Snapshots of sigma_rel 0.05 and 0.10 at 20 times hold those averages; each reconstruction at T equals
    the target's closed form within fit_error * ||p|| * ||theta||_L2 (Cauchy-Schwarz). Measured largest relative
    error over the components, 20 snapshots (10): sigma_rel 0.03 9.5e-4 (1.4e-2), 0.075 1.2e-4 (1.7e-3), 0.15 3.2e-3
    (2.2e-2), 0.2 3.0e-2 (1.1e-1): best between the tracked lengths, worse the further outside, smaller with more
    snapshots."""
    end, decay = 1000.0, 150.0

    def closed(t, gamma):  # the profile average of theta at time t, float64
        g1 = gamma + 1
        moments = [1.0, g1 / (g1 + 1) * t / end, g1 / (g1 + 2) * (t / end) ** 2,
                   g1 * (decay / t) ** g1 * special.gamma(g1) * special.gammainc(g1, t / decay),
                   g1 / (g1 + 0.5) * (t / end) ** 0.5]
        return torch.tensor(moments, dtype=torch.float64)

    squared = [end, end / 3, end / 5, decay / 2 * (1 - math.exp(-2 * end / decay)), end / 2]  # int_0^T theta^2
    errors = {}
    for count in (10, 20):
        folder = tmp_path / f"snapshots{count}"
        write_snapshots(folder, np.linspace(end / count, end, count), (0.05, 0.10), closed)
        for sigma_rel in (0.03, 0.075, 0.15, 0.2):
            (state,), (record,), _ = reconstruct(folder, [sigma_rel])
            gamma = sigma_rel_to_gamma(sigma_rel)
            exact = closed(end, gamma)
            norm = math.sqrt(profile_inner_products(end, gamma, end, gamma))
            bound = record["fit_error"] * norm * torch.tensor(squared, dtype=torch.float64).sqrt()
            error = (state["w"] - exact).abs()
            assert (error <= bound * (1 + 1e-6) + 1e-12).all(), (sigma_rel, error, bound)
            assert int(state["count"]) == count  # buffers: the newest snapshot's
            errors[count, sigma_rel] = float((error / exact.abs()).max())
    print({k: f"{v:.2e}" for k, v in errors.items()})
    assert errors[20, 0.03] < 2e-3 and errors[20, 0.075] < 2.5e-4 and errors[20, 0.15] < 5e-3 and errors[20, 0.2] < 5e-2
    assert all(errors[20, s] < errors[10, s] for s in (0.03, 0.075, 0.15, 0.2))


def test_a_stored_profile_is_reconstructed_exactly(tmp_path):
    """The target equal to a tracked profile at the newest snapshot: the coefficients pick that snapshot alone."""
    write_snapshots(tmp_path, [100.0, 200.0, 300.0], (0.05, 0.10),
                    lambda t, g: torch.tensor([t * g, math.sin(t + g)], dtype=torch.float64))
    (state,), (record,), newest = reconstruct(tmp_path, [0.10])
    torch.testing.assert_close(state["w"], newest["profiles"][1]["w"], rtol=1e-9, atol=1e-9)
    assert record["fit_error"] < 1e-6 and record["coefficient_sum"] == pytest.approx(1.0, abs=1e-9)


def test_coefficients_match_least_squares_over_sampled_profiles():
    """solve_coefficients against lstsq on the profiles sampled on a fine grid of tau (the L2 problem of
    Appendix C.3 discretised, without the closed-form inner products)."""
    times, gammas = np.repeat([0.25, 0.5, 0.75, 1.0], 2), np.tile([sigma_rel_to_gamma(0.05),
                                                                   sigma_rel_to_gamma(0.10)], 4)
    target = sigma_rel_to_gamma(0.15)
    x, fit_error = solve_coefficients(times, gammas, 1.0, target)
    tau = (np.arange(400_000) + 0.5) / 400_000  # midpoints on [0, 1]
    sampled = np.where(tau[None] <= times[:, None], (gammas[:, None] + 1) * tau[None] ** gammas[:, None]
                       / times[:, None] ** (gammas[:, None] + 1), 0.0)
    wanted = (target + 1) * tau**target
    grid_x = np.linalg.lstsq(sampled.T, wanted, rcond=None)[0]
    np.testing.assert_allclose(x, grid_x, rtol=2e-3, atol=2e-3 * np.abs(x).max())
    fit = np.sqrt(np.mean((sampled.T @ x - wanted) ** 2) / np.mean(wanted**2))
    assert fit_error == pytest.approx(fit, rel=1e-3)


# ------------------------------------------------------------------------------------------------ proof 2

TINY_TRAINING = ["network.model_channels=8", "data.batch_size=16", "trainer=cpu", "trainer.max_steps=40",
                 "logger=csv", "callbacks.progress=null", "callbacks.sample_grid=null",
                 "callbacks.checkpoint_best=null", "++trainer.enable_progress_bar=false",
                 "trainer.check_val_every_n_epoch=null", "++trainer.limit_val_batches=0", "callbacks/posthoc_ema=edm2",
                 "callbacks.posthoc_ema.every_n_steps=2"]


def test_a_third_profile_tracked_in_training_equals_its_reconstruction(tmp_path):
    """One run tracks sigma_rel 0.05 and 0.10 (a snapshot every 2 steps) and, in a second callback, 0.075 directly.
    ``lightning-diff posthoc-ema`` rebuilds 0.075 from the first two's 20 snapshots; the checkpoint it writes loads
    (EMA weights, sigma_rel in its run config, records and the leaderboard's options column) and equals the directly
    tracked profile: measured max |difference| 3.5e-5, 3.4e-5 of the weights' norm (asserted < 1e-4) and 0.5% of the
    distance between the 0.05 and 0.10 profiles (asserted < 2%). The profile fit error is 2.3e-3; the weights' error
    is almost all (sum of the coefficients - 1) = 3.4e-5 times the weights: Appendix C.3's least squares does not make
    the coefficients sum to 1, more snapshots bring it closer."""
    third = tmp_path / "third"
    overrides = [*TINY_TRAINING, "+callbacks.third._target_=lightning_diff.callbacks.PostHocEMA",
                 "+callbacks.third.sigma_rels=[0.075]", "+callbacks.third.every_n_steps=1000",
                 f"+callbacks.third.dirpath={third}"]
    train(compose_config("train", overrides, tmp_path))
    snapshots = tmp_path / "posthoc_ema"
    assert sorted(p.name for p in snapshots.iterdir()) == [snapshot_name(s) for s in range(2, 41, 2)]
    assert [p.name for p in third.iterdir()] == [snapshot_name(40)]  # written when training ended

    (record,) = posthoc_ema(snapshots, [0.075], out=tmp_path / "out")
    assert record["checkpoint"] == str(tmp_path / "out" / checkpoint_name(0.075))
    direct = load_checkpoint(third / snapshot_name(40))
    assert direct[SNAPSHOT_KEY]["images"] == record["images"] == 40 * 16 and record["snapshots"] == 20
    module = load_module(record["checkpoint"])
    assert module.weights == "ema" and module.run_config["posthoc_ema"]["sigma_rel"] == 0.075
    rebuilt, tracked = module.state_dict(), direct["profiles"][0]
    assert rebuilt.keys() == tracked.keys()
    difference = torch.cat([(rebuilt[k] - tracked[k]).flatten() for k in direct[SNAPSHOT_KEY]["averaged"]])
    norm = torch.cat([tracked[k].flatten() for k in direct[SNAPSHOT_KEY]["averaged"]]).norm()
    short, long = load_checkpoint(snapshots / snapshot_name(40))["profiles"]
    spread = torch.cat([(short[k] - long[k]).flatten() for k in direct[SNAPSHOT_KEY]["averaged"]]).norm()
    print(f"max |difference| {difference.abs().max():.3g}, relative {difference.norm() / norm:.3g}, "
          f"relative to ||p_0.05 - p_0.10|| {difference.norm() / spread:.3g}, fit error {record['fit_error']:.3g}, "
          f"coefficient sum - 1 {record['coefficient_sum'] - 1:.3g}")
    assert float(difference.norm() / norm) < 1e-4 and float(difference.norm() / spread) < 0.02
    # what sample / evaluate do with it
    assert module.sample([0, 1], sampler={"name": "euler", "steps": 2}).isfinite().all()
    run = run_description(record["checkpoint"], module.run_config, step=40)
    assert run["sigma_rel"] == 0.075 and run["training_step"] == 40
    assert "sigma_rel=0.075" in _options_text({"name": "heun"}, None, run)
    with pytest.raises(ValueError, match="weights=raw.*sigma_rel=0.075.*allowed: weights=ema"):
        load_module(record["checkpoint"], weights="raw")


class Line(pl.LightningModule):
    """One weight vector fitted by SGD; the data are the batch's images."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.ones(4))

    def training_step(self, batch, batch_idx):
        return ((batch[0] - self.w) ** 2).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def fit(steps: int, folder, ckpt_path=None):
    """``steps`` optimizer steps of 2 batches of 4 (a data loader that resumes mid-epoch, as training's)."""
    data = ResumableDataLoader(TensorDataset(torch.linspace(-1, 1, 48 * 4).reshape(48, 4)), batch_size=4)
    callback = PostHocEMA(sigma_rels=[0.05, 0.2], every_n_steps=3, dirpath=str(folder / "snapshots"))
    trainer = pl.Trainer(max_steps=steps, logger=False, enable_progress_bar=False, enable_model_summary=False,
                         accelerator="cpu", default_root_dir=folder, enable_checkpointing=False,
                         accumulate_grad_batches=2, callbacks=[callback])
    trainer.fit(Line(), data, ckpt_path=ckpt_path)
    return trainer


def test_a_resumed_run_writes_the_snapshots_of_an_uninterrupted_one(tmp_path):
    """4 + 5 optimizer steps (resumed from a checkpoint, 2 batches per step) give the snapshots of 9 steps in one go."""
    fit(9, tmp_path / "whole")
    trainer = fit(4, tmp_path / "parts")
    trainer.save_checkpoint(tmp_path / "parts" / "step4.ckpt")
    fit(9, tmp_path / "parts", ckpt_path=tmp_path / "parts" / "step4.ckpt")
    names = [snapshot_name(s) for s in (3, 4, 6, 9)]  # 4: the first run's end
    assert sorted(p.name for p in (tmp_path / "parts" / "snapshots").iterdir()) == names
    for name in (snapshot_name(6), snapshot_name(9)):
        whole, parts = (load_checkpoint(tmp_path / run / "snapshots" / name) for run in ("whole", "parts"))
        assert whole[SNAPSHOT_KEY] == parts[SNAPSHOT_KEY] and whole[SNAPSHOT_KEY]["images"] == int(name[9:16]) * 8
        for a, b in zip(whole["profiles"], parts["profiles"], strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=0)


# ------------------------------------------------------------------------------------------------ bad input

@pytest.mark.parametrize("value", [0, 0.0, -0.1, 0.31, 1, math.nan, "abc", True, None])
def test_sigma_rel_outside_its_range_is_refused_naming_it(value):
    with pytest.raises(ValueError, match=r"sigma_rel=.* is invalid; allowed: a number in \(0, 0\.3003\)"):
        check_sigma_rel(value)
    with pytest.raises(ValueError, match=r"callbacks\.posthoc_ema\.sigma_rels=.*allowed"):
        PostHocEMA(sigma_rels=[0.05, value])


def test_the_command_check_refuses_bad_settings_naming_them():
    cfg = compose(["ckpt_dir=snapshots"], "posthoc-ema")
    check_settings(cfg, "posthoc-ema")
    for value in (0.4, [], [0.1, 0.0], "abc"):
        bad = copy.deepcopy(cfg)
        OmegaConf.update(bad, "sigma_rel", value, merge=False)
        with pytest.raises(ValueError, match=r"sigma_rel=.* is invalid; allowed: a number in \(0, 0\.3003\)"):
            check_settings(bad, "posthoc-ema")
    with pytest.raises(ValueError, match="every_n_steps=0 is invalid; allowed: an integer >= 1"):
        PostHocEMA(every_n_steps=0)
    with pytest.raises(ValueError, match="sigma_rels=.*distinct"):
        PostHocEMA(sigma_rels=[0.1, 0.1])


def test_an_empty_or_missing_ckpt_dir_is_refused_naming_it(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"ckpt_dir=.*empty holds no snapshot-<step>\.pt files; allowed: the "
                                         r"snapshot folder of a run trained with callbacks/posthoc_ema=edm2"):
        posthoc_ema(tmp_path / "empty", [0.1])
    with pytest.raises(ValueError, match=r"ckpt_dir=.*missing is not a folder; allowed"):
        posthoc_ema(tmp_path / "missing", [0.1])
    assert not (tmp_path / "missing").exists()  # nothing was created
    write_snapshots(tmp_path / "mixed", [1.0, 2.0], (0.05, 0.1), lambda t, g: torch.zeros(2))
    torch.save({FORMAT_KEY: CHECKPOINT_FORMAT, SNAPSHOT_KEY: {"step": 3, "images": 3.0, "sigma_rels": [0.1],
                                                               "gammas": [6.9], "averaged": ["w"]},
                "profiles": [{"w": torch.zeros(5), "count": torch.tensor(0)}]},
               tmp_path / "mixed" / snapshot_name(3))
    with pytest.raises(ValueError, match=r"ckpt_dir=.*snapshot-0000003\.pt holds other weights.*one run's"):
        posthoc_ema(tmp_path / "mixed", [0.1])


@pytest.mark.slow
def test_the_experiment_quick_run_writes_its_table_record_and_figure(tmp_path):
    """experiments/posthoc_ema/run.py --quick: a 4-step model, every length reconstructed and scored."""
    run_experiment_quick("posthoc_ema", "--out", str(tmp_path))
    rows = json.loads((tmp_path / "results.json").read_text())["rows"]
    assert [r["sigma_rel"] for r in rows] == [0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.2, 0.25]
    assert all(math.isfinite(r["fd"]) for r in rows) and (tmp_path / "posthoc_ema.png").is_file()
    assert "(best)" in (tmp_path / "table.md").read_text()
