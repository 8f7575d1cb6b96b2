"""Reference statistics cached on disk, keyed by dataset, split, resolution and extractor.

An entry is one ``.npz`` file under ``<cache_dir>/reference/``: the pool3 :class:`FeatureStats` (FID),
optionally the pool3 and VGG16 features themselves (KID and precision/recall need them), and the
extractor identity it was computed with, which is checked on every load. Writes are atomic
(``checkpoint_io.atomic_write``: temporary file, fsync, ``os.replace``), so concurrent jobs never read half a
file.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ...checkpoint_io import atomic_write, default_cache_dir
from .stats import FeatureStats

__all__ = ["ReferenceStats", "Moments", "reference_key", "reference_path", "save_reference", "load_reference",
           "is_published_reference", "load_published_reference"]

_FEATURE_DIM = 2048  # Inception-v3 pool3 features (FID)


@dataclass
class ReferenceStats:
    """Everything the metrics need from a reference set.

    Attributes:
        stats: pool3 moments (FID).
        extractor: identity of the Inception extractor and weights (``extractor.extractor_id``).
        pool3: ``[N, 2048]`` float32 features for KID, or None.
        vgg16: ``[N, 4096]`` float32 features for precision/recall, or None.
        meta: free-form description (dataset, split, resolution, number of images).
    """

    stats: FeatureStats
    extractor: str
    pool3: torch.Tensor | None = None
    vgg16: torch.Tensor | None = None
    meta: dict = field(default_factory=dict)


@dataclass
class Moments:
    """Feature mean and covariance given as they are (published statistics hold no count or sums): what
    ``frechet_distance`` reads of a ``FeatureStats``. ``mu``: ``[D]``, ``sigma``: ``[D, D]``, float64."""

    mu: np.ndarray
    sigma: np.ndarray

    def mean(self) -> np.ndarray:
        return self.mu

    def cov(self) -> np.ndarray:
        return self.sigma


def reference_key(dataset: str, split: str, resolution: int, extractor: str) -> str:
    """The cache key ``"<dataset>-<split>-<resolution>px-<extractor>"`` (file-name safe)."""
    for name, value in (("dataset", dataset), ("split", split)):
        if not value or not re.fullmatch(r"[\w.]+", value):
            raise ValueError(f"reference {name}={value!r} is invalid; allowed: letters, digits, '_' and '.'")
    if not isinstance(resolution, int) or resolution < 1:
        raise ValueError(f"reference resolution={resolution!r} is invalid; allowed: an integer >= 1")
    safe_extractor = re.sub(r"[^\w.@-]", "_", extractor)
    return f"{dataset}-{split}-{resolution}px-{safe_extractor}"


def reference_path(key: str, cache_dir: str | os.PathLike | None = None) -> Path:
    return Path(cache_dir or default_cache_dir()) / "reference" / f"{key}.npz"


def save_reference(key: str, ref: ReferenceStats, cache_dir: str | os.PathLike | None = None) -> Path:
    """Write ``ref`` under ``key`` atomically; returns the path. No collective: rank 0 alone may call it.
    A cache that cannot be written (read-only, full) raises the ``OSError`` of ``atomic_write``, naming the
    file, with a note on the setting to change."""
    path = reference_path(key, cache_dir)
    arrays = {f"stats_{k}": v for k, v in ref.stats.state_dict().items()}
    arrays.update(
        {name: getattr(ref, name).numpy() for name in ("pool3", "vgg16") if getattr(ref, name) is not None}
    )
    try:
        atomic_write(path, lambda file: np.savez(file, extractor=np.array(ref.extractor),
                                                 meta=np.array(json.dumps(ref.meta)), **arrays))
    except OSError as error:
        error.add_note("reference statistics are cached under metrics.cache_dir (default $LIGHTNING_DIFF_CACHE or "
                       "~/.cache/lightning_diff): point it at a writable folder with free space")
        raise
    return path


def load_reference(key: str, extractor: str, cache_dir: str | os.PathLike | None = None) -> ReferenceStats:
    """Load the entry ``key``; ``ValueError`` when it is missing or was made with another extractor."""
    path = reference_path(key, cache_dir)
    if not path.is_file():
        raise ValueError(
            f"reference={key!r}: no cached statistics at {path}; compute them once with "
            "lightning_diff.evaluation.metrics.cache_reference(images, key=...) or pass the reference images"
        )
    with np.load(path) as data:
        stored = str(data["extractor"])
        if stored != extractor:
            raise ValueError(
                f"reference={key!r} was computed with extractor {stored}, not {extractor}; "
                "recompute it with the current metrics.inception_weights"
            )
        stats = FeatureStats.from_state_dict(
            {k.removeprefix("stats_"): data[k] for k in data.files if k.startswith("stats_")}
        )
        feats = {
            name: torch.from_numpy(data[name]) if name in data.files else None for name in ("pool3", "vgg16")
        }
        meta = json.loads(str(data["meta"]))
    return ReferenceStats(stats, stored, feats["pool3"], feats["vgg16"], meta)


def is_published_reference(reference) -> bool:
    """True when ``reference`` names a statistics file (``*.npz``) rather than a split or a cache key."""
    return isinstance(reference, (str, os.PathLike)) and str(reference).endswith(".npz")


def load_published_reference(path: str | os.PathLike) -> ReferenceStats:
    """Pool3 statistics published with a paper: NVlabs/edm's ``fid-refs/*.npz`` (``mu``, ``sigma``) or
    guided-diffusion's reference batches (``VIRTUAL_*.npz``: ``arr_0`` images and ``mu``, ``sigma``; its spatial
    ``mu_s``/``sigma_s`` are not used). FID only (no features: KID and precision/recall need images). The
    ``extractor`` is ``published:<file name>``; ``meta`` holds the file, its SHA-256 and its layout. An
    ``https://`` URL is downloaded once and verified (``pretrained.remote``, as released checkpoints)."""
    from ...pretrained import remote  # imported here: the pretrained package imports the networks

    path = remote.download(str(path)) if remote.is_remote(str(path)) else Path(path)
    if not path.is_file():
        raise ValueError(f"metrics.reference={path}: no such file; allowed: a split (train, val, test) or a "
                         "statistics .npz (NVlabs/edm fid-refs, guided-diffusion reference batch)")
    with np.load(path, allow_pickle=False) as data:
        keys = set(data.files)
        if not {"mu", "sigma"} <= keys:
            raise ValueError(f"metrics.reference={path} holds {sorted(keys)}; allowed: a .npz with mu [{_FEATURE_DIM}]"
                             f" and sigma [{_FEATURE_DIM}, {_FEATURE_DIM}] (NVlabs/edm fid-refs, guided-diffusion "
                             "reference batch)")
        mu, sigma = data["mu"].astype(np.float64), data["sigma"].astype(np.float64)
        layout = "guided-diffusion reference batch" if "arr_0" in keys else "NVlabs/edm fid-refs"
    if mu.shape != (_FEATURE_DIM,) or sigma.shape != (_FEATURE_DIM, _FEATURE_DIM):
        raise ValueError(f"metrics.reference={path}: mu {list(mu.shape)} and sigma {list(sigma.shape)}; allowed: "
                         f"[{_FEATURE_DIM}] and [{_FEATURE_DIM}, {_FEATURE_DIM}] (Inception-v3 pool3 statistics)")
    meta = {"file": str(path.resolve()), "sha256": hashlib.sha256(path.read_bytes()).hexdigest(), "layout": layout}
    return ReferenceStats(Moments(mu, sigma), f"published:{path.name}", meta=meta)
