"""One ``sampler`` group (name, steps, time_steps, options, batch_size) for train, sample, evaluate and the
callbacks, one word per meaning, and a step count the formulation cannot do refused at config time, naming
``sampler.steps``, the value and the allowed range."""

from pathlib import Path

import pytest
import yaml

from lightning_diff.callbacks import GenerativeMetrics
from lightning_diff.cli.train import train
from lightning_diff.config import CONFIG_DIR
from lightning_diff.sampling.settings import SamplerSettings
from lightning_diff.training.builders import build_callbacks, build_datamodule, build_module

from .helpers import compose_config

QUIET = ["logger=csv", "callbacks.progress=null", "++trainer.enable_progress_bar=false",
         "callbacks.sample_grid.num_samples=4"]
TOY = ["data=toy2d", "network=mlp", "network.hidden=16", "network.depth=1", *QUIET]
SAMPLER_KEYS = {"name", "steps", "time_steps", "options", "batch_size"}
OTHER_SPELLINGS = {"sample_steps", "num_steps", "sampler_options", "sampling_batch_size"}


def _keys(node) -> set[str]:
    if isinstance(node, dict):
        return set(node) | {k for v in node.values() for k in _keys(v)}
    if isinstance(node, list):
        return {k for v in node for k in _keys(v)}
    return set()


def test_no_config_spells_steps_or_sampler_settings_another_way():
    spelled = {str(p.relative_to(CONFIG_DIR)): sorted(_keys(yaml.safe_load(p.read_text())) & OTHER_SPELLINGS)
               for p in Path(CONFIG_DIR).rglob("*.yaml")}
    assert not {path: keys for path, keys in spelled.items() if keys}


@pytest.mark.parametrize("config_name", ["train", "sample", "evaluate"])
def test_every_command_has_the_one_sampler_node(config_name):
    cfg = compose_config(config_name, ["sampler=ddim", "sampler.steps=7", "sampler.batch_size=5",
                                       *(["ckpt=x"] if config_name != "train" else [])])
    assert set(cfg.sampler) == SAMPLER_KEYS
    assert (cfg.sampler.name, cfg.sampler.steps, cfg.sampler.batch_size) == ("ddim", 7, 5)
    assert not {"steps", "batch_size"} & set(cfg)  # no top-level second spelling


def test_module_and_metric_callbacks_use_the_run_sampler(tmp_path):
    cfg = compose_config("train", [*TOY, "callbacks=[default,generative_metrics]", "sampler=ddim", "sampler.steps=7",
                                   "++sampler.options.eta=0.5"], tmp_path)
    module = build_module(cfg, build_datamodule(cfg))
    expected = SamplerSettings(name="ddim", steps=7, options={"eta": 0.5, "clip_denoised": False}, batch_size=64)
    assert module.sampler == expected
    metrics = next(cb for cb in build_callbacks(cfg) if isinstance(cb, GenerativeMetrics))
    assert metrics.sampler == expected


def test_a_callback_overrides_only_its_own_sampler_key(tmp_path):
    cfg = compose_config("train", [*TOY, "callbacks=[default,generative_metrics]",
                                   "callbacks.generative_metrics.sampler.steps=2"], tmp_path)
    metrics = next(cb for cb in build_callbacks(cfg) if isinstance(cb, GenerativeMetrics))
    assert metrics.sampler.steps == 2 and metrics.sampler.name == "heun"
    assert build_module(cfg, build_datamodule(cfg)).sampler.steps is None


@pytest.mark.parametrize("overrides,message", [
    (["formulation=ncsn", "sampler.steps=18"], r"sampler\.steps=18 is invalid for formulation=ncsn; allowed: an "
                                               r"integer in \[1, 10\]"),
    (["formulation=ddpm", "formulation.num_timesteps=100", "sampler.steps=200"],
     r"sampler\.steps=200 is invalid for formulation=ddpm; allowed: an integer in \[1, 100\]"),
    (["formulation=ddpm", "formulation.num_timesteps=10", "formulation.beta_schedule=cosine"],
     r"sampler\.steps=null \(formulation=ddpm's default 18\) is invalid for formulation=ddpm; allowed: an "
     r"integer in \[1, 10\]"),
    (["formulation=iddpm", "sampler.steps=1"], r"sampler\.steps=1 is invalid for formulation=iddpm; allowed: an "
                                               r"integer in \[2, 992\]"),
    (["sampler.steps=0"], r"sampler\.steps=0 is invalid; allowed: null \(the formulation's default\) or an integer"),
    (["++sampler.options.eta=0.5"], r"sampler\.options: \['eta'\] are not options of sampler=heun; allowed: .*S_churn"),
    (["sampler=ddim", "sampler.options.eta=2"], r"sampler=ddim with sampler\.steps=18 and sampler\.options="
                                                 r"\{'eta': 2, .* eta=2 is invalid; allowed: 0 <= eta <= 1"),
    (["sampler=annealed_langevin"], r"sampler=annealed_langevin with sampler\.steps=18 .* on formulation=edm "
                                    r"diverges on the exact denoiser of data N\(0, 0\.5\^2\)"),
    (["sampler.batch_size=0"], r"sampler\.batch_size=0 is invalid; allowed: an integer >= 1"),
])
def test_bad_sampler_settings_fail_before_training(overrides, message, tmp_path):
    cfg = compose_config("train", [*TOY, "trainer.max_steps=3", *overrides], tmp_path)
    with pytest.raises(ValueError, match=message):
        train(cfg)
    assert not (tmp_path / "checkpoints").exists()  # refused before the first training step


def test_a_metric_callback_sampler_the_formulation_cannot_do_fails_before_training(tmp_path):
    cfg = compose_config("train", [*QUIET, "formulation=ncsn", "trainer.max_steps=3", "data=digits",
                                   "network.model_channels=8", "callbacks=[default,generative_metrics]",
                                   "callbacks.generative_metrics.sampler.steps=18"], tmp_path)
    with pytest.raises(ValueError, match=r"sampler\.steps=18 is invalid for formulation=ncsn"):
        train(cfg)
    assert not (tmp_path / "checkpoints").exists()


def test_unknown_sampler_keys_are_named():
    with pytest.raises(ValueError, match=r"sampler: unknown settings \['num_steps'\]; allowed: name, steps"):
        SamplerSettings.from_config({"name": "heun", "num_steps": 3})
