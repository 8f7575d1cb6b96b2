"""``lightning-diff leaderboard`` on records of tiny real runs: two formulations on digits (EDM, VP), each scored
by ``evaluate`` with two samplers, plus one evaluation with another sample count and the VP run's training-time
FID (its offline W&B run holds the same record). Checks the ranking against the records' own values, the protocol
grouping, the published-number row and "reproduces", the HTML (every row, figures), the CSV round trip, sweeps,
the W&B public-API path (a fake API object) and the skipped section."""

import csv
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from lightning_diff.cli.evaluate import evaluate
from lightning_diff.cli.leaderboard import leaderboard
from lightning_diff.cli.train import train
from lightning_diff.evaluation.leaderboard import (
    CSV_COLUMNS,
    build,
    collect,
    collect_wandb,
    csv_rows,
    to_markdown,
    write_outputs,
)
from lightning_diff.evaluation.records import RECORD_VERSION, read_record

from .helpers import compose_config, read_wandb_records, wandb_run_summary

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny networks: one intra-op thread

ROOT = Path(__file__).resolve().parent.parent
TINY = ["callbacks.progress=null", "++trainer.enable_progress_bar=false", "callbacks.sample_grid=null", "data=digits",
        "network.model_channels=8", "trainer.max_steps=3", "data.batch_size=16"]


def _evaluate(ckpt, cache, sampler, *extra):
    return evaluate(compose_config("evaluate", [
        f"ckpt={ckpt}", f"sampler={sampler}", "sampler.steps=2", "device=cpu", "progress=false", "metrics=[fid]",
        "metrics.fid.method=eigvals", "metrics.num_samples=4", "metrics.reference_num_images=8", "metrics.batch_size=8",
        f"metrics.cache_dir={cache}", *extra]))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Records of EDM and VP (trained here with an offline W&B logger and the FID
    callback at fit end), each evaluated with heun and euler; one more EDM evaluation with 5 images."""
    import os

    from lightning_diff.cli.train import finish_logging

    cache = tmp_path_factory.mktemp("cache")
    edm_dir = tmp_path_factory.mktemp("edm_run")
    edm = train(compose_config("train", [*TINY, "logger=csv"], edm_dir))["checkpoint"]
    vp_dir = tmp_path_factory.mktemp("vp_run")
    os.environ["WANDB_MODE"] = "offline"
    try:
        vp = train(compose_config("train", [
            *TINY, "formulation=vp", "logger=wandb", "callbacks=[default,generative_metrics]",
            "callbacks.generative_metrics.num_samples=4", "callbacks.generative_metrics.sampler.steps=2",
            "callbacks.generative_metrics.reference_num_images=8", "callbacks.generative_metrics.batch_size=8",
            f"callbacks.generative_metrics.cache_dir={cache}",
            "++callbacks.generative_metrics.options.fid.method=eigvals"], vp_dir))
    finally:
        finish_logging()
    records = [_evaluate(ckpt, cache, s) for ckpt in (edm, vp["checkpoint"]) for s in ("heun", "euler")]
    other = _evaluate(edm, cache, "heun", "metrics.num_samples=5")
    return {"evaluated": records, "other": other, "vp_dir": vp_dir, "edm_dir": edm_dir,
            "cache": cache}


def test_records_carry_uncertainty_protocol_and_provenance(runs):
    record = read_record(runs["evaluated"][0]["path"])
    assert record["record_version"] == RECORD_VERSION and record["kind"] == "evaluate"
    fid = record["uncertainty"]["fid"]
    assert fid["min"] == record["metrics"]["fid"] == fid["mean"] and fid["n"] == 1 and fid["spread"] == 0
    samples = record["protocol"]["samples"]
    assert len(samples["reference_sha256"]) == 64 and samples["extractor"].startswith("inception-v3-compat-pool3@")
    assert samples["labels"] is None  # an unconditional model
    prov = record["provenance"]
    assert len(prov["git_commit"]) == 40 and isinstance(prov["git_dirty"], bool) and prov["wall_time_s"] > 0
    assert prov["packages"]["torch"] and prov["config_hash"] and prov["hardware"]["cpu_count"] >= 1
    assert prov["command"].startswith("lightning-diff evaluate ") and "sampler=heun" in prov["command"]
    assert record["run"]["formulation"] == "EDM" and record["run"]["training_images"] == 3 * 16


def test_training_callback_record_is_in_the_offline_wandb_run(runs):
    """The VP run's fit-end FID: a record of the same shape beside its checkpoints and in its W&B summary."""
    disk = read_record(next((runs["vp_dir"] / "checkpoints").glob("eval-train-generative_metrics-step3.json")))
    assert disk["kind"] == "training" and disk["run"]["training_images"] == 48 and "fid" in disk["uncertainty"]
    wandb_file = sorted(runs["vp_dir"].glob("wandb/offline-run-*/run-*.wandb"))[0]  # the training (then evaluate)
    summary = {}
    for record in read_wandb_records(wandb_file):
        if record.WhichOneof("record_type") == "summary":
            summary.update({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.summary.update})
    payload = summary["records/generative_metrics"]
    assert payload["metrics"] == disk["metrics"] and payload["protocol"] == disk["protocol"]
    assert payload["provenance"]["config_hash"] == disk["provenance"]["config_hash"]
    logged = [*summary, *wandb_run_summary(wandb_file)["history"]]
    assert any(k.startswith("records/generative_metrics_table") for k in logged)  # the W&B Table


def test_evaluate_adds_its_record_to_the_wandb_run_that_trained_the_checkpoint(runs):
    """``lightning-diff evaluate`` (``wandb=auto``): the VP run's evaluations land in its own W&B run (same id, a new
    offline folder each) as summary ``records/evaluate-<file>``; the CSV-logged EDM run gets no W&B run."""
    files = sorted(runs["vp_dir"].glob("wandb/offline-run-*/run-*.wandb"))
    assert len({wandb_run_summary(f)["id"] for f in files}) == 1 and len(files) >= 3  # training + 2 evaluations
    summary = {}
    for wandb_file in files:
        for record in read_wandb_records(wandb_file):
            if record.WhichOneof("record_type") == "summary":
                summary.update({i.key or "/".join(i.nested_key): json.loads(i.value_json)
                                for i in record.summary.update})
    evaluated = [r for r in runs["evaluated"] if r["run"]["formulation"] == "VP"]
    assert evaluated
    for disk in evaluated:
        payload = summary[f"records/evaluate-{Path(disk['path']).stem}"]
        assert payload["metrics"] == disk["metrics"] and payload["kind"] == "evaluate"
        assert payload["provenance"]["config_hash"] == disk["provenance"]["config_hash"]
    assert not (runs["edm_dir"] / "wandb").exists()


@pytest.fixture(scope="module")
def board(runs):
    skipped = []
    records, sweeps = collect([str(runs["edm_dir"]), str(runs["vp_dir"])], skipped)
    return build(records, "fid", skipped=skipped, sweeps=sweeps)


def test_ranking_and_protocol_groups(board, runs):
    evaluated = {r["path"]: r["metrics"]["fid"] for r in runs["evaluated"]}
    main, other = board.groups[0], board.groups[1]
    assert len(board.groups) == 2 and board.differing == ["num_images"]
    assert {r["source"] for r in main.rows} >= set(evaluated) and len(main.rows) == 5  # + the training record
    values = [r["value"] for r in main.rows]
    assert values == sorted(values) and [r["rank"] for r in main.rows] == [1, 2, 3, 4, 5]
    for row in main.rows:
        if row["source"] in evaluated:
            assert row["value"] == evaluated[row["source"]]
    assert [r["source"] for r in other.rows] == [runs["other"]["path"]] and other.protocol["num_images"] == 5
    assert {r["formulation"] for r in main.rows} == {"EDM", "VP"} and {r["sampler"] for r in main.rows} == {
        "heun", "euler"}
    # The sampler's options tell rows of one sampler apart (configs/sampler/heun.yaml's churn settings)
    assert {r["options"] for r in main.rows if r["sampler"] == "heun" and r["source"] in evaluated} == {
        "S_churn=0, S_noise=1, S_tmax=inf, S_tmin=0"}
    assert "| heun | S_churn=0, S_noise=1, S_tmax=inf, S_tmin=0 |" in to_markdown(board)
    assert board.skipped == []


def test_bits_per_dim_ranks_lowest_first_and_groups_by_its_own_protocol(runs):
    """metric=bpd: the likelihood section's protocol (split, images, dequantization, offset) groups the rows, not
    the sampling one; a record without bpd (the FID ones) is not a row."""
    bpd = ["metrics=[fid,bpd]", "metrics.bpd.rtol=1e-2", "metrics.bpd.atol=1e-2", "metrics.bpd.batch_size=2"]
    checkpoints = sorted({r["run"]["checkpoint"] for r in runs["evaluated"]})  # the EDM and the VP run
    records = [_evaluate(ckpt, runs["cache"], "heun", *bpd, f"metrics.bpd.num_images={n}", f"name=bpd{n}")
               for ckpt in checkpoints for n in (2, 3)]
    for record in records:  # out of the shared runs' folders: the other tests count their records
        Path(record["path"]).unlink()
    board = build([*records, *runs["evaluated"]], "bpd")
    assert [[row["source"] for row in group.rows] for group in board.groups] == [
        [r["path"] for r in sorted(records[n::2], key=lambda r: r["metrics"]["bpd"])] for n in (0, 1)]
    assert [group.protocol["num_images"] for group in board.groups] == [2, 3] and board.differing == ["num_images"]
    assert {group.protocol["split"] for group in board.groups} == {"val"}  # digits have no test split: val, named


def test_published_row_and_reproduces(runs):
    records = [read_record(r["path"]) for r in runs["evaluated"]]
    best = min(records, key=lambda r: r["metrics"]["fid"])
    reference = best["protocol"]["samples"]["reference"].split("-inception")[0]
    entry = {"id": "paper", "paper": "A paper", "citation": "Doe 2026", "table": "Table 1",
             "metrics": {"fid": best["metrics"]["fid"] + 0.5}, "tolerance": {"fid": 1.0},
             "protocol": {"reference": reference, "extractor": "inception-v3-compat-pool3", "num_images": 4,
                          "seed_sets": 1, "sampler": "heun"}}
    elsewhere = {**entry, "id": "other", "protocol": {**entry["protocol"], "num_images": 50000}}
    board = build(records, "fid", published=[entry, elsewhere])
    main = board.groups[0]
    published = [r for r in main.rows if r["kind"] == "published"]
    assert [r["name"] for r in published] == ["paper"] and published[0]["rank"] is None
    for row in main.rows:
        if row["kind"] != "published":
            within = abs(row["value"] - entry["metrics"]["fid"]) <= 1.0 and row["sampler"] == "heun"
            assert row["reproduces"] == ("paper" if within else "")
    assert any(r["reproduces"] == "paper" for r in main.rows)
    assert [r["name"] for r in board.groups[1].rows] == ["other"]  # another protocol: its own group


def test_outputs_html_every_row_csv_round_trip_and_the_real_published_file(board, runs, tmp_path):
    cfg = compose_config("leaderboard", [f"runs=[{runs['edm_dir']},{runs['vp_dir']}]", f"out={tmp_path}"])
    result = leaderboard(cfg)
    paths = result["paths"]
    page = paths["html"].read_text()
    rows = csv_rows(result["board"])
    assert page.count("<tr>") + page.count("<tr class='published'>") == len(rows) + len(result["board"].groups)
    for row in rows:
        assert row["name"] in page and (row["kind"] == "published" or row["source"] in page)
    # Pareto figures where a group's rows take >= 2 values of the axis: our group of 5 rows (NFE 2 and 3), fid vs NFE;
    # none vs training images (all 48), none for EDM's CIFAR-10 figures (all NFE 35) or the one-row group
    assert page.count("data:image/png;base64,") == 1
    assert "http" not in page.replace("https://", "").split("<body>")[0]  # self-contained: nothing fetched
    read = list(csv.DictReader(paths["csv"].open()))
    assert list(read[0]) == CSV_COLUMNS and len(read) == len(rows)
    for back, row in zip(read, rows, strict=True):
        for column in CSV_COLUMNS:
            value = row[column]
            assert back[column] == ("" if value is None else str(value))
            if isinstance(value, float):
                assert float(back[column]) == value
    published = [r for r in rows if r["kind"] == "published"]
    assert {"edm_cifar10_uncond_vp", "ddpm_cifar10", "dit_xl2_imagenet256"} <= {r["name"] for r in published}
    markdown = paths["md"].read_text()
    assert "| published | edm_cifar10_uncond_vp |" in markdown and "Karras" in markdown


def test_bad_inputs_are_skipped_by_name_and_the_rest_renders(runs, tmp_path):
    good = json.loads(Path(runs["evaluated"][0]["path"]).read_text())
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "eval-corrupt.json").write_text('{"record_version": 2, "metr')
    (bad / "eval-partial.json").write_text(json.dumps({k: v for k, v in good.items() if k != "provenance"}))
    (bad / "eval-old.json").write_text(json.dumps({**good, "record_version": 1}))
    (bad / "eval-again.json").write_text(json.dumps(good))  # a second record of the same run and settings
    other_stats = json.loads(json.dumps(good))
    other_stats["protocol"]["samples"]["reference_sha256"] = "0" * 64
    other_stats["provenance"]["config_hash"] = "elsewhere"
    (bad / "eval-otherstats.json").write_text(json.dumps(other_stats))
    # Other statistics of the same reference set in another extractor's features compare in their own group.
    other_features = json.loads(json.dumps(other_stats))
    other_features["protocol"]["samples"]["extractor"] = "small_classifier_digits@0123456789ab"
    other_features["provenance"]["config_hash"] = "features"
    (bad / "eval-otherfeatures.json").write_text(json.dumps(other_features))
    (tmp_path / "empty").mkdir()
    skipped = []
    records, _ = collect([str(runs["edm_dir"]), str(bad), str(tmp_path / "empty"), str(tmp_path / "missing")],
                         skipped)
    board = build(records, "fid", skipped=skipped)
    reasons = dict(board.skipped)
    assert set(reasons) == {str(bad / f"eval-{n}.json") for n in ("corrupt", "partial", "old", "again", "otherstats")
                            } | {str(tmp_path / "empty"), str(tmp_path / "missing")}
    assert "not a readable JSON" in reasons[str(bad / "eval-corrupt.json")]
    assert "partial record, missing ['provenance']" in reasons[str(bad / "eval-partial.json")]
    assert "record_version=1" in reasons[str(bad / "eval-old.json")]
    assert "second record of the same run" in reasons[str(bad / "eval-again.json")]
    assert "other reference statistics" in reasons[str(bad / "eval-otherstats.json")]
    assert sum(len(g.rows) for g in board.groups) == 4  # the EDM run's own three records and other_features
    assert [r["source"] for g in board.groups for r in g.rows if g.protocol["extractor"].startswith("small")] == [
        str(bad / "eval-otherfeatures.json")]
    paths = write_outputs(board, tmp_path / "out", with_figures=False)
    page = paths["html"].read_text()
    assert all(name in page for name in reasons) and "eval-corrupt.json" in paths["md"].read_text()


def test_sweep_folder_has_swept_params_best_job_and_rerun_command(runs, tmp_path):
    """A Hydra multirun folder (Optuna's results file included): jobs 0 and 1 with their overrides and records."""
    sweep = tmp_path / "multirun"
    for job, (lr, record) in enumerate(zip(("0.001", "0.002"), runs["evaluated"][:2], strict=True)):
        folder = sweep / str(job)
        (folder / ".hydra").mkdir(parents=True)
        (folder / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(["data=digits", f"optimizer.lr={lr}"]))
        data = json.loads(Path(record["path"]).read_text())
        data["run"] = {**data["run"], "dir": str(folder), "checkpoint": str(folder / "last.ckpt")}
        (folder / "eval-a.json").write_text(json.dumps(data))
    (sweep / "optimization_results.yaml").write_text(yaml.safe_dump({"name": "optuna", "best_params": {
        "optimizer.lr": 0.001}, "best_value": 1.0}))
    skipped = []
    records, sweeps = collect([str(sweep)], skipped)
    board = build(records, "fid", skipped=skipped, sweeps=sweeps)
    table = board.sweeps[0]
    assert table["params"] == ["optimizer.lr"] and [r["optimizer.lr"] for r in table["rows"]] == ["0.001", "0.002"]
    values = [r["value"] for r in table["rows"]]
    assert values == [runs["evaluated"][0]["metrics"]["fid"], runs["evaluated"][1]["metrics"]["fid"]]
    best = table["rows"][values.index(min(values))]
    assert table["best"] == best
    assert best["command"] == f"lightning-diff train data=digits optimizer.lr={best['optimizer.lr']}"
    assert "Best: job" in write_outputs(board, tmp_path / "out", with_figures=False)["md"].read_text()


class _FakeRun:
    def __init__(self, run_id, summary, config):
        self.path, self.summary, self.config = ["me", "proj", run_id], summary, config


class _FakeApi:
    """The two calls of ``wandb.Api`` the leaderboard makes: ``runs(path)`` and ``sweep(path).runs``."""

    def __init__(self, runs):
        self._runs = runs

    def runs(self, path):
        assert path == "me/proj"
        return self._runs

    def sweep(self, path):
        assert path == "me/proj/abc"
        return type("Sweep", (), {"runs": self._runs, "config": {"parameters": {"optimizer.lr": {}}}})()


def test_wandb_projects_and_sweeps_through_the_public_api(runs):
    record = {k: v for k, v in json.loads(Path(runs["evaluated"][0]["path"]).read_text()).items()}
    api = _FakeApi([_FakeRun("r1", {"records/evaluate": record}, {"optimizer": {"lr": 0.001}}),
                    _FakeRun("r2", {"loss": 1.0}, {"optimizer": {"lr": 0.002}})])
    skipped = []
    records, sweeps = collect_wandb(["me/proj", "me/proj/sweeps/abc"], api, skipped)
    assert [r["path"] for r in records] == ["wandb:me/proj/r1/records/evaluate"] * 2
    assert [name for name, _ in skipped] == ["wandb:me/proj/r2"] * 2
    board = build(records, "fid", skipped=skipped, sweeps=sweeps)
    assert len(board.groups[0].rows) == 1  # the project and the sweep hold the same record: counted once
    assert "second record" in board.skipped[-1][1]
    assert [r["optimizer.lr"] for r in board.sweeps[0]["rows"]] == [0.001, 0.002]
    assert board.sweeps[0]["rows"][0]["value"] == record["metrics"]["fid"]


def test_cli_writes_the_three_files(runs, tmp_path, monkeypatch, capsys):
    """``lightning-diff leaderboard ...`` through the console script's ``main`` (in-process: no second import)."""
    from lightning_diff.cli import main

    monkeypatch.setattr(sys, "argv", ["lightning-diff"])
    main(["leaderboard", f"runs=[{runs['edm_dir']}]", f"out={tmp_path}", "~leaderboard", "figures=false"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["leaderboard.csv", "leaderboard.html", "leaderboard.md"]
    assert "# Leaderboard: fid (lower is better)" in capsys.readouterr().out


def test_bad_settings_are_named():
    with pytest.raises(ValueError, match="metric='loss' has no known direction"):
        build([], "loss")
    with pytest.raises(ValueError, match="direction='up' is invalid"):
        build([], "fid", direction="up")
    with pytest.raises(ValueError, match=r"runs=\[\] and wandb=\[\] name no input"):
        leaderboard(compose_config("leaderboard", []))


@pytest.mark.slow
def test_page_sorts_in_headless_chromium(runs, tmp_path):
    """Chromium (Debian package ``chromium``) loads the page inside a same-folder frame, clicks the value
    header of the first table twice (descending) through the DOM, and the frame's first row then holds the
    largest value; a screenshot of the sorted page is saved."""
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        pytest.skip("chromium is not installed (make install installs it where apt-get is available)")
    cfg = compose_config("leaderboard", [f"runs=[{runs['edm_dir']},{runs['vp_dir']}]", f"out={tmp_path}"])
    board = leaderboard(cfg)["board"]
    values = [r["value"] for r in board.groups[0].rows]
    probe = tmp_path / "probe.html"
    probe.write_text(
        "<html><body><iframe id='f' src='leaderboard.html' width='1200' height='700'></iframe><pre id='out'></pre>"
        "<script>document.getElementById('f').onload=()=>{const d=document.getElementById('f').contentDocument;"
        "const th=[...d.querySelectorAll('#group-1 th')].find(h=>h.textContent==='fid');th.click();th.click();"
        "document.getElementById('out').textContent='FIRST='+d.querySelector('#group-1 tbody tr').children["
        "[...th.parentNode.children].indexOf(th)].textContent;};</script></body></html>")
    flags = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--allow-file-access-from-files",
             "--virtual-time-budget=5000"]
    dom = subprocess.run([*flags, "--dump-dom", probe.as_uri()], capture_output=True, text=True, timeout=120)
    assert f"FIRST={max(values):.4g}" in dom.stdout, dom.stderr[-2000:]
    shot = tmp_path / "sorted.png"
    subprocess.run([*flags, f"--screenshot={shot}", "--window-size=1280,800", probe.as_uri()], capture_output=True,
                   timeout=120)
    assert shot.is_file() and shot.stat().st_size > 1000
