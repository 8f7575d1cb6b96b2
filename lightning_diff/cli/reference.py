"""``lightning-diff reference``: a data split's reference statistics, computed once and cached where ``evaluate``
reads them (``configs/reference.yaml``; the computation: ``evaluation.sample_quality.reference_statistics``)."""

from __future__ import annotations

import sys
import time

import hydra
from omegaconf import DictConfig

from ..config import CONFIG_DIR
from ..evaluation.metrics.reference import reference_path
from ..evaluation.progress import progress_bar
from ..evaluation.records import selected_metrics
from ..evaluation.sample_quality import reference_statistics
from ..training.builders import build_datamodule, resolve_device
from .config_check import check_command

__all__ = ["REFERENCE_METRICS", "main", "reference"]

REFERENCE_METRICS = ("fid", "kid", "pr")  # the metrics that read a reference split's statistics or features


def reference(cfg: DictConfig) -> str:
    """Run ``cfg`` (``configs/reference.yaml``): compute and cache the statistics of split ``cfg.metrics.reference``
    of ``cfg.data`` unless an entry serving the selected metrics is cached. Returns the line ``main`` prints (the
    key, the file, whether it was computed now and how long it took). ValueError naming ``metrics=`` for a metric
    that needs no reference statistics."""
    started = time.perf_counter()
    names = selected_metrics(cfg.metrics)
    other = [n for n in names if n not in REFERENCE_METRICS]
    if other:
        raise ValueError(f"metrics={names}: {other} need no reference statistics; allowed: any of "
                         f"{', '.join(REFERENCE_METRICS)}")
    m = cfg.metrics
    with progress_bar(cfg.progress) as bar:
        key, cached = reference_statistics(
            build_datamodule(cfg), m.reference, names, reference_num_images=m.reference_num_images,
            inception_weights=m.inception_weights, batch_size=m.batch_size, device=resolve_device(cfg.device),
            cache_dir=m.cache_dir, feature_extractor=m.feature_extractor, bar=bar)
    how = "already cached" if cached else f"computed in {time.perf_counter() - started:.0f} s"
    return f"reference statistics {key}: {how} ({reference_path(key, m.cache_dir)})"


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="reference")
def main(cfg: DictConfig) -> None:
    check_command(cfg, "reference")  # every '+key' read, numbers and choices valid: before any work
    try:
        line = reference(cfg)
    except KeyboardInterrupt:  # Ctrl-C: one line, no traceback; the entry is written atomically or not at all
        print("interrupted: no reference statistics were cached", file=sys.stderr)
        sys.exit(130)  # 128 + SIGINT: the status a shell gives a command stopped by Ctrl-C
    print(line)


if __name__ == "__main__":
    main()
