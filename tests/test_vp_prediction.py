"""The network's target in the VP families (``formulations.prediction``): ``prediction=eps|x0|v`` for ``vp`` and
``ddpm``. Oracles: the closed form of Salimans & Ho 2022 (Sec. 4, Appendix D) computed here in float64 from a
fixed network output, and diffusers' ``DDIMScheduler.step`` (x0 estimate and deterministic DDIM step) on the same
output; the loss with ``loss_weight`` equals the plain MSE on the network's own target (v = alpha n - sigma_t y).
"""

import math

import pytest
import torch
from torch import nn

from lightning_diff import formulations, sampling
from lightning_diff.denoiser import Denoiser

f64 = torch.float64


class Fixed(nn.Module):
    """A network whose output is a given tensor, whatever its inputs."""

    def __init__(self, out: torch.Tensor):
        super().__init__()
        self.register_buffer("out", out)

    def forward(self, x, c_noise, labels=None, **cond):
        return self.out.to(x.dtype)


def _case(n=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 4, 4, generator=g, dtype=f64), torch.randn(n, 3, 4, 4, generator=g, dtype=f64)


@pytest.mark.parametrize("name", ["vp", "ddpm"])
def test_v_prediction_denoiser_is_the_closed_form(name):
    F, x = _case()
    fm = formulations.get(name, prediction="v")
    sigma = fm.round_sigma(torch.tensor([0.05, 0.3, 1.0, 2.5, 10.0, 60.0], dtype=f64))
    D = Denoiser(Fixed(F), fm)(x, sigma)
    alpha = (1 + sigma**2).rsqrt().reshape(-1, 1, 1, 1)  # sqrt(abar)
    sigma_t = (1 - alpha**2).sqrt()  # sqrt(1 - abar)
    x_t = alpha * x  # the VP frame
    expected = alpha * x_t - sigma_t * F  # Salimans & Ho 2022, Sec. 4: x = alpha z - sigma v
    assert (D - expected).abs().max() < 1e-12


@pytest.mark.parametrize("prediction, diffusers_type", [("v", "v_prediction"), ("eps", "epsilon"),
                                                        ("x0", "sample")])
def test_vp_prediction_matches_diffusers_ddim_step(prediction, diffusers_type):
    diffusers = pytest.importorskip("diffusers")
    scheduler = diffusers.DDIMScheduler(num_train_timesteps=1000, beta_schedule="linear", clip_sample=False,
                                        set_alpha_to_one=False, prediction_type=diffusers_type)
    scheduler.set_timesteps(20)
    F, x_t = (v.float() for v in _case())
    denoiser = Denoiser(Fixed(F.double()), formulations.get("vp", prediction=prediction))
    abar = scheduler.alphas_cumprod.double()
    for t in scheduler.timesteps[[0, 7, 18]].tolist():
        t_prev = t - 1000 // 20
        out = scheduler.step(F, t, x_t, eta=0.0)
        sigma, sigma_prev = (math.sqrt((1 - float(abar[k])) / float(abar[k])) for k in (t, t_prev))
        x = x_t.double() * (1 + sigma**2) ** 0.5  # sigma-frame: x_t / sqrt(abar)
        D = denoiser(x, torch.full((6,), sigma, dtype=f64))
        torch.testing.assert_close(D.float(), out.pred_original_sample, rtol=1e-5, atol=1e-5)
        # Our DDIM from sigma_t to sigma_prev > 0 (a grid not ending in 0), back in the VP frame.
        state = sampling.ddim(denoiser, x, torch.tensor([sigma, sigma_prev], dtype=f64))
        torch.testing.assert_close((state / (1 + sigma_prev**2) ** 0.5).float(), out.prev_sample,
                                   rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("prediction", ["eps", "x0", "v"])
def test_vp_loss_is_the_mse_on_the_networks_target(prediction):
    F, y = _case()
    noise = torch.randn(y.shape, generator=torch.Generator().manual_seed(3), dtype=f64)
    sigma = torch.tensor([0.05, 0.3, 1.0, 2.5, 10.0, 60.0], dtype=f64)
    loss, _ = Denoiser(Fixed(F), formulations.get("vp", prediction=prediction)).loss(y.double(), sigma=sigma,
                                                                                      noise=noise)
    alpha = (1 + sigma**2).rsqrt().reshape(-1, 1, 1, 1)
    sigma_t = (1 - alpha**2).sqrt()
    target = {"eps": noise, "x0": y, "v": alpha * noise - sigma_t * y}[prediction]
    expected = ((F - target) ** 2).flatten(1).mean(1)
    torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=0)


def test_prediction_is_checked():
    with pytest.raises(ValueError, match=r"formulation=vp: prediction='score' is not known; allowed: \('eps', 'x0'"):
        formulations.get("vp", prediction="score")
    with pytest.raises(ValueError, match="formulation=subvp: prediction='v' is not supported; allowed: eps"):
        formulations.get("subvp", prediction="v")
