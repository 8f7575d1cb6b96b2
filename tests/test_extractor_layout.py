"""The FID Inception runs in channels_last (benchmarks/README.md: faster on oneDNN): its pool3 features equal
torch-fidelity's own extractor (default layout, same converted weights) to float32 summation-order error."""

import pytest
import torch
from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY

from lightning_diff.evaluation.metrics import fid_helper_weights_path, resolve_inception_weights
from lightning_diff.evaluation.metrics.extractor import build_extractor

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny networks: one intra-op thread


def test_channels_last_features_equal_torch_fidelity(tmp_path):
    name, path = resolve_inception_weights(fid_helper_weights_path(), tmp_path)
    ours = build_extractor(name, ["2048"], path)
    assert ours.Conv2d_1a_3x3.conv.weight.is_contiguous(memory_format=torch.channels_last)
    theirs = FEATURE_EXTRACTORS_REGISTRY[name](name, ["2048"], feature_extractor_weights_path=path).eval()
    images = (torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 255).to(torch.uint8)
    with torch.no_grad():
        a, b = ours(images)[0], theirs(images)[0]
    rel = ((a - b).abs().max() / b.abs().max()).item()
    print(f"channels_last vs torch-fidelity pool3: max error {rel:.1e} of the largest feature")
    assert rel < 1e-5
    assert (b[0] - b[1]).abs().max() > 0.1 * b.abs().max()  # the features tell the images apart


@pytest.mark.parametrize("shape,grey", [((6, 3, 8, 8), True), ((6, 3, 32, 32), False), ((2, 3, 28, 28), True),
                                        ((2, 3, 320, 310), False), ((2, 1, 8, 8), False)])
def test_separable_resize_is_torch_fidelitys_bit_for_bit(shape, grey):
    """The faster TF1 resize gives exactly torch-fidelity's floats (up- and downsampling, grey and RGB)."""
    from torch_fidelity.interpolate_compat_tensorflow import interpolate_bilinear_2d_like_tensorflow1x

    from lightning_diff.evaluation.metrics.extractor import separable_tf1_resize

    images = (torch.rand(*shape, generator=torch.Generator().manual_seed(1)) * 255).to(torch.uint8)
    if grey:
        images = images[:, :1].expand(-1, 3, -1, -1)
    images = images.float()
    theirs = interpolate_bilinear_2d_like_tensorflow1x(images, size=(299, 299), align_corners=False)
    ours = separable_tf1_resize(images, size=(299, 299), align_corners=False)
    assert torch.equal(ours, theirs) and ours.is_contiguous()
    assert theirs[:, :, 1:].ne(theirs[:, :, :-1]).any()  # a real image, not a constant


def test_extractor_with_the_separable_resize_gives_the_same_features_bit_for_bit(tmp_path):
    """build_extractor's network (separable resize) against torch-fidelity's registered class with the same weights
    in the same layout: equal features, grey digits and RGB images alike."""
    name, path = resolve_inception_weights(fid_helper_weights_path(), tmp_path)
    ours = build_extractor(name, ["2048"], path)
    theirs = FEATURE_EXTRACTORS_REGISTRY[name](name, ["2048"], feature_extractor_weights_path=path)
    theirs = theirs.to(memory_format=torch.channels_last).eval()
    assert type(ours) is not type(theirs)
    generator = torch.Generator().manual_seed(2)
    grey = (torch.rand(2, 1, 8, 8, generator=generator) * 255).to(torch.uint8).expand(-1, 3, -1, -1)
    rgb = (torch.rand(2, 3, 16, 16, generator=generator) * 255).to(torch.uint8)
    with torch.no_grad():
        for images in (grey, rgb):
            assert torch.equal(ours(images)[0], theirs(images)[0])


def test_extractor_identity_is_the_weights_not_the_file_bytes(tmp_path):
    """The same tensors written two ways (a path: the archive folder is named after the file; a file object:
    'archive') are two different files with one identity; other weights get another. Before, the identity hashed
    the file's bytes, and a cache written by another process put the same weights' records in another group."""
    from lightning_diff.evaluation.metrics.extractor import extractor_id

    state = {"state_dict": {"w": torch.arange(6.0).reshape(2, 3), "n": torch.tensor(3)}, "accuracy": 0.9}
    torch.save(state, tmp_path / "one.pt")
    with open(tmp_path / "two.pt", "wb") as file:
        torch.save(state, file)
    assert (tmp_path / "one.pt").read_bytes() != (tmp_path / "two.pt").read_bytes()
    assert extractor_id("x", tmp_path / "one.pt") == extractor_id("x", tmp_path / "two.pt")
    state["state_dict"]["w"][0, 0] = 0.5
    torch.save(state, tmp_path / "three.pt")
    assert extractor_id("x", tmp_path / "three.pt") != extractor_id("x", tmp_path / "one.pt")
    assert extractor_id("x", None).startswith("x@torch-fidelity-")
