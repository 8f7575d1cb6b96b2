"""Resuming checks that the checkpoint belongs to the same experiment; ``init_from=`` starts a
new run from a checkpoint's weights (raw and EMA) with a fresh optimizer at step 0.

Before the check, ``formulation=edm ckpt_path=<VP checkpoint>`` ran on silently: the VP weights and Adam state went
on under EDM's loss. The oracles of ``init_from`` are the checkpoint file's own tensors and the update rules: Adam's
first step moves each weight by at most ``lr`` (Kingma & Ba 2015, Sec. 2.1: the bias-corrected ``m / sqrt(v)`` is
``g / |g|``), and the EMA update ``ema <- beta ema + (1 - beta) theta``.
"""

from pathlib import Path

import pytest
import torch

from lightning_diff.checkpoint_io import load_checkpoint

from .test_resume import _run

pytestmark = pytest.mark.usefixtures("one_thread")

LR = 1e-2  # Adam's step size in these runs: the first step moves each weight by at most this
FIXED_EMA = ["callbacks/ema=fixed", "callbacks.ema.decay.beta=0.5"]  # an average that differs from the weights


@pytest.fixture(scope="module")
def vp_run(tmp_path_factory):
    """A 3-step VP run on the tiny toy2d MLP with a fast EMA (average != weights)."""
    out = tmp_path_factory.mktemp("vp_run")
    return _run(out, 3, "~logger", "formulation=vp", f"optimizer.lr={LR}", *FIXED_EMA)["checkpoint"]


def test_resuming_another_formulations_checkpoint_is_refused_naming_both(tmp_path, vp_run):
    with pytest.raises(ValueError, match=rf"ckpt={vp_run} was trained with formulation=VP, this run asks for "
                                         rf"formulation=EDM; .*init_from={vp_run}"):
        _run(tmp_path, 6, "~logger", "formulation=edm", f"ckpt={vp_run}")
    assert not (tmp_path / "checkpoints").exists()  # refused before any step


def test_resuming_with_another_network_or_data_is_refused_naming_the_settings(tmp_path, vp_run):
    with pytest.raises(ValueError, match=r"formulation.beta_d=19.9, this run asks for formulation.beta_d=10"):
        _run(tmp_path, 6, "~logger", "formulation=vp", "formulation.beta_d=10", f"ckpt={vp_run}")
    with pytest.raises(ValueError, match=r"network.hidden=32, this run asks for network.hidden=64"):
        _run(tmp_path, 6, "~logger", "formulation=vp", "network.hidden=64", f"ckpt={vp_run}")
    with pytest.raises(ValueError, match=r"data classes=8, this run asks for data classes=2"):
        _run(tmp_path, 6, "~logger", "formulation=vp", "data.dataset=two_moons", f"ckpt={vp_run}")


def test_resuming_the_same_experiment_with_more_steps_continues(tmp_path, vp_run):
    result = _run(tmp_path, 5, "~logger", "formulation=vp", f"optimizer.lr={LR}", *FIXED_EMA, f"ckpt={vp_run}")
    assert load_checkpoint(result["checkpoint"])["global_step"] == 5


def test_init_from_loads_raw_and_ema_weights_with_a_fresh_optimizer_at_step_0(tmp_path, vp_run):
    source = load_checkpoint(vp_run)
    result = _run(tmp_path, 1, "~logger", "formulation=edm", f"optimizer.lr={LR}", "callbacks/ema=fixed",
                  f"init_from={vp_run}")
    tuned = load_checkpoint(result["checkpoint"])
    assert tuned["global_step"] == 1  # step 0 + one step, not 3 + 1
    assert all(int(s["step"]) == 1 for s in tuned["optimizer_states"][0]["state"].values())  # a fresh Adam
    beta = 0.9999  # callbacks/ema=fixed
    for name, raw in tuned["current_model_state"].items():
        start = source["current_model_state"][name]
        assert (raw - start).abs().max() <= LR * (1 + 1e-5), name  # one Adam step from the checkpoint's weights
        # the average continues the checkpoint's average (not the raw weights): one EMA update
        expected = beta * source["state_dict"][name] + (1 - beta) * raw
        torch.testing.assert_close(tuned["state_dict"][name], expected, rtol=1e-6, atol=1e-7, msg=name)
    assert tuned["run_config"]["formulation"]["_target_"].endswith(".EDM")  # the new run's config


def test_init_from_another_network_shape_or_a_missing_file_is_named(tmp_path, vp_run):
    with pytest.raises(ValueError, match=rf"init_from={vp_run}: parameter denoiser\.backbone\.\S+ has shape "
                                         r"\[\d+(, \d+)*\] in the checkpoint and \[\d+(, \d+)*\] in this run"):
        _run(tmp_path, 1, "~logger", "network.hidden=64", f"init_from={vp_run}")
    with pytest.raises(FileNotFoundError, match=rf"init_from={tmp_path}/nope.ckpt: no such file"):
        _run(tmp_path, 1, "~logger", f"init_from={tmp_path}/nope.ckpt")


def test_init_from_with_ckpt_is_refused_but_a_requeue_resumes(tmp_path, vp_run):
    with pytest.raises(ValueError, match=rf"init_from={vp_run} and ckpt={vp_run}"):
        _run(tmp_path, 6, "~logger", "formulation=vp", f"ckpt={vp_run}", f"init_from={vp_run}")
    first = _run(tmp_path, 2, "~logger", f"init_from={vp_run}", "ckpt=last_if_exists")  # first start
    assert load_checkpoint(first["checkpoint"])["global_step"] == 2
    again = _run(tmp_path, 4, "~logger", f"init_from={vp_run}", "ckpt=last_if_exists")  # requeued: resumes
    assert load_checkpoint(again["checkpoint"])["global_step"] == 4
    assert Path(again["checkpoint"]).parent == tmp_path / "checkpoints"
