"""``lightning-diff sample``: loads a trained checkpoint, writes uint8 images, and per-sample seeds make
the images independent of the batch size."""

import subprocess
import sys

import numpy as np
import torch

from lightning_diff.evaluation import generate
from lightning_diff.sampling.settings import SamplerSettings
from lightning_diff.training.builders import load_module


def test_same_seed_same_images_whatever_the_batch_size(digits_ckpt):
    module = load_module(digits_ckpt)

    def heun3(batch_size):
        return SamplerSettings(name="heun", steps=3, batch_size=batch_size)

    a, _, stats = generate(module, range(5, 11), sampler=heun3(6), progress=False)
    b, _, _ = generate(module, range(5, 11), sampler=heun3(4), progress=False)
    c, _, _ = generate(module, range(6, 11), sampler=heun3(5), progress=False)
    torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    torch.testing.assert_close(a[1:], c, rtol=0, atol=1e-6)
    assert stats["nfe"] == 2 * 3 - 1  # Heun: 2N - 1 evaluations (EDM Algorithm 1)


def test_cli_writes_npz_and_grid(digits_ckpt, tmp_path):
    out = tmp_path / "samples"
    cmd = [sys.executable, "-m", "lightning_diff.cli.sample", f"ckpt={digits_ckpt}", "num_samples=6", "sampler=ddim",
           "sampler.steps=4", "seed=3", f"out={out}", "sampler.batch_size=4"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "NFE: 4" in proc.stdout and "images/s" in proc.stdout
    images = np.load(out / "samples.npz")["images"]
    assert images.dtype == np.uint8 and images.shape == (6, 1, 8, 8)
    assert (out / "samples.png").exists()
