"""The result record of an evaluation (``lightning-diff evaluate`` or a training metric callback):
``eval-<name>.json`` with the numbers and their uncertainty, the protocol that produced them, the provenance
(git commit, resolved config and its hash, package versions, hardware, wall time, the command that reruns it)
and the config; the same payload goes into the W&B run summary and a W&B Table (docs/leaderboard.md)."""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import math
import os
import platform
import shlex
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path

from ..checkpoint_io import write_new_text
from .metrics.protocol import reference_statistics_sha256
from .sample_quality import SAMPLE_METRICS
from .split_likelihood import LIKELIHOOD_METRICS

__all__ = ["METRICS", "RECORD_VERSION", "RecordError", "selected_metrics", "make_record", "write_record",
           "read_record", "run_description", "uncertainty", "provenance", "config_hash", "rerun_command",
           "wandb_table_rows", "log_record_to_wandb", "summary_line", "guidance_options"]

METRICS = SAMPLE_METRICS + LIKELIHOOD_METRICS
RECORD_VERSION = 2  # 1: checkpoint, metrics, protocol, config; 2: + record_version, kind, run, uncertainty, provenance
_NOT_SETTINGS = ("ckpt", "name", "progress", "device")  # config keys that do not change the numbers
_REQUIRED = ("record_version", "kind", "run", "metrics", "protocol", "provenance")  # keys every v2 record has
_PACKAGES = ("lightning_diff", "torch", "pytorch-lightning", "torchmetrics", "torch-fidelity", "numpy", "hydra-core",
             "wandb")  # versions recorded in the provenance


class RecordError(ValueError):
    """A record file that cannot be used: unreadable, not JSON, another version, or missing a key."""


def selected_metrics(metrics_cfg) -> list[str]:
    """The metric names selected in a ``metrics`` config node (``metrics=[fid,bpd]`` puts their option
    blocks under ``metrics.fid``, ``metrics.bpd``), in canonical order."""
    names = [m for m in METRICS if m in metrics_cfg]
    if not names:
        raise ValueError(f"metrics: none selected; allowed: any of {list(METRICS)}, e.g. metrics=[fid,bpd]")
    return names


def config_hash(config: Mapping) -> str:
    """SHA-1 (first 10 hex digits) of the settings in ``config`` that change the numbers (sorted-key JSON)."""
    settings = {k: v for k, v in config.items() if k not in _NOT_SETTINGS}
    return hashlib.sha1(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:10]


def uncertainty(metrics: Mapping, protocol: Mapping) -> dict:
    """FID over the seed sets (``mean``, ``min`` as EDM reports it, ``max``, ``spread`` = max - min, sample
    ``std`` (0 for one set), ``n`` sets) and KID over its subsets (``mean``, ``std``), where measured."""
    out = {}
    per_set = [s["fid"] for s in protocol.get("samples", {}).get("per_seed_set", []) if "fid" in s]
    if per_set:
        n, mean = len(per_set), sum(per_set) / len(per_set)
        std = math.sqrt(sum((v - mean) ** 2 for v in per_set) / (n - 1)) if n > 1 else 0.0
        out["fid"] = {"mean": mean, "min": min(per_set), "max": max(per_set), "spread": max(per_set) - min(per_set),
                      "std": std, "n": n}
    if "kid_mean" in metrics:
        out["kid"] = {"mean": metrics["kid_mean"], "std": metrics.get("kid_std")}
    return out


def _git(*args: str) -> str | None:
    try:
        run = subprocess.run(["git", *args], cwd=Path(__file__).parent, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return run.stdout.strip() if run.returncode == 0 else None


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def _hardware() -> dict:
    import torch

    cuda = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return {"platform": platform.platform(), "machine": platform.machine(), "cpu": platform.processor() or None,
            "cpu_count": os.cpu_count(), "cuda": cuda}


def rerun_command(entry_point: str) -> str | None:
    """``lightning-diff <entry_point> <the overrides of this Hydra run>`` (shell-quoted), or None outside Hydra."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return None
    overrides = list(HydraConfig.get().overrides.task)
    return " ".join(["lightning-diff", entry_point, *(shlex.quote(o) for o in overrides)])


def provenance(config: Mapping, *, command: str | None, wall_time_s: float | None) -> dict:
    """Git commit and dirty flag (of the package's checkout; None outside one), the config's hash, package
    versions, Python, hardware, wall time in seconds and the command that reruns the evaluation."""
    status = _git("status", "--porcelain", "--untracked-files=no")
    return {"git_commit": _git("rev-parse", "HEAD"), "git_dirty": None if status is None else bool(status),
            "config_hash": config_hash(config), "packages": {p: _version(p) for p in _PACKAGES},
            "python": sys.version.split()[0], "hardware": _hardware(), "wall_time_s": wall_time_s,
            "command": command}


def _short(node) -> str | None:
    """``"EDM"`` for a config node ``{"_target_": "lightning_diff.formulations.EDM", ...}``."""
    target = node.get("_target_") if isinstance(node, Mapping) else None
    return target.rsplit(".", 1)[-1] if target else None


def run_description(checkpoint: str | Path | None, run_config: Mapping | None, step: int | None = None,
                    name: str | None = None) -> dict:
    """What a record measured: the checkpoint, its run folder, name, experiment, formulation, network, data, and
    the training step and images seen (step x data.batch_size x trainer.devices x num_nodes x
    accumulate_grad_batches, each 1 when unset; None when one is not an integer, e.g. ``devices: auto``), the
    EMA length ``sigma_rel`` of a ``lightning-diff posthoc-ema`` checkpoint and the ``consistency`` mode (``cd``
    or ``ct``) of a ``lightning-diff consistency`` model (None otherwise)."""
    cfg = dict(run_config or {})
    checkpoint = None if checkpoint is None else Path(checkpoint).resolve()
    folder = None if checkpoint is None else checkpoint.parent
    if folder is not None and folder.name == "checkpoints":
        folder = folder.parent
    trainer = cfg.get("trainer") or {}
    factors = [step, (cfg.get("data") or {}).get("batch_size"), trainer.get("devices", 1), trainer.get("num_nodes", 1),
               trainer.get("accumulate_grad_batches", 1)]
    images = math.prod(factors) if all(isinstance(v, int) for v in factors) else None
    released = cfg.get("pretrained")
    return {"checkpoint": None if checkpoint is None else str(checkpoint),
            "dir": None if folder is None else str(folder),
            "name": name or cfg.get("run_name") or (folder.name if folder is not None else None),
            "experiment": cfg.get("experiment_name"),
            "formulation": _short(cfg.get("formulation")) or (released or {}).get("format"),
            "network": _short(cfg.get("network")), "data": _short(cfg.get("data")),
            "training_step": step, "training_images": images,
            "sigma_rel": (cfg.get("posthoc_ema") or {}).get("sigma_rel"),
            "consistency": (cfg.get("consistency") or {}).get("mode")}


def make_record(metrics: Mapping, protocol: Mapping, config: Mapping, *, kind: str, run: Mapping,
                command: str | None = None, wall_time_s: float | None = None, cache_dir=None) -> dict:
    """A version-``RECORD_VERSION`` record (JSON-ready).

    Args:
        metrics: name -> value (``fid``, ``kid_mean``, ``bpd``...); protocol: ``{"weights", "samples": ...,
        "bpd": ..., "vlb": ...}`` as ``lightning-diff evaluate`` builds it; config: the resolved evaluation
        config (its hash names the settings); kind: ``"evaluate"`` or ``"training"``; run: what was
        evaluated (``checkpoint``, ``formulation``, ``data``, ``experiment``, ``training_step``,
        ``training_images``); command: the rerun command; wall_time_s: seconds; cache_dir: where the
        reference statistics named in ``protocol["samples"]["reference"]`` are cached (their SHA-256 is added).
    """
    if kind not in ("evaluate", "training"):
        raise ValueError(f"record kind={kind!r} is invalid; allowed: 'evaluate', 'training'")
    protocol = json.loads(json.dumps(protocol, default=str))
    samples = protocol.get("samples")
    if samples is not None and "reference_sha256" not in samples:
        samples["reference_sha256"] = reference_statistics_sha256(samples.get("reference"), cache_dir)
    return {"record_version": RECORD_VERSION, "kind": kind, "run": dict(run), "checkpoint": run.get("checkpoint"),
            "metrics": dict(metrics), "uncertainty": uncertainty(metrics, protocol), "protocol": protocol,
            "provenance": provenance(config, command=command, wall_time_s=wall_time_s),
            "config": json.loads(json.dumps(dict(config), default=str))}


def write_record(directory: str | Path, record: dict, name: str | None = None) -> dict:
    """Write ``record`` as ``<directory>/eval-<name>.json`` (``eval-<name>-1.json``... when it exists: results
    are never replaced); ``name=None`` names it by the config hash. Returns the record with ``"path"``."""
    name = name or record["provenance"]["config_hash"]
    path = write_new_text(Path(directory) / f"eval-{name}.json", json.dumps(record, indent=2, default=str))
    return {**record, "path": str(path)}


def read_record(path: str | Path) -> dict:
    """The record in ``path`` with ``"path"`` added. RecordError naming the file and the problem when it is
    unreadable, not JSON, of another ``record_version`` or missing one of the keys every record has."""
    path = Path(path)
    try:
        record = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise RecordError(f"{path}: not a readable JSON record ({type(err).__name__}: {err})") from err
    if not isinstance(record, dict):
        raise RecordError(f"{path}: a JSON {type(record).__name__}, not a record object")
    version = record.get("record_version")
    if version != RECORD_VERSION:
        raise RecordError(f"{path}: record_version={version!r}; allowed: {RECORD_VERSION} (rerun the evaluation "
                          "with this version: its command is in provenance.command)")
    missing = [k for k in _REQUIRED if k not in record]
    if missing:
        raise RecordError(f"{path}: partial record, missing {missing}")
    return {**record, "path": str(path)}


def wandb_table_rows(record: Mapping) -> tuple[list[str], list[list]]:
    """Columns and rows (one per metric) of the record's W&B Table."""
    samples = record["protocol"].get("samples", {})
    prov = record["provenance"]
    columns = ["metric", "value", "mean", "min", "spread", "std", "num_images", "seed_sets", "sampler", "nfe",
               "weights", "reference", "extractor", "config_hash", "git_commit", "command"]
    fixed = [samples.get("num_images"), samples.get("seed_sets"), samples.get("sampler", {}).get("name"),
             samples.get("nfe"), record["protocol"].get("weights"), str(samples.get("reference")),
             samples.get("extractor"), prov["config_hash"], prov["git_commit"], prov["command"]]
    rows = []
    for metric, value in record["metrics"].items():
        spread = record["uncertainty"].get(metric.split("_")[0], {})
        rows.append([metric, value, *(spread.get(k) for k in ("mean", "min", "spread", "std")), *fixed])
    return columns, rows


def log_record_to_wandb(run, record: Mapping, key: str) -> None:
    """Put ``record`` (without its path) in the W&B run summary under ``records/<key>`` and log it as the
    Table ``records/<key>_table`` (one row per metric)."""
    import wandb

    payload = {k: v for k, v in record.items() if k != "path"}
    run.summary.update({f"records/{key}": payload})
    columns, rows = wandb_table_rows(record)
    run.log({f"records/{key}_table": wandb.Table(columns=columns, data=rows)})


def guidance_options(sampler: Mapping) -> dict:
    """A sampler record's guidance (``sampling.Guidance.record``) as options, for the leaderboard's options column and
    ``summary_line``: ``guidance=2`` (classifier-free; an older record holds the gamma alone), ``autoguidance=2
    (<weaker model>)``, and ``guidance_interval=(sigma_lo, sigma_hi]``; none when unguided (gamma 1)."""
    scale, kind = sampler.get("guidance"), sampler.get("guidance_kind", "cfg")
    if scale in (None, 1, 1.0):
        return {}
    options = {"guidance": scale} if kind == "cfg" else {kind: f"{scale:g} ({sampler.get('guidance_ckpt')})"}
    interval = sampler.get("guidance_interval")
    return options if not interval else {**options, "guidance_interval": f"({interval[0]:g}, {interval[1]:g}]"}


def summary_line(record: dict) -> str:
    """``fid=... bpd=... | <n> images, <sampler> <steps> steps (NFE), ema weights, bpd on test | <path>``."""
    numbers = " ".join(f"{k}={v:.4g}" for k, v in record["metrics"].items())
    protocol = record["protocol"]
    parts = [f"{protocol['weights']} weights"]
    if "samples" in protocol:
        s = protocol["samples"]
        parts.append(f"{s['num_images']} images x {s['seed_sets']} seed sets, {s['sampler']['name']} "
                     f"{s['sampler']['steps']} steps (NFE {s['nfe']})")
        parts += [f"{k}={v}" for k, v in guidance_options(s["sampler"]).items()]
    parts += [f"{m} on the {protocol[m]['split']} split ({protocol[m]['num_images']} images)"
              for m in LIKELIHOOD_METRICS if m in protocol]
    return f"{numbers} | {', '.join(parts)} | {record['path']}"
