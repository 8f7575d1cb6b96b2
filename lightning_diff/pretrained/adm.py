"""Format ``adm``: openai/guided-diffusion and openai/improved-diffusion ``UNetModel`` ``.pt`` state dicts as our
``Denoiser`` around our ``DhariwalUNet``, on the discrete DDPM formulation the checkpoint was trained with.

The files hold weights only; the settings come from the flags of the source's model card, under
guided-diffusion's ``model_and_diffusion_defaults()`` names, and from the weights' shapes (``load``).
"""

from __future__ import annotations

import functools
import logging
import pathlib
import re

import torch
from torch import nn

from ..denoiser import Denoiser
from ..formulations import DDPM
from ..formulations.schedules import ddpm_timesteps
from ..networks.adm import ConvResample, DhariwalEncoder, DhariwalUNet
from .base import Pretrained

__all__ = ["load", "FLAGS", "build_network", "read_state_dict", "load_classifier", "CLASSIFIER_FLAGS"]

log = logging.getLogger(__name__)

# guided-diffusion's model_and_diffusion_defaults(); None: inferred from the weights (a given value is checked).
FLAGS = dict(
    image_size=None,  # Inferred from channel_mult where it is a create_model default, else 64.
    num_channels=None, num_res_blocks=None, channel_mult=None, attention_resolutions=None,
    learn_sigma=None, class_cond=None, use_scale_shift_norm=None, resblock_updown=None,
    num_heads=4, num_heads_upsample=-1, num_head_channels=-1,  # Attention heads: shapes cannot tell.
    use_new_attention_order=False,  # qkv layout: QKVAttention (True) or QKVAttentionLegacy (False).
    dropout=0.0, use_checkpoint=False, use_fp16=False,  # Training / run settings: no effect on D.
    diffusion_steps=1000, noise_schedule="linear", predict_xstart=False, rescale_timesteps=False,
    use_kl=False, rescale_learned_sigmas=False,  # Training loss.
    timestep_respacing=None,  # The source sampler's grid ("N", "ddimN", "" = all T); None: "250" (model cards).
)
PAPER_STEPS = 250  # The model cards' SAMPLE_FLAGS --timestep_respacing 250, the ADM paper's FID tables.
# guided-diffusion create_model: image_size -> channel_mult when channel_mult="".
DEFAULT_CHANNEL_MULT = {512: (0.5, 1, 1, 2, 2, 4, 4), 256: (1, 1, 2, 2, 4, 4), 128: (1, 1, 2, 3, 4), 64: (1, 2, 3, 4)}
NOISE_SCHEDULES = ("linear", "cosine")  # guided-diffusion get_named_beta_schedule

_RESBLOCK = (("in_layers.0.", "norm0."), ("in_layers.2.", "conv0."), ("emb_layers.1.", "affine."),
             ("out_layers.0.", "norm1."), ("out_layers.3.", "conv1."), ("skip_connection.", "skip.1."))
_ATTENTION = (("norm.", "norm."), ("qkv.", "attn.qkv."), ("proj_out.", "attn.proj."))
_POOL = (("positional_embedding", "positional_embedding"), ("qkv_proj.", "qkv."), ("c_proj.", "proj."))


def read_state_dict(path: pathlib.Path, map_location="cpu") -> dict[str, torch.Tensor]:
    """The ``UNetModel`` state dict in ``path`` (``torch.load(weights_only=True)``)."""
    state = torch.load(path, map_location=map_location, weights_only=True)
    if not isinstance(state, dict) or "time_embed.0.weight" not in state or "out.2.weight" not in state:
        raise ValueError(f"format=adm: {path} is not a guided-diffusion UNetModel state dict; allowed: a state dict "
                         "with keys 'time_embed.0.weight', 'input_blocks.0.0.weight', ..., 'out.2.weight'")
    return state


def _sub_indices(state: dict, prefix: str) -> list[int]:
    """Sorted integers i of the keys ``prefix.i.*``."""
    pattern = re.compile(re.escape(prefix) + r"\.(\d+)\.")
    return sorted({int(m.group(1)) for key in state if (m := pattern.match(key))})


def _is_up_layer(state: dict, block: str, layer: int) -> bool:
    """Whether layer ``layer`` of output block ``block`` is an upsampler (Upsample conv or a ResBlock)."""
    return layer > 0 and (f"{block}.{layer}.conv.weight" in state or f"{block}.{layer}.in_layers.0.weight" in state)


def infer_shapes(state: dict[str, torch.Tensor]) -> dict:
    """The ``create_model`` settings the weights' shapes determine: ``num_channels``, ``channel_mult`` (tuple),
    ``num_res_blocks``, ``attention_ds`` (downsampling rates of the levels with attention), ``learn_sigma``,
    ``class_cond``, ``num_classes``, ``in_channels``, ``out_channels``, ``use_scale_shift_norm``,
    ``resblock_updown``."""
    model_channels = state["time_embed.0.weight"].shape[1]
    outputs = _sub_indices(state, "output_blocks")
    ups = [o for o in outputs if any(_is_up_layer(state, f"output_blocks.{o}", j)
                                     for j in _sub_indices(state, f"output_blocks.{o}"))]
    per_level = ups[0] + 1 if ups else len(outputs)  # num_res_blocks + 1 output blocks per level
    levels, num_res_blocks = len(outputs) // per_level, per_level - 1
    widths, attention_ds, k = [], [], 1
    for level in range(levels):
        first = f"input_blocks.{k}.0.in_layers.2.weight"
        widths.append(state[first].shape[0])
        if f"input_blocks.{k}.1.qkv.weight" in state:
            attention_ds.append(2**level)
        k += num_res_blocks + (level < levels - 1)
    channel_mult = tuple(w // model_channels if w % model_channels == 0 else w / model_channels for w in widths)
    down = f"input_blocks.{num_res_blocks + 1}.0"
    in_channels, out_channels = state["input_blocks.0.0.weight"].shape[1], state["out.2.weight"].shape[0]
    return dict(
        num_channels=model_channels, channel_mult=channel_mult, num_res_blocks=num_res_blocks,
        attention_ds=tuple(attention_ds), in_channels=in_channels, out_channels=out_channels,
        learn_sigma=out_channels == 2 * in_channels, class_cond="label_emb.weight" in state,
        num_classes=state["label_emb.weight"].shape[0] if "label_emb.weight" in state else 0,
        use_scale_shift_norm=state["input_blocks.1.0.emb_layers.1.weight"].shape[0] == 2 * widths[0],
        resblock_updown=levels > 1 and f"{down}.in_layers.0.weight" in state,
        emb_channels=state["time_embed.0.weight"].shape[0])


def _contradiction(path, flag: str, value, weights) -> ValueError:
    return ValueError(f"format=adm: flag {flag}={value!r} contradicts the weights in {path} ({flag}={weights!r} "
                      "by their shapes)")


def _as_numbers(flag: str, value) -> tuple:
    """guided-diffusion's comma-separated string (``"32,16,8"``), or a sequence, as a tuple of numbers."""
    items = value.split(",") if isinstance(value, str) else value
    try:
        return tuple(float(v) if float(v) != int(float(v)) else int(float(v)) for v in items)
    except (TypeError, ValueError):
        raise ValueError(f"format=adm: {flag}={value!r} is invalid; allowed: comma-separated numbers such as "
                         "'32,16,8'") from None


def _check_flags(path, shapes: dict, flags: dict) -> int:
    """Check the given flags against the shapes; returns ``image_size``."""
    if shapes["in_channels"] != 3:
        raise ValueError(f"format=adm: {path} takes {shapes['in_channels']} input channels; allowed: 3 (guided-"
                         "diffusion's create_model; a SuperResModel, 6 channels, is not supported)")
    if shapes["out_channels"] not in (3, 6) or shapes["emb_channels"] != 4 * shapes["num_channels"]:
        raise ValueError(f"format=adm: {path} has {shapes['out_channels']} output channels and a "
                         f"{shapes['emb_channels']}-wide embedding for num_channels={shapes['num_channels']}; "
                         "allowed: 3 or 6 outputs and 4 x num_channels (guided-diffusion's UNetModel)")
    for flag in ("num_channels", "num_res_blocks", "learn_sigma", "class_cond", "use_scale_shift_norm",
                 "resblock_updown"):
        if flags[flag] is not None and flags[flag] != shapes[flag]:
            raise _contradiction(path, flag, flags[flag], shapes[flag])
    mult = shapes["channel_mult"]
    if flags["channel_mult"] not in (None, "") and _as_numbers("channel_mult", flags["channel_mult"]) != mult:
        raise _contradiction(path, "channel_mult", flags["channel_mult"], ",".join(map(str, mult)))
    image_size = flags["image_size"]
    if image_size is None:
        image_size = next((size for size, default in DEFAULT_CHANNEL_MULT.items() if default == mult), None)
        if image_size is None:
            image_size = 64
            log.warning("format=adm: %s: no image_size flag and channel_mult=%s is no create_model default; using "
                        "guided-diffusion's default image_size=64 (pass the model card's image_size)", path, mult)
    elif flags["channel_mult"] in (None, "") and image_size in DEFAULT_CHANNEL_MULT \
            and DEFAULT_CHANNEL_MULT[image_size] != mult:
        raise ValueError(f"format=adm: flag image_size={image_size} with channel_mult='' means guided-diffusion's "
                         f"channel_mult={DEFAULT_CHANNEL_MULT[image_size]}, but the weights in {path} have {mult}; "
                         "pass the model card's channel_mult or its image_size")
    if not isinstance(image_size, int) or image_size < 1 or image_size % 2 ** (len(mult) - 1):
        raise ValueError(f"format=adm: image_size={image_size!r} is invalid; allowed: a multiple of "
                         f"{2 ** (len(mult) - 1)} ({len(mult)} levels)")
    if flags["attention_resolutions"] is not None:
        rates = {image_size // r for r in _as_numbers("attention_resolutions", flags["attention_resolutions"])}
        given = tuple(2**level for level in range(len(mult)) if 2**level in rates)
        if given != shapes["attention_ds"]:
            found = ",".join(str(image_size // ds) for ds in shapes["attention_ds"])
            raise _contradiction(path, "attention_resolutions", flags["attention_resolutions"], found)
    if flags["noise_schedule"] not in NOISE_SCHEDULES:
        raise ValueError(f"format=adm: noise_schedule={flags['noise_schedule']!r} is not known; allowed: "
                         f"{', '.join(NOISE_SCHEDULES)}")
    return image_size


def _heads(flags: dict, widths: set[int]) -> dict:
    """Our attention settings from guided-diffusion's: ``num_head_channels`` (a head width) wins over
    ``num_heads`` / ``num_heads_upsample`` (head counts; -1: as num_heads), as in its AttentionBlock."""
    if flags["num_head_channels"] != -1:
        settings, check = dict(channels_per_head=flags["num_head_channels"]), [("num_head_channels",
                                                                                flags["num_head_channels"])]
    else:
        upsample = flags["num_heads"] if flags["num_heads_upsample"] == -1 else flags["num_heads_upsample"]
        settings = dict(num_heads=flags["num_heads"], num_heads_upsample=upsample)
        check = [("num_heads", flags["num_heads"]), ("num_heads_upsample", upsample)]
    for flag, value in check:
        if not isinstance(value, int) or value < 1 or any(w % value for w in widths):
            raise ValueError(f"format=adm: {flag}={value!r} is invalid for attention widths {sorted(widths)}; "
                             "allowed: a positive divisor of every width (guided-diffusion's AttentionBlock)")
    return settings


def _block_pairs(pairs: list, source: str, ours: str, module: nn.Module, attention_layer: str | None = None) -> None:
    """Append the pairs of one ResBlock (+ its attention) or ConvResample layer to ``pairs``."""
    if isinstance(module, ConvResample):
        pairs.append((f"{source}.conv" if "output" in source else f"{source}.op", f"{ours}.conv", "plain"))
        return
    pairs.append((source, ours, "res"))
    if module.attn is not None:
        pairs.append((attention_layer, f"{ours}.attn", "attn"))


def _encoder_pairs(pairs: list, net: nn.Module) -> None:
    """Append the pairs of the shared encoder (``input_blocks``) of a ``DhariwalUNet`` or ``DhariwalEncoder``."""
    for i, module in enumerate(net.enc):  # input_blocks[1:]: ResBlock (+ attention) or a downsampler
        _block_pairs(pairs, f"input_blocks.{i + 1}.0", f"enc.{i}", module, f"input_blocks.{i + 1}.1")


def _pairs(net: DhariwalUNet) -> list[tuple[str, str, str]]:
    """``(guided-diffusion prefix, our prefix, kind)`` for every layer, kind ``plain`` | ``res`` | ``attn``."""
    pairs = [("time_embed.0", "map_layer0", "plain"), ("time_embed.2", "map_layer1", "plain"),
             ("label_emb", "map_label.embed", "plain"), ("input_blocks.0.0", "enc_conv", "plain"),
             ("out.0", "out_norm", "plain"), ("out.2", "out_conv", "plain")]

    block = functools.partial(_block_pairs, pairs)
    _encoder_pairs(pairs, net)
    block("middle_block.0", "dec.0", net.dec[0], "middle_block.1")
    block("middle_block.2", "dec.1", net.dec[1])
    output = -1
    for p in range(2, len(net.dec)):  # output_blocks: ResBlock (+ attention) (+ the next level's upsampler)
        if net.dec_concat[p]:
            output += 1
            block(f"output_blocks.{output}.0", f"dec.{p}", net.dec[p], f"output_blocks.{output}.1")
        else:
            layer = 2 if net.dec[p - 1].attn is not None else 1
            block(f"output_blocks.{output}.{layer}", f"dec.{p}", net.dec[p])
    return pairs


def _legacy_qkv_to_ours(tensor: torch.Tensor, heads: int) -> torch.Tensor:
    """QKVAttentionLegacy's rows (head, q/k/v, channel) -> timm's / QKVAttention's (q/k/v, head, channel)."""
    rest = tensor.shape[1:]
    return tensor.reshape(heads, 3, -1, *rest).transpose(0, 1).reshape(-1, *rest)


def to_our_names(path, state: dict[str, torch.Tensor], net: DhariwalUNet, legacy_attention: bool,
                 pairs: list | None = None) -> dict:
    """guided-diffusion's state dict with ``net``'s names (``pairs``, default the UNet's ``_pairs(net)``); conv1d
    weights of attention as linear weights, legacy qkv rows reordered. Every source tensor must be used."""
    ours, used = {}, set()
    for source, target, kind in (_pairs(net) if pairs is None else pairs):
        renames = {"plain": (("", ""),), "linear": (("", ""),), "res": _RESBLOCK, "attn": _ATTENTION,
                   "pool": _POOL}[kind]
        for key in [k for k in state if k.startswith(source + ".")]:
            rest = key[len(source) + 1:]
            old, new = next(((o, n) for o, n in renames if rest.startswith(o)), (None, None))
            if old is None:
                continue
            value = state[key]
            if kind in ("attn", "pool", "linear"):  # conv1d / 1x1 conv weights [out, in, 1(, 1)] as linear ones
                value = value.reshape(value.shape[0], -1) if value.ndim > 2 else value
                if old == "qkv." and legacy_attention:
                    value = _legacy_qkv_to_ours(value, net.get_submodule(target).attn.num_heads)
            ours[f"{target}.{new}{rest[len(old):]}"] = value
            used.add(key)
    unused = sorted(set(state) - used)
    if unused:
        raise ValueError(f"format=adm: {len(unused)} tensors of {path} have no place in the network the flags and "
                         f"shapes describe (first: {unused[:3]}); allowed: a guided-diffusion UNetModel state dict")
    return ours


def build_network(path, state: dict[str, torch.Tensor], flags: dict) -> tuple[DhariwalUNet, dict]:
    """Our ``DhariwalUNet`` with the weights of ``state`` and the settings (guided-diffusion's names) it has."""
    shapes = infer_shapes(state)
    image_size = _check_flags(path, shapes, flags)
    mc, mult = shapes["num_channels"], shapes["channel_mult"]
    attn_widths = {int(mc * mult[-1])} | {int(mc * mult[ds.bit_length() - 1]) for ds in shapes["attention_ds"]}
    net = DhariwalUNet(
        in_channels=shapes["in_channels"], out_channels=shapes["out_channels"], resolution=image_size,
        num_classes=shapes["num_classes"], model_channels=mc, channel_mult=mult, channel_mult_emb=4,
        num_blocks=shapes["num_res_blocks"], attn_resolutions=tuple(image_size // ds for ds in shapes["attention_ds"]),
        dropout=flags["dropout"], adaptive_scale=shapes["use_scale_shift_norm"],
        resblock_updown=shapes["resblock_updown"], norm_groups=32, with_null_label=False,
        **_heads(flags, attn_widths))
    try:
        net.load_state_dict(to_our_names(path, state, net, not flags["use_new_attention_order"]), strict=True)
    except RuntimeError as err:
        raise ValueError(f"format=adm: the weights in {path} do not fit the network the flags and shapes describe "
                         f"({err})") from None
    settings = {**flags, **{k: v for k, v in shapes.items() if k in flags}, "image_size": image_size,
                "channel_mult": ",".join(map(str, mult)), "num_classes": shapes["num_classes"],
                "attention_resolutions": ",".join(str(image_size // ds) for ds in shapes["attention_ds"])}
    return net.eval(), settings


def formulation(flags: dict, spacing: str = "respace") -> DDPM:
    """guided-diffusion's ``create_gaussian_diffusion`` as our DDPM: its betas (``noise_schedule``,
    ``diffusion_steps``), x0 or eps prediction (``predict_xstart``), ``t * 1000 / T`` fed to the network
    (``rescale_timesteps``), sampled on its ``space_timesteps`` (``spacing``: ``respace`` or ``respace_ddim``)."""
    T = flags["diffusion_steps"]
    return DDPM(num_timesteps=T, beta_schedule=flags["noise_schedule"],
                prediction="x0" if flags["predict_xstart"] else "eps",
                timestep_scale=1000 / T if flags["rescale_timesteps"] else 1.0, spacing=spacing)


def respacing(value, num_timesteps: int) -> tuple[str, int]:
    """guided-diffusion's ``timestep_respacing`` as ``(our DDPM spacing, steps)``: ``"N"`` -> ``("respace", N)``,
    ``"ddimN"`` -> ``("respace_ddim", N)``, ``""`` -> all T timesteps, None -> ``PAPER_STEPS`` (at most T).
    ValueError naming the flag for several sections (``"10,15,20"``) or a count the grid cannot make."""
    T = num_timesteps
    text = "" if value is None else str(value).strip()
    spacing, count = ("respace_ddim", text[4:]) if text.startswith("ddim") else ("respace", text)
    if value is None or not text:
        return spacing, min(PAPER_STEPS, T) if value is None else T
    allowed = f"allowed: '' (all {T} timesteps), 'N' or 'ddimN' with N in [1, {T}] (one section: '10,15,20' is not)"
    if not count.isdigit():
        raise ValueError(f"format=adm: timestep_respacing={value!r} is not supported; {allowed}")
    try:
        ddpm_timesteps(T, int(count), spacing)
    except ValueError as err:
        raise ValueError(f"format=adm: timestep_respacing={value!r}: {err}; {allowed}") from None
    return spacing, int(count)


def source_sampler(settings: dict, steps: int) -> dict:
    """guided-diffusion's ``image_sample.py`` as a ``configs/sampler`` node: ``p_sample_loop`` (ancestral DDPM)
    over ``steps`` respaced timesteps, ``clip_denoised=True``, the variance ``create_gaussian_diffusion`` gives
    (``learn_sigma``: LEARNED_RANGE; else FIXED_LARGE, its ``sigma_small=False``)."""
    variance = "learned" if settings["learn_sigma"] else "fixed_large"
    return {"name": "ddpm", "steps": steps, "options": {"variance": variance, "clip_denoised": True}}


def load(path: pathlib.Path, *, map_location="cpu", **flags) -> Pretrained:
    """A guided-diffusion / improved-diffusion ``UNetModel`` ``.pt`` as our ``Denoiser``: our ``DhariwalUNet``
    (GroupNorm32, no null label) on our ``DDPM`` with the source's betas, T and target, learned variance kept
    (``variance_trained = learn_sigma``).

    Flags: guided-diffusion's ``model_and_diffusion_defaults()`` keys (``FLAGS``), pasted from the model card.
    - Inferred from the weights' shapes (a given flag that disagrees is an error naming both values):
      ``num_channels``, ``num_res_blocks``, ``channel_mult``, ``attention_resolutions`` (which levels),
      ``learn_sigma`` (6 output channels), ``class_cond`` (and the number of classes), ``use_scale_shift_norm``,
      ``resblock_updown``.
    - Not in the shapes, so from the flags with guided-diffusion's defaults: ``image_size`` (else the size
      whose default ``channel_mult`` the weights have: 64/128/256/512, else 64), ``num_heads`` (4),
      ``num_heads_upsample`` (-1), ``num_head_channels`` (-1), ``use_new_attention_order`` (False),
      ``diffusion_steps`` (1000), ``noise_schedule`` (linear), ``predict_xstart`` and ``rescale_timesteps``
      (False).
    - Recorded in ``Pretrained.config`` only (they do not change D): ``dropout`` (set on the network for
      fine-tuning), ``use_checkpoint``, ``use_fp16`` (weights load in float32; run under autocast for the
      source's float16 torso), ``use_kl``, ``rescale_learned_sigmas`` (training losses).
    - The source's sampler (``Pretrained.sampler``: what sample/evaluate run for the settings they leave null):
      ``timestep_respacing`` (``respacing``: ``"N"`` or ``"ddimN"``, our formulation's ``respace`` /
      ``respace_ddim`` spacing; unset, the model cards' 250 steps) with ``image_sample.py``'s ancestral sampler,
      ``clip_denoised=True`` and ``learn_sigma``'s variance (``source_sampler``).

    ``D(x; sigma)`` at the source's levels ``sigma_t = sqrt((1 - abar_t) / abar_t)`` is its x0-prediction
    ``(x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t)`` with ``x_t = sqrt(abar_t) x`` (or its predicted x0);
    between levels sigma is snapped to the nearest level (``DDPM.round_sigma``, as EDM's iDDPMPrecond).
    """
    unknown = sorted(set(flags) - set(FLAGS))
    if unknown:
        raise ValueError(f"format=adm: unknown flags {unknown}; allowed: {', '.join(FLAGS)}")
    flags = {**FLAGS, **flags}
    path = pathlib.Path(path)
    net, settings = build_network(path, read_state_dict(path, map_location), flags)
    spacing, steps = respacing(settings["timestep_respacing"], settings["diffusion_steps"])
    denoiser = Denoiser(net, formulation(settings, spacing), variance_trained=settings["learn_sigma"])
    size = settings["image_size"]
    return Pretrained(denoiser=denoiser, data_shape=(net.enc_conv.in_channels, size, size),
                      num_classes=settings["num_classes"], format="adm", source=str(path), config=settings,
                      sampler=source_sampler(settings, steps))


# --- ADM's noise-conditional classifiers (guided-diffusion create_classifier, EncoderUNetModel) ----------------
# guided-diffusion's classifier_defaults(); None: inferred from the weights (a given value is checked).
CLASSIFIER_FLAGS = dict(
    image_size=None,  # Inferred: the create_classifier size whose channel_mult the weights have.
    classifier_width=None, classifier_depth=None, classifier_attention_resolutions=None,
    classifier_use_scale_shift_norm=None, classifier_resblock_updown=None, classifier_pool=None,
    num_head_channels=64,  # create_classifier's fixed head width (a flag here for other EncoderUNetModels).
    classifier_use_fp16=False,  # Run setting: weights load in float32.
)


def read_classifier_state_dict(path: pathlib.Path, map_location="cpu") -> dict[str, torch.Tensor]:
    """The ``EncoderUNetModel`` state dict in ``path`` (``torch.load(weights_only=True)``)."""
    state = torch.load(path, map_location=map_location, weights_only=True)
    if not isinstance(state, dict) or "time_embed.0.weight" not in state or "middle_block.0.in_layers.0.weight" \
            not in state or any(key.startswith("output_blocks.") for key in state):
        raise ValueError(f"format=adm_classifier: {path} is not a guided-diffusion EncoderUNetModel state dict; "
                         "allowed: a state dict with keys 'time_embed.0.weight', 'input_blocks.0.0.weight', "
                         "'middle_block.*', 'out.*' and no 'output_blocks' (that is a UNetModel: format=adm)")
    return state


def infer_classifier_shapes(path, state: dict[str, torch.Tensor], image_size: int | None) -> dict:
    """The ``create_classifier`` flags the weights' shapes determine, under guided-diffusion's names, and
    ``num_classes``, ``channel_mult``, ``attention_ds``. ``image_size`` (None: every create_classifier size) picks
    the ``channel_mult``; the weights must fit exactly one."""
    width = state["time_embed.0.weight"].shape[1]
    blocks = len(_sub_indices(state, "input_blocks"))  # 1 + levels * depth + levels - 1 = levels * (depth + 1)
    pool = "attention" if "out.2.positional_embedding" in state else "adaptive" if "out.3.weight" in state else None
    if pool is None:
        raise ValueError(f"format=adm_classifier: {path} has neither an attention pool ('out.2.positional_embedding')"
                         " nor an adaptive one ('out.3.weight'); allowed: classifier_pool=attention or adaptive")
    sizes = DEFAULT_CHANNEL_MULT if image_size is None else {image_size: DEFAULT_CHANNEL_MULT.get(image_size)}
    if None in sizes.values():
        raise ValueError(f"format=adm_classifier: image_size={image_size!r} is invalid; allowed: "
                         f"{', '.join(map(str, DEFAULT_CHANNEL_MULT))} (guided-diffusion's create_classifier)")

    def fits(size: int, mult: tuple) -> bool:
        levels = len(mult)
        depth = blocks // levels - 1
        if blocks % levels or depth < 1:
            return False
        first = [f"input_blocks.{1 + level * (depth + 1)}.0.in_layers.2.weight" for level in range(levels)]
        if any(key not in state or state[key].shape[0] != int(width * m) for key, m in zip(first, mult, strict=True)):
            return False
        side = size >> (levels - 1)
        return pool == "adaptive" or state["out.2.positional_embedding"].shape[1] == side * side + 1

    found = [size for size, mult in sizes.items() if fits(size, mult)]
    if len(found) != 1:
        which = "none" if not found else f"all of {found}"
        raise ValueError(f"format=adm_classifier: the weights in {path} fit {which} of the create_classifier sizes "
                         f"{list(sizes)} (channel_mult by image_size); pass the model card's image_size")
    size = found[0]
    mult = DEFAULT_CHANNEL_MULT[size]
    depth = blocks // len(mult) - 1
    attention_ds = tuple(2**level for level in range(len(mult))
                         if f"input_blocks.{1 + level * (depth + 1)}.1.qkv.weight" in state)
    head = "out.2.c_proj.weight" if pool == "attention" else "out.3.weight"
    return dict(image_size=size, classifier_width=width, classifier_depth=depth, classifier_pool=pool,
                classifier_attention_resolutions=",".join(str(size // ds) for ds in attention_ds),
                classifier_use_scale_shift_norm=state["input_blocks.1.0.emb_layers.1.weight"].shape[0] == 2 * width,
                classifier_resblock_updown=len(mult) > 1 and f"input_blocks.{depth + 1}.0.in_layers.0.weight" in state,
                num_classes=state[head].shape[0], channel_mult=mult, attention_ds=attention_ds)


def _classifier_pairs(net: DhariwalEncoder) -> list[tuple[str, str, str]]:
    """``(guided-diffusion prefix, our prefix, kind)`` for every layer of an ``EncoderUNetModel``."""
    pairs = [("time_embed.0", "map_layer0", "plain"), ("time_embed.2", "map_layer1", "plain"),
             ("input_blocks.0.0", "enc_conv", "plain"), ("out.0", "out_norm", "plain"),
             ("out.2", "head", "pool") if net.pool == "attention" else ("out.3", "head", "linear")]
    _encoder_pairs(pairs, net)
    _block_pairs(pairs, "middle_block.0", "mid.0", net.mid[0], "middle_block.1")
    _block_pairs(pairs, "middle_block.2", "mid.1", net.mid[1])
    return pairs


def load_classifier(path: pathlib.Path, *, map_location="cpu", **flags) -> tuple[DhariwalEncoder, dict]:
    """A guided-diffusion noise-conditional classifier ``.pt`` (``128x128_classifier.pt``, ``256x256_classifier.pt``,
    ...; ``create_classifier``'s ``EncoderUNetModel``) as our ``DhariwalEncoder`` (GroupNorm32, 64-channel heads),
    in eval mode, and its settings under guided-diffusion's names.

    The network is guided-diffusion's ``classifier(x_t, t)``: ``x_t`` in the DDPM frame of the diffusion model it
    guides, ``t`` the 0..T-1 timestep: ``sampling.ClassifierGuidance(..., frame="x_t")`` with that model's DDPM.

    Flags: guided-diffusion's ``classifier_defaults()`` keys (``CLASSIFIER_FLAGS``), pasted from the model card.
    ``classifier_width``, ``classifier_depth``, ``classifier_attention_resolutions``, ``classifier_pool``,
    ``classifier_use_scale_shift_norm``, ``classifier_resblock_updown`` and the number of classes are read off the
    weights' shapes (a given flag that disagrees is an error naming both); ``image_size`` picks create_classifier's
    ``channel_mult`` and is inferred when only one size fits; ``num_head_channels`` (64) is not in the shapes;
    ``classifier_use_fp16`` is recorded only.
    """
    unknown = sorted(set(flags) - set(CLASSIFIER_FLAGS))
    if unknown:
        raise ValueError(f"format=adm_classifier: unknown flags {unknown}; allowed: {', '.join(CLASSIFIER_FLAGS)}")
    flags = {**CLASSIFIER_FLAGS, **flags}
    path = pathlib.Path(path)
    state = read_classifier_state_dict(path, map_location)
    shapes = infer_classifier_shapes(path, state, flags["image_size"])
    for flag, value in flags.items():
        if flag not in ("image_size", "num_head_channels", "classifier_use_fp16") and value is not None:
            same = (set(_as_numbers(flag, value)) == set(_as_numbers(flag, shapes[flag]))) \
                if flag == "classifier_attention_resolutions" else value == shapes[flag]
            if not same:
                raise ValueError(f"format=adm_classifier: flag {flag}={value!r} contradicts the weights in {path} "
                                 f"({flag}={shapes[flag]!r} by their shapes)")
    size, mult, width = shapes["image_size"], shapes["channel_mult"], shapes["classifier_width"]
    heads = flags["num_head_channels"]
    attn_widths = {int(width * mult[-1])} | {int(width * mult[ds.bit_length() - 1]) for ds in shapes["attention_ds"]}
    if not isinstance(heads, int) or heads < 1 or any(w % heads for w in attn_widths):
        raise ValueError(f"format=adm_classifier: num_head_channels={heads!r} is invalid for attention widths "
                         f"{sorted(attn_widths)}; allowed: a positive divisor of every width")
    net = DhariwalEncoder(
        in_channels=state["input_blocks.0.0.weight"].shape[1], num_classes=shapes["num_classes"], resolution=size,
        model_channels=width, channel_mult=mult, num_blocks=shapes["classifier_depth"],
        attn_resolutions=tuple(size // ds for ds in shapes["attention_ds"]), channels_per_head=heads,
        adaptive_scale=shapes["classifier_use_scale_shift_norm"], resblock_updown=shapes["classifier_resblock_updown"],
        norm_groups=32, pool=shapes["classifier_pool"])
    try:
        net.load_state_dict(to_our_names(path, state, net, True, _classifier_pairs(net)), strict=True)
    except (RuntimeError, ValueError) as err:
        raise ValueError(f"format=adm_classifier: the weights in {path} do not fit the classifier the flags and "
                         f"shapes describe ({err})") from None
    settings = {**flags, **{k: v for k, v in shapes.items() if k in CLASSIFIER_FLAGS},
                "num_classes": shapes["num_classes"]}
    return net.eval(), settings
