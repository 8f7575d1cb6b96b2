"""experiments/repro_guidance/run.py: the class accuracy counts the samples read as their asked class, on the
classifier's [-1, 1] input scale; the table puts each gamma in its row; slow: ``run.py --quick`` writes a
well-formed table, record and figure."""

import json

import pytest
import torch

from lightning_diff.evaluation.metrics.small_classifier import SmallClassifier

from .helpers import load_experiment, run_experiment_quick

run = load_experiment("repro_guidance")


def brightness_classifier() -> SmallClassifier:
    """A SmallClassifier that reads a constant image as class 1 when it is brighter than mid-grey (x > 0 on the
    [-1, 1] scale) and class 0 otherwise: every layer carries x as relu(x) - relu(-x) to feature 0 = 16 x."""
    model = SmallClassifier(num_classes=2)
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        model.conv1.weight[0, 0, 1, 1], model.conv1.weight[1, 0, 1, 1] = 1.0, -1.0  # relu(x), relu(-x)
        model.conv2.weight[0, 0, 1, 1], model.conv2.weight[0, 1, 1, 1] = 1.0, -1.0  # relu(relu(x) - relu(-x))
        model.conv2.weight[1, 0, 1, 1], model.conv2.weight[1, 1, 1, 1] = -1.0, 1.0  # relu(-(...))
        model.fc.weight[0, 0:16], model.fc.weight[0, 16:32] = 1.0, -1.0  # sum over the 4x4 pool of both signs
        model.head.weight[1, 0], model.head.weight[0, 0] = 1.0, -1.0
    return model.eval()


def test_class_accuracy_counts_the_samples_read_as_their_asked_class():
    classifier = brightness_classifier()
    images = torch.stack([torch.full((1, 8, 8), v, dtype=torch.uint8) for v in (0, 40, 200, 255)])
    # read as 0, 0, 1, 1: 200 and 255 lie above mid-grey 127.5 (the [-1, 1] scaling), 40 below it
    assert run.class_accuracy(classifier, images, torch.tensor([0, 0, 1, 1])) == 1.0
    assert run.class_accuracy(classifier, images, torch.tensor([0, 1, 1, 0])) == 0.5
    assert run.class_accuracy(classifier, images, torch.tensor([1, 1, 0, 0])) == 0.0
    with pytest.raises(ValueError, match="allowed: uint8"):
        run.class_accuracy(classifier, images.float(), torch.tensor([0, 0, 1, 1]))


def test_table_puts_each_gamma_in_its_row():
    rows = [{"gamma": g, "w": g - 1, "accuracy": 0.5, "fd": 10.0 * g, "kid": 1.0} for g in run.GAMMAS]
    rows[1]["fid"] = 7.0
    lines = run.table(rows).splitlines()
    assert lines[0] == "| gamma | w = gamma - 1 | class accuracy | FD | KID | Inception FID |"
    assert lines[2] == "| 0 | -1 | 0.5 | 0 | 1 |  |"
    assert lines[3] == "| 1 | 0 | 0.5 | 10 | 1 | 7 |"
    assert len(lines) == 2 + len(run.GAMMAS)


@pytest.mark.slow
def test_quick_run_writes_table_record_and_figure(tmp_path):
    run_experiment_quick("repro_guidance", "--out", str(tmp_path), timeout=900)
    record = json.loads((tmp_path / "results.json").read_text())
    assert [r["gamma"] for r in record["rows"]] == run.GAMMAS
    assert all(0 <= r["accuracy"] <= 1 and r["fd"] > 0 for r in record["rows"])
    assert [("fid" in r) for r in record["rows"]] == [g == run.INCEPTION_GAMMA for g in run.GAMMAS]
    table = (tmp_path / "table.md").read_text()
    assert "| 1 | 0 |" in table and "Inception FID" in table
    assert (tmp_path / "guidance.png").stat().st_size > 10_000
