"""Sigma grids against EDM Table 1, the DDIM code's sub-sequences (ermongroup/ddim), diffusers'
``DDIMScheduler`` spacings (the installed library, every step count) and their closed forms."""

import math
from fractions import Fraction

import numpy as np
import pytest
import torch

from lightning_diff import formulations
from lightning_diff.formulations import schedules

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


def ddim_code_sequence(T, S, skip_type):
    """ermongroup/ddim runners/diffusion.py ``sample_image`` (the DDIM paper's code), verbatim in numpy."""
    if skip_type == "uniform":
        skip = T // S
        seq = range(0, T, skip)
    else:  # "quad"
        seq = np.linspace(0, np.sqrt(T * 0.8), S) ** 2
        seq = [int(s) for s in list(seq)]
    return list(seq)


@pytest.mark.parametrize("T", [1000, 37])
@pytest.mark.parametrize("spacing, skip_type", [("linear", "uniform"), ("quadratic", "quad")])
def test_linear_and_quadratic_are_the_ddim_code_sequences_for_every_step_count(T, spacing, skip_type):
    """Every S in 1..T, to the last index, repeats included (quad repeats from S = 30 at T = 1000;
    uniform visits len(range(0, T, T // S)) >= S timesteps)."""
    for S in range(1, T + 1):
        assert schedules.ddpm_timesteps(T, S, spacing).tolist() == ddim_code_sequence(T, S, skip_type)[::-1], S


def test_ddim_cifar10_protocol_quadratic_50_and_100_runs():
    """DDIM's CIFAR-10 protocol (quadratic at S = 50 and 100): the grid keeps the distinct timesteps; the
    DDIM code runs S network evaluations, repeats being identity steps (t -> t)."""
    ddpm = formulations.get("ddpm", spacing="quadratic")
    for S in (50, 100):
        seq = ddim_code_sequence(1000, S, "quad")
        distinct = sorted(set(seq), reverse=True)
        with pytest.warns(UserWarning, match=f"num_steps={S}.*{S - len(distinct)} repeated"):
            s = ddpm.sampling_sigmas(S)
        assert len(distinct) < S and s.shape == (len(distinct) + 1,) and (s.diff() < 0).all() and s[-1] == 0
        assert torch.equal(s[:-1], ddpm.grid.flip(0)[distinct])


def test_linear_spacing_visits_more_timesteps_than_asked_when_steps_do_not_divide_T():
    ddpm = formulations.get("ddpm")
    with pytest.warns(UserWarning, match="num_steps=30.*31 timesteps"):
        s = ddpm.sampling_sigmas(30, spacing="linear")
    assert s.shape == (32,) and torch.equal(s[:-1], ddpm.grid.flip(0)[list(range(0, 1000, 33))[::-1]])


def diffusers_timesteps(T, spacing):
    """``DDIMScheduler.set_timesteps`` for N = 1..T (diffusers computes them in numpy float64)."""
    diffusers = pytest.importorskip("diffusers")
    scheduler = diffusers.DDIMScheduler(num_train_timesteps=T, timestep_spacing=spacing)
    for N in range(1, T + 1):
        scheduler.set_timesteps(N)
        yield N, scheduler.timesteps.tolist()


def closed_form(T, N, spacing):
    """The spacing in exact rational arithmetic, largest first: for each i a list of the admissible values
    (two where the exact value is a tie or an integer that float64 may land an ulp beside)."""
    out = []
    for i in range(N):
        if spacing == "leading":
            out.append([i * (T // N)])
        elif spacing == "trailing":  # round(T - i T / N) - 1
            v = Fraction(T * (N - i), N)
            out.append([math.floor(v) - 1, math.ceil(v) - 1] if v.denominator == 2 else [round(v) - 1])
        elif spacing == "linspace":  # round(i (T - 1) / (N - 1))
            v = Fraction(i * (T - 1), max(N - 1, 1))
            out.append([math.floor(v), math.ceil(v)] if v.denominator == 2 else [round(v)])
        else:  # quadratic: floor(0.8 T i^2 / (N - 1)^2)
            v = Fraction(8 * T * i * i, 10 * max(N - 1, 1) ** 2)
            out.append([math.floor(v) - 1, math.floor(v)] if v.denominator == 1 and v > 0 else [math.floor(v)])
    return out if spacing == "trailing" else out[::-1]  # largest first


@pytest.mark.parametrize("T", [1000, 37])
@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
def test_spacings_equal_diffusers_ddim_scheduler_for_every_step_count(T, spacing):
    """diffusers to the last index wherever it returns N timesteps; where its ``trailing`` returns N + 1
    ending in -1 (np.arange overshoots: 62 values of N at T = 1000) the closed form round(T - i T/N) - 1."""
    malformed = []
    for N, expected in diffusers_timesteps(T, spacing):
        ours = schedules.ddpm_timesteps(T, N, spacing).tolist()
        if len(expected) == N:
            assert ours == expected, N
            continue
        malformed.append(N)
        assert spacing == "trailing" and len(expected) == N + 1 and expected[-1] == -1
        exact = [round(Fraction(T * (N - i), N)) - 1 for i in range(N)]  # ties to even, as numpy rounds
        assert ours == exact, N
    if spacing == "trailing" and T == 1000:
        assert len(malformed) == 62


@pytest.mark.parametrize("T", [1000, 37])
@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace", "quadratic"])
def test_spacings_equal_their_closed_forms(T, spacing):
    for N in range(1, T + 1):
        ours = schedules.ddpm_timesteps(T, N, spacing).tolist()
        admissible = closed_form(T, N, spacing)
        assert len(ours) == N and all(v in ok for v, ok in zip(ours, admissible, strict=True)), N
        assert 0 <= ours[-1] and ours[0] <= T - 1


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
    with pytest.raises(ValueError, match="num_steps=1.5"):
        schedules.ddpm_timesteps(1000, 1.5)
