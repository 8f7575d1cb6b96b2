"""Tiny released-format checkpoints built with the official reference code (../shared/reference), for the
importer tests of ``lightning_diff.pretrained``.

Each writer imports the reference code lazily and raises ``pytest.skip`` (via ``reference_or_skip``) when the
folder is absent, so importing this module never needs it.
"""

from __future__ import annotations

import copy
import importlib.util
import pickle
import sys
from pathlib import Path

import pytest
import torch

REFERENCE_DIR = Path(__file__).resolve().parents[2] / "shared" / "reference"
EDM_REFERENCE = REFERENCE_DIR / "edm"

__all__ = ["EDM_REFERENCE", "REFERENCE_DIR", "edm_networks", "guided_diffusion_script_util", "perturb_",
           "reference_or_skip", "write_adm_checkpoint", "write_adm_classifier_checkpoint", "write_edm_pickle"]


def reference_or_skip(name: str) -> Path:
    """``../shared/reference/<name>`` on ``sys.path``; ``pytest.skip`` with the reason when it is absent."""
    folder = REFERENCE_DIR / name
    if not folder.is_dir():
        pytest.skip(f"reference code {folder} is absent (see ../shared/reference/README.md)")
    if str(folder) not in sys.path:
        sys.path.insert(0, str(folder))
    return folder


def edm_networks():
    """NVlabs/edm's ``training.networks`` module (skips when the reference is absent)."""
    reference_or_skip("edm")
    import training.networks

    return training.networks


@torch.no_grad()
def perturb_(net: torch.nn.Module, seed: int = 0, scale: float = 0.05) -> torch.nn.Module:
    """Add ``scale * N(0, 1)`` to EVERY parameter (the references zero-initialise output layers and start
    GroupNorm at identity, which would let a wrong mapping of those tensors look right)."""
    gen = torch.Generator().manual_seed(seed)
    for p in net.parameters():
        p.add_(scale * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    return net


# A stand-in for EDM's training/loss.py (absent from the reference folder): a persistent class, so a snapshot
# holds a second object with embedded source, as EDM's real snapshots do.
_LOSS_SOURCE = '''
import torch
from torch_utils import persistence


@persistence.persistent_class
class EDMLoss:
    def __init__(self, P_mean=-1.2, P_std=1.2, sigma_data=0.5):
        self.P_mean = P_mean
        self.P_std = P_std
        self.sigma_data = sigma_data
'''


def _edm_loss(folder: Path):
    """An instance of the persistent stand-in loss class (module written to ``folder``)."""
    name = "edm_fixture_loss"
    if name not in sys.modules:
        file = folder / f"{name}.py"
        file.write_text(_LOSS_SOURCE)
        spec = importlib.util.spec_from_file_location(name, file)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name].EDMLoss()


def write_edm_pickle(path: Path, precond: str = "EDMPrecond", model_type: str = "SongUNet", label_dim: int = 0,
                     augment_dim: int = 0, img_resolution: int = 8, img_channels: int = 3, seed: int = 0,
                     snapshot: bool = True, **model_kwargs) -> torch.nn.Module:
    """Build a tiny NVlabs/edm network with the reference code, perturb every parameter and pickle it.

    Args:
        path: the ``.pkl`` to write.
        precond: ``EDMPrecond`` | ``VPPrecond`` | ``VEPrecond`` | ``iDDPMPrecond``.
        model_type: ``SongUNet`` | ``DhariwalUNet``; ``model_kwargs`` go to its constructor (EDM's names).
        snapshot: True writes what EDM's training loop writes (``dict(ema=net, loss_fn=..., augment_pipe=None,
            dataset_kwargs=...)``, the net deep-copied, in eval mode, without gradients); False the net alone.
    Returns:
        the reference network (eval mode), to compare against.
    """
    networks = edm_networks()
    torch.manual_seed(seed)
    kwargs = dict(img_resolution=img_resolution, img_channels=img_channels, label_dim=label_dim,
                  model_type=model_type, augment_dim=augment_dim, **model_kwargs)
    net = perturb_(getattr(networks, precond)(**kwargs), seed=seed + 1)
    net = copy.deepcopy(net).eval().requires_grad_(False)
    data = net
    if snapshot:
        dataset_kwargs = dict(class_name="training.dataset.ImageFolderDataset", path="datasets/tiny.zip",
                              use_labels=bool(label_dim), xflip=False, cache=True, resolution=img_resolution)
        data = dict(ema=net, loss_fn=_edm_loss(Path(path).parent), augment_pipe=None, dataset_kwargs=dataset_kwargs)
    with open(path, "wb") as f:
        pickle.dump(data, f)
    return net


def guided_diffusion_script_util():
    """openai/guided-diffusion's ``script_util`` (package ``guided_diffusion`` under ../shared/reference; skips
    when it is absent)."""
    reference_or_skip("guided_diffusion")
    if str(REFERENCE_DIR) not in sys.path:
        sys.path.insert(0, str(REFERENCE_DIR))
    from guided_diffusion import script_util

    return script_util


def write_adm_checkpoint(path: Path, seed: int = 0, **create_model_kwargs) -> torch.nn.Module:
    """A tiny guided-diffusion ``UNetModel`` built by its ``create_model(**create_model_kwargs)`` (a tuple
    ``channel_mult``, e.g. with 0.5, builds ``UNetModel`` directly with create_model's other choices), every
    parameter perturbed, its state dict saved with ``torch.save`` as guided-diffusion does. Returns the model."""
    script_util = guided_diffusion_script_util()
    torch.manual_seed(seed)
    kwargs = dict(create_model_kwargs)
    if isinstance(kwargs.get("channel_mult"), tuple):
        from guided_diffusion.unet import UNetModel

        size, learn_sigma, class_cond = kwargs.pop("image_size"), kwargs.pop("learn_sigma"), kwargs.pop("class_cond")
        kwargs["attention_resolutions"] = tuple(size // int(r) for r in kwargs["attention_resolutions"].split(","))
        net = UNetModel(image_size=size, in_channels=3, model_channels=kwargs.pop("num_channels"),
                        out_channels=6 if learn_sigma else 3, num_res_blocks=kwargs.pop("num_res_blocks"),
                        num_classes=script_util.NUM_CLASSES if class_cond else None, **kwargs)
    else:
        net = script_util.create_model(**kwargs)
    net = perturb_(net, seed=seed + 1).eval()
    torch.save(net.state_dict(), path)
    return net


def write_adm_classifier_checkpoint(path: Path, seed: int = 0, **encoder_kwargs) -> torch.nn.Module:
    """A guided-diffusion ``EncoderUNetModel(**encoder_kwargs)`` (its own argument names: ``image_size``,
    ``model_channels``, ``num_res_blocks``, ``attention_resolutions`` as downsampling rates, ``pool``, ...; 3 input
    channels), every parameter perturbed, its state dict saved as guided-diffusion's classifier_train.py does.
    Returns the model (eval mode)."""
    guided_diffusion_script_util()
    from guided_diffusion.unet import EncoderUNetModel

    torch.manual_seed(seed)
    net = perturb_(EncoderUNetModel(in_channels=3, **encoder_kwargs), seed=seed + 1).eval()
    torch.save(net.state_dict(), path)
    return net
