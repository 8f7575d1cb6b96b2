"""Progressive distillation (Salimans & Ho 2022; lightning_diff.methods.distillation, docs/distillation.md).

Oracles: (1) the target equals Algorithm 2 written in the paper's VP frame (z_t = alpha_t y + sigma_t eps), computed
here independently in float64 with the exact Gaussian-mixture denoiser as the teacher, and equals the target solved
from our DDIM sampler's two steps on a grid that ends above 0; (2) after training on that teacher, one student DDIM
step reproduces two teacher DDIM steps on a 2-D toy (stated tolerances), and the 2-step student is far closer to the
4-step teacher than the teacher's own 2-step DDIM; (3) the weightings are the paper's (SNR + 1 makes the loss the
v-MSE of a v-prediction student).
"""

import functools
import math

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from lightning_diff import formulations, sampling
from lightning_diff.analytic import GaussianMixture
from lightning_diff.cli.distill import distill
from lightning_diff.denoiser import Denoiser
from lightning_diff.methods.distillation import ProgressiveDistillation, distillation_target, loss_weight, round_grids
from lightning_diff.networks import MLP

from .helpers import compose_config, load_experiment, run_experiment_quick

f64 = torch.float64
MIX = GaussianMixture([[-1.0, 0.5], [1.0, -0.5], [0.3, 1.2]], [0.3, 0.4, 0.25], [0.5, 0.3, 0.2])
GRID = torch.tensor([10.0, 3.0, 1.0, 0.3, 0.0], dtype=f64)  # 4 teacher steps; the student takes GRID[::2]


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


def _trainer(max_steps):
    import pytorch_lightning as pl

    return pl.Trainer(max_steps=max_steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                      enable_model_summary=False, accelerator="cpu")


def _algorithm_2_vp(x, s0, s1, s2):
    """Salimans & Ho 2022 Algorithm 2 in their VP frame, float64: alpha = 1/sqrt(1 + sigma^2), sigma_t = alpha sigma."""
    alpha = [1 / math.sqrt(1 + s**2) for s in (s0, s1, s2)]
    sig_t = [a * s for a, s in zip(alpha, (s0, s1, s2), strict=True)]
    x_hat = lambda z, k, s: MIX(z / alpha[k], torch.full((z.shape[0],), s, dtype=f64))  # noqa: E731
    z = alpha[0] * x
    xh = x_hat(z, 0, s0)
    z1 = alpha[1] * xh + sig_t[1] / sig_t[0] * (z - alpha[0] * xh)
    xh1 = x_hat(z1, 1, s1)
    z2 = alpha[2] * xh1 + sig_t[2] / sig_t[1] * (z1 - alpha[1] * xh1)
    ratio = sig_t[2] / sig_t[0]
    return (z2 - ratio * z) / (alpha[2] - ratio * alpha[0])


@pytest.mark.parametrize("levels", [(10.0, 3.0, 1.0), (1.0, 0.3, 0.0), (80.0, 20.0, 5.0), (0.5, 0.1, 0.02)])
def test_target_is_algorithm_2(levels):
    g = torch.Generator().manual_seed(0)
    x = MIX.sample(64, generator=g) + levels[0] * torch.randn(64, 2, generator=g, dtype=f64)
    sig = [torch.full((64,), s, dtype=f64) for s in levels]
    target = distillation_target(MIX, x, *sig)
    assert (target - _algorithm_2_vp(x, *levels)).abs().max() < 1e-12
    # The same target from our DDIM sampler's two steps on a grid that ends at sigma'' (> 0 or 0).
    x_next = sampling.ddim(MIX, x, torch.tensor(levels, dtype=f64))
    ratio = levels[2] / levels[0]
    assert (target - (x_next - ratio * x) / (1 - ratio)).abs().max() < 1e-12


def test_weightings_are_the_papers():
    sigma = torch.tensor([0.01, 0.5, 1.0, 2.0, 80.0], dtype=f64)
    snr = sigma**-2
    assert torch.equal(loss_weight(sigma, "truncated_snr"), torch.maximum(snr, torch.ones_like(snr)))
    # SNR + 1 = 1 / c_out^2 of a v-prediction VP student: the weighted x-loss is the MSE on v.
    c_out = formulations.get("vp", prediction="v").c_out(sigma)
    torch.testing.assert_close(loss_weight(sigma, "snr_plus_one") * c_out**2, torch.ones_like(sigma))
    with pytest.raises(ValueError, match="weighting='snr'.*allowed: truncated_snr, snr_plus_one"):
        loss_weight(sigma, "snr")


def test_round_grids_halve_the_steps():
    base = torch.linspace(8, 0, 9, dtype=f64)
    grids = round_grids(base, 3)
    assert [g.numel() - 1 for g in grids] == [8, 4, 2, 1]
    assert torch.equal(grids[2], base[::4]) and grids[3].tolist() == [8.0, 0.0]
    with pytest.raises(ValueError, match="rounds=4 with a base grid of 8 steps is invalid"):
        round_grids(base, 4)


def test_student_step_reproduces_two_teacher_ddim_steps():
    """The exact mixture denoiser teaches a small v-prediction MLP (VP) on GRID for 400 Adam steps."""
    torch.manual_seed(0)
    student = Denoiser(MLP(dim=2, hidden=64, depth=2, emb_channels=32), formulations.get("vp", prediction="v"))
    module = ProgressiveDistillation(MIX, functools.partial(torch.optim.Adam, lr=5e-3), student=student, steps=4,
                                     rounds=1, steps_per_round=400, sigmas=GRID, data_shape=(2,), quality_samples=512)
    data = MIX.sample(20000, generator=torch.Generator().manual_seed(1)).float()
    _trainer(400).fit(module, DataLoader(TensorDataset(data), batch_size=512, shuffle=True))
    g = torch.Generator().manual_seed(5)
    y = MIX.sample(2000, generator=g)
    for s0, s1, s2 in ((10.0, 3.0, 1.0), (1.0, 0.3, 0.0)):
        x = y + s0 * torch.randn(y.shape, generator=g, dtype=f64)
        one = sampling.ddim(module.student, x, torch.tensor([s0, s2], dtype=f64))  # one student step
        two = sampling.ddim(MIX, x, torch.tensor([s0, s1, s2], dtype=f64))  # two teacher steps
        rms = (one - two).pow(2).mean().sqrt().item()
        assert rms < 0.03, (s0, rms)  # data scale: the mixture's std is ~0.8
    record = module.history[-1]
    assert record["round"] == 0 and record["steps"] == 2
    # The 2-step student vs the 4-step teacher, and the teacher's own 2-step DDIM, on 512 fixed seeds.
    assert record["student_rms_to_base"] < 0.03 and record["teacher_rms_to_base"] > 0.15, record


def test_rounds_halve_steps_and_each_student_starts_as_its_teacher():
    torch.manual_seed(0)
    teacher = Denoiser(MLP(dim=2, hidden=16, depth=1, emb_channels=8), formulations.get("edm"))
    module = ProgressiveDistillation(teacher, functools.partial(torch.optim.Adam, lr=1e-3), steps=8, rounds=2,
                                     steps_per_round=2, data_shape=(2,), quality_samples=8)
    x, sigma = torch.randn(4, 2), torch.full((4,), 2.0)
    assert torch.equal(module.student(x, sigma), teacher(x, sigma))
    assert not any(p.requires_grad for p in module.teacher.parameters())
    _trainer(4).fit(module, DataLoader(TensorDataset(MIX.sample(64).float()), batch_size=16))
    assert [(r["round"], r["steps"]) for r in module.history] == [(0, 4), (1, 2)]
    assert {"student_rms_to_base", "teacher_rms_to_base"} <= set(module.history[0])
    assert module.teacher is not module.reference  # round 1 was taught by round 0's student
    # the rms_to_base baseline is sampled once: the round-0 teacher's 8-step DDIM on the quality seeds
    assert module.base_samples() is module.base_samples()
    assert torch.equal(module.base_samples(), module.ddim_samples(teacher, module.grids[0], range(8)))
    with pytest.raises(ValueError, match="not an nn.Module.*allowed: pass student="):
        ProgressiveDistillation(MIX, steps=4, rounds=1)


def test_cli_distils_a_train_checkpoint(digits_ckpt, tmp_path):
    from lightning_diff.cli.main import COMMANDS
    from lightning_diff.training.builders import load_module

    assert COMMANDS["distill"][0] == "lightning_diff.cli.distill"
    cfg = compose_config("distill", [f"ckpt={digits_ckpt}", "steps=4", "rounds=2", "steps_per_round=1",
                                     "quality_samples=4", "data.batch_size=8", "trainer=cpu", "logger=csv"], tmp_path)
    result = distill(cfg)
    assert [r["steps"] for r in result["history"]] == [2, 1] and len(result["sigmas"]) == 2
    student = load_module(result["student"])
    assert student.grid.tolist() == result["sigmas"]  # lightning-diff sample uses the distilled levels
    images = student.sample(range(3), sampler={"name": "ddim"})
    assert images.shape == (3, 1, 8, 8) and torch.isfinite(images).all()
    torch.testing.assert_close(images, student.sample(range(3), sigmas=torch.tensor(result["sigmas"]),
                                                      sampler={"name": "ddim"}), rtol=0, atol=0)
    # evaluation records say so: the levels sampled on, not the formulation's default grid
    from lightning_diff.sampling.settings import SamplerSettings

    own = SamplerSettings(name="ddim").record(student.formulation, student.grid)
    assert own["steps"] == 1 and own["time_steps"] == {"sigmas": result["sigmas"]}
    assert "time_steps" not in SamplerSettings(name="ddim", steps=4).record(student.formulation, student.grid)
    # lightning-diff sample/evaluate without a sampler run the student's DDIM (before: EDM's Heun on its grid)
    settings, _ = SamplerSettings.of_run(student.run_config, {"name": None})
    assert settings.name == "ddim"


def test_repro_table_puts_each_round_in_its_row():
    run = load_experiment("repro_distillation")  # here, not at import: matplotlib
    history = [{"steps": n, **{f"{who}_{k}": float(n + (who == "teacher")) for who in ("student", "teacher")
                               for k in ("fd", "rms_to_base", "realistic")}} for n in (32, 16)]
    lines = run.round_table(history, {"fd": 9.0, "rms_to_base": 0.0, "realistic": 0.5}).splitlines()
    assert lines[0] == ("| DDIM steps | student fd | teacher fd | student rms_to_base | teacher rms_to_base | "
                        "student realistic | teacher realistic |")
    assert lines[2] == "| 64 (teacher) | 9 | 9 | 0 | 0 | 0.5 | 0.5 |"
    assert lines[4] == "| 16 | 16 | 17 | 16 | 17 | 16 | 17 |"


@pytest.mark.slow
def test_repro_quick_run_writes_table_record_and_figure(tmp_path):
    import json

    run_experiment_quick("repro_distillation", "--out", str(tmp_path), timeout=900)
    record = json.loads((tmp_path / "results.json").read_text())
    assert [r["steps"] for r in record["history"]] == [32, 16]
    assert all(math.isfinite(r["student_fd"]) and 0 <= r["teacher_realistic"] <= 1 for r in record["history"])
    assert "| 64 (teacher) |" in (tmp_path / "table.md").read_text()
    assert (tmp_path / "distillation.png").stat().st_size > 10_000
