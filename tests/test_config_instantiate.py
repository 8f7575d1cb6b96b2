"""Every option of every config group composes AND instantiates: the object each one names is built with the
settings it gives (networks, paper sizes included, on the meta device: shapes without memory)."""

import inspect
from pathlib import Path

import hydra
import pytest
import torch

from lightning_diff import formulations
from lightning_diff.config import CONFIG_DIR
from lightning_diff.evaluation import METRIC_OPTIONS, selected_metrics, split_bits_per_dim, split_vlb
from lightning_diff.formulations import Formulation
from lightning_diff.sampling.settings import SamplerSettings
from lightning_diff.training.builders import build_callbacks, build_datamodule, build_module, build_network

from .helpers import compose_config

CONFIGS = Path(CONFIG_DIR)


def options(group: str) -> list[str]:
    found = sorted(p.stem for p in (CONFIGS / group).glob("*.yaml"))
    assert found, f"configs/{group} is empty"
    return found


def test_every_group_is_covered_here():
    """A new config group needs its instantiation test below."""
    groups = {str(p.parent.relative_to(CONFIGS)) for p in CONFIGS.rglob("*.yaml") if p.parent != CONFIGS}
    assert groups == {"formulation", "network", "data", "augment", "sampler", "optimizer", "lr_scheduler", "trainer",
                      "logger", "callbacks", "callbacks/ema", "paths", "metrics", "experiment", "hparams_search",
                      "launcher",
                      "recipe", "smoke",  # tests/test_presets.py
                      "objective",  # tests/test_objectives.py
                      "callbacks/posthoc_ema",  # tests/test_posthoc_ema.py
                      "leaderboard"}  # published figures, not a group: tests/test_leaderboard.py


@pytest.mark.parametrize("option", options("formulation"))
def test_formulation(option, tmp_path):
    formulation = hydra.utils.instantiate(compose_config("train", [f"formulation={option}"], tmp_path).formulation)
    assert isinstance(formulation, Formulation) and formulation.name == option


def _data_for(network_cfg) -> tuple[tuple[int, ...], int]:
    """A data shape and class count the network fits: its own fixed sizes, else digits (or 2-D points)."""
    if network_cfg._target_.endswith("MLP"):
        return (network_cfg.dim or 2,), 8
    channels = network_cfg.get("in_channels") or network_cfg.get("img_channels") or 1
    side = network_cfg.get("resolution") or network_cfg.get("img_resolution") or 8
    return (channels, side, side), network_cfg.get("num_classes") or 10


@pytest.mark.parametrize("option", [o for o in options("network") if "classifier" not in o])  # test_classifier.py
def test_network_on_the_meta_device(option, tmp_path):
    """Built on the meta device (paper sizes in no memory); a forward pass gives the data's shape back. NCSN's
    RefineNets are unconditional and read their noise levels from the ncsn formulation."""
    cfg = compose_config("train", [f"network={option}"], tmp_path)
    refinenet = cfg.network._target_.endswith("RefineNet")
    if refinenet:
        cfg = compose_config("train", [f"network={option}", "formulation=ncsn"], tmp_path)
    shape, num_classes = _data_for(cfg.network)
    with torch.device("meta"):
        network = build_network(cfg, shape, 0 if refinenet else num_classes, conditional=not refinenet)
        x, c_noise = torch.empty(2, *shape), torch.empty(2)
        out = network(x, c_noise, None if refinenet else torch.zeros(2, dtype=torch.long))
    assert sum(p.numel() for p in network.parameters()) > 0
    assert out.shape[0] == 2 and out.shape[2:] == x.shape[2:]
    assert out.shape[1] in (shape[0], 2 * shape[0])  # learned-variance heads double the channels


def _image_folder(root: Path) -> Path:
    from PIL import Image

    (root / "class_a").mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(root / "class_a" / "0.png")
    return root


@pytest.mark.parametrize("option", [o for o in options("data") if o != "latents"])  # latents: tests/test_latents.py
def test_data(option, tmp_path):
    overrides = [f"data.root={_image_folder(tmp_path / 'images')}"] if option == "imagefolder" else []
    if option == "reflow_pairs":  # a pairs file of lightning-diff reflow (tests/test_reflow.py)
        from lightning_diff.methods import reflow

        record = {"data_shape": [2], "data_transform": {"scale": 1.0, "offset": 0.0, "bits": None}}
        pairs = reflow.Couplings(torch.zeros(10, 2), torch.zeros(10, 2), torch.arange(10), record)
        overrides = [f"data.path={reflow.save_couplings(pairs, tmp_path / 'pairs.pt')}"]
    datamodule = build_datamodule(compose_config("train", [f"data={option}", *overrides], tmp_path))
    assert datamodule.data_shape and datamodule.num_classes >= 0 and datamodule.transform is not None


@pytest.mark.parametrize("option", options("augment"))
def test_augment(option, tmp_path):
    pipe = hydra.utils.instantiate(compose_config("train", [f"augment={option}"], tmp_path).augment)
    images, labels = pipe(torch.zeros(2, 3, 8, 8))
    assert images.shape == (2, 3, 8, 8) and labels.shape[0] == 2


@pytest.mark.parametrize("option", options("sampler"))
@pytest.mark.parametrize("config_name", ["train", "sample", "evaluate"])
def test_sampler(option, config_name):
    """Checked on EDM; annealed Langevin on NCSN, whose step size it has (on EDM's sigma_min it diverges)."""
    cfg = compose_config(config_name, [f"sampler={option}", *(["ckpt=x"] if config_name != "train" else [])])
    formulation = formulations.get("ncsn" if option == "annealed_langevin" else "edm")
    expected = "heun" if option == "default" else option  # default: the source's sampler; heun for our checkpoints
    assert SamplerSettings.from_config(cfg.sampler).check(formulation).name == expected


@pytest.mark.parametrize("option", options("optimizer"))
def test_optimizer(option, tmp_path):
    make = hydra.utils.instantiate(compose_config("train", [f"optimizer={option}"], tmp_path).optimizer)
    assert isinstance(make([torch.nn.Parameter(torch.zeros(1))]), torch.optim.Optimizer)


@pytest.mark.parametrize("option", options("lr_scheduler"))
def test_lr_scheduler(option, tmp_path):
    make = hydra.utils.instantiate(compose_config("train", [f"lr_scheduler={option}"], tmp_path).lr_scheduler)
    scheduler = make(torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0))
    assert isinstance(scheduler, torch.optim.lr_scheduler.LRScheduler)


@pytest.mark.parametrize("option", options("trainer"))
def test_trainer(option, tmp_path):
    """GPU trainers are built with ``accelerator=cpu`` on a host without CUDA (every other setting as given)."""
    cfg = compose_config("train", [f"trainer={option}"], tmp_path)
    if cfg.trainer.accelerator == "gpu" and not torch.cuda.is_available():
        if "FSDP" in str(cfg.trainer.get("strategy")):
            pytest.skip("FSDP needs a GPU accelerator; this host has no CUDA")
        cfg.trainer.accelerator = "cpu"
    trainer = hydra.utils.instantiate(cfg.trainer, logger=False)
    assert trainer.max_steps == cfg.trainer.max_steps


@pytest.mark.parametrize("option", options("logger"))
def test_logger(option, tmp_path):
    logger = hydra.utils.instantiate(compose_config("train", [f"logger={option}"], tmp_path).logger)
    assert logger.save_dir == str(tmp_path)


@pytest.mark.parametrize("option", options("callbacks"))
def test_callbacks(option, tmp_path):
    callbacks = build_callbacks(compose_config("train", [f"callbacks={option}"], tmp_path))
    assert callbacks and all(hasattr(cb, "on_train_end") for cb in callbacks)


@pytest.mark.parametrize("option", options("callbacks/ema"))
def test_ema(option, tmp_path):
    cfg = compose_config("train", [f"callbacks/ema={option}"], tmp_path)
    assert type(hydra.utils.instantiate(cfg.callbacks.ema)).__name__ == "EMA"


@pytest.mark.parametrize("option", options("paths"))
def test_paths(option, tmp_path):
    assert compose_config("train", [f"paths={option}"], tmp_path).paths.output_dir == str(tmp_path)


@pytest.mark.parametrize("option", options("metrics"))
def test_metrics_options_are_the_library_settings(option):
    """Each metric's options are keyword settings of the library function that runs it."""
    cfg = compose_config("evaluate", ["ckpt=x", f"metrics=[{option}]"])
    assert selected_metrics(cfg.metrics) == [option]
    settings = dict(cfg.metrics[option])
    if option == "bpd":
        inspect.signature(split_bits_per_dim).bind(None, None, **settings)
    elif option == "vlb":
        inspect.signature(split_vlb).bind(None, None, **settings)
    else:  # sample metrics take theirs through sample_quality(options={metric: settings})
        assert set(settings) <= set(METRIC_OPTIONS[option])


# Paper presets (a "# paper:" header) need data that is not offline: tests/test_presets.py builds and smoke-runs them.
@pytest.mark.parametrize("option", [o for o in options("experiment")
                                    if "# paper:" not in (CONFIGS / "experiment" / f"{o}.yaml").read_text()])
def test_experiment_builds_its_run(option, tmp_path):
    cfg = compose_config("train", [f"experiment={option}"], tmp_path)
    module = build_module(cfg, build_datamodule(cfg))
    assert build_callbacks(cfg) and module.sampler.steps_for(module.formulation) >= 1


@pytest.mark.parametrize("group", ["hparams_search", "launcher"])
def test_sweepers_and_launchers_resolve(group):
    from hydra import compose, initialize_config_dir

    for option in options(group):
        with initialize_config_dir(CONFIG_DIR, version_base="1.3"):
            cfg = compose("train", [f"{group}={option}"], return_hydra_config=True)
        node = cfg.hydra.sweeper if group == "hparams_search" else cfg.hydra.launcher
        assert inspect.isclass(hydra.utils.get_class(node._target_))
