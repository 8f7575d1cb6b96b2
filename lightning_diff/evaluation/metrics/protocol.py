"""The evaluation protocol: EDM's uint8 rounding, per-rank seeds, "minimum over seed sets", and the
record stored with every result (docs/metrics.md#what-is-recorded-with-each-result)."""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence

import numpy as np
import torch

from ...aliases import renamed_keywords
from ...data.transforms import to_uint8
from ...distributed import rank_and_world, shard
from .compute import Extractors, ImageSource, compute_metrics
from .reference import reference_path

__all__ = ["to_uint8", "protocol_record", "reference_statistics_sha256", "evaluate_generator"]


def protocol_record(
    *,
    num_images: int,
    reference: str,
    extractor: str,
    seeds: Sequence[int] | range,
    weights: str = "ema",
    sampler: dict | None = None,
    nfe: float | None = None,
    rounding: str = "edm: (x*127.5+128).clip(0,255).to(uint8)",
    seed_sets: int = 1,
    **extra,
) -> dict:
    """The protocol of one evaluation as a flat, JSON-ready dict (log it in the run summary).

    Args:
        num_images: generated images per seed set (the record's field of ``RECORD_VERSION`` 2: ``num_samples`` of
        the settings that produced it); reference: cache key or description of the
        reference set; extractor: ``Extractors.inception_id``; seeds: the first seed set; weights:
        ``"ema"``, ``"raw"`` or ``"released"`` (a published checkpoint); sampler: the sampler's config; nfe:
        network evaluations per image;
        seed_sets: how many seed sets the minimum was taken over; extra: anything else to record.
    """
    if weights not in ("ema", "raw", "released"):
        raise ValueError(f"metrics.weights={weights!r} is invalid; allowed: 'ema', 'raw', 'released'")
    seeds = list(seeds)
    return {
        "num_images": num_images,
        "reference": reference,
        "extractor": extractor,
        "rounding": rounding,
        "feature_moments": "float64 sums, all-reduced",
        "seeds": f"{seeds[0]}-{seeds[-1]}" if seeds else "",
        "seed_sets": seed_sets,
        "weights": weights,
        "sampler": dict(sampler or {}),
        "nfe": nfe,
        "world_size": rank_and_world()[1],
        **extra,
    }


def reference_statistics_sha256(reference, cache_dir=None) -> str | None:
    """SHA-256 of the reference statistics a protocol names: the ``sha256`` of a published file's record, or,
    for a cache key, of the arrays in ``<cache_dir>/reference/<key>.npz`` (names and bytes in name order: equal
    statistics give equal hashes whatever the zip's timestamps); None when there is none."""
    if isinstance(reference, dict):
        return reference.get("sha256")
    path = reference_path(reference, cache_dir) if isinstance(reference, str) and "/" not in reference else None
    if path is None or not path.is_file():
        return None
    digest = hashlib.sha256()
    with np.load(path, allow_pickle=False) as arrays:
        for name in sorted(arrays.files):
            digest.update(name.encode())
            digest.update(np.ascontiguousarray(arrays[name]).tobytes())
    return digest.hexdigest()


@renamed_keywords(num_images="num_samples")
def evaluate_generator(
    generate: Callable[[list[int]], torch.Tensor],
    reference,
    metrics=("fid",),
    *,
    num_samples: int = 50_000,  # Generated images per seed set (EDM, Heusel et al.); old keyword num_images.
    seed_sets: int = 1,  # EDM reports the minimum FID over 3 sets of 50k seeds.
    first_seed: int = 0,  # Seed set k uses seeds first_seed + k*num_samples + [0, num_samples).
    batch_size: int = 64,
    extractors: Extractors | None = None,
    **metric_kwargs,
) -> dict:
    """Generate and score ``seed_sets`` sets of images, each rank its contiguous block of seeds.

    Args:
        generate: ``generate(seeds: list[int]) -> uint8 [len(seeds), C, H, W]``; image i must depend on
            seed i only (per-sample generators), so results do not depend on batch size or world size.
        reference: as in :func:`compute_metrics` (images or a cached-statistics key).
        metrics, metric_kwargs: passed to :func:`compute_metrics` (``inception_weights``, ``device``...).
    Returns:
        The metrics of the seed set with the lowest FID (the first set when FID is not requested),
        plus ``"per_seed_set"``: the metrics of every set, and ``"best_seed_set"``: its index.
    """
    if not isinstance(seed_sets, int) or seed_sets < 1:
        raise ValueError(f"metrics.seed_sets={seed_sets!r} is invalid; allowed: an integer >= 1 (EDM uses 3)")
    if not isinstance(num_samples, int) or num_samples < 2:
        raise ValueError(f"metrics.num_samples={num_samples!r} is invalid; allowed: an integer >= 2")
    per_set = []
    for k in range(seed_sets):
        block = shard(num_samples)
        seeds = [first_seed + k * num_samples + i for i in block]
        source = ImageSource(len(seeds), lambda a, b, seeds=seeds: generate(seeds[a:b]), sharded=True)
        per_set.append(
            compute_metrics(
                source, reference, metrics, batch_size=batch_size, extractors=extractors, **metric_kwargs
            )
        )
    best = min(range(seed_sets), key=lambda k: per_set[k].get("fid", 0.0))
    return {**per_set[best], "per_seed_set": per_set, "best_seed_set": best}
