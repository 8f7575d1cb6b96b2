"""Config fuzz: formulation x sampler x network (tiny sizes) x precision x step count. Every combination either
trains one step and samples, or is refused when its objects are built (config time) with an error naming the
setting, its value and what is allowed."""

import itertools
import math
import re
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lightning_diff import formulations
from lightning_diff.builders import build_callbacks, build_datamodule, build_module
from lightning_diff.config import CONFIG_DIR
from lightning_diff.train import train

from .helpers import compose_config

SAMPLERS = sorted(p.stem for p in Path(CONFIG_DIR, "sampler").glob("*.yaml"))
NETWORKS = {  # tiny presets -> data they fit, at their smallest
    "mlp": ["data=toy2d", "data.num_samples=64", "data.num_val_samples=16", "network.hidden=16", "network.depth=1"],
    "tiny_unet": ["data=digits", "network.model_channels=8"],
    "ddpmpp_tiny": ["data=digits", "network.model_channels=8"],
    "ncsnpp_tiny": ["data=digits", "network.model_channels=8"],
    "adm_tiny": ["data=digits", "network.model_channels=8", "network.channels_per_head=8"],
    "dit_tiny": ["data=digits", "network.hidden_size=16", "network.depth=1"],
}
PRECISIONS = ["32-true", "bf16-mixed"]
STEPS = ["null", "1", "2", "11"]  # null: the formulation's default; 1: below iDDPM's 2; 11: above NCSN's 10 levels
SETTING = re.compile(r"\b(sampler|formulation|network|data|trainer|module)(\.\w+)*=")


def run_or_refuse(formulation: str, sampler: str, network: str, precision: str, steps: str, tmp_path) -> str:
    """``"ran"`` after one training step and a sample grid of 2, or ``"refused"`` when building the run's objects
    raised a ValueError naming a setting (asserted)."""
    cfg = compose_config("train", [
        f"formulation={formulation}", f"sampler={sampler}", f"sampler.steps={steps}", f"network={network}",
        *NETWORKS[network], f"trainer.precision={precision}", "++trainer.fast_dev_run=1", "data.batch_size=8",
        "logger=csv", "callbacks.progress=null", "++trainer.enable_progress_bar=false",
        "callbacks.sample_grid.num_samples=2"], tmp_path)
    try:  # config time: everything train() builds before fitting
        build_module(cfg, build_datamodule(cfg))
        build_callbacks(cfg)
    except ValueError as err:
        assert SETTING.search(str(err)) and "allowed" in str(err), f"the error names no setting: {err}"
        return "refused"
    result = train(cfg)
    assert math.isfinite(result["train/loss"])
    samples = np.load(tmp_path / "samples.npz")["samples"]
    assert samples.shape[0] == 2 and np.isfinite(samples).all()
    return "ran"


@settings(max_examples=25, deadline=None, derandomize=True, database=None)
@given(formulation=st.sampled_from(formulations.names()), sampler=st.sampled_from(SAMPLERS),
       network=st.sampled_from(list(NETWORKS)), precision=st.sampled_from(PRECISIONS), steps=st.sampled_from(STEPS))
def test_every_combination_runs_or_is_refused_at_config_time(formulation, sampler, network, precision, steps,
                                                              tmp_path_factory):
    run_or_refuse(formulation, sampler, network, precision, steps, tmp_path_factory.mktemp("fuzz"))


@pytest.mark.parametrize("formulation,steps,expected", [("ncsn", "11", "refused"), ("ncsn", "null", "ran"),
                                                        ("iddpm", "1", "refused"), ("edm", "1", "ran")])
def test_the_fuzz_sees_both_outcomes(formulation, steps, expected, tmp_path):
    assert run_or_refuse(formulation, "euler", "mlp", "32-true", steps, tmp_path) == expected


@pytest.mark.slow
@pytest.mark.parametrize("formulation,sampler,network,precision",
                         itertools.product(formulations.names(), SAMPLERS, NETWORKS, PRECISIONS))
def test_every_combination_exhaustively(formulation, sampler, network, precision, tmp_path):
    run_or_refuse(formulation, sampler, network, precision, "null", tmp_path)
