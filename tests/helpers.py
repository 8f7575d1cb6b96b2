"""Shared test helpers: compose the project's Hydra configs in-process, read W&B offline runs, load and run the
``experiments/<name>/run.py`` scripts."""

from __future__ import annotations

import importlib.util
import json
import os
import struct
import subprocess
import sys
from pathlib import Path

from omegaconf import open_dict
from wandb.proto import wandb_internal_pb2

from lightning_diff.config import CONFIG_DIR, compose

__all__ = ["CONFIG_DIR", "compose_config", "load_experiment", "read_wandb_records", "run_experiment_quick",
           "wandb_run_summary"]

ROOT = Path(__file__).resolve().parents[1]


def compose_config(config_name: str, overrides: list[str], output_dir: Path | None = None):
    """Compose ``configs/<config_name>.yaml`` with ``overrides``; ``paths.output_dir`` is ``output_dir``."""
    cfg = compose(overrides, config_name)
    if output_dir is not None:
        with open_dict(cfg):
            cfg.paths.output_dir = str(output_dir)
    return cfg


def read_wandb_records(path: Path) -> list:
    """The protobuf ``Record`` messages of a ``.wandb`` file.

    The file is a LevelDB-style log (7-byte header ``:W&B``, magic, version; 32 KiB blocks of chunks with
    a 7-byte header: crc32, length, type 1=full 2=first 3=middle 4=last). wandb 0.31 moved its reader
    (``wandb.sdk.internal.datastore``) into its Go core, so these few lines read it here.
    """
    data, block = path.read_bytes(), 32 * 1024
    assert data[:4] == b":W&B", path
    records, pending, pos = [], b"", 7
    while pos + 7 <= len(data):
        room = block - pos % block
        if room < 7:  # a block's tail too short for a chunk header is padding
            pos += room
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        pending += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
    return records


def wandb_run_summary(path: Path) -> dict:
    """Run id, group, name, git commit, config, history (key -> values) and exit of a ``.wandb`` file."""
    run, config, history, exited = None, {}, {}, False
    for record in read_wandb_records(path):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run = record.run
        elif kind == "config":
            config.update({i.key: json.loads(i.value_json) for i in record.config.update if i.key})
        elif kind == "history":
            for item in record.history.item:
                key = item.key or "/".join(item.nested_key)
                history.setdefault(key, []).append(json.loads(item.value_json))
        elif kind == "exit":
            exited = True
    return {"id": run.run_id, "group": run.run_group, "name": run.display_name, "commit": run.git.commit,
            "config": config, "history": history, "exited": exited}


def load_script(path: Path, name: str):
    """The script at ``path`` imported as module ``name`` (experiments/ and benchmarks/ are not packages)."""
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def load_experiment(name: str):
    """``experiments/<name>/run.py`` as a module."""
    return load_script(ROOT / "experiments" / name / "run.py", name)


def run_experiment_quick(name: str, *args: str, timeout: float = 1200) -> None:
    """Run ``python experiments/<name>/run.py --quick <args>`` from the repository root in a subprocess (one intra-op
    thread, W&B offline); a failure shows the tail of its stderr."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline"}
    done = subprocess.run([sys.executable, str(ROOT / "experiments" / name / "run.py"), "--quick", *args], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stderr[-2000:]
