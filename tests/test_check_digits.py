"""experiments/edm_digits/check_digits.py (make demo's check) reads the real digits with numpy alone: its pixels must
be the training data's (lightning_diff.data.digits.digits_uint8), or its realism threshold would judge samples
against other images."""

import numpy as np

from lightning_diff.data.digits import digits_uint8

from .helpers import ROOT, load_script


def _check_digits():
    return load_script(ROOT / "experiments" / "edm_digits" / "check_digits.py", "check_digits")


def test_the_check_reads_the_training_pixels():
    x, labels = _check_digits().real_digits()
    x_int, expected_labels = digits_uint8()
    assert np.array_equal(x * 255, x_int.numpy().reshape(len(x_int), -1).astype(np.float64))
    assert np.array_equal(labels, expected_labels.numpy())


def test_the_check_scores_real_digits_as_real_and_noise_as_not(tmp_path):
    """Held-out real digits pass at its 95% threshold by construction; the training digits all pass (distance 0);
    uniform noise never does (the floor the check prints)."""
    x_int, _ = digits_uint8()
    np.savez(tmp_path / "samples.npz", images=x_int.numpy())
    result = _check_digits().main(str(tmp_path / "samples.npz"))
    assert result["realistic_share"] > 0.95 and result["noise_realistic_share"] == 0.0
    assert min(result["classes"]) > 150 and result["classifier_test_accuracy"] > 0.95
