"""Format ``dit``: facebookresearch/DiT checkpoints load as our ``DiT`` and give DiT's own x0-prediction.

Oracle: DiT's ``models.py`` (``../shared/reference/dit``) on the same perturbed weights, and DiT's diffusion
(``create_diffusion``: linear betas 1e-4..0.02, T = 1000) written out below with numpy in float64.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch

from lightning_diff.networks import DiT
from lightning_diff.pretrained import dit as dit_format

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny networks: one intra-op thread

REFERENCE = Path(__file__).resolve().parents[2] / "shared" / "reference" / "dit" / "models.py"
TIMESTEPS = (0, 1, 250, 999)  # sigma from 0.01 to 157 on DiT's grid
TINY = dict(input_size=8, patch_size=2, in_channels=4, hidden_size=64, depth=2, num_heads=4, num_classes=10)


@pytest.fixture(scope="module")
def ref():
    """DiT's ``models.py`` as a module (skips when the reference folder is absent)."""
    if not REFERENCE.exists():
        pytest.skip(f"DiT reference code not found at {REFERENCE}")
    spec = importlib.util.spec_from_file_location("dit_reference_models", REFERENCE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def dit_alphas_cumprod() -> np.ndarray:
    """DiT's ``gaussian_diffusion.get_beta_schedule("linear")`` at T = 1000, cumulative product, float64."""
    betas = np.linspace(1e-4, 0.02, 1000, dtype=np.float64)
    return np.cumprod(1.0 - betas)


def perturbed_reference(ref, seed: int = 0, **kwargs):
    """A reference DiT with every trainable parameter moved off its init (DiT zero-initialises adaLN and the
    output layer, which would hide a wrong mapping). ``pos_embed`` is DiT's fixed sin-cos table, not trained."""
    torch.manual_seed(seed)
    net = ref.DiT(**{**TINY, **kwargs}).eval()
    with torch.no_grad():
        for p in net.parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn_like(p))
    return net


def reference_x0(net, x: torch.Tensor, t: int, labels: torch.Tensor) -> torch.Tensor:
    """DiT's x0-prediction at timestep t for clean-frame input ``x_t = sqrt(abar_t) x``:
    ``(x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t)`` (Ho et al. 2020 eq. 15)."""
    abar = float(dit_alphas_cumprod()[t])
    x_t = np.sqrt(abar) * x
    with torch.no_grad():
        eps = net(x_t, torch.full((x.shape[0],), t), labels)[:, : x.shape[1]]
    return (x_t - np.sqrt(1 - abar) * eps) / np.sqrt(abar)


def max_relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got - want).abs().max() / want.abs().max()).item()


def sigma_of(t: int) -> float:
    abar = dit_alphas_cumprod()[t]
    return float(np.sqrt((1 - abar) / abar))


def test_position_embedding_is_dits(ref):
    """Our fixed 2-D sin-cos table is DiT's (MAE's ``get_2d_sincos_pos_embed``): first half the column
    coordinate, second half the row, each [sin, cos]. timm's ``build_sincos2d_pos_embed`` orders it
    [sin row, sin col, cos row, cos col], which loaded DiT weights cannot use."""
    ours = DiT(in_channels=4, resolution=16, patch_size=2, hidden_size=64, depth=1, num_heads=4).pos_embed[0]
    want = torch.from_numpy(ref.get_2d_sincos_pos_embed(64, 8)).float()
    assert ours.shape == want.shape
    torch.testing.assert_close(ours, want, rtol=0, atol=1e-6)


def test_backbone_output_is_dits_at_every_timestep(ref):
    """Same weights, same input: our DiT's output is DiT's to float32 accuracy (1e-6 relative), also at t = 999
    where the noise embedding's angles reach 999 rad and an ulp in its frequencies shows (DiT's frequencies are
    ``exp(-ln(10000) k / 128)`` in float32, not the power form)."""
    net = perturbed_reference(ref)
    ours, _ = dit_format.build_network("memory", net.state_dict(), num_heads=4)
    x, labels = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(1)), torch.tensor([0, 3, 10])
    for t in TIMESTEPS:
        with torch.no_grad():
            got, want = ours(x, torch.full((3,), float(t)), labels), net(x, torch.full((3,), t), labels)
        assert max_relative_error(got, want) < 1e-6, t


VARIANTS = {  # name -> reference DiT settings
    "learn_sigma": dict(learn_sigma=True, class_dropout_prob=0.1),
    "no_sigma_patch4": dict(learn_sigma=False, class_dropout_prob=0.1, patch_size=4, input_size=16),
    "no_null_label": dict(learn_sigma=True, class_dropout_prob=0.0),
}
FLAGS = {"no_null_label": dict(num_classes=10)}  # a table without a null row: the class count is a flag


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_loaded_dit_equals_reference(ref, tmp_path, variant):
    """load(.pt)(x, sigma_t, labels) == DiT's x0-prediction at t in TIMESTEPS, conditional and (with a null
    label) unconditional, to 1e-5 relative in float32."""
    settings = VARIANTS[variant]
    net = perturbed_reference(ref, **settings)
    path = tmp_path / "dit.pt"
    torch.save(net.state_dict(), path)
    pretrained = dit_format.load(path, num_heads=4, **FLAGS.get(variant, {}))
    side = settings.get("input_size", TINY["input_size"])
    assert pretrained.data_shape == (4, side, side) and pretrained.num_classes == 10
    assert pretrained.denoiser.variance_trained == settings["learn_sigma"]
    x = torch.randn(3, 4, side, side, generator=torch.Generator().manual_seed(1))
    labels = torch.tensor([0, 3, 9])
    cases = [(labels, labels)]
    if settings["class_dropout_prob"] > 0:
        assert pretrained.denoiser.null_label == 10
        cases.append((None, torch.full((3,), 10)))
    else:
        assert pretrained.denoiser.null_label is None
    errors = []
    for ours_labels, ref_labels in cases:
        for t in TIMESTEPS:
            with torch.no_grad():
                got = pretrained.denoiser(x, sigma_of(t), ours_labels)
            errors.append(max_relative_error(got, reference_x0(net, x, t, ref_labels)))
    print(f"dit {variant}: max relative error {max(errors):.2e}")
    assert max(errors) < 1e-5


def test_training_checkpoint_loads_ema(ref, tmp_path):
    """A DiT training checkpoint ({"model", "ema", "opt", "args"}) loads its EMA weights, as DiT's sample.py."""
    ema, model = perturbed_reference(ref, seed=1), perturbed_reference(ref, seed=2)
    path = tmp_path / "0400000.pt"
    torch.save({"model": model.state_dict(), "ema": ema.state_dict(), "opt": {}, "args": None}, path)
    pretrained = dit_format.load(path, num_heads=4)
    assert pretrained.config["weights"] == "ema"
    x, labels = torch.randn(2, 4, 8, 8), torch.tensor([1, 2])
    with torch.no_grad():
        got = pretrained.denoiser(x, sigma_of(250), labels)
    assert max_relative_error(got, reference_x0(ema, x, 250, labels)) < 1e-5


def test_every_dit_model_has_the_reference_parameters(ref):
    """All 12 DiT_models entries at ImageNet-256 (latent 32x32x4, 1000 classes, learned sigma), built on the meta
    device: our DiT has DiT's parameters, name for name (after the format's renaming) and shape for shape."""
    assert set(dit_format.DIT_MODELS) == set(ref.DiT_models)
    for name, (depth, hidden, patch, heads) in dit_format.DIT_MODELS.items():
        with torch.device("meta"):
            theirs = ref.DiT_models[name]()
            ours = DiT(in_channels=4, out_channels=8, resolution=32, num_classes=1000, patch_size=patch,
                       hidden_size=hidden, depth=depth, num_heads=heads)
        want = {k: v.shape for k, v in dit_format.to_our_names(theirs.state_dict()).items()}
        assert {k: v.shape for k, v in ours.state_dict().items()} == want, name
        count = sum(p.numel() for p in ours.parameters())
        assert count == sum(p.numel() for p in theirs.parameters()) - theirs.pos_embed.numel(), name
        assert ours.blocks[0].attn.num_heads == theirs.blocks[0].attn.num_heads, name


@pytest.mark.parametrize("flags, message", [
    (dict(model="DiT-XL/2"), "model='DiT-XL/2' contradicts"),
    (dict(model="DiT-XXL/2"), "is not known"),
    (dict(learn_sigma=False), "learn_sigma=False contradicts"),
    (dict(num_classes=5), "num_classes=5 contradicts"),
    (dict(image_size=128), "image_size=128 contradicts"),
    (dict(image_size=100), "image_size=100 is invalid"),
    (dict(cfg_scale=4.0), "unknown flags"),
])
def test_flag_contradicting_the_weights_raises(ref, tmp_path, flags, message):
    path = tmp_path / "dit.pt"
    torch.save(perturbed_reference(ref).state_dict(), path)
    with pytest.raises(ValueError, match=message):
        dit_format.load(path, **{"num_heads": 4, **flags})


def test_heads_of_a_model_outside_table_1(ref, tmp_path):
    """Heads are not in the weights: a Table 1 shape gives them, otherwise ``num_heads`` must be passed."""
    path = tmp_path / "dit.pt"
    torch.save(perturbed_reference(ref).state_dict(), path)
    with pytest.raises(ValueError, match="match no DiT_models entry"):
        dit_format.load(path, num_heads=None)
    assert dit_format.load(path, num_heads=4).config["num_heads"] == 4
    assert dit_format.load(path, num_heads=4, image_size=64, num_classes=10, learn_sigma=True).num_classes == 10


def test_vae_decoder_is_dits_decode(ref, tmp_path):
    """``vae=<AutoencoderKL folder>``: the decoder is DiT's ``vae.decode(latents / 0.18215).sample``."""
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    vae = diffusers.AutoencoderKL(block_out_channels=(8,), norm_num_groups=4, latent_channels=4,
                                  sample_size=8).eval()
    vae.save_pretrained(tmp_path / "vae")
    path = tmp_path / "dit.pt"
    torch.save(perturbed_reference(ref).state_dict(), path)
    decoder = dit_format.load(path, num_heads=4, vae=str(tmp_path / "vae")).decoder
    latents = torch.randn(2, 4, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(decoder(latents), vae.decode(latents / 0.18215).sample, rtol=1e-5, atol=1e-6)
