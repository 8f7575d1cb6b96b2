"""NVlabs/edm ``.pkl`` files (Karras et al. 2022) as our ``Denoiser``, without running their code.

An EDM pickle (``network-snapshot-*.pkl``: ``dict(ema=net, loss_fn=..., augment_pipe=..., dataset_kwargs=...)``,
or the net alone) stores each network class with the source of its module (``torch_utils.persistence``);
EDM's own loader ``exec``s that source. We read it with a restricted unpickler instead:

- every global the pickle asks for must be on ``ALLOWED_GLOBALS``; anything else is a ``CheckpointError``
  naming the file and the global, raised before the global is looked up (nothing is imported or called);
- ``torch_utils.persistence._reconstruct_persistent_obj`` becomes ``_persistent_record``, which keeps the class
  name and the object state (parameters, buffers, sub-modules, constructor arguments) and never reads
  ``module_src``; torch's containers (``ModuleDict`` ...) become the same inert ``ModuleRecord``;
- tensor storages are read with ``torch.load(..., weights_only=True)``.

The records are then mapped to our classes: ``EDMPrecond | VPPrecond | VEPrecond | iDDPMPrecond`` -> the
``edm | vp | ve | iddpm`` formulation with the pickle's constants, ``SongUNet`` / ``DhariwalUNet`` -> ours,
with the parameters renamed and re-laid out (``_song_unet_state``, ``_dhariwal_unet_state``).
"""

from __future__ import annotations

import io
import math
import pickle
import re
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch

from .. import formulations
from ..checkpoint_io import CheckpointError
from ..denoiser import Denoiser
from ..networks import DhariwalUNet, SongUNet
from ..networks.unet_blocks import SelfAttention2d
from .base import Pretrained

__all__ = ["ALLOWED_GLOBALS", "ModuleRecord", "load", "read_pickle"]

# EDM generate.py's sampling range (``--sigma_min/--sigma_max`` defaults), clamped to the net's own range as
# generate.py does; EDMPrecond's own range is unlimited (0, inf) unless set in training.
GENERATE_SIGMA_MIN = 0.002
GENERATE_SIGMA_MAX = 80.0
GENERATE_STEPS = 18  # generate.py --steps: deterministic Heun, 35 NFE (EDM Table 2, CIFAR-10).
GENERATE_RHO = 7.0  # generate.py --rho: the time-step exponent (EDM eq. 5).


class ModuleRecord:
    """An inert stand-in for a pickled ``torch.nn.Module``: its class name and ``state`` (the module's
    ``__dict__``: ``_parameters``, ``_buffers``, ``_modules``, persistent classes' ``_init_kwargs``, plain
    attributes). Nothing of the original class runs."""

    class_name = "?"

    def __init__(self, class_name: str, state: dict):
        self.class_name, self.state = class_name, state

    def __setstate__(self, state) -> None:  # BUILD of a torch container pickled with NEWOBJ
        self.state = state if isinstance(state, dict) else {}

    @property
    def init_kwargs(self) -> dict:
        """The keyword arguments the object was constructed with (persistent classes record them)."""
        return dict(self.state.get("_init_kwargs") or {})

    def child(self, name: str) -> ModuleRecord | None:
        return (self.state.get("_modules") or {}).get(name)

    def __repr__(self) -> str:
        return f"ModuleRecord({self.class_name})"


def _container_record(name: str) -> type:
    """A ``ModuleRecord`` subclass standing in for torch container class ``name`` (built by NEWOBJ + BUILD)."""
    return type(name, (ModuleRecord,), {"class_name": name, "__init__": object.__init__})


def _persistent_record(meta) -> ModuleRecord:
    """Replaces ``torch_utils.persistence._reconstruct_persistent_obj``: keeps ``class_name`` and ``state``;
    ``meta["module_src"]`` (the embedded Python source) is never read."""
    if not isinstance(meta, dict) or meta.get("type") != "class" or not isinstance(meta.get("class_name"), str):
        raise pickle.UnpicklingError("a persistent object without type='class' and a class_name")
    state = meta.get("state")
    return ModuleRecord(meta["class_name"], dict(state) if isinstance(state, dict) else {})


def _load_storage(data: bytes):
    """Replaces ``torch.storage._load_from_bytes``: the storage's own ``torch.save`` bytes, read weights-only."""
    return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)


def _rebuild_tensor(storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None, metadata=None):
    """Replaces ``torch._utils._rebuild_tensor_v2``: a plain tensor on ``storage`` (hooks, metadata ignored)."""
    if not isinstance(storage, (torch.TypedStorage, torch.UntypedStorage)):
        raise pickle.UnpicklingError(f"a tensor on a {type(storage).__name__}, not a torch storage")
    return torch._utils._rebuild_tensor(storage, storage_offset, size, stride)


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None, state=None):
    """Replaces ``torch._utils._rebuild_parameter[_with_state]``: the parameter's data as a plain tensor."""
    if not isinstance(data, torch.Tensor):
        raise pickle.UnpicklingError(f"a parameter holding a {type(data).__name__}, not a tensor")
    return data


def _numpy_dtype(name, align=False, copy=False):
    """``numpy.dtype`` for numeric types only (an object dtype could carry arbitrary pickled objects)."""
    dtype = np.dtype(name, align, copy)
    if dtype.hasobject:
        raise pickle.UnpicklingError(f"numpy dtype {dtype} holds Python objects")
    return dtype


def _numpy_scalar(dtype, data=None):
    """``numpy.core.multiarray.scalar`` for numeric dtypes: the scalar of ``dtype`` from its raw bytes."""
    if not isinstance(dtype, np.dtype) or dtype.hasobject or not isinstance(data, bytes):
        raise pickle.UnpicklingError("a numpy scalar that is not a numeric dtype with raw bytes")
    return np.frombuffer(data, dtype=dtype)[0]


_TORCH_CONTAINERS = ("Module", "ModuleDict", "ModuleList", "Sequential", "ParameterDict", "ParameterList")

# Every global an EDM pickle may name ("module.name" -> what it becomes); nothing else loads.
ALLOWED_GLOBALS = {
    "torch_utils.persistence._reconstruct_persistent_obj": _persistent_record,
    "torch.storage._load_from_bytes": _load_storage,
    "torch._utils._rebuild_tensor_v2": _rebuild_tensor,
    "torch._utils._rebuild_parameter": _rebuild_parameter,
    "torch._utils._rebuild_parameter_with_state": _rebuild_parameter,
    "collections.OrderedDict": OrderedDict,
    "dnnlib.util.EasyDict": dict,
    "numpy.dtype": _numpy_dtype,
    "numpy.core.multiarray.scalar": _numpy_scalar,  # numpy 1
    "numpy._core.multiarray.scalar": _numpy_scalar,  # numpy 2
    **{f"torch.nn.modules.{'module' if n == 'Module' else 'container'}.{n}": _container_record(n)
       for n in _TORCH_CONTAINERS},
}


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, file, path: Path):
        super().__init__(file)
        self.path = path

    def find_class(self, module: str, name: str):
        key = f"{module}.{name}"
        if key not in ALLOWED_GLOBALS:
            raise CheckpointError(f"{self.path}: refusing global {key}, which an NVlabs/edm pickle does not need "
                                  f"(allowed: {', '.join(sorted(ALLOWED_GLOBALS))}); nothing from it was run")
        return ALLOWED_GLOBALS[key]


def read_pickle(path: Path):
    """The content of an EDM pickle with networks as ``ModuleRecord``s; ``CheckpointError`` naming ``path``
    for a global outside ``ALLOWED_GLOBALS`` or a file that is not a readable pickle."""
    try:
        with open(path, "rb") as f:
            return _RestrictedUnpickler(f, path).load()
    except CheckpointError:
        raise
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError, RuntimeError) as err:
        raise CheckpointError(f"{path} is not a readable NVlabs/edm pickle: {type(err).__name__}: {err}") from None


# --- formulation ------------------------------------------------------------------------------------------------

PRECONDITIONERS = {"EDMPrecond": "edm", "VPPrecond": "vp", "VEPrecond": "ve", "iDDPMPrecond": "iddpm"}


def _formulation(precond: ModuleRecord) -> formulations.Formulation:
    """Our formulation with the preconditioner's constants (its attributes, set whether or not passed)."""
    s = precond.state
    name = PRECONDITIONERS[precond.class_name]
    if name == "edm":
        return formulations.get("edm", sigma_data=float(s["sigma_data"]),
                                sigma_min=max(GENERATE_SIGMA_MIN, float(s["sigma_min"])),
                                sigma_max=min(GENERATE_SIGMA_MAX, float(s["sigma_max"])))
    if name == "vp":
        return formulations.get("vp", beta_d=float(s["beta_d"]), beta_min=float(s["beta_min"]),
                                num_timesteps=int(s["M"]), epsilon_t=float(s["epsilon_t"]))
    if name == "ve":
        return formulations.get("ve", sigma_min=float(s["sigma_min"]), sigma_max=float(s["sigma_max"]))
    return formulations.get("iddpm", C_1=float(s["C_1"]), C_2=float(s["C_2"]), num_timesteps=int(s["M"]))


# --- networks ---------------------------------------------------------------------------------------------------

# NVlabs/edm training/networks.py constructor defaults (used for the settings a pickle did not pass).
EDM_MODEL_DEFAULTS = {
    "SongUNet": dict(augment_dim=0, model_channels=128, channel_mult=[1, 2, 2, 2], channel_mult_emb=4, num_blocks=4,
                     attn_resolutions=[16], dropout=0.10, label_dropout=0, embedding_type="positional",
                     channel_mult_noise=1, encoder_type="standard", decoder_type="standard",
                     resample_filter=[1, 1]),
    "DhariwalUNet": dict(augment_dim=0, model_channels=192, channel_mult=[1, 2, 3, 4], channel_mult_emb=4,
                         num_blocks=3, attn_resolutions=[32, 16, 8], dropout=0.10, label_dropout=0),
}
EDM_HEAD_CHANNELS = 64  # DhariwalUNet: channels per attention head (fixed in EDM's code)


def source_sampler(formulation: formulations.Formulation) -> dict:
    """NVlabs/edm generate.py's defaults as a ``configs/sampler`` node: deterministic Heun (``S_churn`` 0), 18
    steps on EDM's time steps (eq. 5, rho 7) between ``max(0.002, sigma_min)`` and ``min(80, sigma_max)`` of the net,
    whatever its preconditioner (``edm_sampler``): ``time_steps`` for VP, VE and iDDPM, whose own grids differ; an
    EDMPrecond's formulation already has that range and grid."""
    sampler = {"name": "heun", "steps": GENERATE_STEPS,
               "options": {"S_churn": 0.0, "S_tmin": 0.0, "S_tmax": math.inf, "S_noise": 1.0}}
    if formulation.name == "edm":
        return sampler
    time_steps = {"sigma_min": max(GENERATE_SIGMA_MIN, formulation.sigma_min),
                  "sigma_max": min(GENERATE_SIGMA_MAX, formulation.sigma_max), "rho": GENERATE_RHO}
    return {**sampler, "time_steps": time_steps}


def _plain(value):
    """Numpy scalars -> Python numbers, lists/tuples recursively (for configs and our constructors)."""
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _model_kwargs(path: Path, model: ModuleRecord) -> dict:
    """EDM's constructor arguments of the network (defaults filled in), checked for names we do not know."""
    given = {k: _plain(v) for k, v in model.init_kwargs.items()}
    defaults = EDM_MODEL_DEFAULTS[model.class_name]
    unknown = sorted(set(given) - set(defaults) - {"img_resolution", "in_channels", "out_channels", "label_dim"})
    if unknown:
        raise CheckpointError(f"{path}: {model.class_name} was built with {unknown}, which NVlabs/edm's "
                              f"{model.class_name} does not take; allowed: {sorted(defaults)}")
    return {**defaults, **given}


def _check_attention_width(path: Path, kw: dict) -> None:
    """EDM's DhariwalUNet gives a layer ``channels // 64`` heads, i.e. no attention below 64 channels; ours keeps
    at least one head, so such a (toy-sized) net has no equal here."""
    levels = len(kw["channel_mult"])
    for level, mult in enumerate(kw["channel_mult"]):
        res, width = kw["img_resolution"] >> level, kw["model_channels"] * mult
        if (res in kw["attn_resolutions"] or level == levels - 1) and width < EDM_HEAD_CHANNELS:
            raise CheckpointError(f"{path}: EDM's DhariwalUNet has no attention at {res}x{res} ({width} channels, "
                                  f"fewer than its {EDM_HEAD_CHANNELS} per head) where ours has one head; allowed: "
                                  f"model_channels * channel_mult >= {EDM_HEAD_CHANNELS} at the attention "
                                  "resolutions and the lowest one")


def _our_network(path: Path, model: ModuleRecord, kw: dict) -> torch.nn.Module:
    """Our ``SongUNet`` / ``DhariwalUNet`` with EDM's settings ``kw`` (EDM's names)."""
    common = dict(in_channels=kw["in_channels"], out_channels=kw["out_channels"], resolution=kw["img_resolution"],
                  num_classes=kw["label_dim"], label_dropout=kw["label_dropout"], augment_dim=kw["augment_dim"],
                  model_channels=kw["model_channels"], channel_mult=tuple(kw["channel_mult"]),
                  channel_mult_emb=kw["channel_mult_emb"], num_blocks=kw["num_blocks"],
                  attn_resolutions=tuple(kw["attn_resolutions"]), dropout=kw["dropout"])
    try:
        if model.class_name == "SongUNet":
            return SongUNet(**common, embedding_type=kw["embedding_type"],
                            channel_mult_noise=kw["channel_mult_noise"], encoder_type=kw["encoder_type"],
                            decoder_type=kw["decoder_type"], resample_filter=tuple(kw["resample_filter"]))
        _check_attention_width(path, kw)
        return DhariwalUNet(**common, channels_per_head=EDM_HEAD_CHANNELS)
    except (ValueError, TypeError) as err:
        raise CheckpointError(f"{path}: {model.class_name} settings {kw} do not build: {err}") from None


def _tensors(record: ModuleRecord, prefix: str = "") -> dict[str, torch.Tensor]:
    """The record's parameters and persistent buffers by dotted name, as ``state_dict`` would list them."""
    state, out = record.state, {}
    skip = state.get("_non_persistent_buffers_set") or set()
    for kind in ("_parameters", "_buffers"):
        for name, tensor in (state.get(kind) or {}).items():
            if isinstance(tensor, torch.Tensor) and name not in skip:
                out[prefix + name] = tensor
    for name, child in (state.get("_modules") or {}).items():
        if isinstance(child, ModuleRecord):
            out.update(_tensors(child, f"{prefix}{name}."))
    return out


# UNetBlock tensors: EDM name -> ours (the rest keep their names). EDM's Conv2d ``resample_filter`` buffers (the
# FIR taps, which our ``Resample`` builds from the ``resample_filter`` setting) are not mapped.
_BLOCK_NAMES = {"skip.": "skip.1.", "norm2.": "attn.norm.", "qkv.": "attn.attn.qkv.", "proj.": "attn.attn.proj."}


def _block_tensor_name(name: str) -> str:
    for edm, ours in _BLOCK_NAMES.items():
        if name.startswith(edm):
            return ours + name[len(edm):]
    return name


def _swap_halves(n: int) -> torch.Tensor:
    """Index map of EDM SongUNet's sin/cos swap of the noise embedding (``flip`` of its two halves)."""
    return torch.cat([torch.arange(n // 2, n), torch.arange(n // 2)])


def _label_table(weight: torch.Tensor, bias: torch.Tensor | None, scale: float) -> torch.Tensor:
    """EDM's ``map_label`` (a Linear on one-hot labels times ``scale``) as an embedding table ``[L + 1, C]``:
    row c = ``scale W[:, c] + b``, null row (index L) = what EDM computes for an all-zero label, ``b`` (or 0)."""
    bias = torch.zeros(weight.shape[0], dtype=weight.dtype) if bias is None else bias
    scale = torch.tensor(scale, dtype=weight.dtype)
    return torch.cat([weight.t() * scale + bias, bias[None]])


def _song_unet_state(edm: dict[str, torch.Tensor], resolution: int, num_levels: int) -> dict[str, torch.Tensor]:
    """EDM SongUNet tensors (names as ``model.state_dict()``) -> our SongUNet's state dict names and layout
    (attention layouts are fixed afterwards by ``_attention_layout``)."""
    out = {}
    for name, tensor in edm.items():
        top, rest = name.split(".", 1)
        if name.endswith("resample_filter"):
            continue
        if top in ("enc", "dec"):
            key, tail = rest.split(".", 1)
            match = re.fullmatch(r"(\d+)x\d+_(\w+)", key)
            if match is None:
                raise ValueError(f"SongUNet entry {top}.{key} is not named {{res}}x{{res}}_{{kind}}")
            level = int(math.log2(resolution // int(match[1])))
            ours = _song_unet_module(top, match[2], level, num_levels)
            tail = _block_tensor_name(tail) if re.fullmatch(r"down|up|in\d|block\d+", match[2]) else tail
            out[f"{ours}.{tail}"] = tensor
        elif top != "map_label":
            out[name] = tensor
    noise_channels = edm["map_layer0.weight"].shape[1]
    swap = _swap_halves(noise_channels)
    out["map_layer0.weight"] = out["map_layer0.weight"][:, swap]
    if "map_augment.weight" in out:
        out["map_augment.weight"] = out["map_augment.weight"][swap]
    if "map_label.weight" in edm:
        weight = edm["map_label.weight"]
        table = _label_table(weight, edm.get("map_label.bias"), math.sqrt(weight.shape[1]))
        out["map_label.embed.weight"] = table[:, swap]
    return out


def _song_unet_module(part: str, kind: str, level: int, num_levels: int) -> str:
    """Our SongUNet module path of EDM's ``enc``/``dec`` entry ``{res}x{res}_{kind}`` at ``level`` (its
    ``aux_down``/``aux_up`` entries hold FIR taps only and never get here)."""
    if kind.startswith("block"):
        stage = f"enc.{level}" if part == "enc" else f"dec.{num_levels - 1 - level}"
        return f"{stage}.blocks.{kind[5:]}"
    names = {("enc", "conv"): "enc_conv", ("enc", "down"): f"enc.{level}.down",
             ("enc", "aux_skip"): f"enc.{level}.aux_skip", ("enc", "aux_residual"): f"enc.{level}.aux_residual.0"}
    stage = f"dec.{num_levels - 1 - level}"
    names |= {("dec", "in0"): f"{stage}.mid.0", ("dec", "in1"): f"{stage}.mid.1", ("dec", "up"): f"{stage}.mid.0",
              ("dec", "aux_norm"): f"{stage}.head.0", ("dec", "aux_conv"): f"{stage}.head.2"}
    if (part, kind) not in names:
        raise ValueError(f"SongUNet has an entry {part}...{kind} that NVlabs/edm's SongUNet does not build")
    return names[part, kind]


def _dhariwal_unet_state(edm: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """EDM DhariwalUNet tensors -> our DhariwalUNet's names: ``enc``/``dec`` entries are numbered in EDM's order
    (its first ``enc`` entry is our ``enc_conv``)."""
    out, index = {}, {"enc": {}, "dec": {}}
    for name, tensor in edm.items():
        top, rest = name.split(".", 1)
        if name.endswith("resample_filter"):
            continue
        if top in ("enc", "dec"):
            key, tail = rest.split(".", 1)
            if top == "enc" and key.endswith("_conv"):
                out[f"enc_conv.{tail}"] = tensor
                continue
            number = index[top].setdefault(key, len(index[top]))
            out[f"{top}.{number}.{_block_tensor_name(tail)}"] = tensor
        elif top != "map_label":
            out[name] = tensor
    if "map_label.weight" in edm:
        out["map_label.embed.weight"] = _label_table(edm["map_label.weight"], None, 1.0)
    return out


def _attention_layout(net: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """EDM's attention: ``qkv`` a 1x1 conv whose ``3C`` outputs are laid out ``[head, channel, (q, k, v)]``,
    ``proj`` a 1x1 conv; ours (timm ``Attention``): Linear layers, ``qkv`` outputs ``[(q, k, v), head, channel]``."""
    for prefix, module in net.named_modules():
        if not isinstance(module, SelfAttention2d):
            continue
        heads, qkv, proj = module.attn.num_heads, f"{prefix}.attn.qkv.", f"{prefix}.attn.proj.weight"
        if qkv + "weight" not in state:
            continue  # reported as missing by _load_weights
        weight, bias = state[qkv + "weight"].flatten(1), state[qkv + "bias"]
        rows = torch.arange(weight.shape[0]).reshape(heads, -1, 3).permute(2, 0, 1).flatten()
        state[qkv + "weight"], state[qkv + "bias"] = weight[rows], bias[rows]
        if proj in state:
            state[proj] = state[proj].flatten(1)


def _load_weights(path: Path, net: torch.nn.Module, state: dict[str, torch.Tensor], class_name: str) -> None:
    _attention_layout(net, state)
    ours = net.state_dict()
    missing, unexpected = sorted(set(ours) - set(state)), sorted(set(state) - set(ours))
    wrong = sorted(k for k in set(ours) & set(state) if ours[k].shape != state[k].shape)
    if missing or unexpected or wrong:
        detail = "; ".join(f"{what}: {keys[:6]}{' ...' if len(keys) > 6 else ''}" for what, keys in
                           (("missing", missing), ("not ours", unexpected), ("other shape", wrong)) if keys)
        raise CheckpointError(f"{path}: EDM's {class_name} does not map onto ours ({detail})")
    net.load_state_dict({k: v.to(ours[k].dtype) for k, v in state.items()})


# --- the format -------------------------------------------------------------------------------------------------


def _network_record(path: Path, data) -> ModuleRecord:
    """The preconditioner: ``data["ema"]`` of a training snapshot, or the pickled net itself."""
    net = data.get("ema") if isinstance(data, dict) else data
    if not isinstance(net, ModuleRecord):
        what = f"a dict with keys {sorted(data)}" if isinstance(data, dict) else f"a {type(data).__name__}"
        raise CheckpointError(f"{path} holds {what}, not an NVlabs/edm network (a snapshot dict with 'ema' or a "
                              "pickled preconditioner)")
    if net.class_name not in PRECONDITIONERS:
        raise CheckpointError(f"{path}: the network is a {net.class_name}; allowed: {', '.join(PRECONDITIONERS)}")
    model = net.child("model")
    if not isinstance(model, ModuleRecord) or model.class_name not in EDM_MODEL_DEFAULTS:
        found = getattr(model, "class_name", type(model).__name__)
        raise CheckpointError(f"{path}: the {net.class_name} wraps a {found}; allowed: "
                              f"{', '.join(EDM_MODEL_DEFAULTS)}")
    return net


def load(path: Path, *, map_location="cpu", **flags) -> Pretrained:
    """An NVlabs/edm ``.pkl`` as a ``Pretrained`` (see the module docstring; nothing in the file is run).

    ``D(x, sigma, labels, augment_labels=...)`` equals EDM's ``net(x, sigma, one_hot(labels), augment_labels=...)``
    in float32 (``labels=None`` = EDM's all-zero label); iDDPM nets snap c_noise to the nearest grid level as
    EDM's ``iDDPMPrecond`` does and return the first ``img_channels`` output channels. ``Pretrained.sampler`` is
    generate.py's (``source_sampler``): what sample/evaluate run for the settings they leave null. The conditional
    pickles were trained with ``label_dropout=0``: their all-zero label was never seen, so guidance is refused.
    Args:
        path: the local ``.pkl``.
        map_location: device of the returned denoiser (a string or ``torch.device``).
        flags: none (the pickle holds every setting); any flag is an error.
    """
    path = Path(path)
    if flags:
        raise CheckpointError(f"{path}: the edm format takes no flags (the pickle holds every setting); "
                              f"got {sorted(flags)}")
    precond = _network_record(path, read_pickle(path))
    model = precond.child("model")
    kw = _model_kwargs(path, model)
    net = _our_network(path, model, kw)
    edm = _tensors(model)
    try:
        if model.class_name == "SongUNet":
            state = _song_unet_state(edm, kw["img_resolution"], len(kw["channel_mult"]))
        else:
            state = _dhariwal_unet_state(edm)
        formulation = _formulation(precond)
    except (KeyError, ValueError) as err:
        raise CheckpointError(f"{path}: its {precond.class_name}({model.class_name}) does not read as NVlabs/edm's: "
                              f"{type(err).__name__}: {err}") from None
    _load_weights(path, net, state, model.class_name)
    denoiser = Denoiser(net, formulation, variance_trained=False, float32_preconditioning=True)
    denoiser = denoiser.eval().requires_grad_(False).to(map_location)
    precond_kwargs = {k: _plain(v) for k, v in precond.init_kwargs.items()}
    config = dict(precond=precond.class_name, precond_kwargs=precond_kwargs, model_type=model.class_name,
                  model_kwargs=kw, use_fp16=bool(precond.state.get("use_fp16", False)),
                  formulation=formulation.config())
    return Pretrained(denoiser=denoiser, data_shape=(kw["in_channels"], kw["img_resolution"], kw["img_resolution"]),
                      num_classes=kw["label_dim"], format="edm", source=str(path), config=config,
                      sampler=source_sampler(formulation))
