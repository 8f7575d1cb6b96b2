"""Generate samples of a module in batches, one seed per sample."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Mapping

import torch

from ..networks.layers import LabelEmbedding
from ..sampling import Guidance, PerSampleGenerator, initial_labels, initial_noise
from ..sampling.settings import SamplerSettings
from ..training.builders import load_module
from .progress import progress_bar

__all__ = ["generate", "labels_protocol", "load_guidance"]


def generate(module, seeds, *, sampler: SamplerSettings | Mapping | None = None, guidance: float | Guidance = 1.0,
             class_label: int | None = None, progress: bool = True, seed_protocol: str = "default",
             classifier=None, classifier_scale: float = 1.0) -> tuple[torch.Tensor, torch.Tensor | None, dict]:
    """Sample ``len(seeds)`` items with ``sampler`` (None: the module's own), ``sampler.batch_size`` per call.

    Sample i depends only on ``seeds[i]``, whatever the batch size. A conditional module gets label
    ``class_label`` for every sample, or when it is None ``seed % num_classes`` (``seed_protocol="default"``) or
    the label NVlabs/edm's generate.py draws from the seed (``"edm"``, ``sampling.noise``). A latent model
    (``module.decoder`` set) is decoded to images in model space. ``progress``: a bar on a terminal, plain lines
    with images/s and ETA in a log (``evaluation.progress``).

    ``guidance``: a number (classifier-free gamma, 1 = none) or a ``Guidance`` (``sampling.guidance``: CFG or
    autoguidance, its weaker model loaded here once when it is not yet, ``load_guidance``; an interval).
    ``classifier`` (a ``classifier.NoisyClassifier``) guides with scale ``classifier_scale`` (``module.sample``); an
    unconditional module then samples the classifier's classes, labelled as above.

    Returns:
        ``(samples float [N, *data_shape] in model space, labels long [N] or None, stats)`` with
        ``stats = {"nfe": network evaluations per sample, "seconds": wall time}``.
    """
    sampler = module.sampler if sampler is None else SamplerSettings.from_config(sampler)
    seeds = list(seeds)
    guidance = load_guidance(Guidance.from_config(guidance, own=1.0), module)
    num_classes = _check_conditioning(module, guidance, class_label, classifier)
    _check_decodable(module)
    out, labels, stats, start, size = [], [], {}, time.perf_counter(), sampler.batch_size
    unit = "images" if len(module.data_shape or ()) == 3 else "samples"
    with progress_bar(progress, unit=unit) as bar:  # plain lines where stdout is not a terminal
        task = bar.add_task(f"sampling ({sampler.name}, {sampler.steps_for(module.formulation)} steps)",
                            total=len(seeds))
        for i in range(0, len(seeds), size):
            batch = seeds[i:i + size]
            batch_labels = _labels(module, batch, num_classes, class_label, seed_protocol)
            samples = module.sample(batch, labels=batch_labels, sampler=sampler, guidance=guidance, stats=stats,
                                    seed_protocol=seed_protocol, classifier=classifier,
                                    classifier_scale=classifier_scale)
            if module.decoder is not None:
                with torch.no_grad():
                    samples = module.decoder(samples).float()
            out.append(samples.cpu())
            labels.append(batch_labels)
            bar.advance(task, len(batch))
    labels = torch.cat(labels).cpu() if num_classes else None
    return torch.cat(out), labels, {"nfe": stats.get("nfe"), "seconds": time.perf_counter() - start}


def load_guidance(guidance: Guidance, module) -> Guidance:
    """``guidance`` ready to sample ``module``: for autoguidance, its weaker model (``guidance.ckpt``, with the
    module's weights: ema or raw) loaded in eval mode on the module's device, once (a ``Guidance`` whose ``weak`` is
    set is returned as is). The weaker model must be a version of the same model: the same formulation (its
    constants), data shape and classes; ValueError naming ``guidance.ckpt`` and both models otherwise."""
    if guidance.kind != "autoguidance" or guidance.weak is not None or not guidance.active:
        return guidance
    try:
        weak = load_module(guidance.ckpt, weights="raw" if module.weights == "raw" else "ema")
    except (OSError, ValueError) as err:
        raise ValueError(f"guidance.ckpt={guidance.ckpt}: {err}; allowed: a checkpoint of lightning-diff train (an "
                         "earlier step or a smaller network of the guided model's run)") from err
    weak = weak.to(module.device).eval()
    _check_weaker_model(guidance.ckpt, weak, module)
    return dataclasses.replace(guidance, weak=weak.denoiser)


def _check_weaker_model(ckpt: str, weak, module) -> None:
    """ValueError naming ``guidance.ckpt`` when ``weak`` is not a version of ``module``: another formulation (or its
    constants), data shape, or classes (autoguidance calls both with the same labels)."""
    def classes(m) -> str:
        return f"{m.num_classes} classes" if m.conditional else "no classes (unconditional)"

    ours, theirs = module.formulation.config(), weak.formulation.config()
    mismatch = (f"formulation={theirs.get('name')} {theirs}, the guided model (ckpt=) formulation="
                f"{ours.get('name')} {ours}" if ours != theirs else
                f"data shape {list(weak.data_shape)}, the guided model (ckpt=) {list(module.data_shape)}"
                if tuple(weak.data_shape or ()) != tuple(module.data_shape or ()) else
                f"{classes(weak)}, the guided model (ckpt=) {classes(module)}"
                if (weak.conditional, weak.num_classes) != (module.conditional, module.num_classes) else None)
    if mismatch:
        raise ValueError(f"guidance.ckpt={ckpt}: autoguidance needs a weaker version of the same model, but this one "
                         f"has {mismatch}; allowed: an earlier checkpoint or a smaller network of the same run (same "
                         "formulation, data shape and classes)")


def _check_conditioning(module, guidance: Guidance, class_label: int | None, classifier=None) -> int:
    """The number of classes the module samples with (0: unconditional; the classifier's when one guides an
    unconditional module); ValueError naming ``class_label=`` or ``guidance=`` when the model cannot do what they
    ask."""
    num_classes = module.num_classes if module.conditional else 0
    if classifier is not None and num_classes and classifier.num_classes != num_classes:
        raise ValueError(f"classifier.ckpt: the classifier has {classifier.num_classes} classes, the model "
                         f"{num_classes}; allowed: a classifier of the model's classes")
    cfg = guidance.kind == "cfg" and guidance.active
    if cfg and (not num_classes or module.denoiser.null_label is None):
        why = "is unconditional" if not num_classes else "has no null label (it was trained without label dropout)"
        raise ValueError(f"guidance={guidance.scale}: classifier-free guidance needs a conditional model with a null "
                         f"label; this model {why}; allowed: guidance=1, or guidance.kind=autoguidance")
    untrained = _untrained_null_label(module) if cfg else None
    if untrained:
        raise ValueError(f"guidance={guidance.scale}: classifier-free guidance reads the null label as the "
                         f"unconditional model, but this model's null label was never trained ({untrained}); allowed: "
                         "guidance=1, or a model trained with label dropout (network.label_dropout > 0)")
    num_classes = num_classes or (classifier.num_classes if classifier is not None else 0)
    if class_label is not None and not (isinstance(class_label, int) and 0 <= class_label < num_classes):
        allowed = f"null or an integer in [0, {num_classes})" if num_classes else "null (the model is unconditional)"
        raise ValueError(f"class_label={class_label!r} is invalid; allowed: {allowed}")
    return num_classes


def _untrained_null_label(module) -> str | None:
    """Why ``module``'s null label was never trained, None when it was or cannot be told (a backbone that answers
    ``null_label`` itself): its ``LabelEmbedding`` has ``label_dropout=0``, so training never selected the null row
    the embedding builds anyway (an NVlabs/edm conditional pickle: its all-zero label, never seen)."""
    backbone = module.denoiser.backbone
    embedding = next((m for m in backbone.modules() if isinstance(m, LabelEmbedding)), None)
    if hasattr(backbone, "null_label") or embedding is None or embedding.dropout > 0:
        return None
    released = (module.run_config or {}).get("pretrained")
    if released is None:
        return "network.label_dropout=0 in its training run"
    return f"label_dropout=0 in {released['source']}: format={released['format']}, trained without label dropout"


def _check_decodable(module) -> None:
    """ValueError naming the ``vae`` flag when a latent model (an image-shaped sample whose channels are not 1 or
    3, e.g. DiT's ``[4, 32, 32]``) has no decoder: its samples cannot become images."""
    shape = tuple(module.data_shape or ())
    if module.decoder is None and len(shape) == 3 and shape[0] not in (1, 3):
        raise ValueError(f"this model samples latents of shape {list(shape)} and has no decoder to turn them into "
                         "images; load it with the autoencoder: +pretrained.vae=<diffusers AutoencoderKL folder or "
                         "hf:// id> (Python: pretrained.load_pretrained(..., vae=...))")


def labels_protocol(module, seed_protocol: str = "default") -> str | None:
    """How ``generate`` (with no ``class_label``) labels the samples of ``module``, for protocol records: None for an
    unconditional model, ``"seed % <classes>"`` or ``"drawn per seed (NVlabs/edm)"``."""
    if not module.conditional:
        return None
    return "drawn per seed (NVlabs/edm)" if seed_protocol == "edm" else f"seed % {module.num_classes}"


def _labels(module, seeds: list[int], num_classes: int, class_label: int | None,
            seed_protocol: str) -> torch.Tensor | None:
    """The labels of one batch: fixed, ``seed % num_classes``, or (``edm``) each seed's own draw, replayed here
    exactly as ``module.sample`` draws it (start noise first, then the label)."""
    if not num_classes:
        return None
    if class_label is not None:
        return torch.full((len(seeds),), class_label, dtype=torch.long)
    if seed_protocol == "edm":
        generator = PerSampleGenerator(seeds, device=module.device, protocol="edm")
        initial_noise(generator, module.data_shape, 1.0)
        return initial_labels(generator, num_classes).cpu()
    return torch.tensor([s % num_classes for s in seeds])
