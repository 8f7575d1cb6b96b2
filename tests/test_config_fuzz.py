"""Config fuzz: formulation x sampler x network (tiny sizes) x precision x step count. Every combination either
trains one step and samples, or is refused when its objects are built (config time) with an error naming the
setting, its value and what is allowed. And every command's numeric and enum settings with hostile values: each runs
or is refused by the check every entry point runs first, naming the setting."""

import copy
import functools
import itertools
import math
import re
from pathlib import Path

import hydra
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from omegaconf import OmegaConf

from lightning_diff import formulations, sampling
from lightning_diff.cli.config_check import RULES, check_settings
from lightning_diff.cli.train import check_run_length, train
from lightning_diff.config import CONFIG_DIR, compose
from lightning_diff.sampling.settings import SamplerSettings
from lightning_diff.training.builders import build_callbacks, build_datamodule, build_module

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
    arrays = np.load(tmp_path / "samples.npz")  # images uint8 (image data) or samples float (points)
    samples = arrays["images"] if "images" in arrays else arrays["samples"]
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


# ------------------------------------------------------------ every command's numeric and enum settings, hostile values
# Each command's config composed once; a setting is set as `key=value` sets it (OmegaConf.update), then the check
# every entry point runs first (cli.config_check.check_settings; train: then its run-length check, its first
# step) either refuses it with a ValueError naming it and what is allowed, or accepts it, and then the code that reads
# it runs: a Lightning Trainer is built from trainer.*, a sampler (SamplerSettings, then a real sampling call on a toy
# denoiser) from sampler.*. The settings of the other _target_ nodes (network, formulation, optimizer, data,
# callbacks...) are checked for their type (the annotations of the arguments they go to): strings and booleans where
# numbers go; their ranges are their constructors' to check.
COMMAND_CONFIGS = {  # config name -> the overrides it needs to compose (required settings, every metric's options)
    "train": [], "classifier": [], "sample": ["ckpt=model.ckpt"], "reflow": ["ckpt=model.ckpt"],
    "evaluate": ["ckpt=model.ckpt", "metrics=[fid,is,kid,pr,bpd,vlb]"], "distill": ["ckpt=model.ckpt"],
    "leaderboard": [], "consistency": ["ckpt=model.ckpt"], "posthoc-ema": ["ckpt_dir=snapshots"],
    "tune-steps": ["ckpt=model.ckpt"]}
HOSTILE = [0, -1, 1, 2, 3, 0.5, 1.5, -0.5, math.nan, math.inf, 2**40, "abc", "", True, False, None]


@functools.cache
def _composed(name: str):
    return compose(COMMAND_CONFIGS[name], name)


def _leaves(tree, path=""):
    """``(dotted key, value, inside a _target_ node)`` of every scalar leaf of a config (lists skipped; unresolved:
    an interpolation is a string, its setting is fuzzed where it is defined)."""
    for key, value in tree.items():
        dotted = f"{path}.{key}" if path else key
        if isinstance(value, dict):
            yield from ((k, v, t or "_target_" in value) for k, v, t in _leaves(value, dotted))
        elif not isinstance(value, list) and key != "_target_":
            yield dotted, value, "_target_" in tree


@functools.cache
def fuzzed_settings(name: str) -> tuple[str, ...]:
    """The numeric and enum settings of a command: those its rules name, and every number or boolean of its config."""
    leaves = {k: v for k, v, _ in _leaves(OmegaConf.to_container(_composed(name)))}
    numeric = [k for k, v in leaves.items() if isinstance(v, (bool, int, float))]
    return tuple(sorted({*numeric, *(k for k in RULES.get(name, {}) if k in leaves)}))


class _ToyDenoiser:
    """D(x; sigma) = x / (1 + sigma^2): the exact denoiser of N(0, I) data (discrete formulations snap nothing)."""

    def __call__(self, x, sigma, **cond):
        return x / (1 + sigma.reshape(-1, *[1] * (x.ndim - 1)) ** 2)


def check_or_refuse(name: str, key: str, value) -> str:
    """``"refused"`` (asserting the error names the setting and what is allowed) or ``"accepted"`` (after the code
    that reads it ran: module comment above)."""
    cfg = copy.deepcopy(_composed(name))
    OmegaConf.update(cfg, key, value, merge=False)
    try:
        check_settings(cfg, name)
        if name == "train":
            check_run_length(cfg.trainer)  # what train() checks first, before the lock and the data
    except ValueError as err:
        leaf = key.rsplit(".", 1)[-1]
        assert re.search(rf"\b{re.escape(leaf)}\b", str(err)) and "allowed" in str(err), f"{key}={value!r}: {err}"
        return "refused"
    if key.startswith("trainer."):
        trainer = OmegaConf.to_container(cfg.trainer, resolve=True) | {"logger": False, "enable_progress_bar": False}
        hydra.utils.instantiate(trainer)
    if key.startswith("sampler.") and cfg.sampler.get("name") is not None:
        sampler = SamplerSettings.from_config(cfg.sampler)
        formulation = formulations.get("edm")
        if sampler.steps_for(formulation) <= 64:  # a real sampling call (a huge grid would only cost memory)
            sigmas = sampler.sigmas(formulation)
            x = torch.randn(2, 3, dtype=torch.float64) * sigmas[0]
            out = sampling.sample(sampler.name, _ToyDenoiser(), x, sigmas, generator=torch.Generator().manual_seed(0),
                                  **sampler.options)
            assert torch.isfinite(out).all(), f"{key}={value!r} samples non-finite values"
    return "accepted"


@settings(max_examples=200, deadline=None, derandomize=True, database=None)
@given(data=st.data())
def test_every_numeric_and_enum_setting_runs_or_is_refused_naming_it(data):
    name = data.draw(st.sampled_from(list(COMMAND_CONFIGS)), label="command")
    key = data.draw(st.sampled_from(fuzzed_settings(name)), label="setting")
    check_or_refuse(name, key, data.draw(st.sampled_from(HOSTILE), label="value"))


@pytest.mark.parametrize("name,key,value,expected", [
    ("sample", "num_samples", 0, "refused"), ("sample", "num_samples", 1, "accepted"),
    ("train", "trainer.max_steps", "abc", "refused"), ("train", "trainer.max_steps", 1, "accepted"),
    ("train", "trainer.devices", "abc", "refused"), ("evaluate", "metrics.bpd.divergence", "exact", "accepted"),
    ("train", "network.model_channels", "abc", "refused"), ("train", "sampler.options.S_churn", "abc", "refused"),
    ("reflow", "sampler.steps", 2, "accepted"), ("distill", "rounds", 7, "refused")])
def test_the_settings_fuzz_sees_both_outcomes(name, key, value, expected):
    assert check_or_refuse(name, key, value) == expected


@pytest.mark.parametrize("name", list(COMMAND_CONFIGS))
def test_every_command_setting_has_a_rule(name):
    """A number or boolean a command's own code reads (outside the _target_ nodes, whose arguments' annotations are
    checked) is in config_check's rules: a new setting cannot skip the check."""
    unruled = [k for k, v, built in _leaves(OmegaConf.to_container(_composed(name))) if not built
               and isinstance(v, (bool, int, float)) and k not in RULES.get(name, {})]
    assert not unruled, f"{name}: settings without a rule in lightning_diff.cli.config_check.RULES: {unruled}"


@pytest.mark.slow
@pytest.mark.parametrize("name", list(COMMAND_CONFIGS))
def test_every_setting_with_every_hostile_value(name):
    for key in fuzzed_settings(name):
        for value in HOSTILE:
            check_or_refuse(name, key, value)
