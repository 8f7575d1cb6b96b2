"""The result record of an evaluation: ``<checkpoint dir>/eval-<name>.json`` with the numbers, the protocol
that produced them and the evaluation config, and its one-line summary."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from pathlib import Path

from ..checkpoint_io import write_new_text
from .sample_quality import SAMPLE_METRICS
from .split_likelihood import LIKELIHOOD_METRICS

__all__ = ["METRICS", "selected_metrics", "write_record", "summary_line"]

METRICS = SAMPLE_METRICS + LIKELIHOOD_METRICS
_NOT_SETTINGS = ("ckpt", "name", "progress", "device")  # config keys that do not change the numbers


def selected_metrics(metrics_cfg) -> list[str]:
    """The metric names selected in a ``metrics`` config node (``metrics=[fid,bpd]`` puts their option
    blocks under ``metrics.fid``, ``metrics.bpd``), in canonical order."""
    names = [m for m in METRICS if m in metrics_cfg]
    if not names:
        raise ValueError(f"metrics: none selected; allowed: any of {list(METRICS)}, e.g. metrics=[fid,bpd]")
    return names


def write_record(checkpoint: str | Path, metrics: dict, protocol: dict, config: Mapping,
                 name: str | None = None) -> dict:
    """Write ``eval-<name>.json`` beside ``checkpoint`` (``eval-<name>-1.json``... when it exists: results are
    never replaced); ``name=None`` names it by a hash of the settings in ``config`` that change the numbers.
    Returns the record ``{"checkpoint", "metrics", "protocol", "config", "path"}``."""
    settings = {k: v for k, v in config.items() if k not in _NOT_SETTINGS}
    name = name or hashlib.sha1(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:10]
    checkpoint = Path(checkpoint).resolve()
    path = checkpoint.parent / f"eval-{name}.json"
    record = {"checkpoint": str(checkpoint), "metrics": metrics, "protocol": protocol, "config": dict(config)}
    path = write_new_text(path, json.dumps(record, indent=2, default=str))  # atomic, never replaces a file
    return {**record, "path": str(path)}


def summary_line(record: dict) -> str:
    """``fid=... bpd=... | <n> images, <sampler> <steps> steps (NFE), ema weights, bpd on test | <path>``."""
    numbers = " ".join(f"{k}={v:.4g}" for k, v in record["metrics"].items())
    protocol = record["protocol"]
    parts = [f"{protocol['weights']} weights"]
    if "samples" in protocol:
        s = protocol["samples"]
        parts.append(f"{s['num_images']} images x {s['seed_sets']} seed sets, {s['sampler']['name']} "
                     f"{s['sampler']['steps']} steps (NFE {s['nfe']})")
    parts += [f"{m} on the {protocol[m]['split']} split ({protocol[m]['num_images']} images)"
              for m in LIKELIHOOD_METRICS if m in protocol]
    return f"{numbers} | {', '.join(parts)} | {record['path']}"
