"""Are the demo's samples recognisable digits? A classifier trained on the real digits says.

Fits an RBF-SVM (with calibrated probabilities) on scikit-learn's digits (the same 0..255 pixels the demo trains on), reports its
held-out accuracy, then classifies the generated images of ``samples.npz`` and prints the share it
labels with confidence >= 0.9, the class histogram, and the same numbers for pure-noise images as a
floor. Usage: ``python experiments/edm_digits/check_digits.py outputs/train/edm_digits/<time>/samples.npz``
(without an argument: the newest demo run).
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
from sklearn.calibration import CalibratedClassifierCV
from sklearn.model_selection import train_test_split
from sklearn.svm import SVC

from lightning_diff.data.digits import digits_uint8


def classify(images: np.ndarray, classifier) -> tuple[np.ndarray, np.ndarray]:
    """``[N, 1, 8, 8]`` uint8 -> (predicted class [N], its probability [N])."""
    probs = classifier.predict_proba(images.reshape(len(images), -1) / 255.0)
    return probs.argmax(1), probs.max(1)


def main(path: str | None = None) -> dict:
    if path is None:
        runs = sorted(Path("outputs/train/edm_digits").glob("*/samples.npz"))
        if not runs:
            sys.exit("no demo run found under outputs/train/edm_digits; run `make demo` first")
        path = str(runs[-1])
    x_int, labels = digits_uint8()
    x = x_int.numpy().reshape(len(x_int), -1) / 255.0
    x_tr, x_te, y_tr, y_te = train_test_split(x, labels.numpy(), test_size=0.2, random_state=0, stratify=labels)
    classifier = CalibratedClassifierCV(SVC(random_state=0), ensemble=False).fit(x_tr, y_tr)
    accuracy = classifier.score(x_te, y_te)
    images = np.load(path)["images"]
    pred, conf = classify(images, classifier)
    noise = np.random.default_rng(0).integers(0, 256, images.shape, dtype=np.uint8)
    _, noise_conf = classify(noise, classifier)
    result = {
        "classifier_test_accuracy": float(accuracy),
        "confident_share": float((conf >= 0.9).mean()),
        "mean_confidence": float(conf.mean()),
        "noise_confident_share": float((noise_conf >= 0.9).mean()),
        "classes": np.bincount(pred, minlength=10).tolist(),
    }
    print(f"digit check of {path}: an SVM with {accuracy:.1%} held-out accuracy on real digits labels "
          f"{result['confident_share']:.0%} of the {len(images)} samples with confidence >= 0.9 "
          f"(mean {result['mean_confidence']:.2f}; uniform noise: {result['noise_confident_share']:.0%}); "
          f"samples per class 0-9: {result['classes']}")
    return result


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else None)
