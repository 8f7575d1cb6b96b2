"""Are the demo's samples recognisable digits? Two checks against the real digits.

1. Realism: the distance from each sample to its nearest real training digit, compared with the same
   distance for real held-out digits. A sample "looks like data" when it is at most as far from the
   training set as 95% of held-out real digits are. Uniform noise is the floor (0%).
2. Identity: an RBF-SVM trained on the real digits (its held-out accuracy is printed) labels every sample;
   the class histogram shows whether all ten digits appear.

Usage: ``python experiments/edm_digits/check_digits.py [outputs/train/<experiment>/<time>/samples.npz]``
(without an argument: the newest demo run, ``outputs/train/edm_digits_fast``).
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from sklearn.neighbors import NearestNeighbors
from sklearn.svm import SVC


def real_digits() -> tuple[np.ndarray, np.ndarray]:
    """The 1,797 real digits as ``(float64 [1797, 64] in [0, 1], int [1797])``: scikit-learn's intensities 0..16 in
    the training data's 8-bit pixels (``lightning_diff.data.digits.digits_uint8``: ``floor(v * 255 / 16 + 1/2)``,
    exact in float64; tests/test_check_digits.py checks the two agree), computed here with numpy alone so that the
    check does not import torch and Lightning (4-5 s of every ``make demo``)."""
    values, labels = load_digits(return_X_y=True)
    return np.floor(values * 255 / 16 + 0.5) / 255.0, labels


def main(path: str | None = None) -> dict:
    if path is None:
        runs = sorted(Path("outputs/train/edm_digits_fast").glob("*/samples.npz"))
        if not runs:
            sys.exit("no demo run found under outputs/train/edm_digits_fast; run `make demo` first")
        path = str(runs[-1])
    x, labels = real_digits()
    x_tr, x_te, y_tr, y_te = train_test_split(x, labels, test_size=0.2, random_state=0, stratify=labels)
    samples = np.load(path)["images"].reshape(-1, 64) / 255.0
    noise = np.random.default_rng(0).random(samples.shape)

    neighbours = NearestNeighbors(n_neighbors=1).fit(x_tr)
    threshold = np.quantile(neighbours.kneighbors(x_te)[0][:, 0], 0.95)
    realistic = lambda imgs: float((neighbours.kneighbors(imgs)[0][:, 0] <= threshold).mean())

    classifier = SVC(random_state=0).fit(x_tr, y_tr)
    result = {
        "realistic_share": realistic(samples),
        "noise_realistic_share": realistic(noise),
        "classifier_test_accuracy": float(classifier.score(x_te, y_te)),
        "classes": np.bincount(classifier.predict(samples), minlength=10).tolist(),
    }
    print(f"digit check of {path}: {result['realistic_share']:.0%} of the {len(samples)} samples are as close to "
          f"the real digits as 95% of held-out real digits (uniform noise: {result['noise_realistic_share']:.0%}); "
          f"an SVM with {result['classifier_test_accuracy']:.1%} held-out accuracy sees classes 0-9 "
          f"{result['classes']} times")
    return result


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else None)
