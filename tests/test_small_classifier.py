"""The small-classifier feature extractor (metrics/small_classifier.py): trained deterministically from its seed,
cached once, registered with torch-fidelity by name; its Fréchet distance is 0 for a set against itself, rises
with the noise added to the images, and torch-fidelity's own calculate_metrics with it by name gives the numbers
of our compute_metrics (FID and KID)."""

from __future__ import annotations

import json

import pytest
import torch
import torch_fidelity
from torch.utils.data import Dataset

from lightning_diff.cli.evaluate import evaluate
from lightning_diff.data import DigitsDataModule, to_uint8
from lightning_diff.evaluation import generate
from lightning_diff.evaluation.metrics import Extractors, compute_metrics
from lightning_diff.evaluation.metrics.small_classifier import (
    SmallClassifier,
    load_or_train,
    train_small_classifier,
    weights_path,
)
from lightning_diff.sampling.settings import SamplerSettings
from lightning_diff.training.builders import load_module

from .helpers import compose_config

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny networks: one intra-op thread

NAME = "small_classifier_digits"


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """One cache folder for the module, holding the digits classifier trained once (300 steps, seed 0)."""
    folder = tmp_path_factory.mktemp("ld_cache")
    with torch.random.fork_rng():
        torch.set_num_threads(1)
        load_or_train("digits", 0, folder)
    return folder


@pytest.fixture
def digits():
    from lightning_diff.data.digits import digits_uint8

    return digits_uint8()


def _noisy(images: torch.Tensor, std: float, seed: int = 0) -> torch.Tensor:
    noise = torch.randn(images.shape, generator=torch.Generator().manual_seed(seed)) * std
    return (images.float() + noise).round().clamp(0, 255).to(torch.uint8)


def test_training_is_deterministic_in_its_seed(digits):
    images, labels = digits[0][:400], digits[1][:400]
    a, _ = train_small_classifier(images, labels, seed=3, steps=15)
    b, _ = train_small_classifier(images, labels, seed=3, steps=15)
    c, _ = train_small_classifier(images, labels, seed=4, steps=15)
    for key, value in a.state_dict().items():
        assert torch.equal(value, b.state_dict()[key]), key
    assert not torch.equal(a.conv1.weight, c.conv1.weight)


def test_classifier_is_cached_once_and_classifies(cache, monkeypatch):
    path = weights_path("digits", 0, cache)
    state = torch.load(path, weights_only=True)
    assert state["dataset"] == "digits" and state["held_out_accuracy"] > 0.95  # 180 held-out digits
    monkeypatch.setattr("lightning_diff.evaluation.metrics.small_classifier.train_small_classifier",
                        lambda *a, **k: pytest.fail("retrained although cached"))
    assert load_or_train("digits", 0, cache) == path
    model = SmallClassifier()
    model.load_state_dict(state["state_dict"])


def test_unknown_dataset_or_extractor_is_refused(cache, digits):
    with pytest.raises(ValueError, match="dataset='cifar10' is not known; allowed: digits, mnist"):
        load_or_train("cifar10", 0, cache)
    with pytest.raises(ValueError, match="metrics.feature_extractor='small_classifier_x' is not registered"):
        compute_metrics(digits[0][:8], digits[0][:8], feature_extractor="small_classifier_x", cache_dir=cache)


def test_frechet_distance_is_zero_on_itself_and_rises_with_noise(cache, digits):
    images = digits[0]
    ex = Extractors.build(["fid"], device="cpu", cache_dir=cache, feature_extractor=NAME)
    assert (ex.feature, ex.dim) == ("features", 128)
    assert abs(compute_metrics(images, images, ["fid"], extractors=ex, device="cpu")["fid"]) < 1e-6
    fids = [compute_metrics(_noisy(images, std), images, ["fid"], extractors=ex, device="cpu")["fid"]
            for std in (8.0, 32.0, 96.0)]
    assert 0 < fids[0] < fids[1] < fids[2], fids


class _Images(Dataset):
    """uint8 [3, H, W] items, as torch-fidelity reads a dataset."""

    def __init__(self, images):
        self.images = images.expand(-1, 3, -1, -1)

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return self.images[i]


def test_torch_fidelity_by_name_equals_compute_metrics(cache, digits, monkeypatch):
    monkeypatch.setenv("LIGHTNING_DIFF_CACHE", str(cache))  # the registered extractor finds the cached file
    generated, reference = _noisy(digits[0][:600], 24.0), digits[0][600:]
    theirs = torch_fidelity.calculate_metrics(
        input1=_Images(generated), input2=_Images(reference), fid=True, kid=True, kid_subsets=20,
        kid_subset_size=200, feature_extractor=NAME, cuda=False, cache=False, verbose=False, batch_size=128,
        save_cpu_ram=True)
    ours = compute_metrics(generated, reference, ["fid", "kid"], feature_extractor=NAME, kid_subsets=20,
                           kid_subset_size=200, device="cpu", batch_size=128)
    # Same features up to float32 round-off (torch-fidelity feeds them through its own loader): 1e-5 relative.
    assert ours["fid"] == pytest.approx(theirs["frechet_inception_distance"], rel=1e-5)
    assert ours["kid_mean"] == pytest.approx(theirs["kernel_inception_distance_mean"], rel=1e-5)
    assert ours["kid_std"] == pytest.approx(theirs["kernel_inception_distance_std"], rel=1e-5)


def test_evaluate_uses_it_by_name(cache, digits_ckpt):
    """lightning-diff evaluate ... metrics.feature_extractor=small_classifier_digits: the record names the classifier
    (with its weights' hash) and its FID is compute_metrics' with the same generated and reference images."""
    cfg = compose_config("evaluate", [f"ckpt={digits_ckpt}", "sampler.steps=2", "device=cpu", "progress=false",
                                      "metrics=[fid]", "metrics.num_samples=16", "metrics.reference_num_images=64",
                                      f"metrics.cache_dir={cache}", "metrics.feature_extractor=" + NAME,
                                      "metrics.fid.method=eigvals", "name=small_classifier"])
    record = json.loads(open(evaluate(cfg)["path"]).read())
    assert record["protocol"]["samples"]["extractor"].startswith(f"{NAME}@")
    module = load_module(digits_ckpt)
    heun = SamplerSettings(name="heun", steps=2, batch_size=16,
                           options={"S_churn": 0.0, "S_tmin": 0.0, "S_tmax": float("inf"), "S_noise": 1.0})
    samples, _, _ = generate(module, range(16), sampler=heun, progress=False)
    dm = DigitsDataModule(seed=0, val_fraction=0.1)
    dm.setup()
    expected = compute_metrics(to_uint8(samples), dm.train_set.source.tensors[0][:64], ["fid"], device="cpu",
                               feature_extractor=NAME, cache_dir=cache, fid_method="eigvals")["fid"]
    assert record["metrics"]["fid"] == pytest.approx(expected, rel=1e-6)


def test_training_works_when_the_caller_samples_under_no_grad():
    """A first evaluation with an empty cache trains the classifier from inside sampling code that runs under
    ``torch.no_grad()`` (``reproduction.quality``): training must take its gradients anyway (before: "element 0 of
    tensors does not require grad")."""
    images = torch.randint(0, 256, (40, 1, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    labels = torch.arange(40) % 2
    with torch.no_grad():
        model, _ = train_small_classifier(images, labels, steps=2, batch_size=8)
        assert not torch.is_grad_enabled()  # the caller's mode is left as it was
    assert isinstance(model, SmallClassifier)
