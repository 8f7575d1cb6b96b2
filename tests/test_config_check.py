"""Every key that reaches a command is read by its code or refused before any work, with an error naming it:
a '+' typo gets a did-you-mean over the keys at its level, ``sample``/``evaluate`` refuse what comes
from the checkpoint file instead of recording it, and numeric and enum settings are refused naming the setting and
what is allowed, never with a traceback from inside torch or Lightning."""

import sys
from pathlib import Path

import pytest

from lightning_diff import cli
from lightning_diff.cli.config_check import check_command
from lightning_diff.config import CONFIG_DIR, compose

pytestmark = pytest.mark.usefixtures("one_thread")

TINY_TRAIN = ["data=toy2d", "data.num_samples=64", "data.num_val_samples=16", "network=mlp", "network.hidden=16",
              "network.depth=1", "trainer.max_steps=1", "data.batch_size=8", "logger=csv", "callbacks.progress=null",
              "++trainer.enable_progress_bar=false", "callbacks.sample_grid=null", "trainer=cpu"]


@pytest.fixture
def run(monkeypatch):
    """``lightning-diff <args>`` in this process, exceptions raised as they are (HYDRA_FULL_ERROR)."""
    monkeypatch.setattr(sys, "argv", ["lightning-diff"])
    monkeypatch.setenv("HYDRA_FULL_ERROR", "1")
    return lambda *args: cli.main(list(args))


def test_a_plus_typo_is_refused_with_a_did_you_mean(run, tmp_path):
    """Hydra's hint after ``formulaton=vp`` is ``+formulaton=vp``, which used to train EDM with exit 0."""
    with pytest.raises(ValueError, match=r"\+formulaton=vp: .*'formulaton'.*did you mean formulation\?.*allowed: "):
        run("train", "+formulaton=vp", *TINY_TRAIN, f"hydra.run.dir={tmp_path}")
    assert not (tmp_path / "checkpoints").exists()  # refused before any work


def test_sample_refuses_a_formulation_that_comes_from_the_checkpoint(run, digits_ckpt, tmp_path):
    """``sample ckpt=<EDM ckpt> +formulation=vp`` used to give the EDM images, byte for byte."""
    with pytest.raises(ValueError, match=r"\+formulation=vp: the formulation of a loaded model comes from the "
                                         r"checkpoint file \(ckpt="):
        run("sample", f"ckpt={digits_ckpt}", "+formulation=vp", "num_samples=2", "sampler.steps=2", "device=cpu",
            f"out={tmp_path / 'out'}")
    assert not (tmp_path / "out").exists()


def test_evaluate_refuses_it_instead_of_recording_it(run, digits_ckpt, tmp_path):
    """``evaluate`` used to write a record whose config said VP, whose run said EDM and whose rerun command held
    ``+formulation=vp``; now it stops before loading the checkpoint and writes nothing."""
    records = Path(digits_ckpt).parent
    before = set(records.glob("eval-*.json"))
    with pytest.raises(ValueError, match=r"\+network=mlp: the network of a loaded model comes from the checkpoint"):
        run("evaluate", f"ckpt={digits_ckpt}", "+network=mlp", "metrics=[bpd]", "metrics.bpd.num_images=2",
            "metrics.bpd.rtol=1e-2", "metrics.bpd.atol=1e-2", "device=cpu", "progress=false", "wandb=false",
            "name=plus_network")
    assert set(records.glob("eval-*.json")) == before


@pytest.mark.parametrize("num_samples", [0, -1])
def test_num_samples_below_one_is_refused_naming_it(run, digits_ckpt, tmp_path, num_samples):
    """It used to end in ``torch.cat(): expected a non-empty list of Tensors``."""
    with pytest.raises(ValueError, match=rf"num_samples={num_samples} is invalid; allowed: an integer >= 1"):
        run("sample", f"ckpt={digits_ckpt}", f"num_samples={num_samples}", "device=cpu", f"out={tmp_path}")


def test_a_non_integer_max_steps_is_refused_naming_the_setting(run, tmp_path):
    """It used to end in ``TypeError: '<' not supported between instances of 'str' and 'int'`` from Lightning,
    after the data and the model were built."""
    with pytest.raises(ValueError, match=r"trainer\.max_steps='abc' is invalid; allowed: an integer \(the type of "
                                         r"pytorch_lightning.Trainer's argument max_steps\)"):
        run("train", *TINY_TRAIN, "trainer.max_steps=abc", f"hydra.run.dir={tmp_path}")



def test_train_classifier_refuses_a_run_that_trains_nothing(run, tmp_path):
    """train-classifier shares train's run-length rule; trainer.max_steps=0 used to pass its type rule."""
    with pytest.raises(ValueError, match=r"trainer\.max_steps=0 \(with trainer\.max_epochs=.*trains nothing"):
        run("train-classifier", "trainer.max_steps=0", f"hydra.run.dir={tmp_path}")

def test_accepted_edge_values_run(run, digits_ckpt, tmp_path):
    """The smallest counts and the largest seed the rules allow sample for real."""
    run("sample", f"ckpt={digits_ckpt}", "num_samples=1", "sampler=euler", "sampler.steps=1", "sampler.batch_size=1",
        f"seed={2**32 - 1}", "device=cpu", f"out={tmp_path}")
    assert (tmp_path / "samples.npz").exists()


def checked(name: str, overrides: list[str]) -> None:
    """Compose ``configs/<name>.yaml`` with ``overrides`` and run the check every entry point runs first."""
    check_command(compose(overrides, name), name, overrides)


@pytest.mark.parametrize("name,overrides", [  # the '+' overrides of the README, docs, tests and experiments
    ("train", ["+smoke=cpu", "++trainer.fast_dev_run=1", "++trainer.enable_progress_bar=false", "++seed=3",
               "++trainer.limit_val_batches=1"]),
    ("train", ["experiment=edm_imagenet64_cond_adm", "trainer.devices=8", "+trainer.num_nodes=4"]),
    ("train", ["formulation=ddpm", "objective=hybrid", "+network.out_channels=2",
               "+callbacks.probe._target_=pytorch_lightning.callbacks.LearningRateMonitor",
               "+callbacks.probe.logging_interval=step"]),
    ("train", ["callbacks=[default,generative_metrics]", "++callbacks.generative_metrics.options.fid.method=eigvals"]),
    ("sample", ["ckpt=m.pt", "+pretrained.image_size=64", "+pretrained.class_cond=true", "sampler=ddim",
                "++sampler.options.eta=0.5", "classifier.ckpt=c.pt", "+classifier.image_size=64"]),
    ("evaluate", ["ckpt=m.pkl", "+pretrained.vae=stabilityai/sd-vae-ft-ema", "data=digits"]),
    ("distill", ["ckpt=m.pt", "+pretrained.num_heads=2"]),
])
def test_documented_plus_overrides_still_pass(name, overrides):
    checked(name, overrides)


@pytest.mark.parametrize("name,overrides,message", [
    ("train", ["++sed=3"], r"\+\+sed=3: lightning-diff train has no setting 'sed'.*did you mean seed\?"),
    ("train", ["+trainer.max_step=3"], r"Trainer takes no argument 'max_step'.*did you mean max_steps\? allowed: "),
    ("train", ["+callbacks.sample_grid.num_sample=2"], r"SampleGrid takes no argument 'num_sample'.*num_samples\?"),
    ("train", ["+callbacks.probe.logging_interval=step"], r"a new one is built from its class; allowed: "
                                                         r"\+callbacks.probe._target_=<class>"),
    ("train", ["+paths.out=x"], r"has no setting 'paths.out'.*allowed: .*output_dir under paths"),
    ("classifier", ["+classifier.scale=2"], r"lightning-diff train-classifier has no setting 'classifier.scale'"),
    ("evaluate", ["ckpt=m.ckpt", "+metrics.fid.methd=x"], r"did you mean method\? allowed: method under metrics.fid"),
    ("reflow", ["ckpt=m.ckpt", "+formulation=rf"], r"the formulation of a loaded model comes from the checkpoint"),
    ("reflow", ["ckpt=m.ckpt", "+pretrained.format=edm"], r"has no setting 'pretrained.format'"),
    ("distill", ["ckpt=m.ckpt", "+objective=ssm"], r"the objective of a loaded model .* \(ckpt=m.ckpt\)"),
])
def test_unread_plus_overrides_are_refused_naming_them(name, overrides, message):
    with pytest.raises(ValueError, match=message):
        checked(name, overrides)


@pytest.mark.parametrize("overrides", [["experiment=edm_digits"], ["experiment=edm_digits_fast"],
                                       ["experiment=edm_cifar10_cond_vp"],
                                       ["+smoke=cpu", "experiment=edm_imagenet64_cond_adm"]])
def test_shipped_presets_pass_the_check(overrides):
    """Paper presets: fractional lr ramp-up steps (an int annotation) and resolvers included."""
    checked("train", overrides)


def _options(group: str) -> list[str]:
    return sorted(p.stem for p in Path(CONFIG_DIR, group).glob("*.yaml"))


GROUPS = ("formulation", "network", "data", "sampler", "objective", "optimizer", "lr_scheduler", "trainer", "logger",
          "augment", "callbacks")


@pytest.mark.slow
@pytest.mark.parametrize("override", [f"experiment={e}" for e in _options("experiment")]
                         + [f"{g}={o}" for g in GROUPS for o in _options(g)
                            if f"{g}={o}" != "network=ncsn_cifar10"])  # its num_levels: formulation=ncsn's
def test_every_shipped_config_passes_the_check(override):
    checked("train", [override])
