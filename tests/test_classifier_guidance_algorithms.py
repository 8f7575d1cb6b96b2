"""Classifier guidance against openai/guided-diffusion's own samplers (Dhariwal & Nichol 2021): on the same tiny
random-weight ADM model and classifier, from the same start and step noise, ``sampler=ddpm`` is their Algorithm 1
(``SpacedDiffusion.p_sample_loop(cond_fn=...)``: the ancestral mean shifted by ``s Sigma grad log p(y | x_t)``, Sigma
the step's fixed or learned variance) and ``sampler=ddim`` their Algorithm 2 (``ddim_sample_loop(cond_fn=...)``: the
score form), at ``classifier.scale`` = ``--classifier_scale`` = 0.5, 1 and 4 (a guidance that ignored the scale
would pass at 1 only). ``cond_fn`` is scripts/classifier_sample.py's, clipping on as there.

Oracle: ``shared/reference/guided_diffusion`` (imported; skipped when absent). Both sides use the reference
``EncoderUNetModel`` as the classifier (our loader of it is proven equal in test_pretrained_adm_classifier.py) and
our ``format=adm`` loader for the U-Net (proven equal in test_pretrained_adm.py).
"""

import pytest
import torch

from lightning_diff import sampling
from lightning_diff.pretrained import adm
from lightning_diff.sampling import ClassifierGuidance

from .pretrained_fixtures import guided_diffusion_script_util, write_adm_checkpoint, write_adm_classifier_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny networks: one intra-op thread

SIZE, NUM_CLASSES, RESPACING = 16, 5, "8"  # 8 of the 1000 linear-schedule timesteps, guided-diffusion's respacing
MODEL = dict(image_size=SIZE, num_channels=32, num_res_blocks=1, channel_mult="1,2", attention_resolutions="8",
             num_heads=2, use_scale_shift_norm=True, resblock_updown=False)
CLASSIFIER = dict(image_size=SIZE, model_channels=32, out_channels=NUM_CLASSES, num_res_blocks=1,
                  attention_resolutions=(2,), channel_mult=(1, 2), num_head_channels=32, use_scale_shift_norm=True,
                  resblock_updown=True, pool="attention")
# variance -> (learn_sigma and class_cond of the model, create_gaussian_diffusion's sigma_small)
VARIANCES = {"fixed_small": (False, True), "fixed_large": (False, False), "learned": (True, False)}
SCALES = (0.5, 1.0, 4.0)


@pytest.fixture(scope="module")
def networks(tmp_path_factory):
    """``{learn_sigma: (reference UNetModel, our Denoiser)}`` and the reference classifier, perturbed weights."""
    guided_diffusion_script_util()
    folder = tmp_path_factory.mktemp("guidance")
    models = {}
    for learned in (False, True):
        path = folder / f"model_{learned}.pt"
        settings = dict(MODEL, learn_sigma=learned, class_cond=learned)
        reference = write_adm_checkpoint(path, seed=3, **settings)
        models[learned] = reference, adm.load(path, **settings).denoiser
    classifier = write_adm_classifier_checkpoint(folder / "classifier.pt", seed=4, **CLASSIFIER)
    return models, classifier


def cond_fn_of(classifier, scale: float):
    """guided-diffusion scripts/classifier_sample.py's ``cond_fn``: ``scale * grad_{x_t} log p(y | x_t, t)``."""
    def cond_fn(x, t, y=None):
        with torch.enable_grad():
            x_in = x.detach().requires_grad_(True)
            log_probs = torch.log_softmax(classifier(x_in, t), dim=-1)
            selected = log_probs[range(len(log_probs)), y.view(-1)]
            return torch.autograd.grad(selected.sum(), x_in)[0] * scale
    return cond_fn


def run_both(networks, monkeypatch, variance: str, scale: float, sampler: str, clip: bool = True):
    """``(ours, theirs, theirs unguided)`` ``[2, 3, SIZE, SIZE]`` float32 from one start noise (and, for ddpm, the
    same step noise: our generator's draws, queued into guided-diffusion's ``randn_like``)."""
    learned, sigma_small = VARIANCES[variance]
    models, classifier = networks
    reference, denoiser = models[learned]
    diffusion = guided_diffusion_script_util().create_gaussian_diffusion(
        steps=1000, learn_sigma=learned, sigma_small=sigma_small, timestep_respacing=RESPACING)
    levels = denoiser.formulation.grid.flip(0)[sorted(diffusion.timestep_map, reverse=True)]
    sigmas = torch.cat([levels, torch.zeros(1, dtype=levels.dtype)])
    start = torch.randn(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    labels = torch.tensor([1, 3])

    def model_fn(x, t, y=None):  # classifier_sample.py: the labels reach the model only when it is class-conditional
        return reference(x, t, y if learned else None)

    guided = ClassifierGuidance(denoiser, classifier, scale, frame="x_t", denoiser_labels=learned)
    x = (1 + sigmas[0] ** 2).sqrt() * start  # the sigma-frame x = x_T / sqrt(abar_T)
    g = torch.Generator().manual_seed(6)
    queue = [torch.randn(start.shape, generator=g, dtype=torch.float64).float() for _ in levels[1:]]
    queue.append(torch.zeros(start.shape))  # p_sample's t = 0 noise is masked
    with torch.no_grad():
        if sampler == "ddpm":
            ours = sampling.ddpm(guided, x, sigmas, variance=variance, clip_denoised=clip, cond={"labels": labels},
                                 generator=torch.Generator().manual_seed(6))
        else:
            ours = sampling.ddim(guided, x, sigmas, clip_denoised=clip, cond={"labels": labels})
        loop = diffusion.p_sample_loop if sampler == "ddpm" else diffusion.ddim_sample_loop
        results = []
        for cond_fn in (cond_fn_of(classifier, scale), None):
            pending = list(queue)
            with monkeypatch.context() as patch:
                patch.setattr(torch, "randn_like", lambda like, pending=pending: pending.pop(0))
                results.append(loop(model_fn, start.shape, noise=start.float(), clip_denoised=clip,
                                    cond_fn=cond_fn, model_kwargs={"y": labels}, device="cpu"))
            assert not pending
    return ours.float(), *results


def relative_error(ours: torch.Tensor, theirs: torch.Tensor) -> float:
    """max |ours - theirs| / max |theirs| (unclipped, the tiny random network's samples reach a few hundred)."""
    return ((ours - theirs).abs().max() / theirs.abs().max()).item()


# Tolerances: float32 networks, 8 steps. Clipped, the samples are near [-1, 1] and a pixel of x0_hat at the clip
# edge amplifies round-off: measured 4.1e-6 .. 8.0e-6 (ddpm), 2.0e-5 .. 3.9e-5 (ddim); unclipped 4.6e-7 .. 6.0e-7.
TOLERANCE = {True: 1e-4, False: 1e-5}


@pytest.mark.parametrize("scale", SCALES)
@pytest.mark.parametrize("variance", list(VARIANCES))
def test_ddpm_is_algorithm_1_of_guided_diffusions_p_sample(networks, monkeypatch, variance, scale):
    """Algorithm 1: mean + s Sigma grad_{x_t} log p_phi(y | x_t), Sigma = beta~_t, beta_t or the learned
    exp(v log beta_t + (1 - v) log beta~_t) of the strided step, also on the last step (t = 0, where guided-diffusion
    uses the clipped posterior variance beta~_1). Clipped x0_hat, as classifier_sample.py."""
    ours, theirs, unguided = run_both(networks, monkeypatch, variance, scale, "ddpm")
    error = relative_error(ours, theirs)
    assert error < TOLERANCE[True], error
    assert (theirs - unguided).abs().max() > 5e-3  # the guidance changes the samples (measured 9.6e-3 .. 9.3e-2)


@pytest.mark.parametrize("scale", SCALES)
def test_ddpm_is_algorithm_1_without_clipping(networks, monkeypatch, scale):
    """The same with x0_hat unclipped (the shift no longer hidden by the clip): the score form (D + sigma^2 s grad,
    mean shift s beta_t / sqrt(alpha_t) grad) moved these samples 3.8 times as far as Algorithm 1 does."""
    ours, theirs, unguided = run_both(networks, monkeypatch, "learned", scale, "ddpm", clip=False)
    error = relative_error(ours, theirs)
    assert error < TOLERANCE[False], error
    assert (theirs - unguided).abs().max() > 5e-2  # measured 0.11 .. 0.85


@pytest.mark.parametrize("scale", SCALES)
@pytest.mark.parametrize("clip", [True, False])
def test_ddim_is_algorithm_2_of_guided_diffusions_ddim_sample(networks, monkeypatch, clip, scale):
    """Algorithm 2 (score form): eps - sqrt(1 - abar_t) s grad_{x_t} log p_phi(y | x_t), applied after the clipping
    of x0_hat as ``condition_score`` does; learned-variance model (DDIM does not read the variance)."""
    ours, theirs, unguided = run_both(networks, monkeypatch, "learned", scale, "ddim", clip=clip)
    error = relative_error(ours, theirs)
    assert error < TOLERANCE[clip], error
    assert (theirs - unguided).abs().max() > 5e-2  # measured 0.25 .. 2.5
