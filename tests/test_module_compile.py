"""``module.compile``: the backbone compiled in place (state-dict keys unchanged, so checkpoints and EMA are
those of the eager module), the same outputs as the eager backbone, and a bad value named."""

import pytest
import torch

from lightning_diff import formulations
from lightning_diff.networks import TinyUNet
from lightning_diff.training.module import DiffusionModule


def _net():
    torch.manual_seed(0)
    return TinyUNet(in_channels=1, model_channels=8, channel_mult=(1, 2), num_blocks=1)


def test_bad_compile_value_names_the_setting():
    with pytest.raises(ValueError, match=r"module.compile='yes'.*allowed: false, true, 'fullgraph'"):
        DiffusionModule(_net(), formulations.get("edm"), compile="yes")


@pytest.mark.slow  # inductor compiles forward and backward: minutes on a shared 2-core CPU
def test_compiled_backbone_equals_eager():
    torch.set_num_threads(1)
    eager = DiffusionModule(_net(), formulations.get("edm"))
    compiled = DiffusionModule(_net(), formulations.get("edm"), compile="fullgraph")
    assert list(compiled.state_dict()) == list(eager.state_dict())
    x, sigma = torch.randn(4, 1, 8, 8), torch.tensor([0.01, 0.5, 2.0, 40.0])
    a, b = eager.denoiser(x, sigma), compiled.denoiser(x, sigma)
    torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
    a.square().mean().backward(), b.square().mean().backward()
    for (name, p), q in zip(eager.named_parameters(), compiled.parameters(), strict=True):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-6, msg=name)
