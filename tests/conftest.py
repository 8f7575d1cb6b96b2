import os

import pytest
import torch

from .helpers import compose_config

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("HYDRA_FULL_ERROR", "1")


@pytest.fixture(scope="session", autouse=True)
def _session_cache(tmp_path_factory):
    """``$LIGHTNING_DIFF_CACHE`` (converted Inception weights, reference statistics, small classifiers, downloads)
    in a folder of this session, shared by its tests and the commands they start, never ``~/.cache/lightning_diff``."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("LIGHTNING_DIFF_CACHE", str(tmp_path_factory.mktemp("lightning_diff_cache")))
        yield


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a test module (``pytestmark = pytest.mark.usefixtures("one_thread")``): tiny
    networks on a shared 2-core CPU run several times faster than with two competing threads."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def digits_ckpt(tmp_path_factory):
    """A checkpoint of a 3-step EDM run on digits (tiny U-Net), written by ``lightning_diff.cli.train``."""
    from lightning_diff.cli.train import train

    out = tmp_path_factory.mktemp("digits_run")
    cfg = compose_config("train", ["logger=csv", "callbacks.progress=null", "++trainer.enable_progress_bar=false",
                                   "callbacks.sample_grid=null", "data=digits", "network.model_channels=8",
                                   "trainer.max_steps=3", "data.batch_size=16"], out)
    return train(cfg)["checkpoint"]
