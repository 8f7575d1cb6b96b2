"""Noise-conditional classifiers for classifier guidance (Dhariwal & Nichol 2021, Sec. 4; docs/samplers.md#classifier-
guidance): ``NoisyClassifier``, the classifier as ``sampling.ClassifierGuidance`` calls it, and
``NoisyClassifierModule``, the LightningModule that trains it on any formulation's noise
(``lightning-diff train-classifier``, ``configs/classifier.yaml``).

Training and guidance see the classifier through the one function ``sampling.guidance.classifier_inputs``: an
image ``y`` with its label, ``sigma`` drawn from the formulation's training density ``p(sigma)``, the sigma-frame
``x = y + sigma n``, and the inputs of the chosen frame (``"sigma"``: ``(x, sigma)``; ``"x_t"``: ``(s(t) x, t)``
with t the formulation's network time, as guided-diffusion's classifiers take it). The loss is the cross-entropy
of ``p(c | x; sigma)``, whose minimiser over all functions is the exact noisy-class posterior (the test compares
a trained classifier with it on a Gaussian mixture, ``analytic.GaussianMixture.class_posterior``).
"""

from __future__ import annotations

import dataclasses
import inspect
import math
from collections.abc import Callable, Sequence

import hydra
import pytorch_lightning as pl
import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn
from torch.nn import functional as F
from torchmetrics import MeanMetric

from ..checkpoint_io import CHECKPOINT_FORMAT, FORMAT_KEY, load_checkpoint
from ..data.transforms import DataTransform
from ..formulations import Formulation
from ..sampling.guidance import CLASSIFIER_FRAMES, ClassifierGuidance, classifier_inputs

__all__ = ["NoisyClassifier", "NoisyClassifierModule", "build_classifier_network", "classifier_from_config",
           "load_classifier"]


class NoisyClassifier(nn.Module):
    """``classifier(inputs, time) -> logits [B, num_classes]`` in ``frame`` (``sampling.ClassifierGuidance``).

    - ``frame="sigma"``: ``inputs`` is the sigma-frame ``x`` ``[B, ...]`` and ``time`` is sigma ``[B]``; the network
      sees them preconditioned as a ``Denoiser``'s backbone does (EDM eq. 7): ``network(c_in(sigma) x,
      c_noise(sigma))``, so its input has unit variance and its time input the formulation's own scale. For the
      VP families this equals the x_t frame (``c_in = s``, ``c_noise`` the timestep / 999 t).
    - ``frame="x_t"``: ``network(x_t, t)`` as given (guided-diffusion's classifiers; ``pretrained.load_classifier``).

    Args:
        network: ``network(x, c_noise) -> logits`` (``networks.DhariwalEncoder``, or ``MLP`` with ``out_dim``).
        formulation: the formulation whose preconditioning (``"sigma"``) or frame and time (``"x_t"``) it uses.
        frame: ``"sigma"`` or ``"x_t"``.
        num_classes: the number of logits; None: ``network.num_classes`` (``DhariwalEncoder``).
    """

    def __init__(self, network: nn.Module, formulation: Formulation, frame: str = "sigma",
                 num_classes: int | None = None):
        super().__init__()
        if frame not in CLASSIFIER_FRAMES:
            raise ValueError(f"classifier frame={frame!r} is not known; allowed: {', '.join(CLASSIFIER_FRAMES)}")
        self.network, self.formulation, self.frame = network, formulation, frame
        self.num_classes = network.num_classes if num_classes is None else num_classes

    def forward(self, inputs: torch.Tensor, time: torch.Tensor) -> torch.Tensor:
        if self.frame == "x_t":
            return self.network(inputs, time)
        sigma = time.to(inputs.dtype).reshape(-1)
        c_in = self.formulation.c_in(sigma).reshape((-1,) + (1,) * (inputs.ndim - 1))
        return self.network(c_in * inputs, self.formulation.c_noise(sigma))

    def log_probs(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """``log p(c | x; sigma)`` ``[B, num_classes]`` for the sigma-frame ``x`` and sigma ``[B]``."""
        return torch.log_softmax(self(*classifier_inputs(self.frame, self.formulation, x, sigma)).float(), dim=-1)

    def guide(self, denoiser: Callable, scale: float, *, denoiser_labels: bool = True) -> ClassifierGuidance:
        """``denoiser`` guided by this classifier with scale s (``ClassifierGuidance`` in this frame and
        formulation; ``denoiser_labels=False`` for an unconditional denoiser)."""
        return ClassifierGuidance(denoiser, self, scale, frame=self.frame, formulation=self.formulation,
                                  denoiser_labels=denoiser_labels)


class NoisyClassifierModule(pl.LightningModule):
    """Trains ``NoisyClassifier(network, formulation, frame)`` with the cross-entropy of the label given the noisy
    input (Dhariwal & Nichol 2021, Sec. 4.1: the classifier is trained on noised images with the diffusion's own
    noise); sigma from ``formulation.sample_training_sigma``, i.e. the noise levels a sampler visits.

    Logged: ``train/loss``, ``train/acc``; ``val/loss``, ``val/acc`` and ``val/acc_sigma_<lo>-<hi>`` per
    log-spaced noise bucket over ``[sigma_min, sigma_max]``, on a fixed draw of sigma and noise per batch.

    Args:
        network: ``network(x, c_noise) -> logits [B, num_classes]``.
        formulation: whose noise it trains on (and whose preconditioning / frame the classifier uses).
        frame: ``"sigma"`` (default) or ``"x_t"`` (``NoisyClassifier``).
        optimizer: ``functools.partial`` of a ``torch.optim.Optimizer`` (Hydra ``_partial_: true``).
        lr_scheduler: optional partial taking the optimizer, stepped every optimizer step.
        val_buckets: noise-level buckets of the validation accuracy.
        data_shape, num_classes, data_transform, run_config: stored in checkpoints (``load_classifier``).
    """

    def __init__(self, network: nn.Module, formulation: Formulation, frame: str = "sigma",
                 optimizer: Callable[..., torch.optim.Optimizer] | None = None, lr_scheduler: Callable | None = None,
                 val_buckets: int = 6, data_shape: Sequence[int] | None = None, num_classes: int = 0,
                 data_transform: DataTransform | None = None, run_config: dict | None = None):
        super().__init__()
        if val_buckets < 1:
            raise ValueError(f"val_buckets={val_buckets} is invalid; allowed: an integer >= 1")
        if num_classes < 2:
            raise ValueError(f"num_classes={num_classes}: a classifier needs labelled data with >= 2 classes; "
                             "allowed: data with class labels (digits, mnist, cifar10, toy2d gaussian_mixture)")
        self.classifier = NoisyClassifier(network, formulation, frame, num_classes)
        self.optimizer_factory, self.lr_scheduler_factory = optimizer, lr_scheduler
        self.data_shape = None if data_shape is None else tuple(data_shape)
        self.num_classes, self.data_transform, self.run_config = num_classes, data_transform, run_config
        edges = torch.logspace(math.log10(formulation.sigma_min), math.log10(formulation.sigma_max), val_buckets + 1)
        self.register_buffer("bucket_edges", edges, persistent=False)
        self.val_loss, self.val_acc = MeanMetric(), MeanMetric()
        self.val_bucket_acc = nn.ModuleList(MeanMetric() for _ in range(val_buckets))

    @property
    def formulation(self) -> Formulation:
        return self.classifier.formulation

    def losses(self, y: torch.Tensor, labels: torch.Tensor, generator: torch.Generator | None = None):
        """``(cross-entropy [B], correct [B] float, sigma [B])`` on ``y`` noised at sigma ~ p(sigma)."""
        y = y.float()
        sigma = self.formulation.sample_training_sigma((y.shape[0],), generator=generator, device=y.device)
        noise = torch.randn(y.shape, generator=generator, device=y.device)
        x = y + sigma.reshape((-1,) + (1,) * (y.ndim - 1)) * noise
        logits = self.classifier(*classifier_inputs(self.classifier.frame, self.formulation, x, sigma)).float()
        loss = F.cross_entropy(logits, labels, reduction="none")
        return loss, (logits.argmax(dim=-1) == labels).float(), sigma

    def training_step(self, batch, batch_idx):
        y, labels = batch
        loss, correct, _ = self.losses(y, labels)
        self.log("train/loss", loss.mean(), prog_bar=True, batch_size=y.shape[0])
        self.log("train/acc", correct.mean(), batch_size=y.shape[0])
        return loss.mean()

    def validation_step(self, batch, batch_idx):
        y, labels = batch
        gen = torch.Generator(device=y.device).manual_seed(10_000 + batch_idx)
        loss, correct, sigma = self.losses(y, labels, generator=gen)
        self.val_loss.update(loss)
        self.val_acc.update(correct)
        bucket = (torch.bucketize(sigma, self.bucket_edges) - 1).clamp(0, len(self.val_bucket_acc) - 1)
        for k, metric in enumerate(self.val_bucket_acc):
            selected = bucket == k
            metric.update(correct[selected], weight=selected.float()[selected])

    def on_validation_epoch_end(self):
        self.log("val/loss", self.val_loss.compute(), prog_bar=True)
        self.log("val/acc", self.val_acc.compute(), prog_bar=True)
        self.val_loss.reset()
        self.val_acc.reset()
        edges = self.bucket_edges.tolist()
        for k, metric in enumerate(self.val_bucket_acc):
            value = metric.compute()  # a collective under DDP: every rank calls it
            if torch.isfinite(value):
                self.log(f"val/acc_sigma_{edges[k]:.3g}-{edges[k + 1]:.3g}", value)
            metric.reset()

    def configure_optimizers(self):
        if self.optimizer_factory is None:
            raise ValueError("NoisyClassifierModule: optimizer is not set; pass a partial of a torch.optim optimizer")
        optimizer = self.optimizer_factory(self.classifier.parameters())
        if self.lr_scheduler_factory is None:
            return optimizer
        return {"optimizer": optimizer,
                "lr_scheduler": {"scheduler": self.lr_scheduler_factory(optimizer), "interval": "step"}}

    def on_save_checkpoint(self, checkpoint):
        """What ``load_classifier`` rebuilds the module from: the run's config, the data's shape, classes, transform."""
        checkpoint["run_config"] = self.run_config
        checkpoint["data_shape"] = self.data_shape
        checkpoint["num_classes"] = self.num_classes
        transform = self.data_transform
        checkpoint["data_transform"] = dataclasses.asdict(transform) if transform is not None else None
        checkpoint[FORMAT_KEY] = CHECKPOINT_FORMAT


def build_classifier_network(network_cfg: DictConfig, data_shape: Sequence[int], num_classes: int) -> nn.Module:
    """Instantiate a classifier network config: settings left null come from the data (``builders.build_network``:
    channels, resolution, ``num_classes`` = the logits of a ``DhariwalEncoder``), and ``out_dim`` = the classes
    (an ``MLP`` classifier, whose ``num_classes`` is label conditioning and stays 0)."""
    from ..training.builders import build_network

    network_cfg = OmegaConf.create(OmegaConf.to_container(network_cfg, resolve=True))
    target = hydra.utils.get_class(network_cfg._target_)
    if "out_dim" in inspect.signature(target).parameters and network_cfg.get("out_dim", None) is None:
        network_cfg.out_dim = num_classes
        network_cfg.num_classes = network_cfg.get("num_classes", None) or 0
    return build_network(OmegaConf.create({"network": network_cfg}), data_shape, num_classes, conditional=True)


def load_classifier(ckpt_path, map_location="cpu") -> NoisyClassifierModule:
    """Rebuild a ``NoisyClassifierModule`` (eval mode) from a checkpoint of ``lightning-diff train-classifier``
    (``torch.load(weights_only=True)``, ``checkpoint_io.load_checkpoint``); its ``classifier`` guides
    (``NoisyClassifier.guide``)."""
    checkpoint = load_checkpoint(ckpt_path, map_location=map_location)
    run_config = checkpoint.get("run_config")
    if not isinstance(run_config, dict) or "classifier" not in run_config:
        raise ValueError(f"classifier.ckpt={ckpt_path} was not written by lightning-diff train-classifier (no "
                         "classifier run_config); allowed: its checkpoint, or a released ADM classifier .pt")
    cfg = OmegaConf.create(run_config)
    shape, num_classes, transform = checkpoint["data_shape"], checkpoint["num_classes"], checkpoint["data_transform"]
    module = NoisyClassifierModule(
        build_classifier_network(cfg.network, shape, num_classes), hydra.utils.instantiate(cfg.formulation),
        frame=cfg.classifier.frame, val_buckets=cfg.classifier.val_buckets, data_shape=shape,
        num_classes=num_classes, data_transform=None if transform is None else DataTransform(**transform),
        run_config=run_config)
    module.load_state_dict(checkpoint["state_dict"])
    return module.eval()


def classifier_from_config(node, formulation: Formulation, map_location="cpu") -> tuple[NoisyClassifier | None,
                                                                                          float]:
    """``(classifier or None, scale)`` from the ``classifier:`` node of ``configs/sample.yaml``: ``ckpt`` null (no
    classifier guidance), a checkpoint of ``lightning-diff train-classifier``, or a released guided-diffusion
    classifier ``.pt`` / URL / ``hf://`` id read by ``pretrained.load_classifier`` with the node's other keys as its
    flags (``+classifier.image_size=256 ...``); the released ones take x_t of the DDPM they were trained with, the
    sampled model's ``formulation`` (which must be ``ddpm``)."""
    from ..pretrained import load_classifier as load_released
    from ..pretrained import remote

    settings = OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else dict(node or {})
    ckpt, scale = settings.pop("ckpt", None), settings.pop("scale", 1.0)
    if not isinstance(scale, (int, float)) or isinstance(scale, bool) or not scale >= 0:
        raise ValueError(f"classifier.scale={scale!r} is invalid; allowed: a number >= 0 (0 = no guidance)")
    if ckpt is None:
        if settings:
            raise ValueError(f"classifier.{next(iter(settings))}=... without classifier.ckpt; allowed: set "
                             "classifier.ckpt=PATH or drop the classifier flags")
        return None, float(scale)
    if not (remote.is_remote(str(ckpt)) or str(ckpt).endswith((".pt", ".pth"))):
        if settings:
            raise ValueError(f"classifier.{next(iter(settings))}=...: flags apply to released classifiers (.pt) only; "
                             f"classifier.ckpt={ckpt} was written by lightning-diff train-classifier (drop them)")
        return load_classifier(ckpt, map_location).classifier, float(scale)
    if formulation.name != "ddpm":
        raise ValueError(f"classifier.ckpt={ckpt}: a released ADM classifier reads x_t and the timestep of the DDPM it "
                         f"was trained with, but the model's formulation is {formulation.name}; allowed: a ddpm model "
                         "(a guided-diffusion checkpoint, format=adm)")
    network, config = load_released(ckpt, map_location=map_location, **settings)
    return NoisyClassifier(network, formulation, "x_t", config["num_classes"]), float(scale)
