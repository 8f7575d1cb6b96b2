"""Every formulation trains, samples and evaluates with the default settings: no step count, sampler or batch
size given, so each uses its own default grid (NCSN: its 10 levels, not EDM's 18 steps)."""

import json
import math

import numpy as np
import pytest

from lightning_diff import formulations
from lightning_diff.cli import evaluate, sample
from lightning_diff.cli.train import train

from .helpers import compose_config

TINY_RUN = ["logger=csv", "callbacks.progress=null", "++trainer.enable_progress_bar=false", "data=digits",
            "network.model_channels=8", "trainer.max_steps=2", "data.batch_size=16",
            "callbacks.sample_grid.num_samples=4"]


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("reference_cache"))


@pytest.mark.parametrize("name", formulations.names())
def test_every_formulation_trains_samples_and_evaluates_with_default_settings(name, tmp_path, cache_dir, capsys):
    result = train(compose_config("train", [*TINY_RUN, f"formulation={name}"], tmp_path))
    grid = np.load(tmp_path / "samples.npz")["images"]  # the sample grid drawn when training ended
    assert grid.shape == (4, 1, 8, 8)

    out = tmp_path / "sampled"
    sample.main(compose_config("sample", [f"ckpt={result['checkpoint']}", "num_samples=3", f"out={out}"]))
    default_steps = formulations.get(name).default_sampling_steps
    assert f"heun, {default_steps} steps" in capsys.readouterr().out
    assert np.load(out / "samples.npz")["images"].shape == (3, 1, 8, 8)

    record = evaluate.evaluate(compose_config("evaluate", [  # KID: no 2048 x 2048 matrix function to wait for
        f"ckpt={result['checkpoint']}", "metrics=[kid]", "metrics.kid.subsets=2", "metrics.kid.subset_size=3",
        "metrics.num_samples=3", "metrics.reference_num_images=8", f"metrics.cache_dir={cache_dir}",
        "progress=false", "device=cpu"]))
    assert record["protocol"]["samples"]["sampler"]["steps"] == default_steps
    assert math.isfinite(json.loads(open(record["path"]).read())["metrics"]["kid_mean"])
