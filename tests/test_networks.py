"""Backbones of the papers: parameter counts against the papers, shapes, init, gradients, conditioning,
bf16 / channels_last / torch.compile. Tiny presets run here; paper presets build on the meta device."""

from __future__ import annotations

import math
from pathlib import Path

import hydra
import pytest
import torch
from omegaconf import OmegaConf
from torch.nn import functional as F

from lightning_diff import formulations
from lightning_diff.config import CONFIG_DIR
from lightning_diff.denoiser import Denoiser
from lightning_diff.networks import DhariwalUNet, DiT, SongUNet
from lightning_diff.networks.layers import Resample

CONFIGS = Path(CONFIG_DIR) / "network"
TINY = ["ddpmpp_tiny", "ncsnpp_tiny", "adm_tiny", "dit_tiny"]
RES, CH = 8, 3  # tiny presets run on 3 x 8 x 8 images


PAPER_CLASSES = {"ddpmpp_cifar10": 10, "ncsnpp_cifar10": 10, "adm_imagenet64": 1000,  # the papers' class-
                 **{f"dit_{size}": 1000 for size in ("s2", "b2", "l2", "xl2")}}  # conditional models


def build(preset: str, **overrides) -> torch.nn.Module:
    """Instantiate ``configs/network/<preset>.yaml``; tiny presets get data settings filled in, paper presets the
    papers' classes (their ``num_classes: null`` is filled from the data when ``module.conditional=true``)."""
    cfg = OmegaConf.load(CONFIGS / f"{preset}.yaml")
    if preset.endswith("_tiny"):
        overrides = dict(in_channels=CH, resolution=RES, num_classes=0) | overrides
    elif preset in PAPER_CLASSES:
        overrides = dict(num_classes=PAPER_CLASSES[preset]) | overrides
    return hydra.utils.instantiate(cfg, **overrides)


def randomize(net: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Overwrite every parameter with small noise: zero-initialised output layers would otherwise hide
    the gradient flow and the effect of the conditioning at initialisation."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(0.3 * torch.randn(p.shape, generator=g) / math.sqrt(max(1, p[0].numel())))
    return net


def inputs(batch: int = 2, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, CH, RES, RES, generator=g), torch.randn(batch, generator=g)


# --- paper presets --------------------------------------------------------------------------------------
# (preset, reported parameters in millions, decimals the source reports, source)
PAPER_SIZES = [
    ("ddpmpp_cifar10", 55.7, 1, "EDM (Karras et al. 2022) Table 7 / README, CIFAR-10 DDPM++"),
    ("ncsnpp_cifar10", 56.4, 1, "EDM Table 7 / README, CIFAR-10 NCSN++"),
    ("adm_imagenet64", 295.9, 1, "EDM Table 7, ImageNet-64 ADM"),
    ("dit_s2", 33, 0, "DiT-S/2 33M (configs of Peebles & Xie 2023 Table 1; params as in SiT, Ma et al. 2024, Table 1)"),
    ("dit_b2", 130, 0, "DiT-B/2 130M (SiT Table 1)"),
    ("dit_l2", 458, 0, "DiT-L/2 458M (SiT Table 1)"),
    ("dit_xl2", 675, 0, "DiT-XL/2 675M (SiT Table 1)"),
]


def _count(net: torch.nn.Module) -> int:
    return sum(p.numel() for p in net.parameters())


@pytest.mark.parametrize("preset,millions,decimals,source", PAPER_SIZES)
def test_paper_preset_parameter_count(preset, millions, decimals, source):
    with torch.device("meta"):
        net = build(preset)
    count = _count(net)
    assert round(count / 1e6, decimals) == millions, f"{preset}: {count:,} vs {millions}M ({source})"


def test_dit_xl2_matches_reference_count_exactly():
    # facebookresearch/DiT train.py prints "DiT Parameters: 675,129,632" for DiT-XL/2 (learned sigma,
    # 1000 classes + the null class); that includes the frozen 256 x 1152 sin-cos position table,
    # which is a buffer here.
    with torch.device("meta"):
        net = build("dit_xl2")
    assert _count(net) == 675_129_632 - 256 * 1152


@pytest.mark.parametrize("preset,shape", [("ddpmpp_cifar10", (3, 32)), ("ncsnpp_cifar10", (3, 32)),
                                          ("adm_imagenet64", (6, 64)), ("dit_xl2", (8, 32))])
def test_paper_preset_output_shape_on_meta(preset, shape):
    out_channels, res = shape
    with torch.device("meta"):
        net = build(preset)
        in_channels = 4 if preset.startswith("dit") else 3
        out = net(torch.empty(2, in_channels, res, res), torch.empty(2), torch.zeros(2, dtype=torch.long))
    assert out.shape == (2, out_channels, res, res)


# --- tiny presets: shapes and conditioning --------------------------------------------------------------
@pytest.mark.parametrize("preset", TINY)
@pytest.mark.parametrize("res", [8, 16])
def test_tiny_output_shape_with_learned_variance(preset, res):
    net = build(preset, resolution=res, out_channels=2 * CH, num_classes=4, augment_dim=9)
    x = torch.randn(3, CH, res, res)
    out = net(x, torch.randn(3), torch.tensor([0, 1, 3]), torch.randn(3, 9))
    assert out.shape == (3, 2 * CH, res, res) and out.dtype == torch.float32


@pytest.mark.parametrize("encoder_type", ["standard", "skip", "residual"])
@pytest.mark.parametrize("decoder_type", ["standard", "skip"])
@pytest.mark.parametrize("embedding_type,resample_filter", [("positional", (1, 1)),
                                                            ("fourier", (1, 3, 3, 1))])
def test_song_unet_variants(encoder_type, decoder_type, embedding_type, resample_filter):
    net = randomize(SongUNet(in_channels=CH, resolution=16, model_channels=16, channel_mult=(1, 2, 2),
                             num_blocks=1, attn_resolutions=(8,), embedding_type=embedding_type,
                             encoder_type=encoder_type, decoder_type=decoder_type,
                             resample_filter=resample_filter, dropout=0.0))
    x = torch.randn(2, CH, 16, 16)
    out = net(x, torch.randn(2))
    assert out.shape == x.shape and torch.isfinite(out).all()


@pytest.mark.parametrize("preset", TINY)
def test_zero_initialised_output(preset):
    # ADM and DiT (adaLN-Zero) zero their output layers exactly; EDM's SongUNet scales them by 1e-5.
    net = build(preset).eval()
    out = net(*inputs())
    if preset.startswith(("adm", "dit")):
        assert torch.equal(out, torch.zeros_like(out))
    else:
        assert 0 < out.abs().max() < 1e-3


def test_zero_output_makes_denoiser_the_skip_connection():
    # With F = 0 the EDM denoiser is exactly c_skip(sigma) x (EDM eq. 7).
    fm = formulations.get("edm")
    D = Denoiser(build("adm_tiny"), fm).eval()
    x, sigma = torch.randn(2, CH, RES, RES), torch.tensor([0.5, 3.0])
    assert torch.allclose(D(x, sigma), fm.c_skip(sigma).reshape(-1, 1, 1, 1) * x)


@pytest.mark.parametrize("preset", TINY)
@pytest.mark.parametrize("name", formulations.names())
def test_every_formulations_c_noise_is_embedded(preset, name):
    # c_noise is 999 t (vp), ln(sigma)/4 (edm), a timestep index (ddpm, iddpm, ncsn), ...: distinct
    # noise levels must give finite and distinct outputs.
    fm = formulations.get(name)
    sigma = fm.sampling_sigmas(4)[:2].float()
    c_noise = fm.c_noise(sigma).float()
    net = randomize(build(preset)).eval()
    x = torch.randn(1, CH, RES, RES).expand(2, -1, -1, -1)
    out = net(x, c_noise)
    assert torch.isfinite(out).all()
    assert not torch.allclose(out[0], out[1], atol=1e-6), (name, c_noise)


@pytest.mark.parametrize("preset", TINY)
def test_conditioning_changes_output(preset):
    net = randomize(build(preset, num_classes=4, augment_dim=9)).eval()
    x, c_noise = inputs()
    base = net(x, c_noise, torch.tensor([0, 0]))
    assert not torch.allclose(base, net(x, c_noise, torch.tensor([1, 1])))  # another class
    assert not torch.allclose(base, net(x, c_noise, None))  # the learned null label
    assert not torch.allclose(base, net(x, c_noise + 1, torch.tensor([0, 0])))  # another noise level
    aug = net(x, c_noise, torch.tensor([0, 0]), torch.randn(2, 9))
    assert not torch.allclose(base, aug)  # augmentation labels
    assert torch.equal(base, net(x, c_noise, torch.tensor([0, 0]), torch.zeros(2, 9)))  # zero = none


def assert_label_dropout_swaps_in_the_null_label(net, x, c_noise, labels):
    """In training mode every row of ``net(x, c_noise, labels)`` (identical rows) is either the conditional output
    or the null-label output, and both occur (label dropout replaces whole labels by the null label)."""
    net.eval()
    cond, null = net(x[:1], c_noise[:1], labels[:1]), net(x[:1], c_noise[:1], None)
    net.train()
    out = net(x, c_noise, labels)
    is_cond = (out - cond).flatten(1).abs().amax(1) < 1e-5
    is_null = (out - null).flatten(1).abs().amax(1) < 1e-5
    assert torch.all(is_cond ^ is_null) and is_cond.any() and is_null.any()


@pytest.mark.parametrize("preset", TINY)
def test_label_dropout_swaps_in_the_null_label(preset):
    net = randomize(build(preset, num_classes=4, label_dropout=0.5))
    x = torch.randn(1, CH, RES, RES).expand(16, -1, -1, -1)
    c_noise, labels = torch.zeros(16), torch.full((16,), 2)
    assert_label_dropout_swaps_in_the_null_label(net, x, c_noise, labels)


@pytest.mark.parametrize("preset", TINY)
def test_deterministic_with_fixed_seed(preset):
    outs = []
    for _ in range(2):
        torch.manual_seed(123)
        dropout = {} if preset.startswith("dit") else {"dropout": 0.2}  # DiT has no dropout
        net = build(preset, num_classes=4, label_dropout=0.3, **dropout).train()
        outs.append(net(*inputs(), torch.tensor([1, 2])))
    assert torch.equal(outs[0], outs[1])


@pytest.mark.parametrize("preset", TINY)
def test_gradient_reaches_every_parameter(preset):
    attention = {} if preset.startswith("dit") else {"attn_resolutions": [4, 8]}  # every U-Net layer type
    net = randomize(build(preset, num_classes=4, augment_dim=9, **attention))
    x, c_noise = inputs(batch=4)
    out = net(x, c_noise, torch.tensor([0, 1, 2, 3]), torch.randn(4, 9))
    (out * torch.randn_like(out)).sum().backward()
    silent = [n for n, p in net.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not silent, silent


# --- the CPU presets: TinyUNet and MLP ---------------------------------------------------------------------
CPU = ["tiny_unet", "mlp"]


def build_cpu(preset: str, **overrides) -> torch.nn.Module:
    """``configs/network/<preset>.yaml`` with the data settings of 3 x 8 x 8 images (TinyUNet) or 2-D points."""
    data = dict(in_channels=CH, resolution=RES) if preset == "tiny_unet" else dict(dim=2)
    cfg = OmegaConf.load(CONFIGS / f"{preset}.yaml")
    return hydra.utils.instantiate(cfg, **(data | dict(num_classes=0) | overrides))


def cpu_inputs(preset: str, batch: int = 2, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    shape = (batch, CH, RES, RES) if preset == "tiny_unet" else (batch, 2)
    return torch.randn(shape, generator=g), torch.randn(batch, generator=g)


@pytest.mark.parametrize("res", [8, 16])
def test_tiny_unet_output_shape_with_learned_variance(res):
    net = build_cpu("tiny_unet", resolution=res, out_channels=2 * CH, num_classes=4, attn_resolutions=[res // 2])
    out = net(torch.randn(3, CH, res, res), torch.randn(3), torch.tensor([0, 1, 3]))
    assert out.shape == (3, 2 * CH, res, res) and out.dtype == torch.float32


@pytest.mark.parametrize("dim", [2, 5])
def test_mlp_output_shape(dim):
    net = build_cpu("mlp", dim=dim, num_classes=4)
    out = net(torch.randn(3, dim), torch.randn(3), torch.tensor([0, 1, 3]))
    assert out.shape == (3, dim) and out.dtype == torch.float32


@pytest.mark.parametrize("preset", CPU)
def test_cpu_preset_output_is_zero_initialised(preset):
    # Both zero their last layer, so an untrained Denoiser is exactly c_skip(sigma) x (EDM eq. 7).
    fm = formulations.get("edm")
    x, _ = cpu_inputs(preset)
    sigma = torch.tensor([0.5, 3.0])
    D = Denoiser(build_cpu(preset), fm).eval()
    assert torch.equal(D(x, sigma), fm.c_skip(sigma).reshape(-1, *([1] * (x.ndim - 1))) * x)


@pytest.mark.parametrize("preset", CPU)
def test_cpu_preset_conditioning_changes_output(preset):
    net = randomize(build_cpu(preset, num_classes=4)).eval()
    x, c_noise = cpu_inputs(preset)
    base = net(x, c_noise, torch.tensor([0, 0]))
    assert not torch.allclose(base, net(x, c_noise, torch.tensor([1, 1])))  # another class
    assert not torch.allclose(base, net(x, c_noise, None))  # the learned null label
    assert not torch.allclose(base, net(x, c_noise + 1, torch.tensor([0, 0])))  # another noise level
    assert torch.equal(base, net(x, c_noise, torch.tensor([0, 0])))  # deterministic in eval mode


@pytest.mark.parametrize("preset", CPU)
def test_cpu_preset_label_dropout_swaps_in_the_null_label(preset):
    net = randomize(build_cpu(preset, num_classes=4, label_dropout=0.5))
    x, _ = cpu_inputs(preset, batch=1)
    x, c_noise, labels = x.expand(16, *x.shape[1:]), torch.zeros(16), torch.full((16,), 2)
    assert_label_dropout_swaps_in_the_null_label(net, x, c_noise, labels)


@pytest.mark.parametrize("preset", CPU)
def test_cpu_preset_gradient_reaches_every_parameter(preset):
    layers = dict(attn_resolutions=[8, 4], num_blocks=2) if preset == "tiny_unet" else dict(depth=2)
    net = randomize(build_cpu(preset, num_classes=4, **layers))
    x, c_noise = cpu_inputs(preset, batch=4)
    out = net(x, c_noise, torch.tensor([0, 1, 2, 3]))
    (out * torch.randn_like(out)).sum().backward()
    silent = [n for n, p in net.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not silent, silent


# --- bad settings -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("make,match", [
    (lambda: SongUNet(encoder_type="fancy"), "encoder_type='fancy'"),
    (lambda: SongUNet(embedding_type="learned"), "embedding_type='learned'"),
    (lambda: SongUNet(decoder_type="residual"), "decoder_type='residual'"),
    (lambda: SongUNet(resolution=30), "resolution=30"),
    (lambda: DhariwalUNet(resolution=36), "resolution=36"),
    (lambda: DiT(resolution=31), "resolution=31"),
    (lambda: Resample("up", (1, 2, 1)), "resample_filter"),
])
def test_bad_settings_raise(make, match):
    with pytest.raises(ValueError, match=match):
        make()


@pytest.mark.parametrize("preset", TINY)
def test_unexpected_conditions_raise(preset):
    net = build(preset)
    x, c_noise = inputs()
    with pytest.raises(ValueError, match="num_classes=0"):
        net(x, c_noise, torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="augment_dim=0"):
        net(x, c_noise, None, torch.zeros(2, 9))
    with pytest.raises(ValueError, match="augment_dim=9"):
        build(preset, augment_dim=9)(x, c_noise, None, torch.zeros(2, 4))


# --- layers -----------------------------------------------------------------------------------------------
def test_box_filter_resampling_is_average_pool_and_nearest_upsample():
    x = torch.randn(2, 3, 8, 8)
    assert torch.allclose(Resample("down", (1, 1))(x), F.avg_pool2d(x, 2), atol=1e-6)
    nearest = F.interpolate(x, scale_factor=2, mode="nearest")
    assert torch.allclose(Resample("up", (1, 1))(x), nearest, atol=1e-6)


@pytest.mark.parametrize("mode", ["up", "down"])
def test_binomial_filter_keeps_a_constant_image(mode):
    out = Resample(mode, (1, 3, 3, 1))(torch.full((1, 2, 8, 8), 1.5))
    assert torch.allclose(out[..., 2:-2, 2:-2], torch.tensor(1.5))  # away from the zero padding


def test_dit_unpatchify_inverts_patchify():
    net = DiT(in_channels=CH, resolution=RES, patch_size=2, hidden_size=32, depth=1, num_heads=2)
    x = torch.randn(2, CH, RES, RES)
    h = RES // 2
    tokens = x.reshape(2, CH, h, 2, h, 2).permute(0, 2, 4, 3, 5, 1).reshape(2, h * h, 4 * CH)
    assert torch.equal(net.unpatchify(tokens), x)


# --- precision, memory format, compile --------------------------------------------------------------------
@pytest.mark.parametrize("preset", TINY)
def test_bf16_autocast_close_to_float32(preset):
    net = randomize(build(preset)).eval()
    x, c_noise = inputs()
    ref = net(x, c_noise)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = net(x, c_noise)
    assert out.shape == ref.shape and torch.isfinite(out).all()
    assert (out.float() - ref).norm() / ref.norm() < 0.05


@pytest.mark.parametrize("preset", TINY)
def test_channels_last_matches_contiguous(preset):
    net = randomize(build(preset)).eval()
    x, c_noise = inputs()
    ref = net(x, c_noise)
    net = net.to(memory_format=torch.channels_last)
    out = net(x.contiguous(memory_format=torch.channels_last), c_noise)
    assert torch.allclose(out, ref, atol=1e-5)


# One U-Net and the transformer in the fast suite (about 10 s each here); the other U-Nets share their blocks.
@pytest.mark.parametrize("preset", ["ddpmpp_tiny", "dit_tiny",
                                    pytest.param("ncsnpp_tiny", marks=pytest.mark.slow),
                                    pytest.param("adm_tiny", marks=pytest.mark.slow)])
def test_compiles_without_graph_breaks(preset):
    # fullgraph=True fails on any graph break; the aot_eager backend traces forward and backward
    # through AOTAutograd without generating C++ (inductor codegen takes minutes on this 2-core CPU;
    # see the slow test below).
    torch._dynamo.reset()
    net = randomize(build(preset)).eval()
    x, c_noise = inputs()
    compiled = torch.compile(net, backend="aot_eager", fullgraph=True)
    assert torch.allclose(compiled(x, c_noise), net(x, c_noise), atol=1e-5)


@pytest.mark.slow
def test_inductor_compile_matches_eager():
    torch._dynamo.reset()
    net = randomize(build("ddpmpp_tiny")).eval()
    x, c_noise = inputs()
    assert torch.allclose(torch.compile(net)(x, c_noise), net(x, c_noise), atol=1e-4)


@pytest.mark.parametrize("preset", TINY)
def test_tiny_presets_take_their_shape_from_the_data(preset):
    from lightning_diff.training.builders import build_network

    cfg = OmegaConf.create({"network": OmegaConf.load(CONFIGS / f"{preset}.yaml")})
    net = build_network(cfg, (1, 8, 8), num_classes=10, conditional=True)
    assert net(torch.randn(2, 1, 8, 8), torch.randn(2), torch.tensor([3, 9])).shape == (2, 1, 8, 8)
