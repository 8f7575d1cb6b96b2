"""``lightning-diff evaluate``: the JSON beside the checkpoint holds the numbers and the protocol, the numbers
are those of the library on the very images the protocol names, the reference statistics are cached and
reused, bits/dim carries the data transform's offset, and the VLB refuses a non-ddpm model."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lightning_diff.cli.evaluate import evaluate
from lightning_diff.cli.train import train
from lightning_diff.data import EDM_PIXELS, DigitsDataModule, dequantize
from lightning_diff.data.transforms import to_uint8
from lightning_diff.evaluation import generate
from lightning_diff.evaluation.likelihood import log_likelihood
from lightning_diff.evaluation.metrics import compute_metrics, fid_helper_weights_path
from lightning_diff.sampling.settings import SamplerSettings
from lightning_diff.training.builders import load_module

from .helpers import compose_config

ODE = ["metrics.bpd.num_images=3", "metrics.bpd.batch_size=3", "metrics.bpd.rtol=1e-3", "metrics.bpd.atol=1e-3"]


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("ld_cache"))


def _evaluate_config(overrides):
    return compose_config("evaluate", overrides)


def _overrides(ckpt, cache_dir, *extra):
    return [f"ckpt={ckpt}", "sampler.steps=2", "device=cpu", "progress=false", "metrics.num_samples=4",
            "metrics.reference_num_images=8", "metrics.batch_size=8", f"metrics.cache_dir={cache_dir}", *extra]


@pytest.fixture(scope="module")
def first_run(digits_ckpt, cache_dir):
    cfg = _evaluate_config(_overrides(digits_ckpt, cache_dir, "metrics=[fid,bpd]", "metrics.fid.method=eigvals", *ODE))
    return evaluate(cfg)


def test_json_beside_the_checkpoint_holds_numbers_and_protocol(first_run, digits_ckpt):
    path = first_run["path"]
    assert path.startswith(str(Path(digits_ckpt).resolve().parent)) and "/eval-" in path
    record = json.loads(open(path).read())
    assert set(record["metrics"]) == {"fid", "bpd"}
    assert math.isfinite(record["metrics"]["fid"]) and record["metrics"]["fid"] > 0
    samples = record["protocol"]["samples"]
    assert samples["num_images"] == 4 and samples["seeds"] == "0-3" and samples["weights"] == "ema"
    assert samples["sampler"]["name"] == "heun" and samples["sampler"]["steps"] == 2 and samples["nfe"] == 3
    assert samples["reference"].startswith("digits-train.holdout0.1.seed0.first8-8px-inception-v3-compat-pool3")
    assert samples["extractor"].startswith("inception-v3-compat-pool3@")  # offline default: fid-helper weights
    assert samples["rounding"].startswith("edm") and samples["reference_cached"] is False
    assert record["protocol"]["weights"] == "ema"


def test_fid_is_the_library_fid_of_the_seeds_and_reference_named(first_run, digits_ckpt, cache_dir):
    """Recompute from scratch: sample seeds 0..3 with the recorded sampler, round, and score against the
    first 8 training images of the run's split, passed as images (no cache)."""
    module = load_module(digits_ckpt)
    heun = SamplerSettings(name="heun", steps=2, batch_size=4,
                           options={"S_churn": 0.0, "S_tmin": 0.0, "S_tmax": float("inf"), "S_noise": 1.0})
    samples, _, _ = generate(module, range(4), sampler=heun, progress=False)
    dm = DigitsDataModule(seed=0, val_fraction=0.1)
    dm.setup()
    reference = dm.train_set.source.tensors[0][:8]
    expected = compute_metrics(to_uint8(samples), reference, ("fid",), inception_weights=str(fid_helper_weights_path()),
                               cache_dir=cache_dir, device="cpu", fid_method="eigvals")["fid"]
    assert first_run["metrics"]["fid"] == pytest.approx(expected, rel=1e-6)


def test_bpd_has_the_offset_of_the_transform(first_run, digits_ckpt):
    """bpd = -log p(z) / (d ln 2) + log2(127.5) (EDM's x/127.5 - 1, not score_sde's 7), on the first 3
    held-out images (digits has no test split), dequantized with the generator of batch 0 (seed 0)."""
    protocol = first_run["protocol"]["bpd"]
    assert protocol["split"] == "val" and protocol["num_images"] == 3
    assert protocol["bpd_offset"] == pytest.approx(math.log2(127.5), abs=1e-12)
    module = load_module(digits_ckpt)
    dm = DigitsDataModule(seed=0, val_fraction=0.1)
    dm.setup()
    x_int = dm.val_set.source.tensors[0][:3]
    generator = torch.Generator().manual_seed(0)
    z = dequantize(x_int, generator, EDM_PIXELS, dtype=torch.float64)
    log_prob, _ = log_likelihood(module.denoiser, z, sigma_min=module.formulation.sigma_min,
                                 sigma_max=module.formulation.sigma_max, rtol=1e-3, atol=1e-3, generator=generator)
    expected = (-log_prob / (64 * math.log(2))).mean().item() + math.log2(127.5)
    assert first_run["metrics"]["bpd"] == pytest.approx(expected, rel=1e-9)


def test_vlb_refuses_a_non_ddpm_model(digits_ckpt, cache_dir):
    cfg = _evaluate_config(_overrides(digits_ckpt, cache_dir, "metrics=[fid,vlb]"))
    with pytest.raises(ValueError, match=r"formulation='edm'; allowed: ddpm"):
        evaluate(cfg)


def test_cli_second_run_reuses_the_cached_reference(first_run, digits_ckpt, cache_dir):
    cmd = [sys.executable, "-m", "lightning_diff.cli.evaluate", *_overrides(digits_ckpt, cache_dir, "metrics=[fid]",
                                                                        "metrics.fid.method=eigvals", "name=cli")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    record = json.loads(open(Path(digits_ckpt).parent / "eval-cli.json").read())
    assert record["protocol"]["samples"]["reference_cached"] is True
    # another process: oneDNN's channels_last Inception kernels may sum in another order (features to ~1e-7)
    assert record["metrics"]["fid"] == pytest.approx(first_run["metrics"]["fid"], rel=1e-6)
    assert proc.stdout.strip().splitlines()[-1].startswith("fid=") and "eval-cli.json" in proc.stdout


def test_vlb_of_a_ddpm_model_is_the_library_bound_on_the_split(tmp_path, cache_dir):
    from lightning_diff.evaluation.likelihood import vlb_bits_per_dim

    cfg = compose_config("train", ["logger=csv", "callbacks.progress=null", "++trainer.enable_progress_bar=false",
                                   "callbacks.sample_grid=null", "data=digits", "network.model_channels=8",
                                   "formulation=ddpm", "formulation.num_timesteps=100", "trainer.max_steps=2",
                                   "data.batch_size=16"], tmp_path)
    ckpt = train(cfg)["checkpoint"]
    record = evaluate(_evaluate_config(_overrides(ckpt, cache_dir, "metrics=[vlb]", "metrics.vlb.num_images=2")))
    assert record["protocol"]["vlb"]["split"] == "val" and record["protocol"]["vlb"]["nfe"] == 100
    module = load_module(ckpt)
    dm = DigitsDataModule(seed=0, val_fraction=0.1)
    dm.setup()
    expected, _ = vlb_bits_per_dim(module.denoiser, dm.val_set.source.tensors[0][:2], module.formulation,
                                   scale=1 / 127.5, offset=-1.0, generator=torch.Generator().manual_seed(0))
    assert math.isfinite(record["metrics"]["vlb_bpd"]) and record["metrics"]["vlb_bpd"] > 0
    assert record["metrics"]["vlb_bpd"] == pytest.approx(expected.mean().item(), rel=1e-9)


def test_kid_subset_larger_than_the_images_fails_before_any_work():
    """A KID subset larger than metrics.num_samples used to fail only after the reference statistics and all
    samples were computed (minutes); it is refused before ``module`` or the data are touched."""
    from lightning_diff.evaluation import sample_quality

    with pytest.raises(ValueError, match=r"metrics.kid.subset_size=1000 .*metrics.num_samples=256.*\[2, 256\]"):
        sample_quality(None, None, ["fid", "kid"], num_samples=256, weights="ema", sampler=None,
                       options={"kid": {"subset_size": 1000}})


def test_unknown_wandb_setting_is_refused_before_any_work():
    """``wandb=`` takes auto or false; anything else (``wandb=yes``) is an error naming the setting, not a silent
    'no W&B'."""
    cfg = _evaluate_config(["ckpt=/nonexistent.ckpt", "wandb=yes"])
    with pytest.raises(ValueError, match=r"wandb='yes' is invalid; allowed: auto .* or false"):
        evaluate(cfg)
