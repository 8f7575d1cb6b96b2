"""Sigma grids against EDM Table 1, the DDIM sub-sequence rules and diffusers' spacings (by hand)."""

import math

import pytest
import torch

from lightning_diff import formulations
from lightning_diff.sampling import schedules

f64 = torch.float64


def test_karras_is_uniform_in_sigma_to_the_one_over_rho():
    s = schedules.karras_sigmas(18, 0.002, 80.0, 7.0)
    assert s.shape == (19,) and s.dtype == f64 and s[-1] == 0
    assert s[0].item() == pytest.approx(80.0) and s[-2].item() == pytest.approx(0.002)
    root = s[:-1] ** (1 / 7)
    assert torch.allclose(root.diff(), root.diff()[0].expand(17), atol=1e-12)


def test_vp_grid_endpoints_edm_table1():
    s = formulations.get("vp").sampling_sigmas(10)
    assert s[0].item() == pytest.approx(152.17, abs=5e-3) and s[-2].item() == pytest.approx(0.01049, abs=5e-6)
    t = formulations.get("vp").t_of_sigma(s[:-1])
    assert torch.allclose(t.diff(), t.diff()[0].expand(9), atol=1e-12)  # uniform in t


def test_ve_and_loglinear_are_geometric():
    for s in (schedules.ve_sigmas(12, 0.02, 100.0), schedules.loglinear_sigmas(12, 0.02, 100.0)):
        ratio = s[1:-1] / s[:-2]
        assert torch.allclose(ratio, ratio[0].expand(11)) and s[0].item() == pytest.approx(100.0)
        assert s[-2].item() == pytest.approx(0.02) and s[-1] == 0
    assert torch.allclose(schedules.ve_sigmas(7, 0.02, 100.0), schedules.loglinear_sigmas(7, 0.02, 100.0))


def test_iddpm_grid_uses_j0_rule():
    iddpm = formulations.get("iddpm")
    s = iddpm.sampling_sigmas(4)
    # j = floor(8 + (999 - 8)/3 i + 1/2) = 8, 338, 669, 999
    assert torch.equal(s[:-1], iddpm.u[[8, 338, 669, 999]]) and s[-1] == 0
    assert s[0].item() == pytest.approx(80.20, abs=5e-3) and s[-2].item() == pytest.approx(0.006425, abs=5e-7)


@pytest.mark.parametrize("spacing, expected", [
    ("linear", [900, 800, 700, 600, 500, 400, 300, 200, 100, 0]),  # DDIM tau_i = floor(100 i)
    ("leading", [900, 800, 700, 600, 500, 400, 300, 200, 100, 0]),
    ("quadratic", [800, 632, 483, 355, 246, 158, 88, 39, 9, 0]),  # floor((i sqrt(800)/9)^2)
    ("trailing", [999, 899, 799, 699, 599, 499, 399, 299, 199, 99]),
    ("linspace", [999, 888, 777, 666, 555, 444, 333, 222, 111, 0]),
])
def test_ddpm_timesteps_spacings(spacing, expected):
    assert schedules.ddpm_timesteps(1000, 10, spacing).tolist() == expected


def test_ddpm_grid_maps_timesteps_to_sigmas():
    ddpm = formulations.get("ddpm")
    s = ddpm.sampling_sigmas(10, spacing="trailing")
    abar = ddpm.alphas_cumprod[[999, 899, 99]]
    assert torch.allclose(s[[0, 1, 9]], ((1 - abar) / abar).sqrt()) and s[-1] == 0


def test_rf_grid_is_uniform_in_t():
    s = schedules.rf_sigmas(8, t_max=0.999)
    t = s / (1 + s)
    assert torch.allclose(t, torch.linspace(0.999, 0, 9, dtype=f64), atol=1e-12)
    shifted = schedules.rf_sigmas(8, t_max=0.999, shift=3.0)
    assert torch.allclose(shifted, 3 * s)


@pytest.mark.parametrize("name", formulations.names())
def test_every_formulation_grid_is_valid(name):
    s = formulations.get(name).sampling_sigmas(8)
    assert s.shape == (9,) and s.dtype == f64 and s[-1] == 0 and (s.diff() < 0).all() and math.isfinite(s[0])


def test_bad_settings_raise():
    with pytest.raises(ValueError, match="num_steps=0"):
        schedules.karras_sigmas(0)
    with pytest.raises(ValueError, match="sigma_min"):
        schedules.karras_sigmas(5, 1.0, 0.5)
    with pytest.raises(ValueError, match="spacing='odd'"):
        schedules.ddpm_timesteps(1000, 10, "odd")
    with pytest.raises(ValueError, match="exceeds"):
        schedules.ddpm_timesteps(10, 20)
    with pytest.raises(ValueError, match="repeats"):
        schedules.ddpm_timesteps(100, 60, "quadratic")
