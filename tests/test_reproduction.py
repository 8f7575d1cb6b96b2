"""The reproductions' shared harness (``lightning_diff.cli.reproduction``): a training run is reused only when its
overrides are the same, and every quality evaluation is a leaderboard record, replaced (not duplicated) on a rerun."""

import json

import pytest
import torch
from threadpoolctl import threadpool_info, threadpool_limits

from lightning_diff.cli.reproduction import argument_parser, markdown_table, quality, trained
from lightning_diff.evaluation.leaderboard import build, collect
from lightning_diff.evaluation.records import read_record

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = ["data=digits", "network.model_channels=8", "data.batch_size=16", "trainer.max_steps=2"]


def test_trained_runs_are_reused_by_their_overrides_and_evaluations_are_records(tmp_path, capsys):
    module, datamodule = trained("tiny", TINY, tmp_path)
    ckpt = tmp_path / "tiny" / "checkpoints" / "last.ckpt"
    written = ckpt.stat().st_mtime_ns
    trained("tiny", TINY, tmp_path)
    assert ckpt.stat().st_mtime_ns == written  # same overrides: the finished run is reused
    capsys.readouterr()
    trained("tiny", [*TINY[:-1], "trainer.max_steps=3"], tmp_path)
    assert "training " + str(tmp_path / "tiny") + " again from scratch: its overrides were" in capsys.readouterr().out
    assert json.loads((tmp_path / "tiny" / "overrides.json").read_text())["overrides"][-1] == "trainer.max_steps=3"

    module, datamodule = trained("tiny", TINY, tmp_path)
    sampler = {"name": "euler", "steps": 2}
    first = quality(module, datamodule, sampler, num_samples=8)
    again = quality(module, datamodule, sampler, num_samples=8)
    assert first == again and first["nfe"] == 2 and first["fd"] > 0
    records = sorted((tmp_path / "tiny" / "checkpoints").glob("eval-*.json"))
    assert len(records) == 1  # the rerun replaced its record
    record = read_record(records[0])
    assert record["metrics"]["fid"] == first["fd"] and record["run"]["name"] == f"{tmp_path.name}/tiny"
    assert record["protocol"]["samples"]["extractor"].startswith("small_classifier_digits")
    quality(module, datamodule, {"name": "euler", "steps": 3}, num_samples=8)
    skipped = []
    board = build(collect([str(tmp_path)], skipped)[0], "fid", skipped=skipped)
    assert [sorted(row["nfe"] for row in group.rows) for group in board.groups] == [[2, 3]] and not board.skipped


def test_a_preset_changed_under_the_same_overrides_is_trained_again(tmp_path, capsys, monkeypatch):
    """The cache key is the composed config, not only the override list: ``experiment=edm_digits`` after an edit of
    the preset's file is another model (before, the stale checkpoint was reused)."""
    from lightning_diff.cli import reproduction

    trained("tiny", TINY, tmp_path)
    ckpt = tmp_path / "tiny" / "checkpoints" / "last.ckpt"
    written = ckpt.stat().st_mtime_ns
    compose = reproduction.compose

    def edited_preset(overrides, config_name):  # as if the preset's file now said another learning rate
        cfg = compose(overrides, config_name)
        cfg.optimizer.lr = cfg.optimizer.lr * 2
        return cfg

    monkeypatch.setattr(reproduction, "compose", edited_preset)
    capsys.readouterr()
    trained("tiny", TINY, tmp_path)
    assert "again from scratch: its composed config differs" in capsys.readouterr().out
    assert ckpt.stat().st_mtime_ns != written


def test_markdown_table():
    table = markdown_table(["a", "b"], [[1, 0.123456], ["x", 2.0]])
    assert table == "| a | b |\n|---|---|\n| 1 | 0.1235 |\n| x | 2 |\n"


def test_command_line_pins_torch_and_blas_threads_and_refuses_zero(capsys):
    """``--threads`` (default 1, the committed tables' setting) limits torch's and every BLAS/OpenMP pool's threads
    as the command line is parsed: the numbers depend on the thread count."""
    before = torch.get_num_threads()
    try:
        with threadpool_limits(limits=None):  # restores the pools' limits on exit
            args = argument_parser("A reproduction.", "repro_x", models=True).parse_args(["--quick"])
            assert (args.out, args.models, args.quick, args.threads) == ("outputs/repro_x", "outputs/repro_models",
                                                                        True, 1)
            assert torch.get_num_threads() == 1 and {pool["num_threads"] for pool in threadpool_info()} == {1}
    finally:
        torch.set_num_threads(before)
    with pytest.raises(SystemExit):
        argument_parser("A reproduction.", "repro_x").parse_args(["--threads", "0"])
    assert "--threads=0 is invalid; allowed: an integer >= 1" in capsys.readouterr().err
