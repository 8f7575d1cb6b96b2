"""Noise-conditional classifiers (``methods.classifier``) and ADM's encoder half-U-Net (``DhariwalEncoder``).

Oracles: the exact noisy-class posterior of a Gaussian mixture (``GaussianMixture.class_posterior``), which the
cross-entropy is minimised by; exact classifier guidance at s = 1 on the mixture (the conditional denoiser, so
samples land in the asked component); the x_t frame of DDPM equal to our preconditioned sigma frame; guided-
diffusion's ``create_classifier`` for the parameter count of the paper-size configs.
"""

import sys

import numpy as np
import pytest
import torch

from lightning_diff import formulations, sampling
from lightning_diff.cli.train import train as train_model
from lightning_diff.cli.train_classifier import train
from lightning_diff.data.toy2d import ring_of_gaussians
from lightning_diff.formulations import schedules
from lightning_diff.methods.classifier import NoisyClassifier, classifier_from_config, load_classifier
from lightning_diff.networks import MLP, DhariwalEncoder

from .helpers import compose_config
from .pretrained_fixtures import guided_diffusion_script_util


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


QUIET = ["logger=csv", "callbacks.progress=null", "++trainer.enable_progress_bar=false", "trainer=cpu"]


@pytest.fixture(scope="module")
def toy_classifier(tmp_path_factory):
    """A classifier of the 8-Gaussian ring trained on EDM's noise through ``configs/classifier.yaml`` (500 steps)."""
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("toy_classifier")
    cfg = compose_config("classifier", [*QUIET, "formulation=edm", "network=mlp_classifier", "data=toy2d",
                                        "network.hidden=64", "network.depth=2", "trainer.max_steps=500"], out)
    result = train(cfg)
    return load_classifier(result["checkpoint"]), result


def test_a_trained_classifier_approaches_the_exact_noisy_class_posterior(toy_classifier):
    """KL(p(k | x; sigma) || q(k | x; sigma)) over x ~ p(x; sigma), sigma ~ EDM's p(sigma): the cross-entropy's
    minimiser is the exact posterior. Measured (500 steps): KL 0.009 nats against 1.33 for the prior (the
    classifier that ignores x); accuracy against the Bayes label 0.999 for sigma < 0.1."""
    module, result = toy_classifier
    mixture = ring_of_gaussians()
    g = torch.Generator().manual_seed(123)
    n = 20_000
    y = mixture.sample(n, g)
    sigma = formulations.get("edm").sample_training_sigma((n,), generator=g).double()
    x = y + sigma[:, None] * torch.randn(n, 2, generator=g, dtype=torch.float64)
    exact = mixture.class_posterior(x, sigma)
    with torch.no_grad():
        log_q = module.classifier.log_probs(x.float(), sigma.float()).double()
    kl = (exact * (exact.clamp_min(1e-300).log() - log_q)).sum(1)
    prior_kl = (exact * (exact.clamp_min(1e-300).log() - mixture.weights.log())).sum(1)
    assert kl.mean() < 0.03 and prior_kl.mean() > 1.0, (kl.mean(), prior_kl.mean())
    low = sigma < 0.1
    assert (log_q[low].argmax(1) == exact[low].argmax(1)).double().mean() > 0.99
    # logged per noise bucket: perfect at the lowest sigma, chance (1/8) or below at the highest
    assert result["val/acc_sigma_0.002-0.0117"] > 0.99 and result["val/acc_sigma_13.7-80"] < 0.3
    assert module.classifier.num_classes == 8 and module.classifier.frame == "sigma"


def test_the_trained_classifier_guides_the_exact_unconditional_denoiser_to_the_asked_component(toy_classifier):
    """Heun (18 steps) on the exact unconditional denoiser of the ring, guided at s = 1 by the trained
    classifier: the samples land in the asked component (Bayes label at sigma = 0) as often as with the exact
    posterior as the classifier (within 0.05), against about 1/8 unguided. Measured: 0.9975 (trained), 1.0 (exact),
    0.12 (unguided)."""
    module, _ = toy_classifier
    mixture = ring_of_gaussians()
    labels = torch.arange(400) % 8
    grid = schedules.karras_sigmas(18, 0.002, 80.0)
    x = 80.0 * torch.randn(400, 2, generator=torch.Generator().manual_seed(5), dtype=torch.float64)

    def unconditional(x, sigma, labels=None):
        assert labels is None  # denoiser_labels=False: the denoiser is unconditional
        return mixture(x, sigma)

    def exact_posterior(x, sigma):
        return mixture.class_posterior(x, sigma).log()

    def hits(classifier, scale=1.0):
        guided = sampling.ClassifierGuidance(unconditional, classifier, scale, frame="sigma", denoiser_labels=False)
        out = sampling.heun(guided, x, grid, cond={"labels": labels})
        return (mixture.class_posterior(out, 0.0).argmax(1) == labels).double().mean().item()

    trained = hits(module.classifier.double())
    exact = hits(exact_posterior)
    unguided = hits(exact_posterior, 0.0)
    assert exact > 0.97 and trained > exact - 0.05 and unguided < 0.3, (trained, exact, unguided)


def test_the_preconditioned_sigma_frame_of_ddpm_is_guided_diffusions_x_t_frame():
    """For DDPM, ``c_in(sigma) x = sqrt(abar_t) x = x_t`` and ``c_noise`` is the timestep: the sigma-frame
    classifier (our trained ones) sees what a guided-diffusion x_t classifier sees, and both guide alike."""
    ddpm = formulations.get("ddpm")
    torch.manual_seed(0)
    net = DhariwalEncoder(in_channels=1, num_classes=4, resolution=8, model_channels=16, channel_mult=(1, 2),
                          num_blocks=1, attn_resolutions=(4,), channels_per_head=8).double()
    for p in net.parameters():
        p.data.normal_(0, 0.2)
    t = torch.tensor([5, 300, 990])
    sigma = ddpm.grid.flip(0)[t]
    x = torch.randn(3, 1, 8, 8, dtype=torch.float64) * (1 + sigma.reshape(-1, 1, 1, 1))
    sigma_frame, x_t_frame = NoisyClassifier(net, ddpm, "sigma"), NoisyClassifier(net, ddpm, "x_t")
    assert torch.allclose(sigma_frame.log_probs(x, sigma), x_t_frame.log_probs(x, sigma), atol=1e-12)
    labels = torch.tensor([0, 3, 1])
    grads = [c.guide(lambda x, s, labels=None: x, 2.0).log_prob_grad(x, sigma, labels)
             for c in (sigma_frame, x_t_frame)]
    assert torch.allclose(*grads, atol=1e-12) and grads[0].abs().max() > 1e-4


@pytest.mark.parametrize("option, size, classes, card", [
    ("adm_classifier_imagenet256", 256, 1000, dict(image_size=256)),
    ("adm_classifier_imagenet128", 128, 1000, dict(image_size=128)),
    ("adm_classifier_tiny", 8, 10, None),
])
def test_classifier_network_configs_build_the_papers_sizes(option, size, classes, card, tmp_path):
    """On the meta device: logits ``[B, classes]``; the paper sizes have exactly as many parameters as guided-
    diffusion's ``create_classifier`` with the model card's flags."""
    cfg = compose_config("classifier", [f"network={option}"], tmp_path)
    with torch.device("meta"):
        from lightning_diff.methods.classifier import build_classifier_network

        network = build_classifier_network(cfg.network, (3 if card else 1, size, size), classes)
        out = network(torch.empty(2, 3 if card else 1, size, size), torch.empty(2))
    assert isinstance(network, DhariwalEncoder) and out.shape == (2, classes)
    if card is None:
        return
    script_util = guided_diffusion_script_util()
    with torch.device("meta"):
        reference = script_util.create_classifier(
            classifier_use_fp16=False, classifier_width=128, classifier_depth=2,
            classifier_attention_resolutions="32,16,8", classifier_use_scale_shift_norm=True,
            classifier_resblock_updown=True, classifier_pool="attention", **card)
    count = sum(p.numel() for p in network.parameters())
    assert count == sum(p.numel() for p in reference.parameters()), count


def test_mlp_classifier_config_gives_logits_and_no_label_input(tmp_path):
    cfg = compose_config("classifier", ["network=mlp_classifier", "data=toy2d"], tmp_path)
    from lightning_diff.methods.classifier import build_classifier_network

    network = build_classifier_network(cfg.network, (2,), 8)
    assert isinstance(network, MLP) and network.num_classes == 0
    assert network(torch.randn(3, 2), torch.rand(3)).shape == (3, 8)


def test_train_classifier_and_sample_with_it_from_the_command_line(tmp_path, monkeypatch):
    """``lightning-diff train-classifier`` then ``lightning-diff sample ... classifier.ckpt=... classifier.scale=S``:
    an unconditional digits model samples the classifier's classes (labels seed % 10 in samples.npz); scale 0
    gives the unguided images exactly, scale 3 others."""
    from lightning_diff import cli

    monkeypatch.setattr(sys, "argv", ["lightning-diff"])
    monkeypatch.setenv("HYDRA_FULL_ERROR", "1")
    run = [*QUIET, "trainer.max_steps=2", "data.batch_size=16", "network.model_channels=8"]
    model = train_model(compose_config("train", [*run, "callbacks.sample_grid=null"], tmp_path / "model"))
    classifier = train(compose_config("classifier", run, tmp_path / "classifier"))
    common = ["sample", f"ckpt={model['checkpoint']}", "num_samples=6", "sampler.steps=4", "device=cpu"]
    for scale in (0.0, 3.0):
        cli.main([*common, f"classifier.ckpt={classifier['checkpoint']}", f"classifier.scale={scale}",
                  f"out={tmp_path / str(scale)}"])
        assert np.load(tmp_path / str(scale) / "samples.npz")["labels"].tolist() == [0, 1, 2, 3, 4, 5]
    cli.main([*common, f"out={tmp_path / 'plain'}"])
    plain = np.load(tmp_path / "plain" / "samples.npz")
    assert "labels" not in plain
    assert np.array_equal(plain["images"], np.load(tmp_path / "0.0" / "samples.npz")["images"])
    assert not np.array_equal(plain["images"], np.load(tmp_path / "3.0" / "samples.npz")["images"])


def test_bad_settings(tmp_path):
    ddpm, edm = formulations.get("ddpm"), formulations.get("edm")
    with pytest.raises(ValueError, match="frame='x0' is not known; allowed: x_t, sigma"):
        NoisyClassifier(MLP(dim=2, out_dim=3), edm, "x0", num_classes=3)
    with pytest.raises(ValueError, match=r"classifier.scale=-1 is invalid; allowed: a number >= 0"):
        classifier_from_config({"ckpt": None, "scale": -1}, edm)
    with pytest.raises(ValueError, match=r"classifier.image_size=\.\.\. without classifier.ckpt"):
        classifier_from_config({"ckpt": None, "scale": 1.0, "image_size": 256}, edm)
    with pytest.raises(ValueError, match="a released ADM classifier reads x_t .* formulation is edm; allowed: a ddpm"):
        classifier_from_config({"ckpt": "256x256_classifier.pt", "scale": 1.0}, edm)
    assert classifier_from_config({"ckpt": None, "scale": 2}, ddpm) == (None, 2.0)
    cfg = compose_config("classifier", [*QUIET, "data=toy2d", "data.dataset=swiss_roll", "network=mlp_classifier",
                                        "trainer.max_steps=1"], tmp_path)  # swiss_roll's labels are all 0
    with pytest.raises(ValueError, match="num_classes=1: a classifier needs labelled data with >= 2 classes"):
        train(cfg)


@pytest.mark.slow
def test_classifier_guidance_steers_digit_samples_to_the_asked_class(tmp_path):
    """The issue's end-to-end proof: an unconditional EDM model of the digits (experiment=edm_digits, 500 steps)
    and a noise-conditional classifier trained on EDM's noise (configs/classifier.yaml, 120 steps); 100 samples
    asked for classes seed % 10 with scales s = 0, 1, 3, 10 (Heun, 18 steps). A separately trained held-out
    classifier (an RBF-SVM on the clean training digits, as experiments/edm_digits/check_digits.py) reads the
    asked class more often as s grows. Measured numbers: docs/samplers.md#classifier-guidance."""
    from sklearn.model_selection import train_test_split
    from sklearn.svm import SVC

    from lightning_diff.data.digits import digits_uint8
    from lightning_diff.data.transforms import to_uint8
    from lightning_diff.evaluation import generate
    from lightning_diff.training.builders import load_module

    model = train_model(compose_config("train", [*QUIET, "experiment=edm_digits", "trainer.max_steps=500",
                                                 "callbacks.sample_grid=null"], tmp_path / "model"))
    guide = train(compose_config("classifier", [*QUIET, "trainer.max_steps=120", "data.batch_size=128"],
                                 tmp_path / "classifier"))
    module, classifier = load_module(model["checkpoint"]), load_classifier(guide["checkpoint"]).classifier
    x_int, labels = digits_uint8()
    x_train, x_test, y_train, y_test = train_test_split(x_int.numpy().reshape(len(x_int), -1) / 255.0,
                                                        labels.numpy(), test_size=0.2, random_state=0,
                                                        stratify=labels)
    held_out = SVC(random_state=0).fit(x_train, y_train)
    accuracy = {"svm_on_real_test_digits": held_out.score(x_test, y_test)}
    for scale in (0.0, 1.0, 3.0, 10.0):
        samples, asked, _ = generate(module, range(100), classifier=classifier, classifier_scale=scale,
                                     progress=False)
        images = to_uint8(samples, module.data_transform).numpy().reshape(len(samples), -1) / 255.0
        accuracy[scale] = float((held_out.predict(images) == asked.numpy()).mean())
    print(accuracy)
    assert accuracy["svm_on_real_test_digits"] > 0.95, accuracy
    # measured: SVM 0.983 on real test digits; asked class read at s = 0, 1, 3, 10: 0.07, 0.50, 0.63, 0.70
    assert accuracy[0.0] < 0.25 and accuracy[1.0] > accuracy[0.0] + 0.25, accuracy  # unguided: chance (0.1)
    assert accuracy[3.0] > accuracy[1.0] - 0.05 and accuracy[10.0] > accuracy[3.0] - 0.05, accuracy
    assert accuracy[10.0] > 0.55, accuracy
