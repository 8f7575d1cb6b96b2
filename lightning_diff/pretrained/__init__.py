"""Released checkpoints of the papers as our ``Denoiser`` (docs/pretrained.md).

``load(source, *, format=None, map_location="cpu", **flags) -> Denoiser`` and ``load_pretrained(...) ->
Pretrained`` (the denoiser with the data shape, classes, transform and, for latent models, the decoder).

``source`` is a local file or folder, an ``https://`` URL or ``hf://org/name[/file]`` (downloaded once into a
cache and verified: ``pretrained.remote``). ``format`` is inferred when omitted:

- ``edm``: a ``.pkl`` (NVlabs/edm network pickle; read by a restricted unpickler that runs none of its code);
- ``dit``: a ``.pt`` / ``.pth`` whose keys are DiT's (``x_embedder``, ``t_embedder``, ``blocks.N.adaLN_modulation``);
- ``adm``: any other ``.pt`` / ``.pth`` (guided-diffusion / improved-diffusion ``UNetModel`` state dict);
- ``diffusers``: a folder holding ``model_index.json`` (a pipeline) or ``config.json`` (a model).

``flags`` go to the format's loader under the source project's own names (``adm``: guided-diffusion's
``image_size=64 num_channels=192 ...``; ``dit``: ``model="DiT-XL/2" image_size=256``), except ``sha256=<hex>``,
which checks the file's digest first. Format modules are imported only when used (diffusers is optional).
"""

from __future__ import annotations

import importlib
import pickle
import re
import zipfile
from pathlib import Path

import torch

from ..denoiser import Denoiser
from . import remote
from .base import Pretrained

__all__ = ["FORMATS", "Pretrained", "infer_format", "load", "load_classifier", "load_pretrained"]

FORMATS = {  # format -> module with load(path, *, map_location, **flags) -> Pretrained
    "edm": "lightning_diff.pretrained.edm",
    "adm": "lightning_diff.pretrained.adm",
    "dit": "lightning_diff.pretrained.dit",
    "diffusers": "lightning_diff.pretrained.diffusers_folder",
}
_DIT_KEY = re.compile(r"(^|\.)(x_embedder|t_embedder)\.|(^|\.)blocks\.\d+\.adaLN_modulation\.")
_NESTED = ("ema", "model", "state_dict")  # training checkpoints keep the weights one level down


def load(source, *, format: str | None = None, map_location="cpu", **flags) -> Denoiser:
    """The released model at ``source`` as our ``Denoiser`` (``load_pretrained(...).denoiser``), in eval mode."""
    return load_pretrained(source, format=format, map_location=map_location, **flags).denoiser


def load_pretrained(source, *, format: str | None = None, map_location="cpu", sha256: str | None = None,
                    **flags) -> Pretrained:
    """The released model at ``source`` with what sampling it needs (``Pretrained``).

    Args:
        source: file, folder, ``https://`` URL or ``hf://org/name[/file]``.
        format: ``edm`` | ``adm`` | ``dit`` | ``diffusers``; None infers it (module docstring).
        map_location: where the weights go (``torch.load``'s argument).
        sha256: expected SHA-256 of the file, checked before it is read.
        flags: the format loader's settings, under the source project's names.
    Raises:
        ValueError: an unknown format, or one that cannot be inferred (naming the allowed ones and ``format=``).
    """
    path = remote.resolve(source, sha256=sha256)
    if format is None:
        format = infer_format(path)
    elif format not in FORMATS:
        raise ValueError(f"format={format!r} is not known; allowed: {', '.join(FORMATS)}")
    pretrained = importlib.import_module(FORMATS[format]).load(path, map_location=map_location, **flags)
    pretrained.denoiser.eval()
    return pretrained


def load_classifier(source, *, format: str = "adm_classifier", map_location="cpu", sha256: str | None = None,
                    **flags) -> tuple[torch.nn.Module, dict]:
    """A released noise-conditional classifier as ``(network in eval mode, its settings)``. The one format,
    ``adm_classifier``: guided-diffusion's ``EncoderUNetModel`` ``.pt`` (``adm.load_classifier``: our
    ``DhariwalEncoder``, ``classifier(x_t, t)`` in the DDPM frame, flags ``classifier_width=...``). ``source`` as
    ``load``'s (file, URL, ``hf://``); read with ``weights_only=True``."""
    if format != "adm_classifier":
        raise ValueError(f"classifier format={format!r} is not known; allowed: adm_classifier")
    from . import adm

    return adm.load_classifier(remote.resolve(source, sha256=sha256), map_location=map_location, **flags)


def infer_format(path: Path) -> str:
    """The format of a local file or folder (module docstring); ValueError listing the formats otherwise."""
    path = Path(path)
    if path.is_dir():
        if (path / "model_index.json").is_file() or (path / "config.json").is_file():
            return "diffusers"
    elif path.suffix == ".pkl":
        return "edm"
    elif path.suffix in (".pt", ".pth"):
        return "dit" if any(_DIT_KEY.search(key) for key in _state_keys(path)) else "adm"
    raise ValueError(f"ckpt={path}: cannot tell its format (a .pkl is edm; a .pt/.pth is dit or adm by its keys; a "
                     f"folder with model_index.json or config.json is diffusers); allowed formats: "
                     f"{', '.join(FORMATS)}; force one with format=NAME (command line: pretrained.format=NAME)")


def _state_keys(path: Path) -> list[str]:
    """The parameter names of a ``.pt`` file (read with ``weights_only=True``, memory-mapped when it is a zip
    archive: no copy of the weights), including those one level down in a training checkpoint (``ema``,
    ``model``, ``state_dict``)."""
    try:
        checkpoint = torch.load(path, map_location="cpu", mmap=zipfile.is_zipfile(path), weights_only=True)
    except pickle.UnpicklingError:
        raise ValueError(f"ckpt={path} asks for {', '.join(_refused_globals(path)) or 'globals'} outside "
                         "torch.load's weights_only allowlist, which no released state dict holds; refused, since "
                         "loading it could run code") from None
    except Exception as error:  # not a file torch.load reads
        raise ValueError(f"ckpt={path}: cannot read its keys to tell dit from adm ({type(error).__name__}: "
                         f"{error}); force the format with format=adm or format=dit (command line: "
                         "pretrained.format=NAME)") from None
    if not isinstance(checkpoint, dict):
        return []
    keys = [k for k in checkpoint if isinstance(k, str)]
    for name in _NESTED:
        if isinstance(checkpoint.get(name), dict):
            keys += [k for k in checkpoint[name] if isinstance(k, str)]
    return keys


def _refused_globals(path: Path) -> list[str]:
    """The globals of ``path``'s pickle that ``weights_only`` refuses (read from its opcodes: nothing runs)."""
    try:
        return torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except Exception:  # too damaged to list them
        return []
