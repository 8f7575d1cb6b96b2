"""``lightning-diff leaderboard runs=[...] out=DIR metric=fid``: result records ranked by protocol
(``configs/leaderboard.yaml``, docs/leaderboard.md).

Reads the records of ``lightning-diff evaluate`` and the training metric callbacks
(``lightning_diff.evaluation.records``: ``eval-*.json``) from run folders, globs, record files and Hydra multirun
folders (sweeps, Optuna's included), and from W&B projects or sweeps through the public API (``wandb=``). Rows
are grouped by measurement protocol (reference set, feature extractor, images per seed set, seed sets, rounding;
for bits/dim: split, images, dequantization offset): only rows of one group share a ranking, and the output
says which protocol fields tell the groups apart. The published figures of ``configs/leaderboard/published.yaml``
sit in the group of their protocol; a row "reproduces" one when its protocol matches the published one and the
value lies within the stated tolerance. Unusable input (no record, a partial or corrupt one, a duplicate, other
reference statistics than its group's) is listed by name under "skipped". Each group's Pareto frontier against NFE
and against training images (``pareto_front``) is marked in the rows and drawn in the figures. Writes
``leaderboard.md`` (with the figures as PNG files beside it), ``leaderboard.csv`` and a self-contained, sortable
``leaderboard.html`` with the figures (metric vs NFE, metric vs training images) embedded as PNG.
"""

from __future__ import annotations

import base64
import csv
import glob
import html
import io
import itertools
import json
import math
import re
import shlex
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from ..checkpoint_io import atomic_write_all
from .records import RECORD_VERSION, RecordError, guidance_options, read_record

__all__ = ["DIRECTIONS", "CSV_COLUMNS", "PARETO_AXES", "Figure", "Leaderboard", "collect", "build", "pareto_front",
           "figures", "write_outputs"]

DIRECTIONS = {"fid": "min", "kid_mean": "min", "bpd": "min", "vlb_bpd": "min", "is_mean": "max", "precision": "max",
              "recall": "max"}  # better direction of each metric a record holds
_LIKELIHOOD = {"bpd": "bpd", "vlb_bpd": "vlb"}  # metric -> protocol section; the rest are in "samples"
_UNCERTAIN = {"fid": "fid", "kid_mean": "kid"}  # metric -> its uncertainty block in a record
PARETO_AXES = {"nfe": "NFE", "training_images": "training images"}  # row key -> axis name of a Pareto frontier
CSV_COLUMNS = ["group", "rank", "name", "kind", "formulation", "sampler", "options", "steps", "nfe", "pareto_nfe",
               "weights", "guidance", "metric", "value", "mean", "min", "spread", "std", "seed_sets",
               "training_images", "pareto_training_images", "reproduces", "citation", "command", "source"]


@dataclass
class Group:
    protocol: dict  # the fields that must match for values to compare
    rows: list[dict] = field(default_factory=list)


@dataclass
class Figure:
    """A Pareto figure of one group (``figures``)."""
    group: int  # the group's number in the tables, from 1
    axis: str  # a key of PARETO_AXES
    title: str
    png: bytes
    PATTERN = "leaderboard-group*-*.png"  # the figure files write_outputs owns in its folder

    @property
    def file(self) -> str:
        """The file name beside ``leaderboard.md``: ``leaderboard-group<i>-<axis>.png``."""
        return f"leaderboard-group{self.group}-{self.axis}.png"


@dataclass
class Leaderboard:
    metric: str
    direction: str
    groups: list[Group]
    skipped: list[tuple[str, str]]  # (input, reason)
    sweeps: list[dict]
    differing: list[str]  # protocol fields whose values differ between groups


# ---------------------------------------------------------------- inputs

def _is_sweep(folder: Path) -> bool:
    return (folder / "multirun.yaml").is_file() or any(folder.glob("*/.hydra/overrides.yaml"))


def _records_in(folder: Path) -> list[Path]:
    return sorted(folder.rglob("eval-*.json"))


def collect(runs: Iterable[str], skipped: list) -> tuple[list[dict], list[dict]]:
    """Records and sweeps of the ``runs`` inputs (folders, globs, record files, multirun folders); an input with
    no record or an unreadable record is appended to ``skipped`` as ``(name, reason)``."""
    records, sweeps = [], []
    for item in runs:
        paths = [Path(p) for p in sorted(glob.glob(str(item), recursive=True))] or [Path(item)]
        for path in paths:
            if path.is_file():
                files = [path]
            elif path.is_dir():
                files = _records_in(path)
                if _is_sweep(path):
                    sweeps.append(_hydra_sweep(path))
            else:
                skipped.append((str(item), "no such file or folder"))
                continue
            if not files:
                skipped.append((str(path), "no record (eval-*.json): run lightning-diff evaluate ckpt=... on it"))
            for file in files:
                try:
                    records.append(read_record(file))
                except RecordError as err:
                    skipped.append((str(file), str(err)))
    return records, sweeps


def _hydra_sweep(folder: Path) -> dict:
    """The jobs of a Hydra multirun folder: ``{"dir", "jobs": [{"dir", "overrides": {key: value}}], "optuna"}``
    (``optuna``: the sweeper's ``optimization_results.yaml`` when there is one)."""
    jobs = []
    for file in sorted(folder.glob("*/.hydra/overrides.yaml"), key=lambda p: (len(p.parts[-3]), p.parts[-3])):
        pairs = [o.split("=", 1) for o in yaml.safe_load(file.read_text()) or [] if "=" in o]
        jobs.append({"dir": str(file.parent.parent), "overrides": {k.lstrip("+~"): v for k, v in pairs}})
    optuna = folder / "optimization_results.yaml"
    return {"dir": str(folder), "jobs": jobs,
            "optuna": yaml.safe_load(optuna.read_text()) if optuna.is_file() else None}


def collect_wandb(sources: Iterable[str], api, skipped: list) -> tuple[list[dict], list[dict]]:
    """Records in the summaries (``records/<key>``) of the runs of W&B projects ``entity/project`` or sweeps
    ``entity/project/sweeps/<id>``, through the public API object ``api`` (``wandb.Api()``)."""
    records, sweeps = [], []
    for source in sources:
        try:
            if "/sweeps/" in source:
                sweep = api.sweep(source.replace("/sweeps/", "/"))
                runs = list(sweep.runs)
                params = sorted((sweep.config or {}).get("parameters", {}))
                sweeps.append({"dir": f"wandb:{source}", "optuna": None, "jobs": [
                    {"dir": f"wandb:{'/'.join(run.path)}", "overrides": {p: _select(run.config, p) for p in params}}
                    for run in runs]})
            else:
                runs = list(api.runs(source))
        except Exception as err:  # the API's errors (network, permission, unknown project) vary by version
            skipped.append((f"wandb:{source}", f"W&B public API: {type(err).__name__}: {err}"))
            continue
        for run in runs:
            found = {k: v for k, v in dict(run.summary).items() if k.startswith("records/") and isinstance(v, Mapping)}
            if not found:
                skipped.append((f"wandb:{'/'.join(run.path)}", "no record in the run summary (records/<key>)"))
            for key, value in found.items():
                name = f"wandb:{'/'.join(run.path)}/{key}"
                if value.get("record_version") != RECORD_VERSION:
                    skipped.append((name, f"record_version={value.get('record_version')!r}; allowed: {RECORD_VERSION}"))
                    continue
                records.append({**json.loads(json.dumps(dict(value), default=str)), "path": name,
                                "run": {**value.get("run", {}), "dir": f"wandb:{'/'.join(run.path)}"}})
    return records, sweeps


def _select(config: Mapping, dotted: str):
    """``config["a"]["b"]`` for ``"a.b"`` (W&B nests Hydra configs), else ``config["a.b"]``."""
    node = config
    for part in dotted.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return config.get(dotted)
        node = node[part]
    return node


# ---------------------------------------------------------------- protocol and rows

def _reference_name(reference) -> str:
    """``digits-train-8px`` of the cache key ``digits-train-8px-<extractor>``; a published file's name."""
    if isinstance(reference, Mapping):
        return Path(str(reference.get("published", ""))).name
    match = re.match(r"^(.*?-\d+px)-", str(reference))
    return match.group(1) if match else str(reference)


def protocol_of(record: Mapping, metric: str) -> dict:
    """The fields that must be equal for two values of ``metric`` to compare."""
    protocol = record["protocol"]
    if metric in _LIKELIHOOD:
        p = protocol[_LIKELIHOOD[metric]]
        return {"split": p.get("split"), "num_images": p.get("num_images"), "dequantization": p.get("dequantization"),
                "bpd_offset": p.get("bpd_offset")}
    s = protocol["samples"]
    return {"reference": _reference_name(s.get("reference")), "extractor": s.get("extractor"),
            "num_images": s.get("num_images"), "seed_sets": s.get("seed_sets"), "rounding": s.get("rounding")}


def _value_text(v) -> str:
    """A setting's value as the options column shows it (floats as ``%g``)."""
    return f"{v:g}" if isinstance(v, float) else str(v)


def _options_text(sampler: Mapping, labels: str | None = None, run: Mapping | None = None) -> str:
    """``eta=0.2, guidance=2``: the sampler's options, the guidance (kind, scale, interval) when not 1, the class
    labels of a conditional model, a DDPM sub-sequence's ``spacing``, time steps other than the formulation's (what
    tells two runs of one sampler at one NFE apart), and from the record's ``run``: the post-hoc EMA length
    ``sigma_rel`` of the weights and the ``consistency`` mode (cd / ct) of a consistency model; empty when there are
    none."""
    options = {**(sampler.get("options") or {}), **guidance_options(sampler)}
    if labels:
        options["labels"] = labels
    for key in ("sigma_rel", "consistency"):
        if (run or {}).get(key) is not None:
            options[key] = run[key]
    if sampler.get("spacing"):
        options["spacing"] = sampler["spacing"]
    if sampler.get("time_steps"):
        options["time_steps"] = _time_steps_text(sampler["time_steps"])
    return ", ".join(f"{k}={_value_text(v)}" for k, v in sorted(options.items()))


def _time_steps_text(steps: Mapping, *, head: int = 3, tail: int = 2) -> str:
    """A record's ``time_steps`` (``SamplerSettings.record``) in a few words: ``tuned <file> (key <8 hex>)`` for a
    ``lightning-diff tune-steps`` file, ``sigmas(80 3.14 0.5 0)`` for an explicit grid (``sampler.time_steps.sigmas``,
    a distilled student's own levels; longer than ``head + tail + 1`` levels: the first ``head``, ``...``, the last
    ``tail`` and the count), ``edm(sigma_min=0.17)`` for EDM's time-step constants (Karras et al. 2022, eq. 5)."""
    if "file" in steps:
        return f"tuned {Path(str(steps['file'])).name} (key {str(steps.get('key'))[:8]})"
    if "sigmas" in steps:
        levels = [f"{float(s):.3g}" for s in steps["sigmas"]]
        if len(levels) > head + tail + 1:
            return f"sigmas({' '.join(levels[:head])} ... {' '.join(levels[-tail:])}; {len(levels)} levels)"
        return f"sigmas({' '.join(levels)})"
    return "edm(" + " ".join(f"{k}={_value_text(v)}" for k, v in sorted(steps.items())) + ")"


def _row(record: Mapping, metric: str) -> dict:
    samples = record["protocol"].get("samples", {})
    sampler = samples.get("sampler", {})
    spread = record.get("uncertainty", {}).get(_UNCERTAIN.get(metric, ""), {})
    run = record["run"]
    nfe = samples.get("nfe") if metric not in _LIKELIHOOD else record["protocol"][_LIKELIHOOD[metric]].get("nfe")
    return {"rank": None, "name": run.get("name") or Path(str(run.get("dir"))).name, "kind": record["kind"],
            "formulation": run.get("formulation"), "sampler": sampler.get("name"),
            "options": _options_text(sampler, samples.get("labels"), run),
            "steps": sampler.get("steps"),
            "nfe": nfe, "weights": record["protocol"].get("weights"), "guidance": sampler.get("guidance"),
            "metric": metric, "value": record["metrics"][metric], "mean": spread.get("mean"),
            "min": spread.get("min"), "spread": spread.get("spread"), "std": spread.get("std"),
            "seed_sets": samples.get("seed_sets"), "training_images": run.get("training_images"),
            "reproduces": "", "citation": "", "command": record["provenance"].get("command"),
            "source": record["path"], "run_dir": run.get("dir"), "experiment": run.get("experiment")}


def _published_rows(entries: Sequence[Mapping], metric: str) -> list[tuple[dict, dict]]:
    """``(protocol, row)`` of each published entry that reports ``metric``."""
    out = []
    for e in entries:
        if metric not in e.get("metrics", {}):
            continue
        p = dict(e.get("protocol", {}))
        row = {"rank": None, "name": e["id"], "kind": "published", "formulation": e.get("paper"),
               "sampler": p.get("sampler"), "options": _options_text(p), "steps": p.get("steps"), "nfe": p.get("nfe"),
               "weights": p.get("weights"),
               "guidance": p.get("guidance"), "metric": metric, "value": float(e["metrics"][metric]), "mean": None,
               "min": None, "spread": None, "std": None, "seed_sets": p.get("seed_sets"), "training_images": None,
               "reproduces": "", "citation": f"{e['citation']}, {e['table']}", "command": None,
               "source": "configs/leaderboard/published.yaml", "run_dir": None, "experiment": e.get("preset"),
               "tolerance": (e.get("tolerance") or {}).get(metric)}
        out.append((p, row))
    return out


def _matches(published: Mapping, ours: Mapping) -> bool:
    """True when every protocol field the published entry states equals ours (a list: any of its values; an
    extractor without ``@hash`` matches any weights of that extractor)."""
    for key, value in published.items():
        mine = ours.get(key)
        if key == "extractor" and "@" not in str(value):
            mine = str(mine).split("@")[0]
        allowed = value if isinstance(value, list) else [value]
        if value is not None and key in ours and mine != value and mine not in allowed:
            return False
    return True


def pareto_front(points: Sequence[tuple[float | None, float]], direction: str) -> list[bool]:
    """Which ``(x, value)`` points are on the Pareto frontier: no other point has ``x`` lower or equal and a value
    better or equal (``direction``: ``min``, lower is better; ``max``), one of the two strictly. Points with ``x``
    None (a published figure without an NFE) or a non-finite value are neither on it nor dominate; equal points
    are both on it. Sorted by x, then best value first: a point is on the frontier when it has the best value of
    its x and that value beats every value at a lower x. O(n log n).

    Args:
        points: ``[(x, value)]``, e.g. (NFE, FID) per row of a group; direction: ``min`` or ``max``.
    Returns:
        ``[bool]`` per point, in their order.
    """
    if direction not in ("min", "max"):
        raise ValueError(f"direction={direction!r} is invalid; allowed: min, max")
    sign = 1 if direction == "min" else -1  # sign * value: lower is better
    order = sorted((i for i, (x, v) in enumerate(points) if x is not None and math.isfinite(v)),
                   key=lambda i: (points[i][0], sign * points[i][1]))
    front = [False] * len(points)
    best_before = math.inf  # the best sign * value at a lower x
    for _, same_x in itertools.groupby(order, key=lambda i: points[i][0]):
        same_x = list(same_x)
        best_here = sign * points[same_x[0]][1]
        if best_here < best_before:
            for i in same_x:
                front[i] = sign * points[i][1] == best_here
        best_before = min(best_before, best_here)
    return front


def _mark_frontiers(rows: list[dict], direction: str) -> None:
    """Set ``pareto_<axis>`` of each row of one group, for each axis of ``PARETO_AXES``."""
    for axis in PARETO_AXES:
        marks = pareto_front([(r[axis], r["value"]) for r in rows], direction)
        for row, mark in zip(rows, marks, strict=True):
            row[f"pareto_{axis}"] = mark


def build(records: Sequence[dict], metric: str, *, published: Sequence[Mapping] = (), direction: str = "auto",
          skipped: list | None = None, sweeps: Sequence[dict] = ()) -> Leaderboard:
    """Group ``records`` by protocol, rank each group by ``metric``, place and match the published rows, and mark
    each group's Pareto frontiers (``pareto_nfe``, ``pareto_training_images``: ``pareto_front``; a published row takes
    part in the NFE frontier when it states an NFE).

    Args:
        records: as ``read_record`` returns them; metric: a key of a record's ``metrics`` (``fid``, ``is_mean``,
        ``kid_mean``, ``precision``, ``recall``, ``bpd``, ``vlb_bpd``); published: entries of
        ``configs/leaderboard/published.yaml``; direction: ``min``, ``max`` or ``auto`` (``DIRECTIONS``);
        skipped: ``(input, reason)`` pairs so far; sweeps: as ``collect`` returns them.
    """
    if direction == "auto":
        if metric not in DIRECTIONS:
            raise ValueError(f"metric={metric!r} has no known direction; allowed: {', '.join(DIRECTIONS)}, or set "
                             "direction=min|max")
        direction = DIRECTIONS[metric]
    if direction not in ("min", "max"):
        raise ValueError(f"direction={direction!r} is invalid; allowed: auto, min, max")
    skipped = list(skipped or [])
    seen, usable = {}, []
    for record in sorted(records, key=lambda r: r["path"]):
        if metric not in record["metrics"]:
            skipped.append((record["path"], f"no {metric} in this record (it has {', '.join(record['metrics'])})"))
            continue
        run = record["run"]
        identity = (run.get("checkpoint") or run.get("dir"), record["kind"], record["provenance"].get("config_hash"),
                    run.get("training_step"))
        if identity in seen:
            skipped.append((record["path"], f"a second record of the same run and settings as {seen[identity]}"))
            continue
        try:
            key = protocol_of(record, metric)
        except (KeyError, TypeError) as err:
            skipped.append((record["path"], f"partial record: its protocol lacks {err}"))
            continue
        seen[identity] = record["path"]
        usable.append((key, record))
    usable = _drop_other_statistics(usable, metric, skipped)
    groups: list[Group] = []
    for key, record in usable:
        group = next((g for g in groups if g.protocol == key), None)
        if group is None:
            group = Group(key)
            groups.append(group)
        group.rows.append(_row(record, metric))
    for protocol, row in _published_rows(published, metric):
        group = next((g for g in groups if _matches(protocol, g.protocol)), None)
        if group is None:
            group = Group({k: protocol.get(k) for k in protocol if k not in ("sampler", "steps", "nfe", "weights",
                                                                                 "guidance")})
            groups.append(group)
        for ours in group.rows:
            close = row["tolerance"] is not None and abs(ours["value"] - row["value"]) <= row["tolerance"]
            same_method = all(protocol.get(k) in (None, ours.get(k)) for k in ("sampler", "nfe", "weights"))
            same_preset = row["experiment"] is None or ours["experiment"] == row["experiment"]
            if ours["kind"] != "published" and close and same_method and same_preset:
                ours["reproduces"] = row["name"]
        group.rows.append(row)
    sign = 1 if direction == "min" else -1
    for group in groups:
        group.rows.sort(key=lambda r: (sign * r["value"], r["kind"] == "published", r["name"]))
        rank = 0
        for row in group.rows:
            if row["kind"] != "published":
                rank += 1
                row["rank"] = rank
        _mark_frontiers(group.rows, direction)
    groups.sort(key=lambda g: -sum(r["kind"] != "published" for r in g.rows))
    keys = sorted({k for g in groups for k in g.protocol})
    differing = [k for k in keys if len({json.dumps(g.protocol.get(k), default=str) for g in groups}) > 1]
    return Leaderboard(metric, direction, groups, skipped, [_sweep_table(s, usable, metric, direction) for s in sweeps],
                       differing)


def _drop_other_statistics(usable: list, metric: str, skipped: list) -> list:
    """Within each reference set and feature extractor (the statistics are moments of its features), keep the
    records scored against the most common statistics (SHA-256) and skip the others by name: the same reference
    name with other statistics does not compare."""
    if metric in _LIKELIHOOD:
        return usable
    digest = {id(r): r["protocol"]["samples"].get("reference_sha256") for _, r in usable}
    common = {}
    for name in {(k["reference"], k["extractor"]) for k, _ in usable}:
        counts = Counter(digest[id(r)] for k, r in usable if (k["reference"], k["extractor"]) == name and digest[id(r)])
        common[name] = counts.most_common(1)[0][0] if counts else None
    kept = []
    for key, record in usable:
        want, have = common[key["reference"], key["extractor"]], digest[id(record)]
        if want is not None and have is not None and have != want:
            skipped.append((record["path"], f"computed against other reference statistics for {key['reference']} "
                                            f"(SHA-256 {have[:12]}; the other results: {want[:12]})"))
        else:
            kept.append((key, record))
    return kept


def _sweep_table(sweep: Mapping, usable: list, metric: str, direction: str) -> dict:
    """The jobs of a sweep with the swept parameters (overrides whose value differs between jobs) as columns,
    each job's value (its final record: the highest training step, an ``evaluate`` record first), the best job
    and the command that reruns it."""
    jobs = sweep["jobs"]
    keys = sorted({k for j in jobs for k in j["overrides"]})
    swept = [k for k in keys if len({str(j["overrides"].get(k)) for j in jobs}) > 1 or len(jobs) == 1]
    if sweep.get("optuna"):
        swept = sorted(set(swept) | set(sweep["optuna"].get("best_params", {})))
    rows = []
    for job in jobs:
        inside = [r for _, r in usable if str(r["run"].get("dir")) == job["dir"]
                  or str(r["path"]).startswith(job["dir"] + "/")]
        final = max(inside, key=lambda r: (r["kind"] == "evaluate", r["run"].get("training_step") or 0), default=None)
        rows.append({"job": Path(job["dir"]).name, **{k: job["overrides"].get(k) for k in swept},
                     "value": None if final is None else final["metrics"][metric],
                     "command": "lightning-diff train " + " ".join(shlex.quote(f"{k}={v}")
                                                                   for k, v in job["overrides"].items())})
    scored = [r for r in rows if r["value"] is not None]
    best = (min if direction == "min" else max)(scored, key=lambda r: r["value"]) if scored else None
    return {"dir": sweep["dir"], "params": swept, "rows": rows, "best": best, "optuna": sweep.get("optuna")}


# ---------------------------------------------------------------- outputs

def _fmt(value) -> str:
    if value is None or value == "":
        return ""
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _protocol_text(protocol: Mapping) -> str:
    return ", ".join(f"{k}={_fmt(v)}" for k, v in protocol.items())


_MD_COLUMNS = ["rank", "name", "formulation", "sampler", "options", "nfe", "pareto", "weights", "value", "spread",
               "training_images", "reproduces", "citation"]
STAR = "★"  # marks a row on its group's Pareto frontier (md and HTML)


def _md_cell(row: Mapping, column: str) -> str:
    """The text of ``row``'s ``column`` in the md table (``pareto``: ``STAR`` on the NFE frontier)."""
    if column == "rank" and row.get("kind") == "published":
        return "published"
    if column == "pareto":
        return STAR if row.get("pareto_nfe") else ""
    return _fmt(row.get(column))


def _better(board: Leaderboard) -> str:
    """``lower`` or ``higher``: which values of the board's metric are better."""
    return "lower" if board.direction == "min" else "higher"


def _pareto_legend(board: Leaderboard) -> str:
    return (f"{STAR}: on its group's Pareto frontier of {board.metric} against NFE (no other row of the group has "
            f"lower-or-equal NFE and a better-or-equal {board.metric}, one of the two strictly; published rows take "
            "part when they state an NFE). Figures: per group whose rows take at least 2 values of the axis, the "
            "frontier ringed and labelled with the rows' ranks.")


def to_markdown(board: Leaderboard, figures: Sequence[Figure] = ()) -> str:
    """The tables, sweeps and skipped inputs as Markdown; ``figures`` (``Figure``, written beside the file as
    ``Figure.file``) are linked under their group's table."""
    lines = [f"# Leaderboard: {board.metric} ({_better(board)} is better)", ""]
    if board.differing:
        lines += [f"Groups differ in: {', '.join(board.differing)}. Ranks compare rows of one group only.", ""]
    lines += [_pareto_legend(board), ""]
    for i, group in enumerate(board.groups, 1):
        lines += [f"## Group {i}: {_protocol_text(group.protocol)}", "",
                  "| " + " | ".join(c if c != "value" else board.metric for c in _MD_COLUMNS) + " |",
                  "|" + "---|" * len(_MD_COLUMNS)]
        lines += ["| " + " | ".join(_md_cell(row, c) for c in _MD_COLUMNS) + " |" for row in group.rows]
        lines.append("")
        lines += [f"![{f.title}]({f.file})\n" for f in figures if f.group == i]
    for sweep in board.sweeps:
        lines += _sweep_markdown(sweep, board.metric)
    lines += ["## Skipped", ""] + ([f"- `{name}`: {reason}" for name, reason in board.skipped] or ["(none)"])
    return "\n".join(lines) + "\n"


def _sweep_markdown(sweep: Mapping, metric: str) -> list[str]:
    cols = ["job", *sweep["params"], "value"]
    lines = [f"## Sweep {sweep['dir']}", "", "| " + " | ".join(c if c != "value" else metric for c in cols) + " |",
             "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(_fmt(r.get(c)) for c in cols) + " |" for r in sweep["rows"]]
    if sweep["best"] is not None:
        lines += ["", f"Best: job {sweep['best']['job']} ({metric} {_fmt(sweep['best']['value'])}); rerun: "
                      f"`{sweep['best']['command']}`"]
    if sweep.get("optuna"):
        lines += [f"Optuna: best_params {sweep['optuna'].get('best_params')}, best_value "
                  f"{_fmt(sweep['optuna'].get('best_value'))}"]
    return lines + [""]


def csv_rows(board: Leaderboard) -> list[dict]:
    """One dict per row (``CSV_COLUMNS``; ``group`` numbered from 1), in the order of the tables."""
    return [{"group": i, **{c: row.get(c) for c in CSV_COLUMNS if c != "group"}}
            for i, group in enumerate(board.groups, 1) for row in group.rows]


def _pareto_png(rows: Sequence[Mapping], axis: str, title: str, ylabel: str, *, min_log_range: float = 10,
                dpi: int = 100) -> bytes:
    """A Pareto figure of one group as PNG bytes (matplotlib, Agg): the value (``ylabel``) against ``axis`` (a key of
    ``PARETO_AXES``) for the ``rows`` that have it; against NFE a colour per sampler, against training images a colour
    per run; published rows as stars; the frontier (``pareto_<axis>``) as a staircase through ringed points labelled
    with their rank (a published row: its name). A log axis (x or y) when its largest value is ``min_log_range``
    times its smallest or more."""
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series: dict[str, list[tuple[float, float]]] = {}
    for r in rows:
        key = "published" if r["kind"] == "published" else str(r["sampler"] if axis == "nfe" else r["name"])
        series.setdefault(key, []).append((float(r[axis]), r["value"]))
    fig, ax = plt.subplots(figsize=(7, 3.6))
    for name, xy in sorted(series.items()):
        style = "*" if name == "published" else "o"
        ax.plot(*zip(*xy, strict=True), style, label=name, alpha=0.75, markersize=8 if style == "*" else 4)
    front = sorted((r for r in rows if r[f"pareto_{axis}"]), key=lambda r: (float(r[axis]), r["value"]))
    xs, ys = [float(r[axis]) for r in front], [r["value"] for r in front]
    ax.step(xs, ys, where="post", color="black", linewidth=1.2, label="Pareto frontier")
    ax.scatter(xs, ys, s=80, facecolors="none", edgecolors="black", linewidths=1.2)
    labels: dict[tuple[float, float], list[str]] = {}  # equal rows share a point: one label
    for x, y, r in zip(xs, ys, front, strict=True):
        labels.setdefault((x, y), []).append(r["name"] if r["kind"] == "published" else f"#{r['rank']}")
    for xy, names in labels.items():
        ax.annotate(", ".join(names), xy, xytext=(4, 4), textcoords="offset points", fontsize=7)
    for name, values in (("x", [float(r[axis]) for r in rows]), ("y", [r["value"] for r in rows])):
        if min(values) > 0 and max(values) >= min_log_range * min(values):
            getattr(ax, f"set_{name}scale")("log")
            scale = getattr(ax, f"{name}axis")
            scale.set_major_locator(matplotlib.ticker.LogLocator(subs=(1, 2, 5)))
            scale.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
            scale.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set_title(title, fontsize=9)
    ax.set_xlabel(PARETO_AXES[axis])
    ax.set_ylabel(ylabel)
    ax.legend(fontsize=6, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi)
    plt.close(fig)
    return buffer.getvalue()


def figures(board: Leaderboard, *, min_values: int = 2) -> list[Figure]:
    """Per group and axis of ``PARETO_AXES`` (NFE, training images), the Pareto figure of the rows that have the
    axis, when they take at least ``min_values`` distinct values of it (rows at one NFE show no trade-off)."""
    out = []
    for i, group in enumerate(board.groups, 1):
        for axis, name in PARETO_AXES.items():
            rows = [r for r in group.rows if r[axis] is not None]
            if len({float(r[axis]) for r in rows}) >= min_values:
                title = f"Group {i}: {board.metric} vs {name}"
                ylabel = f"{board.metric} ({_better(board)} is better)"
                out.append(Figure(i, axis, title, _pareto_png(rows, axis, title, ylabel)))
    return out


_SCRIPT = """
function sortTable(th){const table=th.closest('table'),body=table.tBodies[0],i=[...th.parentNode.children].indexOf(th);
const asc=th.dataset.order!=='asc';th.dataset.order=asc?'asc':'desc';
const key=r=>{const t=r.children[i].textContent.trim(),n=parseFloat(t);return isNaN(n)?t:n};
[...body.rows].sort((a,b)=>{const x=key(a),y=key(b);const c=(typeof x==='number'&&typeof y==='number')?x-y:
String(x).localeCompare(String(y));return asc?c:-c}).forEach(r=>body.appendChild(r));}
"""


def _html_cell(row: Mapping, column: str) -> str:
    """The ``<td>`` of ``row``'s ``column`` (the ``pareto_*`` booleans: ``STAR`` or empty)."""
    if column.startswith("pareto_"):
        return "<td class='pareto'>" + STAR + "</td>" if row.get(column) else "<td></td>"
    return f"<td>{html.escape(_fmt(row.get(column)))}</td>"


def to_html(board: Leaderboard, title: str, figures: Sequence[Figure] = ()) -> str:
    """A self-contained page: a sortable table per group (click a header) with its ``figures`` embedded below it
    (``Figure``), sweeps, skipped."""
    e = html.escape
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{e(title)}</title><style>"
             "body{font-family:sans-serif;margin:1.5em}table{border-collapse:collapse;margin-bottom:1em}"
             "td,th{border:1px solid #bbb;padding:3px 6px;font-size:13px}th{cursor:pointer;background:#eee}"
             "tr.published{font-style:italic;background:#f6f6ff}td.pareto{font-weight:bold;text-align:center}"
             f"</style><script>{_SCRIPT}</script></head><body><h1>{e(title)}</h1>",
             f"<p>Metric: <b>{e(board.metric)}</b> ({_better(board)} is better)."
             + (f" Groups differ in: {e(', '.join(board.differing))}." if board.differing else "") + "</p>",
             f"<p>{e(_pareto_legend(board))} The pareto_training_images column: the same against training images."
             "</p>"]
    columns = [c for c in CSV_COLUMNS if c not in ("group", "metric")]
    for i, group in enumerate(board.groups, 1):
        parts.append(f"<h2>Group {i}</h2><p class='protocol'>{e(_protocol_text(group.protocol))}</p>"
                     f"<table class='sortable' id='group-{i}'><thead><tr>"
                     + "".join(f"<th onclick='sortTable(this)'>{e(board.metric if c == 'value' else c)}</th>"
                               for c in columns) + "</tr></thead><tbody>")
        for row in group.rows:
            cls = " class='published'" if row["kind"] == "published" else ""
            parts.append(f"<tr{cls}>" + "".join(_html_cell(row, c) for c in columns) + "</tr>")
        parts.append("</tbody></table>")
        parts += [f"<figure><img alt='{e(f.title)}' src='data:image/png;base64,{base64.b64encode(f.png).decode()}'>"
                  f"<figcaption>{e(f.title)}</figcaption></figure>" for f in figures if f.group == i]
    for sweep in board.sweeps:
        cols = ["job", *sweep["params"], "value", "command"]
        parts.append(f"<h2>Sweep {e(sweep['dir'])}</h2><table class='sortable'><thead><tr>"
                     + "".join(f"<th onclick='sortTable(this)'>{e(c)}</th>" for c in cols) + "</tr></thead><tbody>"
                     + "".join("<tr>" + "".join(f"<td>{e(_fmt(r.get(c)))}</td>" for c in cols) + "</tr>"
                               for r in sweep["rows"]) + "</tbody></table>")
        if sweep["best"] is not None:
            parts.append(f"<p>Best: job {e(str(sweep['best']['job']))}; rerun: <code>{e(sweep['best']['command'])}"
                         "</code></p>")
    parts.append("<h2>Skipped</h2><ul id='skipped'>"
                 + "".join(f"<li><code>{e(n)}</code>: {e(r)}</li>" for n, r in board.skipped) + "</ul></body></html>")
    return "\n".join(parts)


def _csv_text(board: Leaderboard) -> str:
    """``leaderboard.csv``: the header ``CSV_COLUMNS`` and ``csv_rows``."""
    buffer = io.StringIO(newline="")
    writer = csv.DictWriter(buffer, CSV_COLUMNS)
    writer.writeheader()
    writer.writerows(csv_rows(board))
    return buffer.getvalue()


def write_outputs(board: Leaderboard, out: str | Path, title: str = "lightning-diff leaderboard",
                  with_figures: bool = True) -> dict[str, Path]:
    """Write ``leaderboard.md``, ``leaderboard.csv``, ``leaderboard.html`` and (``with_figures``) the Pareto figures
    ``leaderboard-group<i>-<axis>.png`` into ``out``, all replaced as one unit (``checkpoint_io.atomic_write_all``);
    figure files of an earlier board that this one has not are removed. Returns the paths (``md``, ``csv``,
    ``html``, and each figure's ``Figure.file``)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    drawn = figures(board) if with_figures else []
    texts = {"md": to_markdown(board, drawn), "csv": _csv_text(board), "html": to_html(board, title, drawn)}
    contents = {**{k: v.encode() for k, v in texts.items()}, **{f.file: f.png for f in drawn}}
    paths = {k: out / (f"leaderboard.{k}" if k in texts else k) for k in contents}
    atomic_write_all({paths[k]: (lambda file, data=data: file.write(data)) for k, data in contents.items()})
    for old in out.glob(Figure.PATTERN):
        if old.name not in contents:
            old.unlink()
    return paths


def log_wandb_table(board: Leaderboard, run) -> None:
    """Log the rows as the W&B Table ``leaderboard`` of ``run`` (report-ready: one row per result)."""
    import wandb

    rows = csv_rows(board)
    run.log({"leaderboard": wandb.Table(columns=CSV_COLUMNS, data=[[_fmt(r[c]) for c in CSV_COLUMNS] for r in rows])})
