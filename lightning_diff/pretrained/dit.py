"""Format ``dit``: facebookresearch/DiT ``.pt`` checkpoints as our ``Denoiser`` around our ``DiT``.

Released files (``DiT-XL-2-256x256.pt``, ``DiT-XL-2-512x512.pt``) are plain EMA state dicts; DiT's training
checkpoints are ``{"model", "ema", "opt", "args"}`` dicts, of which we take ``"ema"`` as DiT's ``sample.py``
does. The model works on the latents of Stable Diffusion's autoencoder (image side / 8, 4 channels); decode
them with ``VAEDecoder`` (flag ``vae``) or by hand: ``AutoencoderKL.from_pretrained("stabilityai/sd-vae-ft-ema")
.decode(latents / 0.18215).sample``, images in [-1, 1].
"""

from __future__ import annotations

import logging
import math
import pathlib

import torch

from ..denoiser import Denoiser
from ..formulations import DDPM
from ..networks.dit import DiT
from .base import Pretrained

__all__ = ["load", "DIT_MODELS", "VAE_SCALE", "LATENT_DOWNSAMPLE"]

log = logging.getLogger(__name__)

# DiT Table 1: name -> (depth N, hidden size d, patch side p, heads); DiT's models.py ``DiT_models``.
_SIZES = {"XL": (28, 1152, 16), "L": (24, 1024, 16), "B": (12, 768, 12), "S": (12, 384, 6)}
DIT_MODELS = {f"DiT-{size}/{p}": (depth, hidden, p, heads)
              for size, (depth, hidden, heads) in _SIZES.items() for p in (2, 4, 8)}
VAE_SCALE = 0.18215  # Latent scale of Stable Diffusion's autoencoder (DiT sample.py: decode(latents / 0.18215)).
LATENT_DOWNSAMPLE = 8  # Image side / latent side of that autoencoder.
CLASS_DROPOUT = 0.1  # DiT train.py's class_dropout_prob: its LabelEmbedder has the null row only when it is > 0.
SAMPLING_STEPS = 250  # DiT sample.py / sample_ddp.py --num-sampling-steps (create_diffusion("250")).
CFG_SCALE = 1.5  # DiT sample_ddp.py --cfg-scale: Table 4's headline FID 2.27 (our gamma: DiT's scale).

# DiT's parameter names -> ours (prefix renames; block parameters keep their names).
_RENAMES = (("t_embedder.mlp.0.", "t_embedder.1."), ("t_embedder.mlp.2.", "t_embedder.3."),
            ("y_embedder.embedding_table.", "y_embedder.embed."),
            ("final_layer.adaLN_modulation.", "final_adaLN."), ("final_layer.linear.", "final_linear."))
_FLAGS = ("model", "image_size", "num_classes", "learn_sigma", "num_heads", "vae")


def read_state_dict(path: pathlib.Path, map_location="cpu") -> tuple[dict[str, torch.Tensor], str]:
    """The model weights in a DiT ``.pt`` (``weights_only=True``) and which ones: ``"state_dict"`` for a plain
    state dict (the released files), ``"ema"`` for a training checkpoint."""
    payload = torch.load(path, map_location=map_location, weights_only=True)
    if isinstance(payload, dict) and "ema" in payload and "model" in payload:
        log.info("%s is a DiT training checkpoint; loading its 'ema' weights (as DiT's sample.py does)", path)
        return payload["ema"], "ema"
    if not isinstance(payload, dict) or "x_embedder.proj.weight" not in payload:
        raise ValueError(f"{path} is not a DiT checkpoint; allowed: a DiT state dict (keys 'x_embedder.proj.weight', "
                         "'blocks.0....') or a training checkpoint with 'model' and 'ema'")
    return payload, "state_dict"


def _shapes(state: dict[str, torch.Tensor]) -> dict:
    """Architecture settings that the weights' shapes determine."""
    hidden, in_channels, patch, _ = state["x_embedder.proj.weight"].shape
    info = dict(hidden_size=hidden, in_channels=in_channels, patch_size=patch,
                depth=sum(1 for k in state if k.startswith("blocks.") and k.endswith(".adaLN_modulation.1.weight")),
                out_channels=state["final_layer.linear.weight"].shape[0] // patch**2,
                mlp_ratio=state["blocks.0.mlp.fc1.weight"].shape[0] / hidden,
                frequency_embedding_size=state["t_embedder.mlp.0.weight"].shape[1],
                label_rows=state["y_embedder.embedding_table.weight"].shape[0])
    if "pos_embed" in state:
        tokens = state["pos_embed"].shape[1]
        info["resolution"] = patch * math.isqrt(tokens)
    return info


def _contradiction(path, flag: str, value, weights: str) -> ValueError:
    return ValueError(f"format=dit: flag {flag}={value!r} contradicts the weights in {path} ({weights})")


def _heads(path, shapes: dict, model: str | None, num_heads: int | None) -> tuple[str | None, int]:
    """The model name and head count: from ``model`` (checked against the weights), else the DiT_models entry
    the shapes match, else the ``num_heads`` flag (a model outside DiT Table 1)."""
    found = (shapes["depth"], shapes["hidden_size"], shapes["patch_size"])
    if model is not None:
        if model not in DIT_MODELS:
            raise ValueError(f"format=dit: model={model!r} is not known; allowed: {', '.join(DIT_MODELS)}")
        if DIT_MODELS[model][:3] != found:
            raise _contradiction(path, "model", model, "depth {}, hidden_size {}, patch_size {}".format(*found))
    else:
        model = next((name for name, spec in DIT_MODELS.items() if spec[:3] == found), None)
    if model is None:
        if num_heads is None:
            raise ValueError(f"format=dit: the weights in {path} (depth {found[0]}, hidden_size {found[1]}, "
                             f"patch_size {found[2]}) match no DiT_models entry, so the head count is unknown; "
                             "allowed: pass num_heads=<int>")
        return None, num_heads
    if num_heads is not None and num_heads != DIT_MODELS[model][3]:
        raise ValueError(f"format=dit: num_heads={num_heads} contradicts model={model!r} "
                         f"({DIT_MODELS[model][3]} heads, DiT Table 1)")
    return model, DIT_MODELS[model][3]


def _resolution(path, shapes: dict, image_size: int | None) -> int:
    """Latent side: from the stored ``pos_embed`` (checked against ``image_size // 8``), else from image_size."""
    if image_size is not None and (not isinstance(image_size, int) or image_size % LATENT_DOWNSAMPLE):
        raise ValueError(f"format=dit: image_size={image_size!r} is invalid; allowed: a multiple of "
                         f"{LATENT_DOWNSAMPLE} (DiT: 256 or 512)")
    side = shapes.get("resolution")
    if side is None and image_size is None:
        raise ValueError(f"format=dit: {path} has no pos_embed, so the input size is unknown; allowed: pass "
                         "image_size=<256|512>")
    if side is not None and image_size is not None and image_size // LATENT_DOWNSAMPLE != side:
        raise _contradiction(path, "image_size", image_size, f"latent side {side} = image_size "
                             f"{side * LATENT_DOWNSAMPLE} / {LATENT_DOWNSAMPLE}")
    return side if side is not None else image_size // LATENT_DOWNSAMPLE


def _classes(path, shapes: dict, num_classes: int | None) -> tuple[int, bool]:
    """``(num_classes, with_null_label)``. DiT's label table has ``num_classes + 1`` rows when trained with
    class dropout (all of DiT's runs: ``class_dropout_prob=0.1``), ``num_classes`` rows without; without the
    flag the table is taken to hold the null row."""
    rows = shapes["label_rows"]
    if num_classes is None:
        return rows - 1, True
    if rows - num_classes not in (0, 1):
        raise _contradiction(path, "num_classes", num_classes, f"a label table of {rows} rows: num_classes "
                             f"{rows - 1} with a null label or {rows} without")
    return num_classes, rows == num_classes + 1


def _learn_sigma(path, shapes: dict, learn_sigma: bool | None) -> bool:
    inferred = shapes["out_channels"] == 2 * shapes["in_channels"]
    if not inferred and shapes["out_channels"] != shapes["in_channels"]:
        raise ValueError(f"format=dit: {path} has {shapes['out_channels']} output channels for "
                         f"{shapes['in_channels']} input channels; allowed: equal, or twice (learn_sigma)")
    if learn_sigma is not None and bool(learn_sigma) != inferred:
        raise _contradiction(path, "learn_sigma", learn_sigma, f"{shapes['out_channels']} output channels for "
                             f"{shapes['in_channels']} input channels")
    return inferred


def to_our_names(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """DiT's state dict with our ``DiT``'s parameter names (``pos_embed`` dropped: ours is computed)."""
    renamed = {}
    for key, value in state.items():
        if key == "pos_embed":
            continue
        for old, new in _RENAMES:
            if key.startswith(old):
                key = new + key[len(old):]
                break
        renamed[key] = value
    return renamed


def _check_position_embedding(path, net: DiT, state: dict[str, torch.Tensor], tolerance: float = 1e-5) -> None:
    """The file's fixed ``pos_embed`` must be the 2-D sin-cos table our DiT computes (DiT never trains it)."""
    if "pos_embed" not in state:
        return
    stored = state["pos_embed"].to(torch.float64)
    error = (stored - net.pos_embed.to(torch.float64)).abs().max().item()
    if error > tolerance:
        raise ValueError(f"format=dit: pos_embed in {path} differs from DiT's 2-D sin-cos table by {error:.3g} "
                         f"(allowed: <= {tolerance}); a DiT with a trained or different position embedding is "
                         "not supported")


def build_network(path, state: dict[str, torch.Tensor], *, model=None, image_size=None, num_classes=None,
                  learn_sigma=None, num_heads=None) -> tuple[DiT, dict]:
    """Our ``DiT`` with the weights of ``state`` (DiT's names) and the settings it was built with."""
    shapes = _shapes(state)
    model, heads = _heads(path, shapes, model, num_heads)
    classes, with_null = _classes(path, shapes, num_classes)
    settings = dict(in_channels=shapes["in_channels"], out_channels=shapes["out_channels"],
                    resolution=_resolution(path, shapes, image_size), num_classes=classes,
                    with_null_label=with_null, label_dropout=CLASS_DROPOUT if with_null else 0.0,
                    patch_size=shapes["patch_size"], hidden_size=shapes["hidden_size"],
                    depth=shapes["depth"], num_heads=heads, mlp_ratio=shapes["mlp_ratio"],
                    frequency_embedding_size=shapes["frequency_embedding_size"])
    _learn_sigma(path, shapes, learn_sigma)
    net = DiT(**settings)
    _check_position_embedding(path, net, state)
    net.load_state_dict(to_our_names(state), strict=True)
    return net.eval(), dict(settings, model=model)


def load_vae(vae: str, map_location="cpu") -> torch.nn.Module:
    """``VAEDecoder`` around the diffusers ``AutoencoderKL`` at ``vae`` (folder or Hub id), scale 0.18215."""
    try:
        from diffusers import AutoencoderKL
    except ImportError as err:
        raise ImportError("format=dit: flag vae needs diffusers; install the extra: pip install "
                          "'lightning_diff[pretrained]'") from err
    from ..networks.diffusers_wrapper import VAEDecoder

    try:
        autoencoder = AutoencoderKL.from_pretrained(vae, low_cpu_mem_usage=False)  # no `accelerate` needed
    except OSError as err:
        raise OSError(f"format=dit: vae={vae!r} could not be read as a diffusers AutoencoderKL folder or Hub id "
                      f"({err}); allowed: a local folder with config.json and weights, e.g. a download of "
                      "stabilityai/sd-vae-ft-ema") from err
    return VAEDecoder(autoencoder.to(map_location).eval(), VAE_SCALE)


def load(path: pathlib.Path, *, map_location="cpu", model: str | None = None, image_size: int | None = None,
         num_classes: int | None = None, learn_sigma: bool | None = None, num_heads: int | None = None,
         vae: str | None = None, **unknown) -> Pretrained:
    """A facebookresearch/DiT ``.pt`` as our ``Denoiser``: our ``DiT`` on DDPM's linear betas (T = 1000,
    1e-4..0.02, epsilon prediction; DiT's ``create_diffusion``), learned variance kept (``learn_sigma``).

    Flags (DiT's own names; each is inferred from the weights when omitted, and an error when it contradicts
    them): ``model`` a ``DiT_models`` key (``DiT-XL/2`` ... ``DiT-S/8``; sets the heads, DiT Table 1),
    ``image_size`` (256 / 512: latent side ``image_size // 8``), ``num_classes`` (1000), ``learn_sigma``.
    ``num_heads``: only for a model outside DiT Table 1. ``vae``: a diffusers ``AutoencoderKL`` folder or Hub id
    (DiT: ``stabilityai/sd-vae-ft-ema`` or ``-mse``) for ``Pretrained.decoder``; without it the decoder is None
    (decode as this module's docstring says).

    ``D(x; sigma)`` equals DiT's x0-prediction at DiT's 1000 noise levels; between levels the network gets the
    nearest level's timestep and the preconditioning the given sigma (snap, as EDM's ``iDDPMPrecond``), and
    samplers snap their grids to the levels (``Denoiser.round_sigma``). ``data_shape`` is the latent shape, e.g.
    ``(4, 32, 32)``. A label table with the null row was trained with class dropout (``label_dropout`` 0.1).

    The source's sampler (``Pretrained.sampler`` and ``guidance``, what sample/evaluate run for the settings they
    leave null): DiT's ``sample.py``, ancestral DDPM over ``space_timesteps(1000, "250")`` (the formulation's
    ``respace`` spacing), learned sigma (else FIXED_LARGE), no clipping (``clip_denoised=False``: latents), and
    ``sample_ddp.py``'s classifier-free guidance 1.5 (Table 4) when the model has a null label. DiT guides the
    first three latent channels only (``forward_with_cfg``); ours guides all four.
    """
    if unknown:
        raise ValueError(f"format=dit: unknown flags {sorted(unknown)}; allowed: {', '.join(_FLAGS)}")
    path = pathlib.Path(path)
    state, weights = read_state_dict(path, map_location)
    net, settings = build_network(path, state, model=model, image_size=image_size, num_classes=num_classes,
                                  learn_sigma=learn_sigma, num_heads=num_heads)
    variance_trained = settings["out_channels"] == 2 * settings["in_channels"]
    formulation = DDPM(num_timesteps=1000, beta_schedule="linear", spacing="respace")
    denoiser = Denoiser(net, formulation, variance_trained=variance_trained)
    side = settings["resolution"]
    sampler = {"name": "ddpm", "steps": SAMPLING_STEPS,
               "options": {"variance": "learned" if variance_trained else "fixed_large", "clip_denoised": False}}
    return Pretrained(denoiser=denoiser, data_shape=(settings["in_channels"], side, side),
                      num_classes=settings["num_classes"], format="dit", source=str(path),
                      config=dict(settings, weights=weights, vae=vae, image_size=side * LATENT_DOWNSAMPLE),
                      decoder=None if vae is None else load_vae(vae, map_location), sampler=sampler,
                      guidance=CFG_SCALE if settings["with_null_label"] and settings["num_classes"] else 1.0)
