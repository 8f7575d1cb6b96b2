"""A 2-job Hydra multirun on toy2d: each job is its own offline W&B run in the experiment's group, with its
own config and metrics, closed before the next job starts (read back from the runs' ``.wandb`` files)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from lightning_diff.config import CONFIG_DIR

from .helpers import wandb_run_summary

ROOT = Path(__file__).resolve().parent.parent


def test_multirun_makes_one_wandb_run_per_job_in_one_group(tmp_path):
    sweep_dir = tmp_path / "sweep"
    overrides = ["-m", "data=toy2d", "data.num_samples=256", "data.batch_size=64", "network=mlp",
                 "network.hidden=16", "network.depth=1", "trainer.max_steps=3", "trainer.log_every_n_steps=1",
                 "trainer.enable_progress_bar=false", "callbacks.sample_grid=null", "callbacks.progress=null",
                 "experiment_name=sweep_test", "optimized_metric=train/loss", f"hydra.sweep.dir={sweep_dir}",
                 "optimizer.lr=0.001,0.002"]
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true", "OMP_NUM_THREADS": "1"}
    env.pop("WANDB_API_KEY", None)
    run = subprocess.run([sys.executable, "-m", "lightning_diff.cli.train", *overrides], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=400)
    assert run.returncode == 0, run.stderr[-4000:]
    files = [next((sweep_dir / str(job)).glob("wandb/offline-run-*/run-*.wandb")) for job in (0, 1)]
    runs = [wandb_run_summary(path) for path in files]
    assert runs[0]["id"] != runs[1]["id"]
    assert [r["group"] for r in runs] == ["sweep_test", "sweep_test"]
    assert [r["config"]["optimizer"]["lr"] for r in runs] == [0.001, 0.002]
    for r in runs:
        assert r["exited"]  # wandb.finish() closed the job's run
        assert r["config"]["evaluation_weights"] == "ema"  # which weights the results come from
        assert len(r["history"]["train/loss"]) == 3
        assert r["commit"]  # W&B recorded the git commit
    overrides_of_job = yaml.safe_load((sweep_dir / "1" / ".hydra" / "overrides.yaml").read_text())
    assert "optimizer.lr=0.002" in overrides_of_job


def test_wandb_sweep_parameters_are_hydra_overrides():
    from omegaconf import OmegaConf

    from lightning_diff.cli.train import compose

    sweep = yaml.safe_load((ROOT / "sweeps" / "toy2d_lr.yaml").read_text())
    fixed = [arg for arg in sweep["command"] if "=" in arg and not arg.startswith("${")]
    for key, spec in sweep["parameters"].items():
        value = spec["values"][-1] if "values" in spec else spec["max"]
        cfg = compose([*fixed, f"{key}={value}", "paths.output_dir=."])
        if "." in key:  # a setting
            assert OmegaConf.select(cfg, key) == value
        else:  # a config group
            assert cfg[key]["_target_"].startswith("lightning_diff.")


def test_optuna_sweep_returns_the_optimised_metric(tmp_path):
    """hparams_search=toy2d_optuna: two Optuna trials, each a training job whose return value (the
    optimised metric) the sweeper records; the best value is the smaller of the two."""
    sweep_dir = tmp_path / "optuna"
    overrides = ["hparams_search=toy2d_optuna", "data=toy2d", "data.num_samples=256", "network=mlp",
                 "network.hidden=16", "network.depth=1", "trainer.max_steps=3", "trainer.enable_progress_bar=false",
                 "callbacks.sample_grid=null", "callbacks.progress=null", "logger=csv", "optimized_metric=train/loss",
                 "hydra.sweeper.n_trials=2", "hydra.sweeper.sampler.n_startup_trials=2", f"hydra.sweep.dir={sweep_dir}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, "-m", "lightning_diff.cli.train", *overrides], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=400)
    assert run.returncode == 0, run.stderr[-4000:]
    result = yaml.safe_load((sweep_dir / "optimization_results.yaml").read_text())
    losses = [float(line.split("optimized_metric train/loss:")[1]) for job in (0, 1)
              for line in (sweep_dir / str(job) / "train.log").read_text().splitlines()
              if "optimized_metric train/loss:" in line]
    assert result["name"] == "optuna" and set(result["best_params"]) == {
        "optimizer.lr", "callbacks.ema.decay.rampup_ratio", "data.batch_size"}
    assert len(losses) == 2 and result["best_value"] == pytest.approx(min(losses), rel=1e-6)


def test_slurm_launcher_config_composes():
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose("train", overrides=["launcher=slurm", "trainer=ddp"], return_hydra_config=True)
    assert cfg.hydra.launcher._target_.endswith("SlurmLauncher")
    assert cfg.hydra.launcher.tasks_per_node == cfg.hydra.launcher.gpus_per_node == 8
