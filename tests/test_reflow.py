"""Reflow (``lightning_diff.methods.reflow``; Liu, Gong & Liu 2023) against closed forms.

Gaussian to Gaussian: for data ``N(mu, s^2 I)`` and noise ``z ~ N(0, I)`` the exact 1-rectified flow (the ideal
denoiser of the data) moves ``z`` along ``x_t = (1 - t) mu + sigma_t z`` with ``sigma_t = sqrt((1 - t)^2 s^2 + t^2)``
(the flow of a Gaussian path is affine), so its coupling is ``z -> mu + s z``, the optimal-transport map, and its
straightness (Liu et al. Sec. 3: ``S = int E ||(z - x_0) - dx_t/dt||^2 dt``) is

    S = ||z||^2 int_0^1 (sigma_t' - (1 - s))^2 dt   per trajectory,   sigma_t' = (t - (1 - t) s^2) / sigma_t,

while the rectified flow of that coupling (one reflow) is exactly straight: ``E[y | (1 - t) y + t z = x]`` with
``y = mu + s z`` is a deterministic function of x and S = 0. On a 2-D mixture of two Gaussians, one reflow trained on
the exact 1-rectified flow's coupling must shrink S and bring 1-step Euler samples to the data.
"""

import functools
import math
import subprocess
import sys

import hydra
import pytest
import pytorch_lightning as pl
import torch
from scipy.integrate import quad

from lightning_diff import sampling
from lightning_diff.analytic import GaussianMixture
from lightning_diff.denoiser import Denoiser
from lightning_diff.formulations import RectifiedFlow
from lightning_diff.methods import reflow
from lightning_diff.networks import MLP
from lightning_diff.objectives import Reflow
from lightning_diff.sampling.settings import SamplerSettings
from lightning_diff.training.module import DiffusionModule

from .helpers import compose_config

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny networks: one intra-op thread

MU, S = torch.tensor([1.0, -0.5]), 0.5  # the Gaussian data N(MU, S^2 I)
T_MAX = 1 - 1e-3  # RectifiedFlow's default t_max: the ODE starts at x = T_MAX z, not at t = 1


class CoupledGaussian:
    """The exact velocity field of the reflowed Gaussian coupling ``y = MU + S z`` as a sigma-frame denoiser:
    ``D(x; sigma) = E[y | x_t]`` with ``x_t = x / (1 + sigma)``, ``t = sigma / (1 + sigma)``, ``z = (x_t - (1 - t) MU) /
    ((1 - t) S + t)``."""

    def __call__(self, x, sigma, **cond):
        sigma = sigma.reshape(-1, 1).to(torch.float64)
        t, x_t = sigma / (1 + sigma), x.to(torch.float64) / (1 + sigma)
        return (MU + S * (x_t - (1 - t) * MU) / ((1 - t) * S + t)).to(x.dtype)


def closed_form_straightness(t_max=T_MAX) -> float:
    """``int (sigma_t' - (1 - s))^2 dt`` over ``[0, t_max]`` divided by ``t_max`` (the mean the grid takes)."""
    def slope(t):
        return (t - (1 - t) * S**2) / math.sqrt((1 - t) ** 2 * S**2 + t**2)

    return quad(lambda t: (slope(t) - (1 - S)) ** 2, 0, t_max)[0] / t_max


def noise(count, first=0):
    return sampling.PerSampleGenerator(range(first, first + count)).randn((count, 2), dtype=torch.float64)


def test_exact_rectified_flow_couples_gaussians_by_the_ot_map():
    data = GaussianMixture(MU, S)
    settings = SamplerSettings("heun", steps=64, batch_size=500)
    pairs = reflow.draw_couplings(data, range(1000), (2,), settings, RectifiedFlow())
    error = (pairs.samples.double() - (MU + S * pairs.noise.double())).abs().max()
    assert error < 3e-3  # measured 1.7e-3: the start at t_max misses (1 - t_max) y
    # per-sample seeds: pair i depends only on seed i
    again = reflow.draw_couplings(data, range(990, 1000), (2,), SamplerSettings("heun", steps=64, batch_size=3),
                                  RectifiedFlow())
    torch.testing.assert_close(again.samples, pairs.samples[990:], rtol=0, atol=0)
    torch.testing.assert_close(again.noise, pairs.noise[990:], rtol=0, atol=0)
    assert pairs.record["key"] is None and pairs.record["sampler"] == {"name": "heun", "steps": 64, "options": {}}


def test_straightness_of_the_exact_flows_equals_the_closed_form():
    z = noise(300)
    expected = closed_form_straightness() * z.pow(2).sum(1)
    errors = {}
    for steps in (100, 400):
        value, end = reflow.straightness(GaussianMixture(MU, S), z, steps=steps)
        errors[steps] = abs(float(value.mean() / expected.mean()) - 1)
        assert (end - (MU + S * z)).abs().max() < 2.5 / steps  # Euler's O(1/N) (measured 0.021 at N = 100)
    assert errors[400] < 1e-2 and errors[100] < 3e-2  # measured 0.6% and 2.3%: the Euler grid's O(1/N)
    assert errors[400] < errors[100] / 3
    straight, end = reflow.straightness(CoupledGaussian(), z, steps=100)
    assert float(straight.max()) < 1e-4 * float(expected.mean())  # measured 1.6e-5 relative (the start at t_max)
    one_step = sampling.euler(CoupledGaussian(), RectifiedFlow().sigma_max * z,
                              torch.tensor([RectifiedFlow().sigma_max, 0.0], dtype=torch.float64))
    assert (one_step - (MU + S * z)).abs().max() < 3e-3  # one Euler step of the reflowed field is the OT map


def test_reflow_objective_is_the_rectified_flow_loss_on_the_coupled_noise():
    torch.manual_seed(1)
    network = MLP(dim=2, hidden=16, depth=1)
    torch.nn.init.normal_(network.out[-1].weight)  # not the zero init: a non-trivial velocity
    formulation = RectifiedFlow()
    denoiser = Denoiser(network, formulation)
    y, z, t = torch.randn(8, 2), torch.randn(8, 2), torch.rand(8) * 0.9 + 0.05
    loss, _ = Reflow()(denoiser, y, noise=z, sigma=t / (1 - t))
    x_t = (1 - t[:, None]) * y + t[:, None] * z  # Liu et al. Algorithm 1: ||(X_1 - X_0) - v(X_t, t)||^2
    velocity = network(x_t, formulation.t_scale * t)
    torch.testing.assert_close(loss, ((z - y) - velocity).pow(2).mean(1), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="objective=reflow.*data=reflow_pairs"):
        Reflow()(denoiser, y)
    objective = hydra.utils.instantiate(compose_config("train", ["objective=reflow"]).objective)
    assert type(objective) is Reflow


@pytest.mark.parametrize("name, options, match", [("ddpm", {}, "sampler=ddpm"),
                                                  ("heun", {"S_churn": 1.0}, "S_churn=1.0"),
                                                  ("ddim", {"eta": 1.0}, "eta=1.0")])
def test_stochastic_samplers_are_refused(name, options, match):
    settings = SamplerSettings(name, steps=4, options=options)
    with pytest.raises(ValueError, match=match):
        reflow.draw_couplings(GaussianMixture(MU, S), range(2), (2,), settings, RectifiedFlow())


def test_pairs_file_and_data_module(tmp_path):
    network = MLP(dim=2, hidden=8, depth=1)
    denoiser = Denoiser(network, RectifiedFlow())
    pairs = reflow.draw_couplings(denoiser, range(50), (2,), SamplerSettings("euler", steps=3), RectifiedFlow(),
                                  source="ckpt")
    path = reflow.save_couplings(pairs, tmp_path / "pairs.pt")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pairs.pt"]  # no temporary file left
    loaded = reflow.load_couplings(path)
    torch.testing.assert_close(loaded.samples, pairs.samples, rtol=0, atol=0)
    assert len(loaded.record["key"]) == 64 and loaded.record["source"] == "ckpt"
    network.inp.bias.data += 1  # other weights: another key
    assert reflow.draw_couplings(denoiser, range(2), (2,), SamplerSettings("euler", steps=3),
                                 RectifiedFlow()).record["key"] != loaded.record["key"]
    data = reflow.ReflowPairsDataModule(str(path), batch_size=16, val_fraction=0.2)
    assert data.data_shape == (2,) and data.transform.bits is None
    y, labels, extra = next(iter(data.train_dataloader()))
    assert y.shape == (16, 2) and labels.shape == (16,) and extra["noise"].shape == (16, 2)
    row = int((pairs.samples == y[0]).all(1).nonzero()[0, 0])  # each sample keeps its own noise
    torch.testing.assert_close(extra["noise"][0], pairs.noise[row], rtol=0, atol=0)
    assert len(data.val_set) == 10 and len(data.train_set) == 40
    torch.save({"format": "other"}, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match="has format 'other'"):
        reflow.load_couplings(tmp_path / "bad.pt")


def test_one_reflow_straightens_a_mixture_and_improves_one_step_samples(tmp_path):
    """The exact 1-rectified flow of two Gaussians (the mixture's ideal denoiser) draws 8192 pairs; a small MLP trained
    400 steps on them with objective=reflow (DiffusionModule, ReflowPairsDataModule) is the 2-rectified flow."""
    mixture = GaussianMixture(torch.tensor([[-1.5, 0.0], [1.5, 0.0]]), 0.2)
    formulation = RectifiedFlow()
    pairs = reflow.draw_couplings(mixture, range(8192), (2,), SamplerSettings("heun", steps=32, batch_size=8192),
                                  formulation)
    path = reflow.save_couplings(pairs, tmp_path / "pairs.pt")
    pl.seed_everything(0)
    module = DiffusionModule(MLP(dim=2, hidden=64, depth=2), formulation, data_shape=(2,), objective=Reflow(),
                             optimizer=functools.partial(torch.optim.Adam, lr=3e-3))
    trainer = pl.Trainer(max_steps=400, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0)
    trainer.fit(module, datamodule=reflow.ReflowPairsDataModule(str(path), batch_size=256))
    module.eval()
    z = noise(1000, first=10**6)  # held-out noise
    data = mixture.sample(1000, torch.Generator().manual_seed(5))
    grid = torch.tensor([formulation.sigma_max, 0.0], dtype=torch.float64)
    results = {}
    with torch.no_grad():
        for name, field in (("1-rf", mixture), ("2-rf", module.denoiser)):
            value, _ = reflow.straightness(field, z, steps=100)
            one_step = sampling.euler(field, formulation.sigma_max * z, grid)
            results[name] = (float(value.mean()), reflow.empirical_w2(one_step, data),
                             float(mixture.log_prob(one_step).mean()))
    (s1, w1, ll1), (s2, w2, ll2) = results["1-rf"], results["2-rf"]
    # measured: S 0.89 -> 0.0037, 1-step W2 1.51 -> 0.18, 1-step log-likelihood -26.7 -> -1.0 nats (data: -0.27)
    assert s2 < s1 / 20, results
    assert w2 < w1 / 3 and w2 < 0.5, results
    assert ll2 > ll1 + 10 and ll2 > -3, results


@pytest.mark.slow  # two training runs and a subprocess: ~50 s on a loaded 2-core machine
def test_cli_draws_pairs_and_trains_the_next_flow(tmp_path):
    from lightning_diff.cli.train import train
    from lightning_diff.training.builders import load_module

    common = ["logger=csv", "callbacks.progress=null", "++trainer.enable_progress_bar=false",
              "callbacks.sample_grid=null", "formulation=rf", "network=mlp", "network.hidden=16", "network.depth=1",
              "trainer=cpu", "trainer.max_steps=3", "data.batch_size=64", "sampler=euler", "sampler.steps=4"]
    first = train(compose_config("train", [*common, "data=toy2d", "data.num_samples=256",
                                           "data.num_val_samples=64"], tmp_path / "run1"))
    out = tmp_path / "pairs.pt"
    cmd = [sys.executable, "-m", "lightning_diff", "reflow", f"ckpt={first['checkpoint']}", "num_samples=200",
           f"out={out}", "sampler=euler", "sampler.steps=8", "straightness.num_samples=50", "straightness.steps=10"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "wrote 200 pairs" in proc.stdout and "straightness S = " in proc.stdout
    assert reflow.load_couplings(out).record["source"] == first["checkpoint"]
    second = train(compose_config("train", [*common, "data=reflow_pairs", f"data.path={out}", "objective=reflow"],
                                  tmp_path / "run2"))
    assert math.isfinite(second["train/loss"])
    assert type(load_module(second["checkpoint"]).objective) is Reflow
