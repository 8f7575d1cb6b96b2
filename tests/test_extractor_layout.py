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
