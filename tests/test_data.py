"""Pixel transforms (exact round trips, EDM's PNG rounding, bits/dim offsets), the digits and toy2d
DataModules (shapes, ranges, held-out splits, determinism) and the loaders' epoch-wise shuffling."""

import math

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits

from lightning_diff.data import (
    CONTINUOUS,
    EDM_PIXELS,
    DataTransform,
    DigitsDataModule,
    Toy2DDataModule,
    bpd_offset,
    dequantize,
    from_uint8,
    to_uint8,
)
from lightning_diff.data.loading import EpochSampler, split_indices

ALL_PIXELS = torch.arange(256, dtype=torch.uint8)
SCORE_SDE_CENTRED = DataTransform(scale=1 / 128, offset=-1.0)  # score_sde: (x_int + u) / 256 * 2 - 1
SCORE_SDE_UNIT = DataTransform(scale=1 / 256, offset=0.0)  # score_sde uncentred: (x_int + u) / 256
TRANSFORMS, TRANSFORM_IDS = [EDM_PIXELS, SCORE_SDE_CENTRED, SCORE_SDE_UNIT], ["edm", "c128", "u256"]


# --- transforms -------------------------------------------------------------------------------------------
def test_edm_scaling_hits_the_ends_exactly():
    x = from_uint8(ALL_PIXELS)
    assert x.dtype == torch.float32
    assert x[0].item() == -1.0 and x[255].item() == 1.0
    torch.testing.assert_close(x.double(), ALL_PIXELS.double() / 127.5 - 1, rtol=0, atol=1e-7)


@pytest.mark.parametrize("transform", TRANSFORMS, ids=TRANSFORM_IDS)
def test_uint8_round_trip_is_exact(transform):
    assert torch.equal(to_uint8(from_uint8(ALL_PIXELS, transform), transform), ALL_PIXELS)


def test_to_uint8_is_edm_png_rounding():
    # NVlabs/edm generate.py: (x * 127.5 + 128).clip(0, 255).to(torch.uint8), on values in and out of range,
    # including exact half-way points between levels.
    g = torch.Generator().manual_seed(0)
    x = torch.cat([torch.randn(100_000, generator=g) * 0.7, (torch.arange(-2, 258) + 0.5) / 127.5 - 1])
    assert torch.equal(to_uint8(x), (x * 127.5 + 128).clip(0, 255).to(torch.uint8))
    # round to nearest: any perturbation below half a level keeps the level
    jitter = (torch.rand(256, generator=g) - 0.5) * 0.999 / 127.5
    assert torch.equal(to_uint8(from_uint8(ALL_PIXELS) + jitter), ALL_PIXELS)


@pytest.mark.parametrize(("transform", "offset"), [(EDM_PIXELS, math.log2(127.5)), (SCORE_SDE_CENTRED, 7.0),
                                                  (SCORE_SDE_UNIT, 8.0)], ids=TRANSFORM_IDS)
def test_bpd_offset_matches_math_6_9(transform, offset):
    assert bpd_offset(transform) == pytest.approx(offset, abs=1e-12)
    if transform is EDM_PIXELS:
        assert bpd_offset(transform) == pytest.approx(6.9944, abs=1e-4)


@pytest.mark.parametrize("transform", TRANSFORMS, ids=TRANSFORM_IDS)
def test_dequantization_fills_each_bin_and_offset_gives_exact_bits(transform):
    # Uniform 8-bit data has exactly 8 bits/dim. Dequantized, it is uniform on [offset, offset + 256 scale),
    # a density of 1 / (256 scale); -log2 of it plus bpd_offset must give back 8 bits.
    g = torch.Generator().manual_seed(1)
    x_int = ALL_PIXELS.repeat(200)
    z = dequantize(x_int, generator=g, transform=transform)
    assert z.dtype == torch.float32
    assert torch.equal(((z.double() - transform.offset) / transform.scale).floor().long(), x_int.long())
    u = (z.double() - transform.offset) / transform.scale - x_int.double()
    assert 0.45 < u.mean().item() < 0.55 and u.min() >= 0 and u.max() < 1
    assert math.log2(256 * transform.scale) + bpd_offset(transform) == pytest.approx(8.0, abs=1e-12)


def test_continuous_transform_refuses_pixel_operations():
    for fn in (from_uint8, to_uint8, dequantize, bpd_offset):
        args = () if fn is bpd_offset else (ALL_PIXELS,)
        with pytest.raises(ValueError, match="continuous"):
            fn(*args, transform=CONTINUOUS)


# --- digits -----------------------------------------------------------------------------------------------
def test_digits_attributes_before_setup():
    dm = DigitsDataModule(batch_size=16)
    assert (dm.name, dm.data_shape, dm.num_classes) == ("digits", (1, 8, 8), 10)
    assert dm.transform.scale == 1 / 127.5 and dm.transform.offset == -1 and dm.transform.bits == 8
    assert dm.transform.levels == 256 and dm.train_set is None


def test_digits_pixels_are_sklearn_values_times_255_over_16():
    dm = DigitsDataModule()
    dm.setup()
    x = dm.train_set.source.tensors[0]
    x_all = torch.cat([x, dm.val_set.source.tensors[0]])
    assert len(x_all) == 1797 and x.dtype == torch.uint8
    values, _ = load_digits(return_X_y=True)
    expected = np.floor(values * 255 / 16 + 0.5)  # 0 -> 0, 8 -> 128, 16 -> 255
    got = np.sort(x_all.reshape(1797, 64).numpy().astype(np.int64), axis=0)
    assert np.array_equal(got, np.sort(expected, axis=0).astype(np.int64))
    assert {0, 128, 255} <= set(np.unique(got).tolist())


def test_digits_batches_shapes_dtypes_range():
    dm = DigitsDataModule(batch_size=64)
    x, labels = next(iter(dm.train_dataloader()))
    assert x.shape == (64, 1, 8, 8) and x.dtype == torch.float32
    assert labels.shape == (64,) and labels.dtype == torch.long and labels.max() < 10
    assert x.min() >= -1 and x.max() <= 1
    levels = (x + 1) * 127.5
    torch.testing.assert_close(levels, levels.round(), rtol=0, atol=1e-4)  # on the 8-bit grid
    xv, lv = next(iter(dm.val_dataloader()))
    assert xv.shape == (64, 1, 8, 8) and lv.dtype == torch.long


def test_digits_split_is_stratified_disjoint_and_deterministic():
    def split(seed):
        dm = DigitsDataModule(seed=seed)
        dm.setup()
        return dm.train_set.source.tensors, dm.val_set.source.tensors

    (xt, yt), (xv, yv) = split(0)
    assert len(xt) == 1617 and len(xv) == 180
    assert torch.bincount(yv, minlength=10).min() >= 17 and torch.bincount(yv, minlength=10).max() <= 19
    train_idx, val_idx = split_indices(torch.arange(1797) % 10, 0.1, seed=0)
    assert set(train_idx.tolist()).isdisjoint(val_idx.tolist()) and len(train_idx) + len(val_idx) == 1797
    # the two sets partition all 1,797 images (as multisets of rows)
    all_rows = sorted(map(tuple, torch.cat([xt, xv]).reshape(1797, -1).tolist()))
    ref = DigitsDataModule().load("train").tensors[0].reshape(1797, -1)
    assert all_rows == sorted(map(tuple, ref.tolist()))
    (xt2, _), (xv2, yv2) = split(0)
    assert torch.equal(xv, xv2) and torch.equal(yv, yv2) and torch.equal(xt, xt2)
    (_, _), (xv3, _) = split(1)
    assert not torch.equal(xv, xv3)


def test_digits_val_fraction_zero_needs_test_split():
    with pytest.raises(ValueError, match="val_fraction=0"):
        DigitsDataModule(val_fraction=0)
    with pytest.raises(ValueError, match="val_fraction=1.5"):
        DigitsDataModule(val_fraction=1.5)
    with pytest.raises(ValueError, match="no test split"):
        DigitsDataModule().test_dataloader()


def test_hflip_appends_mirrored_copies():
    plain, flipped = DigitsDataModule(), DigitsDataModule(hflip=True)
    plain.setup(), flipped.setup()
    n = len(plain.train_set)
    assert len(flipped.train_set) == 2 * n
    x, label = flipped.train_set[3]
    xf, label_f = flipped.train_set[n + 3]
    assert torch.equal(xf, x.flip(-1)) and label == label_f and not torch.equal(x, xf)
    assert torch.equal(plain.train_set[3][0], x)
    assert len(flipped.val_set) == len(plain.val_set)  # only training data is augmented


def test_shuffle_order_depends_on_seed_and_epoch_only():
    def first_labels(dm, epoch):
        loader = dm.train_dataloader()
        loader.sampler.set_epoch(epoch)
        return next(iter(loader))[1]

    a, b = DigitsDataModule(batch_size=32), DigitsDataModule(batch_size=32)
    torch.manual_seed(123)  # the global RNG must not matter
    assert torch.equal(first_labels(a, 0), first_labels(b, 0))
    assert not torch.equal(first_labels(a, 0), first_labels(a, 1))
    sampler = EpochSampler(100, seed=5)
    sampler.set_epoch(3)
    assert sorted(sampler) == list(range(100)) and list(sampler) == list(EpochSampler(100, seed=8))


def test_worker_processes_give_the_same_batches():
    main = [b for b in DigitsDataModule(batch_size=256, hflip=True).train_dataloader()]
    workers = [b for b in DigitsDataModule(batch_size=256, hflip=True, num_workers=1).train_dataloader()]
    assert len(main) == len(workers) == math.ceil(2 * 1617 / 256)
    for (x0, y0), (x1, y1) in zip(main, workers, strict=True):
        assert torch.equal(x0, x1) and torch.equal(y0, y1)


# --- toy2d ------------------------------------------------------------------------------------------------
TOYS = ["gaussian_mixture", "two_moons", "swiss_roll", "checkerboard"]


@pytest.mark.parametrize("dataset", TOYS)
def test_toy2d_batches_and_determinism(dataset):
    dm = Toy2DDataModule(dataset, num_samples=1000, num_val_samples=300, batch_size=100, seed=3)
    assert dm.data_shape == (2,) and dm.name == "toy2d" and dm.transform.bits is None
    x, labels = next(iter(dm.train_dataloader()))
    assert x.shape == (100, 2) and x.dtype == torch.float32 and labels.dtype == torch.long
    assert labels.min() >= 0 and labels.max() < dm.num_classes
    assert x.abs().max() < 3 and 0.3 < x.std(0).min() < 1.5  # unit scale, as sigma_data = 0.5 expects
    dm.setup()
    again = Toy2DDataModule(dataset, num_samples=1000, num_val_samples=300, seed=3)
    again.setup()
    assert torch.equal(dm.train_set.x, again.train_set.x) and torch.equal(dm.val_set.x, again.val_set.x)
    other = Toy2DDataModule(dataset, num_samples=1000, num_val_samples=300, seed=4)
    other.setup()
    assert not torch.equal(dm.train_set.x, other.train_set.x)
    assert len(dm.val_set) == 300 and not torch.equal(dm.train_set.x[:300], dm.val_set.x)
    # the training set does not depend on the size of the held-out set
    bigger_val = Toy2DDataModule(dataset, num_samples=1000, num_val_samples=10, seed=3)
    bigger_val.setup()
    assert torch.equal(dm.train_set.x, bigger_val.train_set.x)


def test_toy2d_gaussian_mixture_matches_its_mixture():
    dm = Toy2DDataModule("gaussian_mixture", num_samples=20_000, seed=0)
    dm.setup()
    gm = dm.mixture
    assert dm.num_classes == 8 and gm.means.shape == (8, 2)
    x, labels = dm.train_set.x.double(), dm.train_set.labels
    # moments: mean 0, covariance (std^2 + radius^2 / 2) I = 0.51 I; standard errors ~0.005 and ~0.003
    torch.testing.assert_close(x.mean(0), gm.mean(), rtol=0, atol=0.02)
    torch.testing.assert_close(x.T.cov(), gm.covariance(), rtol=0, atol=0.02)
    # labels are the component each point was drawn from: distance to its mean is chi(2) * std
    dist = (x - gm.means[labels]).norm(dim=1) / gm.stds[labels]
    assert dist.pow(2).mean().item() == pytest.approx(2.0, abs=0.06)
    assert torch.bincount(labels, minlength=8).min() > 2300
    # mean log-likelihood of the data under the true mixture equals that of fresh mixture samples
    fresh = gm.sample(20_000, generator=torch.Generator().manual_seed(1))
    assert gm.log_prob(x).mean().item() == pytest.approx(gm.log_prob(fresh).mean().item(), abs=0.03)


def test_toy2d_checkerboard_fills_the_dark_squares():
    dm = Toy2DDataModule("checkerboard", num_samples=8000)
    dm.setup()
    cell = dm.train_set.x.floor().long()
    assert torch.all((cell[:, 0] + cell[:, 1]) % 2 == 0) and cell.min() >= -2 and cell.max() <= 1
    assert len({tuple(c) for c in cell.tolist()}) == 8


def test_toy2d_labels_of_moons_and_bad_settings():
    dm = Toy2DDataModule("two_moons", num_samples=2000)
    dm.setup()
    assert dm.num_classes == 2 and set(dm.train_set.labels.tolist()) == {0, 1} and dm.mixture is None
    with pytest.raises(ValueError, match="dataset='spiral'.*allowed: gaussian_mixture, two_moons"):
        Toy2DDataModule("spiral")
    with pytest.raises(ValueError, match="num_samples=0"):
        Toy2DDataModule(num_samples=0)
    with pytest.raises(ValueError, match="batch_size=0"):
        Toy2DDataModule(batch_size=0).train_dataloader()


def test_lightning_sets_the_epoch_of_the_shuffling_order():
    import pytorch_lightning as pl

    class FirstBatches(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.zeros(()))
            self.first = []

        def training_step(self, batch, batch_idx):
            x, labels = batch
            self.first.append(labels.clone())
            return (self.weight * x).sum()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.0)

    model, dm = FirstBatches(), DigitsDataModule(batch_size=32, seed=7)
    trainer = pl.Trainer(max_epochs=3, limit_train_batches=1, limit_val_batches=0, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         accelerator="cpu")
    trainer.fit(model, datamodule=dm)
    dm.setup()
    expected = [dm.train_set.__getitems__(list(EpochSampler(1617, seed=7 + e))[:32])[1] for e in range(3)]
    assert len(model.first) == 3
    for got, want in zip(model.first, expected, strict=True):
        assert torch.equal(got, want)
