"""Format ``adm_classifier``: guided-diffusion's noise-conditional classifiers (``EncoderUNetModel``, the
``128x128_classifier.pt`` / ``256x256_classifier.pt`` of its model card) load as our ``DhariwalEncoder``, equal to
the reference code on the same (perturbed) weights, and guide through ``ClassifierGuidance(frame="x_t")`` with
the gradient guided-diffusion's ``cond_fn`` (scripts/classifier_sample.py) takes.

Oracle: openai/guided-diffusion (``shared/reference/guided_diffusion``, imported; skipped when absent).
"""

import pytest
import torch

from lightning_diff import pretrained
from lightning_diff.formulations import DDPM
from lightning_diff.networks import DhariwalEncoder
from lightning_diff.pretrained import adm
from lightning_diff.sampling import ClassifierGuidance

from .pretrained_fixtures import guided_diffusion_script_util, write_adm_classifier_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny networks: one intra-op thread


# name -> (EncoderUNetModel arguments, the flags a user pastes)
VARIANTS = {
    "attention-pool-updown-scale-shift-64px": (
        dict(image_size=64, model_channels=32, out_channels=10, num_res_blocks=1, attention_resolutions=(4, 8),
             channel_mult=(1, 2, 3, 4), num_head_channels=16, use_scale_shift_norm=True, resblock_updown=True,
             pool="attention"),
        dict(image_size=64, classifier_width=32, classifier_depth=1, classifier_attention_resolutions="16,8",
             classifier_pool="attention", num_head_channels=16)),
    "adaptive-pool-conv-resample-no-scale-shift-two-blocks": (
        dict(image_size=64, model_channels=32, out_channels=7, num_res_blocks=2, attention_resolutions=(2,),
             channel_mult=(1, 2, 3, 4), num_head_channels=32, use_scale_shift_norm=False, resblock_updown=False,
             pool="adaptive"),
        dict(num_head_channels=32)),  # everything else read off the shapes
    "five-levels-128px-style": (
        dict(image_size=128, model_channels=32, out_channels=5, num_res_blocks=1, attention_resolutions=(8, 16),
             channel_mult=(1, 1, 2, 3, 4), num_head_channels=32, use_scale_shift_norm=True, resblock_updown=True,
             pool="attention"),
        dict(image_size=128, classifier_depth=1, num_head_channels=32)),
}


def relative_errors(ours: torch.Tensor, expected: torch.Tensor) -> list[float]:
    return ((ours - expected).abs().amax(1) / expected.abs().amax(1)).tolist()


@pytest.mark.parametrize("name", VARIANTS)
def test_classifier_equals_guided_diffusions_encoder(name, tmp_path):
    kwargs, flags = VARIANTS[name]
    reference = write_adm_classifier_checkpoint(tmp_path / "classifier.pt", **kwargs)
    ours, settings = adm.load_classifier(tmp_path / "classifier.pt", **flags)
    assert isinstance(ours, DhariwalEncoder) and not ours.training
    size = kwargs["image_size"]
    gen = torch.Generator().manual_seed(0)
    x_t = torch.randn(3, 3, size, size, generator=gen)
    t = torch.tensor([0, 333, 999])
    with torch.no_grad():
        expected, got = reference(x_t, t), ours(x_t, t)
    errors = relative_errors(got, expected)
    assert max(errors) < 1e-5, errors  # measured: 4.5e-7 .. 1.6e-6 (float32)
    assert settings["num_classes"] == kwargs["out_channels"] and settings["classifier_pool"] == kwargs["pool"]
    assert settings["classifier_depth"] == kwargs["num_res_blocks"] and settings["image_size"] == size
    assert settings["classifier_attention_resolutions"] == ",".join(
        str(size // ds) for ds in sorted(kwargs["attention_resolutions"]))


def test_create_classifier_flags_of_the_model_card_load_through_the_public_api(tmp_path):
    """guided-diffusion's own ``create_classifier`` (64 px, its fixed 64-channel heads) with the model card's
    flag names, through ``pretrained.load_classifier``; and its guidance gradient: ``cond_fn`` of
    classifier_sample.py is ``grad_{x_t} log p(y | x_t, t)``; ours w.r.t. the sigma-frame x is ``sqrt(abar_t)``
    times it (``x_t = sqrt(abar_t) x``)."""
    script_util = guided_diffusion_script_util()
    card = dict(image_size=64, classifier_width=64, classifier_depth=1, classifier_attention_resolutions="16,8",
                classifier_use_scale_shift_norm=True, classifier_resblock_updown=True, classifier_pool="attention")
    torch.manual_seed(0)
    reference = script_util.create_classifier(classifier_use_fp16=False, **card)
    from .pretrained_fixtures import perturb_

    perturb_(reference, seed=1).eval()
    torch.save(reference.state_dict(), tmp_path / "64x64_classifier.pt")
    ours, settings = pretrained.load_classifier(tmp_path / "64x64_classifier.pt", **card)
    assert settings["num_classes"] == 1000

    fm = DDPM()
    t = torch.tensor([10, 400, 900])
    sigma = fm.grid.flip(0)[t].float()
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(3, 3, 64, 64, generator=gen) * (1 + sigma.reshape(-1, 1, 1, 1))
    labels = torch.tensor([3, 500, 999])
    s = fm.alphas_cumprod[t].sqrt().float().reshape(-1, 1, 1, 1)
    x_t = (s * x).requires_grad_(True)  # guided-diffusion's cond_fn
    selected = torch.log_softmax(reference(x_t, t), dim=-1)[torch.arange(3), labels].sum()
    (expected,) = torch.autograd.grad(selected, x_t)
    guidance = ClassifierGuidance(lambda x, sigma, labels=None: x, ours, 1.0, frame="x_t", formulation=fm)
    got = guidance.log_prob_grad(x, sigma, labels)
    errors = relative_errors((got / s).flatten(1), expected.flatten(1))
    assert max(errors) < 1e-4, errors


@pytest.mark.parametrize("flag, value, message", [
    ("classifier_width", 64, r"flag classifier_width=64 contradicts the weights in .* \(classifier_width=32 by"),
    ("classifier_depth", 2, r"flag classifier_depth=2 contradicts .*\(classifier_depth=1 "),
    ("classifier_pool", "adaptive", r"flag classifier_pool='adaptive' contradicts .*\(classifier_pool='attention'"),
    ("classifier_attention_resolutions", "32,16,8", r"flag classifier_attention_resolutions='32,16,8' contradicts"),
    ("classifier_use_scale_shift_norm", False, r"flag classifier_use_scale_shift_norm=False contradicts"),
    ("classifier_resblock_updown", False, r"flag classifier_resblock_updown=False contradicts"),
    ("image_size", 128, r"the weights in .* fit none of the create_classifier sizes \[128\]"),
    ("image_size", 48, r"image_size=48 is invalid; allowed: 512, 256, 128, 64"),
    ("num_head_channels", 24, r"num_head_channels=24 is invalid for attention widths \[96, 128\]"),
    ("learn_sigma", True, r"unknown flags \['learn_sigma'\]; allowed: image_size, classifier_width"),
])
def test_a_flag_that_contradicts_the_weights_is_an_error_naming_both(flag, value, message, tmp_path):
    kwargs, flags = VARIANTS["attention-pool-updown-scale-shift-64px"]
    write_adm_classifier_checkpoint(tmp_path / "classifier.pt", **kwargs)
    with pytest.raises(ValueError, match="format=adm_classifier: " + message):
        adm.load_classifier(tmp_path / "classifier.pt", **dict(flags, **{flag: value}))


def test_a_unet_is_not_a_classifier(tmp_path):
    from .pretrained_fixtures import write_adm_checkpoint

    write_adm_checkpoint(tmp_path / "model.pt", image_size=16, num_channels=32, num_res_blocks=1, channel_mult="1,2",
                         attention_resolutions="8", learn_sigma=False, class_cond=False, num_heads=2)
    with pytest.raises(ValueError, match="not a guided-diffusion EncoderUNetModel .*format=adm"):
        pretrained.load_classifier(tmp_path / "model.pt")
    with pytest.raises(ValueError, match="classifier format='edm' is not known; allowed: adm_classifier"):
        pretrained.load_classifier(tmp_path / "model.pt", format="edm")
