"""Sample-quality metrics (FID, IS, KID, precision/recall) through torch-fidelity, with float64 feature
moments reduced across ranks, cached reference statistics and the evaluation protocol (docs/metrics.md).

Entry point: :func:`compute_metrics`; generation driver: :func:`evaluate_generator`.
"""

from ...distributed import all_gather_rows, all_reduce_sum, shard
from .compute import METRICS, Extractors, ImageSource, cache_reference, compute_metrics, extract_reference
from .extractor import fid_helper_weights_path, resolve_inception_weights
from .protocol import evaluate_generator, protocol_record, to_uint8
from .reference import (
    ReferenceStats,
    is_published_reference,
    load_published_reference,
    load_reference,
    reference_key,
    save_reference,
)
from .small_classifier import SMALL_CLASSIFIER_DATASETS, SmallClassifierExtractor, load_or_train
from .stats import FeatureStats, frechet_distance

__all__ = [
    "METRICS",
    "Extractors",
    "ImageSource",
    "cache_reference",
    "compute_metrics",
    "extract_reference",
    "all_gather_rows",
    "all_reduce_sum",
    "shard",
    "fid_helper_weights_path",
    "resolve_inception_weights",
    "evaluate_generator",
    "protocol_record",
    "to_uint8",
    "ReferenceStats",
    "load_reference",
    "is_published_reference",
    "load_published_reference",
    "reference_key",
    "save_reference",
    "FeatureStats",
    "frechet_distance",
    "SMALL_CLASSIFIER_DATASETS",
    "SmallClassifierExtractor",
    "load_or_train",
]
