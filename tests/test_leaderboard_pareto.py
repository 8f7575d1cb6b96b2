"""The leaderboard's Pareto view (docs/leaderboard.md, "Pareto view"): per protocol group, the rows that no other
row dominates in (NFE, quality) and in (training images, quality), marked in the md (a star column and the figure
as a PNG file beside leaderboard.md), the CSV (``pareto_nfe``) and the HTML (embedded figure); and the options
column of the records the newer commands write (tuned grids, explicit sigmas, DDPM spacing).

The oracle of the frontier is the definition itself, checked pair by pair (O(n^2)) here, independently of the
library's sort-and-sweep: a row is dominated when another row of its group has lower-or-equal NFE and a
better-or-equal value, one of the two strictly; rows without the axis (a published figure without NFE) are neither
on the frontier nor dominate. Hand-made records only: no training, no Inception."""

import csv
import json
import random
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from PIL import Image

from lightning_diff.evaluation.leaderboard import _options_text, build, csv_rows, pareto_front, write_outputs

STAR = "★"


def _dominated_brute_force(points, direction):
    """``[bool]``: True where some other point with an axis value has lower-or-equal x and better-or-equal value,
    one strictly (the definition of Pareto dominance; direction ``min``: lower values are better)."""
    def better_or_equal(a, b):
        return a <= b if direction == "min" else a >= b

    out = []
    for i, (x, v) in enumerate(points):
        out.append(x is not None and any(
            j != i and xj is not None and xj <= x and better_or_equal(vj, v) and (xj < x or vj != v)
            for j, (xj, vj) in enumerate(points)))
    return out


def _frontier_brute_force(points, direction):
    dominated = _dominated_brute_force(points, direction)
    return [x is not None and not d for (x, _), d in zip(points, dominated, strict=True)]


def test_frontier_by_hand():
    """Worked by hand (lower is better): (1, 9) best at NFE 1; (2, 9) ties its value at a higher NFE: dominated;
    (2, 5) and its twin (2, 5) are both kept (neither strictly better); (2, 6) loses at equal NFE; (4, 5) ties the
    value at a higher NFE: dominated; (4, 3) improves; (None, 1) has no NFE: out, and dominates nothing."""
    points = [(1, 9.0), (2, 9.0), (2, 5.0), (2, 5.0), (2, 6.0), (4, 5.0), (4, 3.0), (None, 1.0)]
    assert pareto_front(points, "min") == [True, False, True, True, False, False, True, False]
    # Higher is better (IS, precision): (1, 9) is the best value of all rows with an NFE, so only it remains.
    assert pareto_front(points, "max") == [True, False, False, False, False, False, False, False]
    assert pareto_front([], "min") == [] and pareto_front([(None, 1.0)], "max") == [False]


@pytest.mark.parametrize("direction", ["min", "max"])
@pytest.mark.parametrize("seed", range(20))
def test_frontier_equals_the_pairwise_dominance_check(direction, seed):
    """Random rows with many ties (NFE in 1..6, values in 0..5, some without NFE, float NFE too)."""
    rng = random.Random(seed)
    points = [(rng.choice([None, 1, 2, 2.0, 3, 4, 6]), float(rng.randint(0, 5))) for _ in range(rng.randint(1, 25))]
    assert pareto_front(points, direction) == _frontier_brute_force(points, direction)


def test_frontier_refuses_an_unknown_direction():
    with pytest.raises(ValueError, match="direction='up' is invalid; allowed: min, max"):
        pareto_front([(1, 1.0)], "up")


# ------------------------------------------------------------------------------------------------ records

REFERENCE = "digits-train-8px-small_classifier_digits@6b5b9cf7eb54"


def _record(i, value, nfe, *, images=None, sampler="heun", num_images=256, metric="fid", time_steps=None):
    """A minimal record (the keys ``build`` reads) of run ``run<i>``."""
    sampler_record = {"name": sampler, "steps": nfe, "options": {}, "guidance": 1.0, "guidance_kind": "cfg",
                      **({"time_steps": time_steps} if time_steps else {})}
    return {"path": f"/runs/run{i}/eval-{i}.json", "kind": "evaluate", "metrics": {metric: value}, "uncertainty": {},
            "run": {"dir": f"/runs/run{i}", "name": f"run{i}", "checkpoint": f"/runs/run{i}/last.ckpt",
                    "formulation": "EDM", "training_images": images},
            "protocol": {"weights": "ema", "samples": {
                "reference": REFERENCE, "extractor": "small_classifier_digits@6b5b9cf7eb54",
                "num_images": num_images, "seed_sets": 1, "rounding": "edm", "sampler": sampler_record, "nfe": nfe,
                "reference_sha256": "0" * 64}},
            "provenance": {"config_hash": f"hash{i}", "command": f"lightning-diff evaluate ckpt=run{i}"}}


# (value, nfe, training images) of group 1 (256 images), a group 2 (512 images) of one row with NFE
GROUP_1 = [(9.0, 1, 1000), (5.0, 2, 2000), (5.0, 2, 1000), (6.0, 2, 4000), (5.0, 4, 500), (3.0, 4, 4000),
           (2.0, None, 8000)]
GROUP_2 = [(7.0, 3, 100), (8.0, None, 200)]


def _records(metric="fid"):
    rows = [_record(i, v, n, images=t, metric=metric) for i, (v, n, t) in enumerate(GROUP_1)]
    return rows + [_record(10 + i, v, n, images=t, metric=metric, num_images=512) for i, (v, n, t) in
                   enumerate(GROUP_2)]


PUBLISHED = [  # one published figure with an NFE (it takes part), one without (it does not)
    {"id": "paper_nfe", "paper": "P", "citation": "Doe 2026", "table": "Table 1", "metrics": {"fid": 4.0},
     "protocol": {"reference": "digits-train-8px", "num_images": 256, "nfe": 3}},
    {"id": "paper_no_nfe", "paper": "P", "citation": "Doe 2026", "table": "Table 2", "metrics": {"fid": 1.0},
     "protocol": {"reference": "digits-train-8px", "num_images": 256}}]


@pytest.mark.parametrize("metric", ["fid", "is_mean"])
def test_build_marks_each_groups_frontier_in_the_metrics_direction(metric):
    """FID lower is better, IS higher: the same rows give other frontiers; per group, against NFE and against
    training images; a published row takes part with an NFE, not without."""
    published = [{**e, "metrics": {metric: e["metrics"]["fid"]}} for e in PUBLISHED]
    board = build(_records(metric), metric, published=published)
    direction = "min" if metric == "fid" else "max"
    assert [len(g.rows) for g in board.groups] == [9, 2]
    for group in board.groups:
        for axis in ("nfe", "training_images"):
            points = [(r[axis], r["value"]) for r in group.rows]
            assert [r[f"pareto_{axis}"] for r in group.rows] == _frontier_brute_force(points, direction), axis
    by_name = {r["name"]: r for r in board.groups[0].rows}
    assert by_name["paper_no_nfe"]["pareto_nfe"] is False  # no NFE: out, although its value is the best
    if metric == "fid":  # 4.0 at NFE 3 beats 5.0 at NFE 4 and is not beaten by 5.0 at NFE 2: on the frontier
        assert by_name["paper_nfe"]["pareto_nfe"] and not by_name["run4"]["pareto_nfe"]
        assert [r["name"] for r in board.groups[0].rows if r["pareto_nfe"]] == ["run5", "paper_nfe", "run1",
                                                                                "run2", "run0"]
    assert {r["name"]: r["pareto_nfe"] for r in board.groups[1].rows} == {"run10": True, "run11": False}


def test_md_csv_and_html_carry_the_frontier_and_the_figure_files(tmp_path):
    board = build(_records(), "fid", published=PUBLISHED)
    stale = tmp_path / "leaderboard-group7-nfe.png"  # of an earlier board with more groups
    tmp_path.mkdir(exist_ok=True)
    stale.write_bytes(b"old")
    paths = write_outputs(board, tmp_path)
    frontier = {r["name"] for g in board.groups for r in g.rows if r["pareto_nfe"]}
    assert frontier == {"run0", "run1", "run2", "run5", "paper_nfe", "run10"}

    table = [line.split(" | ") for line in paths["md"].read_text().splitlines() if line.startswith("| ")]
    header = table[0]
    starred = {cells[header.index("name")] for cells in table if STAR in cells[header.index("pareto")]}
    assert starred == frontier
    # The figures: per group whose rows take >= 2 values of the axis, a PNG beside leaderboard.md, linked, readable.
    names = sorted(p.name for p in tmp_path.glob("leaderboard-group*.png"))
    assert names == ["leaderboard-group1-nfe.png", "leaderboard-group1-training_images.png",
                     "leaderboard-group2-training_images.png"]  # group 2 has one row with an NFE: no NFE figure
    markdown = paths["md"].read_text()
    for name in names:
        assert f"]({name})" in markdown
        with Image.open(tmp_path / name) as image:
            assert image.width > 100 and image.height > 100
    assert not stale.exists()

    read = list(csv.DictReader(paths["csv"].open()))
    assert {r["name"] for r in read if r["pareto_nfe"] == "True"} == frontier
    assert {r["pareto_nfe"] for r in read} == {"True", "False"}
    assert [r["pareto_nfe"] for r in read] == [str(r["pareto_nfe"]) for r in csv_rows(board)]

    page = paths["html"].read_text()
    assert page.count("data:image/png;base64,") == len(names)
    header = re.findall(r"<th[^>]*>(.*?)</th>", page.split("</thead>", 1)[0])
    cells = [re.findall(r"<td[^>]*>(.*?)</td>", row) for row in re.findall(r"<tr[^>]*>(.*?)</tr>", page)]
    cells = [row for row in cells if row]  # body rows (the header's cells are <th>)
    assert {row[header.index("name")] for row in cells if row[header.index("pareto_nfe")] == STAR} == frontier


def test_no_figure_where_the_rows_take_one_value_of_the_axis(tmp_path):
    """Three rows at NFE 35 (no trade-off to show) from runs of 100, 200 and 400 training images: only the figure
    against training images."""
    records = [_record(i, 3.0 + i, 35, images=100 * 2 ** i) for i in range(3)]
    write_outputs(build(records, "fid"), tmp_path)
    assert sorted(p.name for p in tmp_path.glob("*.png")) == ["leaderboard-group1-training_images.png"]


def test_without_figures_nothing_is_linked(tmp_path):
    paths = write_outputs(build(_records(), "fid"), tmp_path, with_figures=False)
    assert not list(tmp_path.glob("*.png")) and ".png)" not in paths["md"].read_text()
    assert "data:image/png" not in paths["html"].read_text()


def test_options_of_tuned_grids_explicit_sigmas_and_spacing():
    """A tune-steps file (``time_steps: {sigmas, file, key}``, ``sampling.grid_file``) is named with its key; an
    explicit grid (a distilled student's levels or ``sampler.time_steps.sigmas``) shows its levels; DDPM's
    sub-sequence ``spacing`` is a setting that tells two DDIM runs at one NFE apart."""
    key = "ab" * 32
    tuned = {"name": "euler", "time_steps": {"sigmas": [80.0, 3.1, 0.5, 0.0], "file": "/grids/euler-nfe3.json",
                                             "key": key}}
    assert _options_text(tuned) == "time_steps=tuned euler-nfe3.json (key abababab)"
    assert _options_text({"name": "euler", "time_steps": {"sigmas": [80.0, 3.14159, 0.5, 0.0]}}) == (
        "time_steps=sigmas(80 3.14 0.5 0)")
    long_grid = {"name": "euler", "time_steps": {"sigmas": [80.0, 40.0, 20.0, 10.0, 5.0, 2.0, 1.0, 0.5, 0.0]}}
    assert _options_text(long_grid) == "time_steps=sigmas(80 40 20 ... 0.5 0; 9 levels)"
    assert _options_text({"name": "euler", "time_steps": {"sigma_min": 0.1698}}) == "time_steps=edm(sigma_min=0.1698)"
    assert _options_text({"name": "ddim", "options": {"eta": 0.0}, "spacing": "quadratic"}) == (
        "eta=0, spacing=quadratic")


def test_build_rows_of_tuned_and_consistency_records_are_told_apart():
    """Two Euler runs at NFE 3 (Karras grid, tuned file) and a consistency run: three distinct option texts."""
    tuned = {"sigmas": [80.0, 3.1, 0.5, 0.0], "file": "/grids/euler-nfe3.json", "key": "cd" * 32}
    records = [_record(0, 5.0, 3, sampler="euler"), _record(1, 4.0, 3, sampler="euler", time_steps=tuned),
               _record(2, 6.0, 3, sampler="consistency")]
    rows = build(records, "fid").groups[0].rows
    assert [(r["sampler"], r["options"], r["pareto_nfe"]) for r in rows] == [
        ("euler", "time_steps=tuned euler-nfe3.json (key cdcdcdcd)", True), ("euler", "", False),
        ("consistency", "", False)]


@pytest.mark.slow
def test_page_shows_the_pareto_figure_in_headless_chromium(tmp_path):
    """Chromium (``make browser``) loads leaderboard.html inside a same-folder frame; every figure's image is
    decoded (``naturalWidth > 0``) and the NFE frontier's rows carry the star."""
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        pytest.skip("chromium is not installed (make browser installs it where apt-get is available)")
    write_outputs(build(_records(), "fid", published=PUBLISHED), tmp_path)
    probe = tmp_path / "probe.html"
    probe.write_text(
        "<html><body><iframe id='f' src='leaderboard.html' width='1200' height='700'></iframe><pre id='out'></pre>"
        "<script>document.getElementById('f').onload=()=>{const d=document.getElementById('f').contentDocument;"
        "const imgs=[...d.querySelectorAll('img')].map(i=>({alt:i.alt,complete:i.complete,w:i.naturalWidth}));"
        "const col=[...d.querySelectorAll('#group-1 th')].findIndex(h=>h.textContent==='pareto_nfe');"
        "const stars=[...d.querySelectorAll('#group-1 tbody tr')].filter(r=>r.children[col].textContent==='\u2605')"
        ".length;"
        "document.getElementById('out').textContent='RESULT='+JSON.stringify({imgs,stars});};</script>"
        "</body></html>")
    flags = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--allow-file-access-from-files",
             "--virtual-time-budget=5000"]
    dom = subprocess.run([*flags, "--dump-dom", probe.as_uri()], capture_output=True, text=True, timeout=120)
    assert "RESULT=" in dom.stdout, dom.stderr[-2000:]
    result = json.loads(dom.stdout.split("RESULT=", 1)[1].split("</pre>", 1)[0].replace("&quot;", '"'))
    assert [i["alt"] for i in result["imgs"]] == ["Group 1: fid vs NFE", "Group 1: fid vs training images",
                                                  "Group 2: fid vs training images"]
    assert all(i["complete"] and i["w"] > 0 for i in result["imgs"]), result
    assert result["stars"] == 5  # run0, run1, run2, run5, paper_nfe
    assert Path(tmp_path / "leaderboard-group1-nfe.png").is_file()
