"""Autoguidance (Karras et al. 2024, "Guiding a diffusion model with a bad version of itself") and guidance intervals
(Kynkäänniemi et al. 2024, "Applying guidance in a limited interval...") against closed forms on a 2-D Gaussian
mixture with exact denoisers (``lightning_diff.analytic``): the main model is the exact denoiser of the mixture (per
class: of its component), the weak model the exact denoiser of the same mixture with every component broadened. The
guided denoiser equals ``D_weak + gamma (D - D_weak)`` to float rounding; the interval ``(sigma_lo, sigma_hi]``
switches it off outside (the main denoiser exactly, one network pass) and the NFE counts 2 passes per evaluation
inside, 1 outside. CFG with an interval likewise on the class-conditional mixture. ``guidance=<float>`` stays CFG;
every ``guidance.*`` setting is checked by name, and the weaker model must share the formulation and data shape."""

from pathlib import Path

import pytest
import torch

from lightning_diff import sampling
from lightning_diff.analytic import GaussianMixture
from lightning_diff.cli.config_check import check_settings
from lightning_diff.evaluation.generate import generate, load_guidance
from lightning_diff.evaluation.leaderboard import _options_text
from lightning_diff.formulations import schedules
from lightning_diff.sampling import AutoGuidance, CFGDenoiser, Guidance
from lightning_diff.sampling.core import network_passes
from lightning_diff.sampling.settings import SamplerSettings

from .helpers import compose_config

f64 = torch.float64
MEANS, STDS, WEIGHTS = [[-1.0, 0.5], [1.0, -0.5], [0.3, 1.2]], [0.3, 0.4, 0.25], [0.5, 0.3, 0.2]
BROADER = 0.5  # added to every component's std: the weak model's worse (blurrier) density
NULL = len(MEANS)  # the null label of classifier-free guidance


def mixtures(extra_std: float) -> tuple[GaussianMixture, list[GaussianMixture]]:
    """The mixture and its components, each std increased by ``extra_std``."""
    stds = [s + extra_std for s in STDS]
    return GaussianMixture(MEANS, stds, WEIGHTS), [GaussianMixture(m, s) for m, s in zip(MEANS, stds, strict=True)]


class Exact:
    """The exact D(x; sigma, c) of a mixture (each row: its class's component; labels None or the null label: the
    mixture), recording the rows and the noise levels of every call."""

    null_label = NULL

    def __init__(self, extra_std: float = 0.0):
        self.mixture, self.components = mixtures(extra_std)
        self.calls = []

    def __call__(self, x, sigma, labels=None):
        sigma = torch.as_tensor(sigma, dtype=f64).reshape(-1).expand(x.shape[0])
        self.calls.append(sigma.tolist())
        if labels is None:
            return self.mixture(x, sigma)
        every = torch.stack([c(x, sigma) for c in self.components] + [self.mixture(x, sigma)])  # [K + 1, B, D]
        return every[labels, torch.arange(x.shape[0])]


def closed_form(good, weak, x, sigma, labels, gamma):
    """D_weak + gamma (D_good - D_weak) from the exact denoisers (Karras et al. 2024, the guided denoiser)."""
    return weak(x, sigma, labels) + gamma * (good(x, sigma, labels) - weak(x, sigma, labels))


@pytest.fixture
def batch():
    g = torch.Generator().manual_seed(0)
    x = 2 * torch.randn(64, 2, generator=g, dtype=f64)
    sigma = torch.rand(64, generator=g, dtype=f64) * 6 + 0.05
    labels = torch.randint(0, 3, (64,), generator=g)
    return x, sigma, labels


# --- autoguidance ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("gamma", [2.5, 1.5, 0.4, 0.0])
@pytest.mark.parametrize("conditional", [False, True])
def test_autoguidance_equals_the_closed_form(batch, gamma, conditional):
    """Unconditional (the mixture) and conditional (the weak model gets the same labels, as EDM2's generate_images
    calls its guiding network): the guided D is the closed form to float64 rounding."""
    x, sigma, labels = batch
    labels = labels if conditional else None
    good, weak = Exact(), Exact(BROADER)
    guided = AutoGuidance(good, weak, gamma)(x, sigma, labels=labels)
    expected = closed_form(Exact(), Exact(BROADER), x, sigma, labels, gamma)
    assert (guided - expected).abs().max() <= 1e-12
    assert (weak(x, sigma, labels) - good(x, sigma, labels)).abs().max() > 0.1  # the weak model differs


def test_autoguidance_at_gamma_one_is_the_main_model_in_one_pass(batch):
    x, sigma, labels = batch
    good, weak = Exact(), Exact(BROADER)
    assert torch.equal(AutoGuidance(good, weak, 1.0)(x, sigma, labels=labels), Exact()(x, sigma, labels))
    assert len(good.calls) == 1 and weak.calls == []
    assert AutoGuidance(good, weak, 1.0).network_passes({"labels": labels}, sigma) == 1


# --- the interval -----------------------------------------------------------------------------------------
LO, HI = 0.28, 5.42  # Kynkäänniemi et al. 2024's EDM2-S interval, a half-open (sigma_lo, sigma_hi]
LEVELS = torch.tensor([0.1, LO, 0.29, 1.0, HI, 5.5, 20.0], dtype=f64)
INSIDE = [False, False, True, True, True, False, False]  # sigma_lo < sigma <= sigma_hi


@pytest.mark.parametrize("kind", ["autoguidance", "cfg"])
def test_the_interval_switches_guidance_off_outside(kind):
    """Rows inside (sigma_lo, sigma_hi] are the closed form; rows outside are the main (conditional) denoiser
    exactly, and the reference model never sees them (one pass)."""
    x = torch.randn(len(LEVELS), 2, generator=torch.Generator().manual_seed(1), dtype=f64)
    labels = torch.tensor([0, 1, 2, 0, 1, 2, 0])
    good, reference = Exact(), Exact(BROADER)
    if kind == "autoguidance":
        guided = AutoGuidance(good, reference, 2.5, interval=(LO, HI))
        expected = closed_form(Exact(), Exact(BROADER), x, LEVELS, labels, 2.5)
    else:
        guided = CFGDenoiser(good, 2.5, interval=(LO, HI))
        expected = Exact()(x, LEVELS, None) + 2.5 * (Exact()(x, LEVELS, labels) - Exact()(x, LEVELS, None))
    out = guided(x, LEVELS, labels=labels)
    inside = torch.tensor(INSIDE)
    assert (out[inside] - expected[inside]).abs().max() <= 1e-12
    assert torch.equal(out[~inside], Exact()(x, LEVELS, labels)[~inside])
    reference_rows = reference.calls if kind == "autoguidance" else [c[3:] for c in good.calls if len(c) == 6]
    assert sorted(sum(reference_rows, [])) == sorted(LEVELS[inside].tolist())  # only the inside rows
    for row, level in enumerate(LEVELS):
        assert guided.network_passes({"labels": labels[row:row + 1]}, level.reshape(1)) == 1 + INSIDE[row]


@pytest.mark.parametrize("sampler", ["heun", "euler"])
def test_guided_sampling_follows_the_closed_form_with_2_passes_inside_and_1_outside(sampler):
    """Heun / Euler through autoguidance with an interval equals the sampler through the closed-form piecewise
    denoiser; NFE is 2 per evaluation at a level inside the interval, 1 outside, counted from the grid here."""
    grid = schedules.karras_sigmas(12, 0.002, 20.0)
    x = 20.0 * torch.randn(50, 2, generator=torch.Generator().manual_seed(3), dtype=f64)
    good, weak = Exact(), Exact(BROADER)

    def piecewise(x, sigma):
        inside = ((sigma > LO) & (sigma <= HI)).reshape(-1, 1)
        return torch.where(inside, closed_form(Exact(), Exact(BROADER), x, sigma, None, 2.0), Exact()(x, sigma))

    stats, exact_stats = {}, {}
    out = sampling.sample(sampler, AutoGuidance(good, weak, 2.0, interval=(LO, HI)), x, grid, stats=stats)
    exact = sampling.sample(sampler, piecewise, x, grid, stats=exact_stats)
    assert torch.allclose(out, exact, atol=1e-10, rtol=0)
    levels = grid[:-1].tolist() + (grid[1:-1].tolist() if sampler == "heun" else [])  # Heun's corrector levels
    inside = sum(LO < s <= HI for s in levels)
    assert 0 < inside < len(levels)  # both sides of the interval are on the grid
    assert exact_stats["nfe"] == len(levels) and stats["nfe"] == len(levels) + inside
    assert len(good.calls) == len(levels) and len(weak.calls) == inside


def test_cfg_with_an_interval_counts_its_passes_and_runs_one_batch_inside():
    grid = schedules.karras_sigmas(8, 0.01, 10.0)
    x = 10.0 * torch.randn(12, 2, generator=torch.Generator().manual_seed(4), dtype=f64)
    labels = torch.tensor([0, 1, 2] * 4)
    denoiser, stats = Exact(), {}
    sampling.euler(CFGDenoiser(denoiser, 2.0, interval=(0.5, 3.0)), x, grid, cond={"labels": labels}, stats=stats)
    inside = sum(0.5 < s <= 3.0 for s in grid[:-1].tolist())
    assert stats["nfe"] == 8 + inside
    assert sorted(len(c) for c in denoiser.calls) == [12] * (8 - inside) + [24] * inside  # [x; x] inside


def test_network_passes_without_a_level_is_the_guided_count():
    """``network_passes(cond)`` with no sigma (a caller that does not say) counts the guided cost: an upper bound."""
    guided = AutoGuidance(Exact(), Exact(BROADER), 2.0, interval=(LO, HI))
    assert network_passes(guided, {}) == 2
    assert network_passes(guided, {}, torch.tensor([20.0], dtype=f64)) == 1
    assert network_passes(CFGDenoiser(Exact(), 2.0, interval=(LO, HI)), {"labels": None}, None) == 1


# --- settings -------------------------------------------------------------------------------------------
def test_a_float_is_classifier_free_guidance_and_records_stay_valid():
    assert Guidance.from_config(1.5) == Guidance(kind="cfg", scale=1.5)
    assert Guidance.from_config(None) == Guidance(kind="cfg", scale=None)
    record = Guidance.from_config(1.5).record()
    assert record == {"guidance": 1.5, "guidance_kind": "cfg", "guidance_interval": None}
    auto = Guidance.from_config({"kind": "autoguidance", "scale": 2, "ckpt": "weak.ckpt", "interval": [LO, HI]})
    assert auto.record() == {"guidance": 2.0, "guidance_kind": "autoguidance", "guidance_interval": [LO, HI],
                             "guidance_ckpt": "weak.ckpt"}
    assert _options_text({"name": "heun", **record}) == "guidance=1.5"
    expected = f"autoguidance=2 (weak.ckpt), guidance_interval=({LO}, {HI}]"
    assert _options_text({"name": "heun", **auto.record()}) == expected
    assert _options_text({"name": "heun", "guidance": 1.0}) == ""  # an older record


@pytest.mark.parametrize("value,setting", [
    ({"kind": "autoguide", "scale": 2}, "guidance.kind='autoguide'"),
    ({"scale": -1}, "guidance.scale=-1"), ({"scale": True}, "guidance.scale=True"), (-0.5, "guidance=-0.5"),
    ("abc", "guidance='abc'"), ({"interval": [3.0, 0.3]}, r"guidance.interval=\[3.0, 0.3\]"),
    ({"interval": [0.3]}, r"guidance.interval=\[0.3\]"), ({"interval": [-1, 2]}, r"guidance.interval=\[-1, 2\]"),
    ({"interval": "abc"}, "guidance.interval='abc'"),
    ({"kind": "autoguidance", "scale": 2}, "guidance.ckpt=None with guidance.kind=autoguidance"),
    ({"kind": "cfg", "scale": 2, "ckpt": "w.ckpt"}, "guidance.ckpt='w.ckpt' with guidance.kind=cfg"),
    ({"kind": "cfg", "weight": 2}, r"guidance: unknown settings \['weight'\]")])
def test_bad_guidance_settings_are_refused_by_name(value, setting):
    with pytest.raises(ValueError, match=f"^{setting}.*allowed: "):
        Guidance.from_config(value)


def test_the_models_own_guidance_fills_a_null_scale():
    """``SamplerSettings.of_run``: a null scale is the model's own CFG gamma (a preset's or a released checkpoint's);
    autoguidance has none, so its scale must be given."""
    run = {"guidance": 1.5}
    assert SamplerSettings.of_run(run, None, None)[1] == Guidance(scale=1.5)
    assert SamplerSettings.of_run(run, None, 2.0)[1] == Guidance(scale=2.0)
    assert SamplerSettings.of_run(run, None, {"kind": "cfg", "scale": None, "interval": [LO, HI]})[1] == Guidance(
        scale=1.5, interval=(LO, HI))
    assert SamplerSettings.of_run(None, None, None)[1] == Guidance(scale=1.0)
    with pytest.raises(ValueError, match="guidance.scale=None with guidance.kind=autoguidance.*allowed: "):
        SamplerSettings.of_run(run, None, {"kind": "autoguidance", "scale": None, "ckpt": "w.ckpt"})


@pytest.mark.parametrize("command", ["sample", "evaluate"])
def test_the_commands_take_a_float_or_the_guidance_node(command):
    base = ["ckpt=model.ckpt"]
    for overrides in (["guidance=1.5"], ["guidance=null"], [],
                      ["guidance.kind=autoguidance", "guidance.scale=2", "guidance.ckpt=weak.ckpt",
                       f"guidance.interval=[{LO},{HI}]"]):
        check_settings(compose_config(command, base + overrides), command)
    for overrides, setting in ((["guidance.kind=autoguidance", "guidance.scale=2"], "guidance.ckpt"),
                               (["guidance.interval=[3,1]"], "guidance.interval"),
                               (["guidance.scale=-1"], "guidance.scale"), (["guidance=abc"], "guidance")):
        with pytest.raises(ValueError, match=f"{setting}=.*allowed: "):
            check_settings(compose_config(command, base + overrides), command)


# --- the weaker model of a run ------------------------------------------------------------------------------
def _toy_run(tmp_path_factory, name: str, *overrides: str) -> str:
    """A checkpoint of a 2-step conditional run on the 2-D mixture (``lightning_diff.cli.train``)."""
    from lightning_diff.cli.train import train

    cfg = compose_config("train", ["logger=csv", "callbacks.progress=null", "++trainer.enable_progress_bar=false",
                                   "callbacks.sample_grid=null", "data=toy2d", "network=mlp", "network.hidden=16",
                                   "network.depth=1", "data.num_samples=64", "data.num_val_samples=16",
                                   "data.batch_size=16", "trainer.max_steps=2", "module.conditional=true",
                                   "network.label_dropout=0.1", *overrides], tmp_path_factory.mktemp(name))
    return train(cfg)["checkpoint"]


@pytest.fixture(scope="module")
def toy_runs(tmp_path_factory):
    return {"main": _toy_run(tmp_path_factory, "main"), "weak": _toy_run(tmp_path_factory, "weak", "seed=1"),
            "vp": _toy_run(tmp_path_factory, "vp", "formulation=vp"),
            "moons": _toy_run(tmp_path_factory, "moons", "data.dataset=two_moons")}


def test_the_weaker_model_must_share_formulation_shape_and_classes(toy_runs):
    from lightning_diff.training.builders import load_module

    module = load_module(toy_runs["main"])
    spec = Guidance(kind="autoguidance", scale=2.0, ckpt=toy_runs["weak"], interval=(0.3, 3.0))
    loaded = load_guidance(spec, module)
    assert loaded.weak is not None and loaded == spec  # the loaded model is not part of the setting
    samples, labels, stats = generate(module, range(4), sampler={"name": "euler", "steps": 6}, guidance=spec,
                                      progress=False)
    inside = sum(0.3 < s <= 3.0 for s in module.formulation.sampling_sigmas(6)[:-1].tolist())
    assert torch.isfinite(samples).all() and labels is not None and stats["nfe"] == 6 + inside
    with pytest.raises(ValueError, match=r"guidance.ckpt=.*vp.*formulation=vp.*guided model \(ckpt=\) "
                                         r"formulation=edm.*allowed: "):
        load_guidance(Guidance(kind="autoguidance", scale=2.0, ckpt=toy_runs["vp"]), module)
    with pytest.raises(ValueError, match=r"guidance.ckpt=.*nothere.ckpt: .*does not exist.*allowed: "):
        missing = str(Path(toy_runs["main"]).parent / "nothere.ckpt")
        load_guidance(Guidance(kind="autoguidance", scale=2.0, ckpt=missing), module)
    with pytest.raises(ValueError, match=r"guidance.ckpt=.*moons.*has 2 classes, the guided model \(ckpt=\) 8 "
                                         r"classes.*allowed: "):
        load_guidance(Guidance(kind="autoguidance", scale=2.0, ckpt=toy_runs["moons"]), module)
