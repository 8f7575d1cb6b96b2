"""The shared harness of the CPU-scale reproductions (``experiments/repro_*/run.py``, docs/experiments.md).

Each reproduction trains a few small models, samples them under several settings and writes a Markdown table, a
figure and a JSON record. What they share lives here: a training run cached by its overrides (a rerun of the
command reuses the model it trained, a changed override retrains), sample quality in a small classifier's features
(Fréchet distance and KID, ``metrics/small_classifier.py``) written as an evaluation record beside the run's
checkpoint (so ``lightning-diff leaderboard`` ranks them), and the table.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from omegaconf import OmegaConf
from threadpoolctl import threadpool_limits

from ..aliases import renamed_keywords
from ..checkpoint_io import atomic_write, load_checkpoint
from ..config import compose
from ..evaluation.records import config_hash, make_record, run_description
from ..evaluation.sample_quality import sample_quality
from ..training.builders import build_datamodule, load_module
from .train import train

__all__ = ["DIGITS_DDPM", "QUICK_TRAINING", "QUIET_TRAINING", "argument_parser", "edm_digits_model", "digits_ddpm",
           "markdown_table",
           "quality", "trained", "write_results"]

# Overrides of every reproduction's training runs: no W&B, no progress bar or sample grid (the scripts print).
QUIET_TRAINING = ("logger=csv", "callbacks.sample_grid=null", "trainer=cpu", "callbacks.progress=null",
                  "++trainer.enable_progress_bar=false", "++trainer.enable_model_summary=false")
# Added to a model's overrides by a reproduction's ``--quick`` smoke run (tests): a few steps of a small batch.
QUICK_TRAINING = ("trainer.max_steps=4", "data.batch_size=16")
# The DDPM of repro_ddim_table1 and repro_likelihood: the edm_digits recipe with DDPM's formulation (linear betas,
# T = 1000), the hybrid loss (learned variance, two output channels) and the tiny U-Net at half width (16 channels).
DIGITS_DDPM = ("experiment=edm_digits", "formulation=ddpm", "objective=hybrid", "+network.out_channels=2",
               "network.model_channels=16")


class _ReproductionParser(argparse.ArgumentParser):
    """Limits torch's intra-op threads and every BLAS/OpenMP pool of the process (numpy, scipy: threadpoolctl) to
    ``--threads`` when the command line is parsed, for the rest of the process."""

    def parse_args(self, args=None, namespace=None):
        parsed = super().parse_args(args, namespace)
        if parsed.threads < 1:
            self.error(f"--threads={parsed.threads} is invalid; allowed: an integer >= 1")
        torch.set_num_threads(parsed.threads)
        threadpool_limits(limits=parsed.threads)  # not restored: holds for the rest of the process
        return parsed


def argument_parser(doc: str, name: str, *, models: bool = False) -> argparse.ArgumentParser:
    """The command line every reproduction shares: ``--out`` (default ``outputs/<name>``), ``--quick`` (a
    seconds-long smoke run for the tests), ``--threads`` (torch's and BLAS's threads, set when parsed; default 1, the
    committed tables' setting: another count changes the order of float sums in training and sampling, hence the
    numbers at the percent level, though not their shape) and, with ``models``, ``--models`` (where the shared DDPM is
    cached); the description is ``doc``'s first line. A script adds its own options to it."""
    parser = _ReproductionParser(description=doc.splitlines()[0])
    parser.add_argument("--out", default=f"outputs/{name}")
    if models:
        parser.add_argument("--models", default="outputs/repro_models", help="where the trained DDPM is cached")
    parser.add_argument("--quick", action="store_true", help="seconds-long smoke run (tests)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch and BLAS threads (1: the committed tables; others change the last digits)")
    return parser


def trained(name: str, overrides: Sequence[str], root: str | Path, *, weights: str = "ema"):
    """Train ``lightning-diff train <overrides>`` into ``<root>/<name>`` once and return ``(module, datamodule)``.

    The run is reused when ``<root>/<name>/overrides.json`` (written after a finished run) holds the same
    overrides and the same composed config (a preset changed under the same overrides, e.g. ``experiment=edm_digits``
    after an edit of its file, is another model) and its ``checkpoints/last.ckpt`` exists; otherwise the folder is
    emptied (no other model's checkpoints or records survive; a line says what was thrown away and why) and the run
    trained from scratch (seeded, so identical on rerun at the same ``--threads``).
    ``weights``: ``"ema"`` or ``"raw"``, as ``builders.load_module``.
    """
    run_dir = Path(root) / name
    overrides = [*QUIET_TRAINING, *overrides]
    stamp, ckpt = run_dir / "overrides.json", run_dir / "checkpoints" / "last.ckpt"
    cfg = compose([*overrides, f"paths.output_dir={run_dir}"], "train")
    settings = json.loads(json.dumps(OmegaConf.to_container(cfg, resolve=True), default=str))
    settings.pop("run_name", None), (settings.get("logger") or {}).pop("name", None)  # time-stamped names
    wanted = {"overrides": overrides, "config": settings}
    found = json.loads(stamp.read_text()) if stamp.is_file() else None
    if not (found == wanted and ckpt.is_file()):
        if run_dir.exists():  # never silently: say what is thrown away and why
            why = ("it did not finish (no overrides.json)" if found is None else
                   f"its overrides were {found.get('overrides') if isinstance(found, dict) else found}"
                   if not isinstance(found, dict) or found.get("overrides") != overrides
                   else "its composed config differs (a preset's file changed)")
            print(f"reproduction: training {run_dir} again from scratch: {why}; now {overrides}", flush=True)
        shutil.rmtree(run_dir, ignore_errors=True)  # another model's checkpoints and records must not survive
        ckpt = Path(train(cfg)["checkpoint"])
        stamp.write_text(json.dumps(wanted, indent=1))
    return load_module(str(ckpt), weights=weights).eval(), build_datamodule(cfg)


def edm_digits_model(ckpt: str | None, root: str | Path, *, quick: bool = False):
    """``(module, datamodule, checkpoint path)``: ``ckpt`` when given (its own data), else the digits EDM
    recipe (``experiment=edm_digits``; with ``quick``, :data:`QUICK_TRAINING` under another name) trained once into
    ``<root>/edm_digits`` by :func:`trained`."""
    if ckpt is None:
        overrides = ["experiment=edm_digits", *(QUICK_TRAINING if quick else ())]
        module, data = trained("edm_digits" + ("_quick" if quick else ""), overrides, root)
        return module, data, str(Path(module.run_config["paths"]["output_dir"]) / "checkpoints" / "last.ckpt")
    module = load_module(ckpt)
    return module, build_datamodule(OmegaConf.create(module.run_config)), ckpt


def digits_ddpm(root: str | Path, *, quick: bool = False):
    """``trained`` for :data:`DIGITS_DDPM` in ``<root>/ddpm_digits_hybrid`` (``_quick`` with :data:`QUICK_TRAINING`),
    so whichever of repro_ddim_table1 and repro_likelihood runs first trains it and the other reuses it."""
    if quick:
        return trained("ddpm_digits_hybrid_quick", [*DIGITS_DDPM, *QUICK_TRAINING], root)
    return trained("ddpm_digits_hybrid", DIGITS_DDPM, root)


@renamed_keywords(num_images="num_samples")
def quality(module, datamodule, sampler: Mapping, *, num_samples: int, guidance: float = 1.0, seed: int = 0,
            inception: bool = False) -> dict[str, float]:
    """Sample quality of ``module`` with ``sampler`` (a ``configs/sampler`` node as a dict) on seeds
    ``seed .. seed + num_samples - 1`` (old keyword: ``num_images``) against the training split of ``datamodule``.

    Returns ``{"fd": ..., "kid": ..., "kid_std": ..., "nfe": ...}``: Fréchet distance and KID (mean and spread over
    subsets) in the features of the dataset's small classifier (``small_classifier_<dataset>``) and the network
    evaluations per sample (of the last sampler batch: adaptive solvers vary by batch); with ``inception=True``
    also ``"fid"``, the Inception FID of the same images (upsampled to 299x299: it shows both
    rank the same; not a paper's number).
    """
    started = time.perf_counter()
    common = dict(num_samples=num_samples, weights="ema", sampler=sampler, guidance=guidance, seed=seed)
    kid = {"kid": {"subset_size": min(num_samples, 1000)}}
    extractor = f"small_classifier_{datamodule.name}"
    small, protocol = sample_quality(module, datamodule, ["fid", "kid"], options=kid, feature_extractor=extractor,
                                     **common)
    _write_record(module, small, protocol, {**common, "metrics": ["fid", "kid"], "feature_extractor": extractor,
                                            "options": kid}, time.perf_counter() - started)
    out = {"fd": small["fid"], "kid": small["kid_mean"], "kid_std": small["kid_std"], "nfe": protocol["nfe"]}
    if inception:
        started = time.perf_counter()
        fid, protocol = sample_quality(module, datamodule, ["fid"], **common)
        _write_record(module, fid, protocol, {**common, "metrics": ["fid"]}, time.perf_counter() - started)
        out["fid"] = fid["fid"]
    return out


def _write_record(module, results: Mapping, protocol: Mapping, config: Mapping, wall_time_s: float) -> None:
    """The evaluation as a record (``evaluation/records.py``) beside the trained run's checkpoint, as
    ``lightning-diff evaluate`` writes it, so ``lightning-diff leaderboard runs=[outputs/repro_*]`` ranks the
    reproductions' numbers by protocol. Named by the settings' hash and replaced on a rerun (same settings, same
    deterministic numbers), never duplicated."""
    run_dir = Path(module.run_config["paths"]["output_dir"])  # <root>/<name> of trained()
    folder = run_dir / "checkpoints"
    checkpoint = folder / "last.ckpt"
    step = load_checkpoint(checkpoint, mmap=True).get("global_step")
    config = dict(config)
    if posthoc := (module.run_config or {}).get("posthoc_ema"):  # lightning-diff posthoc-ema: a record per length
        config["sigma_rel"] = posthoc["sigma_rel"]
    config = json.loads(json.dumps(config, default=str))
    record = make_record(results, {"weights": "ema", "samples": protocol}, config, kind="evaluate",
                         run=run_description(checkpoint, module.run_config, step, name=_run_name(run_dir)),
                         command=" ".join(sys.argv), wall_time_s=wall_time_s)
    path = folder / f"eval-repro-{config_hash(config)[:12]}.json"
    atomic_write(path, lambda file: file.write(json.dumps(record, indent=2, default=str).encode()))


def _run_name(run_dir: Path) -> str:
    """``repro_formulations/edm`` of ``outputs/repro_formulations/runs/edm``: the reproduction and the model, so the
    leaderboard tells apart two reproductions' models of one name."""
    return "/".join([part for part in run_dir.parts if part != "runs"][-2:])


def markdown_table(header: Sequence[str], rows: Sequence[Sequence]) -> str:
    """A Markdown table; floats are printed with 4 significant digits, everything else with ``str``."""
    def cell(v) -> str:
        return f"{v:.4g}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def write_results(out_dir: str | Path, table: str, record: Mapping, figures: Mapping[str, object] | None = None, *,
                  publish_to: str | Path | None = None) -> None:
    """Write ``table.md``, ``results.json`` (``record``, JSON-ready) and each matplotlib figure of ``figures``
    (``{"<file>.png": figure}``, laid out tight, 120 dpi) into ``out_dir``, print the table and, with ``publish_to``
    (the script's folder on a full run), copy them all there: the committed results."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "table.md").write_text(table)
    (out_dir / "results.json").write_text(json.dumps(record, indent=1, sort_keys=True) + "\n")
    for name, fig in (figures or {}).items():
        fig.tight_layout()
        fig.savefig(out_dir / name, dpi=120)
    print(table)
    if publish_to is not None:
        for name in ("table.md", "results.json", *(figures or {})):
            shutil.copy(out_dir / name, Path(publish_to) / name)
