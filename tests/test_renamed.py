"""One word per meaning across the commands' configs, the command line and the Python API (issue 22, item 6).

Before: ``distill`` read its checkpoint as ``teacher=`` and ``train`` as ``ckpt_path=`` while the other commands said
``ckpt=`` (so ``lightning-diff distill ckpt=m.ckpt`` was refused by Hydra: "Key 'ckpt' is not in struct"); the
generated-sample counts were ``num_samples``, ``metrics.num_images``, ``num_pairs`` and ``quality_seeds``; a
formulation's discrete noise levels were ``M`` (VP, sub-VP, iDDPM), ``num_levels`` (NCSN) and ``num_timesteps``
(DDPM); network presets built class-label tables (``num_classes: 10`` / ``1000``) for runs that
``module.conditional=false`` left unconditional; and the training run's ``samples.npz`` had another layout than
``lightning-diff sample``'s. Each old name still works for one release with one ``FutureWarning`` naming both.
"""

import inspect
import sys
import warnings
from contextlib import nullcontext
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from lightning_diff import formulations
from lightning_diff.aliases import current_keywords
from lightning_diff.callbacks import GenerativeMetrics
from lightning_diff.callbacks.sample_grid import SampleGrid
from lightning_diff.cli import distill, evaluate, reflow, sample, train, train_classifier
from lightning_diff.cli.renamed import RENAMED, rename_config, rename_overrides
from lightning_diff.config import CONFIG_DIR, compose
from lightning_diff.denoiser import Denoiser
from lightning_diff.evaluation.metrics import evaluate_generator
from lightning_diff.evaluation.sample_quality import sample_quality
from lightning_diff.methods.distillation import ProgressiveDistillation
from lightning_diff.networks import MLP
from lightning_diff.training.builders import load_module
from lightning_diff.training.resume_check import _experiment_settings

COMMANDS = {"train": train, "classifier": train_classifier, "evaluate": evaluate, "reflow": reflow,
            "distill": distill}
# (config, old key, new key, a value, the overrides that make the key exist)
CASES = [
    ("distill", "teacher", "ckpt", "m.ckpt", []),
    ("distill", "quality_seeds", "quality_samples", 8, ["ckpt=m.ckpt"]),
    ("train", "ckpt_path", "ckpt", "last_if_exists", []),
    ("train", "callbacks.generative_metrics.num_images", "callbacks.generative_metrics.num_samples", 7,
     ["callbacks=[default,generative_metrics]"]),
    ("train", "formulation.M", "formulation.num_timesteps", 500, ["formulation=vp"]),
    ("train", "formulation.num_levels", "formulation.num_timesteps", 5, ["formulation=ncsn"]),
    ("classifier", "formulation.M", "formulation.num_timesteps", 400, ["formulation=iddpm"]),
    ("classifier", "formulation.num_levels", "formulation.num_timesteps", 5, ["formulation=ncsn"]),
    ("evaluate", "metrics.num_images", "metrics.num_samples", 9, ["ckpt=m.ckpt"]),
    ("reflow", "num_pairs", "num_samples", 9, ["ckpt=m.ckpt"]),
]
IDS = [f"{name}-{old}" for name, old, *_ in CASES]


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _future_warnings(caught) -> list[str]:
    return [str(w.message) for w in caught if issubclass(w.category, FutureWarning)]


def _cfg_job(capsys, name: str, overrides: list[str]) -> tuple[str, list[str]]:
    """What ``lightning-diff <command> <overrides> --cfg job`` prints (the composed config, unresolved), through
    the command's own ``main`` (sys.argv, as the console script runs it), and the FutureWarnings raised."""
    argv = sys.argv
    sys.argv = [name, *overrides, "--cfg", "job"]
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            COMMANDS[name].main()
    finally:
        sys.argv = argv
    return capsys.readouterr().out, _future_warnings(caught)


def test_every_renamed_key_has_a_case():
    assert {(name, old) for name, old, *_ in CASES} == {(n, o) for n, table in RENAMED.items() for o in table}


@pytest.mark.parametrize("name,old,new,value,extra", CASES, ids=IDS)
def test_the_new_name_composes(name, old, new, value, extra):
    """Before: e.g. distill ckpt=m.ckpt -> ConfigCompositionException "Could not override 'ckpt'"."""
    assert OmegaConf.select(compose([*extra, f"{new}={value}"], name), new) == value


@pytest.mark.parametrize("name,old,new,value,extra", CASES, ids=IDS)
def test_the_old_name_on_the_command_line_runs_as_the_new_one_with_one_warning(name, old, new, value, extra, capsys):
    new_job, new_warnings = _cfg_job(capsys, name, [*extra, f"{new}={value}"])
    old_job, old_warnings = _cfg_job(capsys, name, [*extra, f"{old}={value}"])
    assert new_job and old_job == new_job
    assert new_warnings == []
    assert len(old_warnings) == 1 and old in old_warnings[0] and new in old_warnings[0], old_warnings


def test_rename_overrides_keeps_prefixes_values_and_flags():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        renamed = rename_overrides("train", ["+callbacks.generative_metrics.num_images=5", "ckpt_path=a=b",
                                             "~ckpt_path", "--cfg", "seed=ckpt_path", "formulation.M=10,20"])
    assert renamed == ["+callbacks.generative_metrics.num_samples=5", "ckpt=a=b", "~ckpt", "--cfg",
                       "seed=ckpt_path", "formulation.num_timesteps=10,20"]
    assert len(_future_warnings(caught)) == 4


def test_an_old_key_from_a_config_file_moves_to_the_new_one_with_one_warning():
    """A user's experiment file that still sets ``ckpt_path:`` (config files may add keys): the check every command
    runs first moves it."""
    new = OmegaConf.to_container(compose(["ckpt=x"], "train"), resolve=False)
    old = compose([], "train")
    OmegaConf.set_struct(old, False)
    del old["ckpt"]
    old.ckpt_path = "x"
    OmegaConf.set_struct(old, True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        rename_config(old, "train")
    assert OmegaConf.to_container(old, resolve=False) == new
    assert len(_future_warnings(caught)) == 1 and "ckpt_path" in _future_warnings(caught)[0]


# --- the Python API: the old keyword works with one warning, both at once is refused -------------------------

def _teacher():
    return Denoiser(MLP(dim=2, hidden=8, depth=1, emb_channels=8), formulations.get("edm"))


KEYWORDS = [  # (call(**keyword), old, new, value, what the call's result shows of the value)
    (formulations.VP, "M", "num_timesteps", 500, lambda f: f.config()),
    (formulations.SubVP, "M", "num_timesteps", 500, lambda f: f.config()),
    (formulations.IDDPM, "M", "num_timesteps", 400, lambda f: (f.config(), f.sigma_max)),
    (formulations.NCSN, "num_levels", "num_timesteps", 5, lambda f: (f.config(), f.grid.tolist())),
    (GenerativeMetrics, "num_images", "num_samples", 7, lambda cb: cb.settings),
    (lambda **kw: ProgressiveDistillation(_teacher(), steps=8, rounds=2, **kw), "quality_seeds", "quality_samples",
     3, lambda module: module.quality_samples),
]


@pytest.mark.parametrize("call,old,new,value,shown", KEYWORDS, ids=[f"{k[1]}-{k[2]}" for k in KEYWORDS])
def test_the_old_keyword_gives_the_same_object_with_one_warning(call, old, new, value, shown):
    expected = shown(call(**{new: value}))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = shown(call(**{old: value}))
    assert result == expected
    messages = _future_warnings(caught)
    assert len(messages) == 1 and f"{old}=" in messages[0] and f"{new}=" in messages[0], messages
    with pytest.raises(TypeError, match=f"got {old}= and {new}="):
        call(**{old: value, new: value})


def test_an_old_checkpoints_formulation_settings_read_under_the_new_names():
    """A run trained before the rename stores ``formulation.M``; resuming it with today's config (``num_timesteps``)
    continues the same experiment (``resume_check`` compares the settings under today's names)."""
    old = {"formulation": {"_target_": "lightning_diff.formulations.VP", "beta_d": 19.9, "M": 1000}}
    new = {"formulation": {"_target_": "lightning_diff.formulations.VP", "beta_d": 19.9, "num_timesteps": 1000}}
    assert current_keywords(old["formulation"]) == new["formulation"]
    assert _experiment_settings(old, (2,), 0) == _experiment_settings(new, (2,), 0)


def test_signatures_show_the_new_keywords_only():
    """What Hydra's instantiate and config_check read (``inspect.signature``)."""
    for fn, new, old in ((formulations.VP, "num_timesteps", "M"), (formulations.NCSN, "num_timesteps", "num_levels"),
                         (GenerativeMetrics, "num_samples", "num_images"), (sample_quality, "num_samples",
                                                                             "num_images")):
        parameters = inspect.signature(fn).parameters
        assert new in parameters and old not in parameters, fn


@pytest.mark.parametrize("old", ["num_images", "num_samples"])
def test_evaluation_functions_take_the_count_under_either_name(old):
    """The value reaches the checks under its new name (no images are generated: the checks refuse first)."""
    warns = pytest.warns(FutureWarning, match=f"{old}= is now num_samples=") if old == "num_images" else nullcontext()
    with warns, pytest.raises(ValueError, match=r"metrics\.kid\.subset_size=1000 .*metrics\.num_samples=256"):
        sample_quality(None, None, ["kid"], **{old: 256}, weights="ema", options={"kid": {"subset_size": 1000}})
    warns = pytest.warns(FutureWarning, match=f"{old}= is now num_samples=") if old == "num_images" else nullcontext()
    with warns, pytest.raises(ValueError, match=r"metrics\.num_samples=1 is invalid"):
        evaluate_generator(lambda seeds: None, "ref", **{old: 1})


# --- one word per meaning in every config file -----------------------------------------------------------------

WORDS = {  # meaning -> (the word, the retired words of that meaning)
    "the checkpoint a command reads": ("ckpt", ("ckpt_path", "teacher")),
    "how many samples a command generates": ("num_samples", ("num_pairs", "quality_seeds", "num_images")),
    "a formulation's number of discrete noise levels": ("num_timesteps", ("M", "num_levels")),
}
# num_images stays the count of a data split's images: a node with a split, or a data module's own size.
DATA_IMAGES = "num_images"
# Not renamed here: RefineNet's keyword (lightning_diff/networks/refinenet.py), set from formulation.num_timesteps.
KNOWN = {"network.num_levels"}
SKIPPED = ("leaderboard",)  # the published figures' protocols: fields of the records (RECORD_VERSION 2)
READS_A_CHECKPOINT = ("train", "sample", "evaluate", "reflow", "distill")


def _keys(tree, path: str = ""):
    """``(dotted key, parent node)`` of every key of a YAML tree (Hydra's defaults list and node skipped)."""
    for key, value in tree.items():
        if key in ("defaults", "hydra"):
            continue
        dotted = f"{path}.{key}" if path else str(key)
        yield dotted, tree
        if isinstance(value, dict):
            yield from _keys(value, dotted)


def config_keys() -> list[tuple[str, str, dict]]:
    """``(file, dotted key as the commands see it, parent node)`` of every key of every config file: a group's file
    under its group (``formulation/vp.yaml``: ``formulation.M``), ``@package _global_`` files and the commands'
    own files from the root."""
    found = []
    for path in sorted(Path(CONFIG_DIR).rglob("*.yaml")):
        relative = path.relative_to(CONFIG_DIR)
        if relative.parts[0] in SKIPPED:
            continue
        text = path.read_text()
        package = "" if len(relative.parts) == 1 or "@package _global_" in text else ".".join(relative.parts[:-1])
        tree = OmegaConf.to_container(OmegaConf.create(text), resolve=False) or {}
        found += [(str(relative), f"{package}.{key}" if package else key, parent) for key, parent in _keys(tree)]
    return found


def test_no_config_key_uses_a_retired_word():
    """Before: ckpt_path (train.yaml), teacher and quality_seeds (distill.yaml), num_pairs (reflow.yaml),
    metrics.num_images (evaluate.yaml), callbacks.generative_metrics.num_images, formulation.M (vp, subvp, iddpm),
    formulation.num_levels (ncsn and the NCSN presets)."""
    retired = {word for _, old in WORDS.values() for word in old}
    wrong = []
    for file, key, parent in config_keys():
        leaf = key.rsplit(".", 1)[-1]
        if leaf not in retired or key in KNOWN:
            continue
        if leaf == DATA_IMAGES and ("split" in parent or key.startswith("data.")):
            continue
        wrong.append(f"{file}: {key}")
    assert not wrong, f"retired words (the words: {WORDS}): {wrong}"


def test_every_command_that_reads_a_checkpoint_calls_it_ckpt():
    keys = {name: set(OmegaConf.load(Path(CONFIG_DIR, f"{name}.yaml"))) for name in READS_A_CHECKPOINT}
    assert all("ckpt" in keys[name] for name in READS_A_CHECKPOINT), keys


def test_class_conditioning_is_switched_by_module_conditional_alone():
    """A network preset counts no classes of its own (null: the data's, when module.conditional=true; a
    classifier's num_classes are its outputs), and every experiment's class count agrees with its switch. Before:
    network=ddpmpp_cifar10 (and ncsnpp_cifar10, adm_imagenet64, dit_*) built a label table in an unconditional run."""
    counted = [f for f, key, parent in config_keys() if key == "network.num_classes" and f.startswith("network/")
               and "classifier" not in f and parent["num_classes"] is not None]
    assert not counted, f"network presets with their own class count: {counted}"
    for preset in sorted(p.stem for p in Path(CONFIG_DIR, "experiment").glob("*.yaml")):
        cfg = compose([f"experiment={preset}"])
        classes, conditional = cfg.network.get("num_classes"), cfg.module.conditional
        assert (classes is None or classes > 0) if conditional else not classes, (preset, conditional, classes)


# --- one samples.npz layout ---------------------------------------------------------------------------------

def _layout(path: Path) -> dict:
    with np.load(path) as arrays:
        return {key: (arrays[key].dtype.str, arrays[key].ndim) for key in arrays.files}


def test_train_and_sample_write_one_samples_npz_layout(digits_ckpt, tmp_path):
    """Before: the training run's grid held images (uint8) and samples (float32 [N, C, H, W]); sample: images."""
    module = load_module(digits_ckpt)
    SampleGrid(num_samples=3, dirpath=str(tmp_path / "train"))._render(
        SimpleNamespace(datamodule=None, loggers=[]), module, "samples")
    sample.sample(compose([f"ckpt={digits_ckpt}", "num_samples=3", f"out={tmp_path / 'sample'}", "device=cpu"],
                          "sample"))
    layouts = [_layout(tmp_path / folder / "samples.npz") for folder in ("train", "sample")]
    assert layouts[0] == layouts[1] == {"images": ("|u1", 4)}


def test_the_fast_help_takes_an_old_key():
    """``lightning-diff <command> <old key>=... --help`` renames before the help composes (before: Hydra refused the
    old key, as the help path ran before the rename)."""
    import subprocess

    run = subprocess.run([sys.executable, "-m", "lightning_diff", "distill", "teacher=some.ckpt", "--help"],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0 and run.stdout.startswith("lightning-diff distill"), run.stderr[-2000:]
    assert "teacher" in run.stderr and "ckpt" in run.stderr  # the one-line FutureWarning names both
