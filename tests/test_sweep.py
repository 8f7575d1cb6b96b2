"""A 2-job Hydra multirun on toy2d: each job is its own offline W&B run in the experiment's group, with its
own config and metrics, closed before the next job starts (read back from the runs' ``.wandb`` files)."""

import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from wandb.proto import wandb_internal_pb2

ROOT = Path(__file__).resolve().parent.parent


def read_wandb_records(path: Path) -> list:
    """The protobuf ``Record`` messages of a ``.wandb`` file.

    The file is a LevelDB-style log (7-byte header ``:W&B``, magic, version; 32 KiB blocks of chunks with
    a 7-byte header: crc32, length, type 1=full 2=first 3=middle 4=last). wandb 0.31 moved its reader
    (``wandb.sdk.internal.datastore``) into its Go core, so these few lines read it here.
    """
    data, block = path.read_bytes(), 32 * 1024
    assert data[:4] == b":W&B", path
    records, pending, pos = [], b"", 7
    while pos + 7 <= len(data):
        room = block - pos % block
        if room < 7:  # a block's tail too short for a chunk header is padding
            pos += room
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        pending += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
    return records


def _run_summary(path: Path) -> dict:
    run, config, history, exited = None, {}, {}, False
    for record in read_wandb_records(path):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run = record.run
        elif kind == "config":
            config.update({i.key: json.loads(i.value_json) for i in record.config.update if i.key})
        elif kind == "history":
            for item in record.history.item:
                key = item.key or "/".join(item.nested_key)
                history.setdefault(key, []).append(json.loads(item.value_json))
        elif kind == "exit":
            exited = True
    return {"id": run.run_id, "group": run.run_group, "name": run.display_name, "commit": run.git.commit,
            "config": config, "history": history, "exited": exited}


def test_multirun_makes_one_wandb_run_per_job_in_one_group(tmp_path):
    sweep_dir = tmp_path / "sweep"
    overrides = ["-m", "data=toy2d", "data.num_samples=256", "data.batch_size=64", "network=mlp",
                 "network.hidden=16", "network.depth=1", "trainer.max_steps=3", "trainer.log_every_n_steps=1",
                 "trainer.enable_progress_bar=false", "callbacks.sample_grid=null", "callbacks.progress=null",
                 "experiment_name=sweep_test", "optimized_metric=train/loss", f"hydra.sweep.dir={sweep_dir}",
                 "optimizer.lr=0.001,0.002"]
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true", "OMP_NUM_THREADS": "1"}
    env.pop("WANDB_API_KEY", None)
    run = subprocess.run([sys.executable, "-m", "lightning_diff.train", *overrides], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=400)
    assert run.returncode == 0, run.stderr[-4000:]
    files = [next((sweep_dir / str(job)).glob("wandb/offline-run-*/run-*.wandb")) for job in (0, 1)]
    runs = [_run_summary(path) for path in files]
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

    from lightning_diff.train import compose

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
    run = subprocess.run([sys.executable, "-m", "lightning_diff.train", *overrides], cwd=ROOT, env=env,
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

    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        cfg = compose("train", overrides=["launcher=slurm", "trainer=ddp"], return_hydra_config=True)
    assert cfg.hydra.launcher._target_.endswith("SlurmLauncher")
    assert cfg.hydra.launcher.tasks_per_node == cfg.hydra.launcher.gpus_per_node == 8
