"""RefineNet (networks/refinenet.py) against ermongroup/ncsnv2's own NCSN and NCSNv2 networks, imported from the
public mirror into a temporary package (test-only; skipped when the mirror is absent): the same parameter count
at the published width (ngf 128, on the meta device), and, with the reference's weights copied in, the same
function: ours(2x - 1) = sigma_i * theirs(x) (NCSN: our F = sigma s; NCSNv2: theirs is h / sigma, ours h)."""

from __future__ import annotations

import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

from lightning_diff.networks import RefineNet

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny networks: one intra-op thread

MIRROR = Path("/work/.mirror/ermongroup+ncsnv2/repo")
FILES = ("__init__.py", "layers.py", "normalization.py", "ncsn.py", "ncsnv2.py")
PACKAGE = "ncsnv2_reference_models"


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """ermongroup/ncsnv2's models/ as a package in a temporary folder (never inside lightning_diff)."""
    if not MIRROR.is_dir():
        pytest.skip(f"mirror of ermongroup/ncsnv2 absent: {MIRROR}")
    folder = tmp_path_factory.mktemp("ref") / PACKAGE
    folder.mkdir()
    for name in FILES:
        text = subprocess.run(["git", f"--git-dir={MIRROR}", "show", f"HEAD:models/{name}"], check=True,
                              capture_output=True, text=True).stdout
        (folder / name).write_text(text)
    sys.path.insert(0, str(folder.parent))
    try:
        from ncsnv2_reference_models import ncsn, ncsnv2
    finally:
        sys.path.remove(str(folder.parent))
    return ncsn.NCSN, ncsnv2.NCSNv2


def _config(ngf, num_classes, sigma_begin, sigma_end, device="cpu", size=32):
    ns = types.SimpleNamespace
    return ns(data=ns(logit_transform=False, rescaled=False, channels=3, image_size=size),
              model=ns(ngf=ngf, num_classes=num_classes, nonlinearity="elu", normalization="InstanceNorm++",
                       spec_norm=False, sigma_begin=sigma_begin, sigma_end=sigma_end, sigma_dist="geometric"),
              device=device)


def _count(net):
    return sum(p.numel() for p in net.parameters())


# (ours, the reference's config): NCSN CIFAR-10 (configs/ncsn_original.yml: L = 10, sigma 1 -> 0.01) and
# NCSNv2 CIFAR-10 (configs/cifar10.yml: L = 232, sigma 50 -> 0.01), both ngf 128.
CASES = {
    "ncsn": (dict(num_levels=10, sigma_max=1.0, sigma_min=0.01), (10, 1.0, 0.01), 0),
    "ncsnv2": (dict(num_levels=0), (232, 50.0, 0.01), 1),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_parameter_count_equals_the_reference(reference, case):
    ours_kwargs, (levels, begin, end), which = CASES[case]
    with torch.device("meta"):
        theirs = reference[which](_config(128, levels, begin, end, device="meta"))
        ours = RefineNet(model_channels=128, **ours_kwargs)
    assert _count(ours) == _count(theirs)
    assert [p.shape for p in ours.parameters()] == [p.shape for p in theirs.parameters()]


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("size", [32, 28])
def test_same_function_with_the_reference_weights(reference, case, size):
    ours_kwargs, (levels, begin, end), which = CASES[case]
    levels = 10 if case == "ncsnv2" else levels  # a short grid suffices: NCSNv2 only divides by sigma_i
    torch.manual_seed(0)
    theirs = reference[which](_config(8, levels, begin, end, size=size)).eval()
    ours = RefineNet(in_channels=3, resolution=size, model_channels=8, **ours_kwargs).eval()
    with torch.no_grad():
        for p, q in zip(ours.parameters(), theirs.parameters(), strict=True):
            p.copy_(q + 0.05 * torch.randn_like(q))  # perturbed: the zero-initialised betas matter too
            q.copy_(p)
    x = torch.rand(4, 3, size, size, generator=torch.Generator().manual_seed(1))
    level = torch.tensor([0, 3, 7, 9])
    sigmas = torch.logspace(torch.log10(torch.tensor(begin)), torch.log10(torch.tensor(end)), levels)
    with torch.no_grad():
        expected = theirs(x, level) * sigmas[level][:, None, None, None]
        got = ours(2 * x - 1, level.float())
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


def test_level_index_and_settings_are_checked():
    net = RefineNet(model_channels=4, num_levels=10, sigma_max=1.0, sigma_min=0.01)
    with pytest.raises(ValueError, match=r"allowed: level indices 0..9"):
        net(torch.zeros(2, 3, 8, 8), torch.tensor([0.5, 1.0]))
    with pytest.raises(ValueError, match=r"allowed: level indices 0..9"):
        net(torch.zeros(1, 3, 8, 8), torch.tensor([10.0]))
    with pytest.raises(ValueError, match="network.num_classes=10: RefineNet .* class-unconditional"):
        RefineNet(num_classes=10)
    with pytest.raises(ValueError, match="network.num_levels=10 .* needs network.sigma_max"):
        RefineNet(num_levels=10)


def test_ncsn_preset_levels_are_the_formulations():
    """experiment=ncsn_cifar10: the network's sigma_i (F = sigma_i s) are formulation=ncsn's levels, and the level
    index it reads is the formulation's c_noise of that level."""
    import hydra

    from lightning_diff.training.builders import build_network

    from .helpers import compose_config

    cfg = compose_config("train", ["experiment=ncsn_cifar10", "network.model_channels=4"])
    net = build_network(cfg, (3, 32, 32), 10, False)
    formulation = hydra.utils.instantiate(cfg.formulation)
    torch.testing.assert_close(net.sigmas, formulation.grid.float())
    levels = formulation.c_noise(formulation.grid.float())
    assert torch.equal(net._level(levels), torch.arange(10))
