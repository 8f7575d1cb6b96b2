"""Released checkpoints sample with their source's sampler unless a setting says otherwise, and
classifier-free guidance refuses a null label that was never trained.

Oracles: guided-diffusion's ``space_timesteps`` (``shared/reference/guided_diffusion/respace.py``, imported), which
both its ``image_sample.py`` and DiT's ``sample.py`` (``create_diffusion(str(num_sampling_steps))``) sample on; its
``ddim_sample_loop`` with ``image_sample.py``'s ``clip_denoised=True``; the sampler settings of the sources' scripts
(guided-diffusion ``image_sample.py``: ``p_sample_loop``, learned sigma, ``clip_denoised=True``, ``--timestep_respacing
250`` in the model cards; DiT ``sample.py``: 250 steps, learned sigma, ``clip_denoised=False``; ``sample_ddp.py``:
``--cfg-scale 1.5``, DiT Table 4's headline).
"""

import json
import sys

import numpy as np
import pytest
import torch

from lightning_diff import cli, sampling
from lightning_diff.config import apply_smoke
from lightning_diff.denoiser import Denoiser
from lightning_diff.evaluation import generate
from lightning_diff.evaluation.metrics import compute as metrics_compute
from lightning_diff.formulations import EDM, schedules
from lightning_diff.networks import MLP
from lightning_diff.sampling import SamplerSettings
from lightning_diff.training.builders import build_datamodule, build_module, load_module
from lightning_diff.training.module import DiffusionModule
from tests.helpers import compose_config
from tests.pretrained_fixtures import guided_diffusion_script_util, reference_or_skip, write_adm_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")

ADM = dict(image_size=16, num_channels=32, num_res_blocks=1, channel_mult="1,2", attention_resolutions="8",
           learn_sigma=True, class_cond=True, num_heads=2, use_scale_shift_norm=True, resblock_updown=True)


def space_timesteps(num_timesteps: int, section_counts: str) -> list[int]:
    """guided-diffusion's ``respace.space_timesteps``, sorted (the oracle)."""
    guided_diffusion_script_util()
    from guided_diffusion.respace import space_timesteps as reference

    return sorted(reference(num_timesteps, section_counts))


# --- the grids --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("steps", [25, 50, 100, 250, 1000])
def test_respace_visits_guided_diffusions_space_timesteps(steps):
    ours = schedules.ddpm_timesteps(1000, steps, "respace")
    assert sorted(ours.tolist()) == space_timesteps(1000, str(steps)) and len(set(ours.tolist())) == steps


def test_respace_equals_space_timesteps_for_every_count_where_linspace_does_not():
    """guided-diffusion accumulates a float stride; numpy's linspace does not: at T = 1000 they part for 278 counts
    (21, 23, 31, ...), so ``respace`` is its own rule, not ``linspace``."""
    parted = []
    for T in (1000, 4000):
        for steps in [*range(1, 400), *range(T - 20, T + 1)]:
            ours = sorted(schedules.ddpm_timesteps(T, steps, "respace").tolist())
            assert ours == space_timesteps(T, str(steps)), (T, steps)
            parted += [steps] if T == 1000 and ours != sorted(schedules.ddpm_timesteps(T, steps, "linspace")) else []
    assert parted[:3] == [21, 23, 31]


@pytest.mark.parametrize("steps", [25, 50, 100, 250, 1000])
def test_respace_ddim_visits_space_timesteps_ddimN(steps):
    ours = schedules.ddpm_timesteps(1000, steps, "respace_ddim")
    assert sorted(ours.tolist()) == space_timesteps(1000, f"ddim{steps}")


def test_respace_ddim_without_an_integer_stride_is_an_error_naming_it():
    with pytest.raises(ValueError, match="cannot create exactly .* with an integer stride"):
        space_timesteps(1000, "ddim999")  # the reference refuses it too
    with pytest.raises(ValueError, match=r"spacing='respace_ddim' with num_steps=999 of 1000: no integer stride"):
        schedules.ddpm_timesteps(1000, 999, "respace_ddim")


# --- the commands -----------------------------------------------------------------------------------------------
def _flags(settings: dict) -> list[str]:
    return [f"+pretrained.{k}={v!r}" if isinstance(v, str) else f"+pretrained.{k}={str(v).lower()}"
            for k, v in settings.items()]


@pytest.fixture(scope="module")
def adm_pt(tmp_path_factory):
    path = tmp_path_factory.mktemp("adm") / "adm.pt"
    write_adm_checkpoint(path, **ADM)
    return path


@pytest.fixture(scope="module")
def dit_pt(tmp_path_factory):
    """A tiny DiT of DiT's own code on 3-channel 8x8 inputs (no autoencoder needed), learned sigma, class dropout."""
    reference_or_skip("dit")
    import models as dit_models

    torch.manual_seed(0)
    net = dit_models.DiT(input_size=8, patch_size=2, in_channels=3, hidden_size=32, depth=1, num_heads=2,
                         num_classes=10, class_dropout_prob=0.1, learn_sigma=True)
    with torch.no_grad():  # off DiT's zero init; pos_embed is its fixed sin-cos table (not trained)
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p) if p.requires_grad else 0)
    path = tmp_path_factory.mktemp("dit") / "dit.pt"
    torch.save(net.state_dict(), path)
    return path


class SamplerSpy:
    """Stands in for ``sampling.sample`` and records what the command asks of it (name, guidance scale, timesteps,
    options); returns the start noise, so a 250-step command takes no time."""

    def __init__(self):
        self.calls = []

    def __call__(self, name, denoiser, x, sigmas, **kwargs):
        if x.ndim == 4:  # not SamplerSettings.check's 1-D probe
            self.calls.append(dict(name=name, denoiser=denoiser, sigmas=sigmas, options=kwargs))
        return x

    def only(self, formulation) -> dict:
        (call,) = self.calls
        options = {k: v for k, v in call["options"].items() if k not in ("generator", "stats", "cond")}
        return dict(name=call["name"], options=options, guidance=getattr(call["denoiser"], "scale", 1.0),
                    timesteps=sorted(formulation.timestep_index(call["sigmas"][:-1]).tolist()))


def _sample(monkeypatch, tmp_path, *args) -> dict:
    spy = SamplerSpy()
    monkeypatch.setattr(sampling.registry, "sample", spy)
    monkeypatch.setattr(sys, "argv", ["lightning-diff"])
    cli.main(["sample", *args, "num_samples=1", "device=cpu", f"out={tmp_path / 'out'}"])
    return spy


def test_adm_command_without_sampler_settings_runs_image_sample_py(adm_pt, tmp_path, monkeypatch):
    """`lightning-diff sample ckpt=<ADM .pt>` + the model card's flags and nothing else: DDPM ancestral steps on
    space_timesteps(1000, "250"), learned variance (learn_sigma), x0 clipped (clip_denoised=True)."""
    spy = _sample(monkeypatch, tmp_path, f"ckpt={adm_pt}", *_flags(ADM))
    formulation = load_module(str(adm_pt), pretrained=ADM).formulation
    run = spy.only(formulation)
    assert run == dict(name="ddpm", options={"variance": "learned", "clip_denoised": True}, guidance=1.0,
                       timesteps=space_timesteps(1000, "250"))


def test_adm_timestep_respacing_flag_is_the_grid(adm_pt, tmp_path, monkeypatch):
    """The model card's SAMPLE_FLAGS `--timestep_respacing ddim25` (or any `N`) set the source's grid."""
    spy = _sample(monkeypatch, tmp_path, f"ckpt={adm_pt}", *_flags(ADM), "+pretrained.timestep_respacing=ddim25")
    run = spy.only(load_module(str(adm_pt), pretrained=ADM).formulation)
    assert run["name"] == "ddpm" and run["timesteps"] == space_timesteps(1000, "ddim25")
    with pytest.raises(ValueError, match=r"timestep_respacing='10,15,20' is not supported; allowed: .*'ddimN'"):
        load_module(str(adm_pt), pretrained=dict(ADM, timestep_respacing="10,15,20"))


def test_dit_command_without_sampler_settings_runs_dits_sample_py(dit_pt, tmp_path, monkeypatch):
    """`lightning-diff sample ckpt=<DiT .pt>`: 250 DDPM steps on space_timesteps(1000, "250") with learned sigma,
    no clipping (latents), classifier-free guidance 1.5 (sample_ddp.py; DiT Table 4)."""
    spy = _sample(monkeypatch, tmp_path, f"ckpt={dit_pt}", "+pretrained.num_heads=2")
    run = spy.only(load_module(str(dit_pt), pretrained={"num_heads": 2}).formulation)
    assert run == dict(name="ddpm", options={"variance": "learned", "clip_denoised": False}, guidance=1.5,
                       timesteps=space_timesteps(1000, "250"))


def test_explicit_settings_win(adm_pt, dit_pt, tmp_path, monkeypatch):
    spy = _sample(monkeypatch, tmp_path, f"ckpt={adm_pt}", *_flags(ADM), "sampler=ddpm", "sampler.steps=50",
                  "sampler.options.clip_denoised=false", "sampler.options.variance=fixed_small")
    run = spy.only(load_module(str(adm_pt), pretrained=ADM).formulation)
    assert run["options"] == {"variance": "fixed_small", "clip_denoised": False}
    assert run["timesteps"] == space_timesteps(1000, "50")  # the source's spacing, the asked count
    spy = _sample(monkeypatch, tmp_path, f"ckpt={dit_pt}", "+pretrained.num_heads=2", "sampler=ddim", "guidance=1")
    run = spy.only(load_module(str(dit_pt), pretrained={"num_heads": 2}).formulation)
    assert run["name"] == "ddim" and run["options"] == {"eta": 0.0, "clip_denoised": False} and run["guidance"] == 1


@pytest.mark.parametrize("asked, expected", [
    ([], dict(name="ddpm", steps=250, spacing="respace", guidance=1.0, guidance_kind="cfg", guidance_interval=None,
              options={"variance": "learned", "clip_denoised": True})),
    (["sampler=ddim", "sampler.steps=25", "sampler.options.clip_denoised=false"],
     dict(name="ddim", steps=25, spacing="respace", guidance=1.0, guidance_kind="cfg", guidance_interval=None,
          options={"eta": 0.0, "clip_denoised": False})),
])
def test_evaluate_records_the_effective_sampler(adm_pt, tmp_path, monkeypatch, asked, expected):
    reference = tmp_path / "ref.npz"
    np.savez(reference, mu=np.zeros(2048), sigma=np.eye(2048))
    monkeypatch.setattr(sampling.registry, "sample", SamplerSpy())
    monkeypatch.setattr(metrics_compute, "frechet_distance", lambda *a, **k: 0.0)  # the protocol, not the number
    record = _evaluate(adm_pt, reference, asked)
    assert record["protocol"]["samples"]["sampler"] == expected
    assert record["protocol"]["pretrained"]["sampler"]["options"] == {"variance": "learned", "clip_denoised": True}


def _evaluate(path, reference, extra):
    from lightning_diff.cli.evaluate import evaluate

    return evaluate(compose_config("evaluate", [
        f"ckpt={path}", *_flags(ADM), "metrics=[fid]", "metrics.num_samples=2", f"metrics.reference={reference}",
        "device=cpu", "progress=false", "name=source", *extra]))


def test_adm_ddim_respacing_with_source_clipping_equals_guided_diffusions_ddim_sample_loop(adm_pt):
    """`+pretrained.timestep_respacing=ddim10 sampler=ddim`: our DDIM with the source's clipping on the source's
    grid equals guided-diffusion's ``ddim_sample_loop(clip_denoised=True)`` from the same start noise."""
    script_util = guided_diffusion_script_util()
    reference = write_adm_checkpoint(adm_pt.parent / "again.pt", **ADM)  # same seed: the same weights
    module = load_module(str(adm_pt), pretrained=dict(ADM, timestep_respacing="ddim10"))
    settings, guidance = SamplerSettings.of_run(module.run_config, {"name": "ddim"})
    sigmas = settings.sigmas(module.formulation, module.grid)
    diffusion = script_util.create_gaussian_diffusion(steps=1000, learn_sigma=True, timestep_respacing="ddim10")
    assert module.formulation.timestep_index(sigmas[:-1]).tolist() == sorted(diffusion.timestep_map, reverse=True)
    gen = torch.Generator().manual_seed(2)
    noise, labels = torch.randn(2, 3, 16, 16, generator=gen), torch.tensor([7, 993])
    with torch.no_grad():
        expected, unclipped = (diffusion.ddim_sample_loop(reference, noise.shape, noise=noise, clip_denoised=clip,
                                                          model_kwargs={"y": labels}, eta=0.0)
                               for clip in (True, False))
        ours = sampling.ddim(module.denoiser, (1 + sigmas[0] ** 2).sqrt() * noise.double(), sigmas,
                             cond={"labels": labels}, **settings.call_options(module.formulation))
    assert guidance.scale == 1.0 and settings.options == {"clip_denoised": True}
    error = ((ours.float() - expected).abs().max() / expected.abs().max()).item()
    print(f"max relative error {error:.2e}; clipping moves the result by {(unclipped - expected).abs().max():.3f}")
    assert error < 1e-4, error  # measured 2.2e-5: the float32 reference, amplified where x0 meets the clip
    assert (unclipped - expected).abs().max() > 0.1  # clipping was active: the test tells clipped from not


# --- the DiT training preset --------------------------------------------------------------------------------------
def test_dit_preset_samples_with_learned_sigma_and_guidance_1_5(tmp_path):
    """configs/experiment/dit_xl2_imagenet256 at smoke width: its sampler is DiT's (learned sigma, which needs the
    hybrid loss to train the variance channels) and sample/evaluate of its checkpoints guide with 1.5 (Table 4)."""
    cfg = compose_config("train", ["experiment=dit_xl2_imagenet256", "+smoke=true"], tmp_path)
    assert apply_smoke(cfg)
    module = build_module(cfg, build_datamodule(cfg))
    settings, guidance = SamplerSettings.of_run(module.run_config, None)
    assert guidance.scale == 1.5 and module.sampler.options == {"variance": "learned", "clip_denoised": False}
    assert module.sampler.record(module.formulation)["spacing"] == "respace"
    with torch.no_grad():  # learned variance needs variance channels trained as one (objective=hybrid)
        out = module.sample([0], labels=torch.tensor([3]), guidance=guidance)
    assert torch.isfinite(out).all()


# --- classifier-free guidance needs a trained null label ---------------------------------------------------------
def _mlp_module(label_dropout: float) -> DiffusionModule:
    torch.manual_seed(0)
    net = MLP(dim=2, hidden=16, depth=1, emb_channels=8, num_classes=3, label_dropout=label_dropout)
    return DiffusionModule(None, None, denoiser=Denoiser(net, EDM()), conditional=True, num_classes=3,
                           data_shape=(2,))


def test_guidance_is_refused_for_a_null_label_never_trained():
    """label_dropout=0 still builds a null row (LabelEmbedding), which training never selects: guidance with it is
    refused naming guidance and label_dropout; trained with label dropout it runs."""
    with pytest.raises(ValueError, match=r"guidance=2.0: .*null label was never trained .*network.label_dropout=0.*"
                                         r"allowed: guidance=1"):
        generate(_mlp_module(0.0), range(2), guidance=2.0, progress=False, sampler={"name": "heun", "steps": 2})
    samples, _, _ = generate(_mlp_module(0.1), range(2), guidance=2.0, progress=False,
                             sampler={"name": "heun", "steps": 2})
    assert torch.isfinite(samples).all()
    samples, _, _ = generate(_mlp_module(0.0), range(2), guidance=1.0, progress=False,
                             sampler={"name": "heun", "steps": 2})
    assert torch.isfinite(samples).all()


def test_released_dit_null_label_was_trained(dit_pt):
    module = load_module(str(dit_pt), pretrained={"num_heads": 2})
    assert module.denoiser.null_label == 10 and module.run_config["pretrained"]["config"]["label_dropout"] == 0.1
    assert json.dumps(module.run_config)  # the record is JSON-ready
